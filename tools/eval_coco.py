"""Score a COCO results file with pycocotools:
``python tools/eval_coco.py RESULTS.json ANNOTATIONS.json [--out metrics.json]``."""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["eval-coco", *sys.argv[1:]]))
