"""``python -m strands_dedup.cli``: the ``strands-dedup`` command."""

from ._commands import main

main()
