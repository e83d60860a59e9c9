"""``python -m strands_dedup.cli``: the ``strands-dedup`` command."""

from .commands import main

main()
