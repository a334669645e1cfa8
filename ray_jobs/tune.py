"""Ray job entry point: `ray job submit -- python ray_jobs/tune.py --config configs/NAME.yaml ...`.

Thin by design: the same code path as `otmel tune` (arguments are parsed in `otmel.cli`).
"""

import sys

from otmel.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))
