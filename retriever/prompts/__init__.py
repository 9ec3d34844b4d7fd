"""Prompts: clip-interrogator-style prompt building.

Takes images and label tables (cached indexes of artists, mediums, flavors, or your own lists), and
gives prompts: a base caption followed by the terms that bring it closest to the image.
"""
