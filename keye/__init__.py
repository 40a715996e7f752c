"""Keye toolkit: video front-end, Keye-VL / Kelix-style models, training stages, item embeddings."""

__version__ = "0.1.0"
