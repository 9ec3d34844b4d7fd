from retriever.cli import main

main()
