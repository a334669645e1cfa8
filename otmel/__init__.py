"""otmel: optimal-transport guided correlation assignment for multimodal entity linking."""

__version__ = "0.1.0"
