"""How much a loaded machine may add to a bound on wall-clock time in a test.

A bound such as "a crashed primary is taken over within one lease" keeps its meaning with a second
more (the alternative it rules out costs the wait timeout, or forever), while a machine whose cores
are shared (CI runners, pytest-xdist workers) delays a process by that much now and then.
``STRANDS_DEDUP_TEST_SLACK`` sets it (seconds).
"""

from __future__ import annotations

import os

SLACK = float(os.environ.get("STRANDS_DEDUP_TEST_SLACK", "1.0"))
