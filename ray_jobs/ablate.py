"""Ray job entry point: `ray job submit -- python ray_jobs/ablate.py --config configs/NAME.yaml ...`.

Thin by design: the same code path as `otmel ablate` (arguments are parsed in `otmel.cli`).
"""

import sys

from otmel.cli import main

if __name__ == "__main__":
    sys.exit(main(["ablate", *sys.argv[1:]]))
