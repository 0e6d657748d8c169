"""Training curves and iteration times from work dirs' logs:
``python tools/analyze_logs.py plot_curve WORK_DIR [WORK_DIR ...] --keys loss lr mIoU --out F.png
[--title T] [--legend L ...]`` and ``python tools/analyze_logs.py cal_train_time WORK_DIR``."""
import sys

from vitasks.cli import main

if __name__ == "__main__":
    sys.exit(main(["analyze-logs", *sys.argv[1:]]))
