"""Convert outside ViT weights to a vitasks checkpoint:
``python tools/convert_checkpoint.py {timm,hf,npz,mae,deit,detectron2,mmdet,mmseg} IN OUT
[--img-size N] [--num-classes K] [--drop-head] [--drop-final-norm]`` (see ``vitasks convert
--help``; the whole-model formats detectron2, mmdet and mmseg take no options)."""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
