"""vitasks: one Vision Transformer backbone, many vision tasks."""

__version__ = "0.1.0"
