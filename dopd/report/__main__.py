"""`python -m dopd.report ...`: the dopd-report command line (dopd.report.cli.main)."""

import sys

from dopd.report.cli import main

sys.exit(main())
