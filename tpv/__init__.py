"""tpv: task prompt vectors on a frozen language model (arXiv 2408.01119)."""

__version__ = "0.1.0"
