"""Models: naming and loading CLIP/CoCa models, and encoding texts and images with them.

Takes a model reference (open_clip name and tag, checkpoint file, `hf-hub:`, `local-dir:`, a bundled
toy model) and gives a `LoadedModel` with its fingerprint, an `Encoder` that turns texts and images
into normalised vectors, and safe image reading. `weights/` holds the bundled toy models and
`toyworld` renders the synthetic world they were trained on.
"""
