"""Search: the `Retriever` API that answers image and text queries from an index.

Takes an index directory and queries (images, texts), encodes them, and gives ranked hits; in
hybrid mode it merges retrieved and generated captions and reranks them by CLIP similarity.
"""
