"""Serve: the HTTP API and web page (FastAPI; `pip install caption-retriever[serve]`).

Takes loaded Retrievers and requests, and gives JSON answers with the same schema as `--json`,
behind limits on body size and pending work.
"""
