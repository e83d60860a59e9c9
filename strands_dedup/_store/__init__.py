"""The Redis shell of the protocol: Lua scripts, the shared subscriber and client construction."""

from .connect import client_from_url
from .redis import Client, HeldLeaseRef, RedisStore
from .subscriber import ShardedSubscriber, Subscriber, Watch

__all__ = [
    "Client",
    "HeldLeaseRef",
    "RedisStore",
    "ShardedSubscriber",
    "Subscriber",
    "Watch",
    "client_from_url",
]
