"""``python -m benchmarks``: strands-dedup against its peers and raw Redis (see compare.py)."""

import sys

from benchmarks.compare import main

sys.exit(main())
