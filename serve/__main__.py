"""`python -m serve [--store DIR] [--port 8000] ...`: the same as `tpv serve`."""

import sys

from serve.cli import main

sys.exit(main())
