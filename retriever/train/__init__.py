"""Train: fine-tuning CLIP and CoCa models on (image, caption) pairs.

Takes pair files and a starting model, and gives `local-dir:` model folders per epoch with
resumable state, plus the evaluation (R@1, exact match) reported along the way.
"""
