"""Write a small generated dataset in a standard layout: ``python tools/make_synthetic.py {cls,seg,det,video} OUT``."""
import sys

from vitasks.data.synthetic import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
