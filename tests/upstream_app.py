"""A slow fake agent service for gateway tests: ``python tests/upstream_app.py PORT WORK``."""

from __future__ import annotations

import sys

import uvicorn

from strands_dedup.http._demo import FakeAgent

if __name__ == "__main__":
    port, work = int(sys.argv[1]), float(sys.argv[2])
    uvicorn.run(FakeAgent(work), host="127.0.0.1", port=port, log_level="error")
