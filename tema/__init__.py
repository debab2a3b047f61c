"""TEMA: a reproducible study of tag-enriched multi-attention for cross-domain sequential recommendation."""

__version__ = "0.1.0"
