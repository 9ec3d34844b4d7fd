"""Generate: writing new captions for images with a CoCa model.

Takes images and decoding options, and gives captions: CoCa steps with a KV cache, and the decoding
loops (greedy, sampling, beam search) that drive them.
"""
