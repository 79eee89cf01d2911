"""Layer-by-layer analysis of how multimodal LLMs fuse vision and language (VisiPruner toolkit)."""

__version__ = "0.1.0"
