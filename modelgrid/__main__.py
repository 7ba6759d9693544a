"""`python -m modelgrid ...` = the `modelgrid` command."""

import sys

from modelgrid.cli import main

sys.exit(main())
