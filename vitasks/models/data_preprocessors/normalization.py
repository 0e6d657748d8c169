"""Normalisation statistics shared by the data preprocessors."""

# ImageNet statistics in 0-255 RGB (torchvision's, which most checkpoints were trained with).
IMAGENET_MEAN = (123.675, 116.28, 103.53)
IMAGENET_STD = (58.395, 57.12, 57.375)
