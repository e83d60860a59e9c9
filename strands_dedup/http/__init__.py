"""HTTP surfaces: the ASGI `IdempotencyMiddleware` and the retry-safe reverse-proxy `Gateway`.

Both take their options as one validated model (`HttpConfig`, `GatewayConfig`) and run each keyed
request through the deduplicator's engine, so they are counted and traced like library calls.
Needs the ``http`` extra for the gateway (uvicorn, httpx).
"""

from .gateway import Gateway, run_gateway
from .middleware import KEYED, IdempotencyMiddleware, StoredResponse
from .policy import GatewayConfig, HttpConfig

__all__ = [
    "KEYED",
    "Gateway",
    "GatewayConfig",
    "HttpConfig",
    "IdempotencyMiddleware",
    "StoredResponse",
    "run_gateway",
]
