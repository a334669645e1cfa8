"""`python -m otmel.cli ...`"""

import sys

from otmel.cli import main

sys.exit(main())
