"""Corpus: reading users' text files and training pairs.

Takes corpus files (txt, tsv, csv, parquet, jsonl), (image path, caption) pair files and COCO
annotations, and gives clean texts with metadata, validated pairs, and COCO as TSV; bad rows are
reported by file and line.
"""
