"""`python -m serve [--store DIR] [--port 8000] ...`: the same as `tpv serve`."""

import sys

from serve.app import main

sys.exit(main())
