"""Ray job entry point: `ray job submit -- python ray_jobs/train.py --config configs/NAME.yaml [k=v ...]`.

Thin by design: the same code path as `otmel train` (arguments are parsed in `otmel.cli`).
"""

import sys

from otmel.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
