"""HTTP surfaces: the ASGI `IdempotencyMiddleware`, the retry-safe reverse-proxy `Gateway`, and
the ``httpx`` transports that key a call's outgoing requests (`IdempotentTransport`,
`IdempotentAsyncTransport`).

The middleware and the gateway take their options as one validated model (`HttpConfig`,
`GatewayConfig`) and run each keyed request through the deduplicator's public API, so they
are counted and traced like library calls. Needs the ``http`` extra for the gateway and the
transports (uvicorn, httpx).
"""

from ._gateway import Gateway, run_gateway
from ._middleware import KEYED, IdempotencyMiddleware, StoredResponse
from ._outgoing import (
    FENCE_HEADER,
    IdempotentAsyncTransport,
    IdempotentTransport,
    OutgoingConfig,
    effect_key,
)
from ._policy import GatewayConfig, HttpConfig

__all__ = [
    "FENCE_HEADER",
    "KEYED",
    "Gateway",
    "GatewayConfig",
    "HttpConfig",
    "IdempotencyMiddleware",
    "IdempotentAsyncTransport",
    "IdempotentTransport",
    "OutgoingConfig",
    "StoredResponse",
    "effect_key",
    "run_gateway",
]
