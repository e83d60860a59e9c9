"""The engine and the APIs over it: the asyncio `Deduplicator`, the blocking `SyncDeduplicator`,
streamed calls, the session guard, the renewer, what they report (`observe`) and their health
(`health`).

Every surface runs its calls through one `Engine` per deduplicator (and so per event loop): the
public names are re-exported from ``strands_dedup``.
"""
