"""The ``strands-dedup`` command line (`main`) and what it reads and repairs (`Inspector`)."""

from .admin import Inspector
from .commands import NAMESPACE_ENV, REDIS_URL_ENV, main
from .healthcheck import healthcheck

main.add_command(healthcheck)

__all__ = ["NAMESPACE_ENV", "REDIS_URL_ENV", "Inspector", "main"]
