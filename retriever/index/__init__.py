"""Index: turning a corpus into a searchable FAISS index directory, and opening one.

Takes texts and a model, and gives a directory (FAISS index, texts.parquet, manifest.json) built in
resumable shards, with the ANN type chosen and tuned for the memory and recall asked for.
"""
