"""Hostile clients against one gateway process with its default limits, measured.

    python -m benchmarks.abuse [--redis-url URL] [--only readers,uploads,keys,bytes]

- readers: 110 connections ask for a 32 MiB response and never read; a client that reads sends
  a request every 0.5 s meanwhile: its latencies, and when the stalled ones were cut off.
- uploads: 40 uploads stop one byte short of the 10 MiB body limit: the gateway's RSS while
  they stall and after they are answered, and when they were answered.
- keys: one identity sends 10,000 requests with new keys: how many ran.
- bytes: one identity sends 200 requests whose 1,000,000-byte responses are retained: how many
  ran, and what Redis' used_memory grew by.

The upstream is tests/recording_upstream.py; Redis a throwaway redis-server unless given.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import socket
import statistics
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import redis

from benchmarks._common import ROOT, redis_for

sys.path.insert(0, str(ROOT / "tests"))
MiB = 1024 * 1024


def _rss(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def _refusals(port: int, reason: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("strands_dedup_http_refusals_total{") and f'reason="{reason}"' in line
    )


@contextlib.contextmanager
def _servers(redis_url: str) -> Iterator[tuple[int, int]]:
    """(gateway port, gateway pid), both processes stopped afterwards."""
    from servers import free_port, gateway_command, process

    up = free_port()
    upstream = [sys.executable, str(ROOT / "tests" / "recording_upstream.py"), str(up)]
    with process(upstream, f"http://127.0.0.1:{up}/seen"):
        port = free_port()
        namespace = f"abuse-{uuid.uuid4().hex[:8]}"
        args = gateway_command(f"http://127.0.0.1:{up}/api", redis_url, namespace, port)
        with process(args, f"http://127.0.0.1:{port}/healthz") as gateway:
            yield port, gateway.pid


def readers(port: int, pid: int, stalled: int = 110, seconds: float = 25) -> dict[str, Any]:
    socks = []
    started = time.monotonic()
    for _ in range(stalled):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", port))
        sock.sendall(
            f"POST /flood?size={32 * MiB} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        )
        socks.append(sock)
    latencies, statuses, all_cut = [], [], None
    peak = 0
    with httpx.Client(timeout=120) as http:
        while time.monotonic() - started < seconds:
            began = time.monotonic()
            statuses.append(http.post(f"http://127.0.0.1:{port}/echo").status_code)
            latencies.append(time.monotonic() - began)
            peak = max(peak, _rss(pid))
            if all_cut is None and _refusals(port, "send-timeout") >= stalled:
                all_cut = time.monotonic() - started
            time.sleep(max(0.0, 0.5 - (time.monotonic() - began)))  # the reading client's pace
    for sock in socks:
        sock.close()
    return {
        "stalled_readers": stalled,
        "reading_client_requests": len(statuses),
        "reading_client_statuses": {str(s): statuses.count(s) for s in set(statuses)},
        "reading_client_latency_median_s": round(statistics.median(latencies), 4),
        "reading_client_latency_max_s": round(max(latencies), 3),
        "all_stalled_cut_off_after_s": None if all_cut is None else round(all_cut, 1),
        "gateway_rss_peak_mib": round(peak / MiB, 1),
    }


def uploads(port: int, pid: int, count: int = 40, limit: int = 10 * MiB) -> dict[str, Any]:
    before = _rss(pid)
    socks = []
    started = time.monotonic()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=120)
        head = f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {limit}\r\n\r\n".encode()
        sock.sendall(head + b"x" * (limit - 1))
        socks.append(sock)
    held = _rss(pid)
    statuses, answered = [], []
    for sock in socks:
        data = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                data += chunk
        answered.append(time.monotonic() - started)
        statuses.append(int(data.split(b" ", 2)[1]) if data else 0)
        sock.close()
    after = _rss(pid)
    return {
        "stalled_uploads": count,
        "statuses": {str(s): statuses.count(s) for s in set(statuses)},
        "gateway_rss_before_mib": round(before / MiB, 1),
        "gateway_rss_stalled_mib": round(held / MiB, 1),
        "gateway_rss_after_mib": round(after / MiB, 1),
        "answered_after_s": [round(min(answered), 1), round(max(answered), 1)],
    }


def keys(port: int, count: int = 10_000) -> dict[str, Any]:
    statuses: list[int] = []
    started = time.monotonic()
    with httpx.Client(timeout=30) as http:
        for _ in range(count):
            headers = {"Authorization": "Bearer flood", "Idempotency-Key": uuid.uuid4().hex}
            statuses.append(http.post(f"http://127.0.0.1:{port}/echo", headers=headers).status_code)
    return {
        "requests": count,
        "statuses": {str(s): statuses.count(s) for s in set(statuses)},
        "elapsed_s": round(time.monotonic() - started, 1),
    }


def stored_bytes(port: int, redis_url: str, count: int = 200) -> dict[str, Any]:
    client = redis.Redis.from_url(redis_url)
    before = int(client.info("memory")["used_memory"])
    statuses: list[int] = []
    with httpx.Client(timeout=30) as http:
        for _ in range(count):
            headers = {"Authorization": "Bearer filler", "Idempotency-Key": uuid.uuid4().hex}
            url = f"http://127.0.0.1:{port}/big?size=1000000"
            statuses.append(http.post(url, headers=headers).status_code)
    grown = int(client.info("memory")["used_memory"]) - before
    client.close()
    return {
        "requests": count,
        "statuses": {str(s): statuses.count(s) for s in set(statuses)},
        "redis_used_memory_growth_mib": round(grown / MiB, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--redis-url", help="a real Redis (default: a throwaway redis-server)")
    parser.add_argument("--only", default="readers,uploads,keys,bytes")
    options = parser.parse_args()
    wanted = set(options.only.split(","))
    out: dict[str, Any] = {}
    with redis_for(options.redis_url) as url:
        for name in ("readers", "uploads", "keys", "bytes"):
            if name not in wanted:
                continue
            with _servers(url) as (port, pid):  # a fresh gateway (and namespace) per scenario
                if name == "readers":
                    out[name] = readers(port, pid)
                elif name == "uploads":
                    out[name] = uploads(port, pid)
                elif name == "keys":
                    out[name] = keys(port)
                else:
                    out[name] = stored_bytes(port, url)
            print(json.dumps({name: out[name]}), flush=True)


if __name__ == "__main__":
    main()
