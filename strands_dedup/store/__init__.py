"""The Redis shell of the protocol: Lua scripts, the shared subscriber and client construction."""

from .connect import client_from_url
from .redis import HeldLeaseRef, RedisStore
from .subscriber import Subscriber, Watch

__all__ = ["HeldLeaseRef", "RedisStore", "Subscriber", "Watch", "client_from_url"]
