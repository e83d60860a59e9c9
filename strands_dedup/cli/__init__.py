"""The ``strands-dedup`` command line (`main`) and what it reads and repairs (`Inspector`)."""

from ._admin import Inspector
from ._commands import NAMESPACE_ENV, REDIS_URL_ENV, main
from ._healthcheck import healthcheck

main.add_command(healthcheck)

__all__ = ["NAMESPACE_ENV", "REDIS_URL_ENV", "Inspector", "main"]
