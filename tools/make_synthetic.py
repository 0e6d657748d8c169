"""Write a small generated dataset in a standard layout:
``python tools/make_synthetic.py {cls,seg,det,video} OUT [--seed N] [--style random|plain|photo]``
(every kind takes every style; ``photo``: shapes over crops of a photograph)."""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["make-synthetic", *sys.argv[1:]]))
