"""Example vitasks plugin: importing this package registers ``CosineClsHead`` in vitasks MODELS."""

from .cosine_head import CosineClsHead

__all__ = ["CosineClsHead"]
