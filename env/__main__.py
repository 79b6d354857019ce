"""`python -m env ...`: see env/cli.py for the manual."""

import sys

from env.cli import main

sys.exit(main())
