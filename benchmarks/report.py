"""Turns a `python -m benchmarks` run into latest.json, latest.md and PNG plots."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

FLOOR = "redis (floor)"
OURS = "strands-dedup"


def _ms(row: dict[str, Any] | None) -> str:
    if not row or "median" not in row or math.isnan(row["median"]):
        return "-"
    return f"{row['median']:.3f} ({row['p99']:.3f})"


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or not b or math.isnan(a) or math.isnan(b):
        return "-"
    return f"{a / b:.2f}x"


def _median(res: dict[str, Any], peer: str, mode: str) -> float | None:
    row = res.get(peer, {}).get(mode)
    return row.get("median") if isinstance(row, dict) else None


def latency_table(res: dict[str, Any], title: str) -> list[str]:
    lines = [
        f"### {title}",
        "",
        "| peer | async median (p99), ms | x floor | x strands-dedup "
        "| sync median (p99), ms | x floor | x strands-dedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for peer, row in res.items():
        if "error" in row:
            lines.append(f"| {peer} | {row['error']} | | | | | |")
            continue
        cells = [peer]
        for mode in ("async", "sync"):
            value = _median(res, peer, mode)
            cells += [
                _ms(row.get(mode)),
                _ratio(value, _median(res, FLOOR, mode)),
                _ratio(value, _median(res, OURS, mode)),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return [*lines, ""]


def markdown(report: dict[str, Any]) -> str:
    env = report["environment"]
    res = report["scenarios"]
    out = [
        "## Results",
        "",
        f"`{report['command'].strip()}` on {env['platform']}, {env['cpus']} CPUs, Python "
        f"{env['python']}, Redis {env['redis_version']}, load average before the run "
        f"{env['load_average'][0]:.2f}; {env['when']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in sorted(env["packages"].items()))
        + ".",
        "",
    ]
    if "fresh" in res:
        out += latency_table(res["fresh"], "1. Fresh call (no contention)")
    if "replay" in res:
        out += latency_table(res["replay"], "2. Replay of a completed call")
    if "storm" in res:
        out += [
            "### 3. Storm: N concurrent duplicates of one token (the call takes 0.2 s)",
            "",
            "| peer | N | processes | executions | successful responses | failed "
            "| all results after |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in res["storm"].values():
            if "error" in row:
                out.append(
                    f"| {row['peer']} | {row['n']} | {row['processes']} | {row['error']} | | | |"
                )
                continue
            failed = f"{row['failed']}" + (
                " (" + ", ".join(f"{k}: {v}" for k, v in row["errors"].items()) + ")"
                if row["errors"]
                else ""
            )
            out.append(
                f"| {row['peer']} | {row['n']} | {row['processes']} | {row['executions']} | "
                f"{row['ok']} of {row['n']} | {failed} | {row['all_done_s']:.3f} s |"
            )
        out.append("")
    if "throughput" in res:
        ours = res["throughput"].get(OURS, {}).get("calls_per_s")
        out += [
            "### 4. Throughput: distinct tokens, concurrency 64, one process",
            "",
            "| peer | mode | calls/s | x strands-dedup |",
            "|---|---|---|---|",
        ]
        for peer, row in res["throughput"].items():
            if "error" in row:
                out.append(f"| {peer} | {row['error']} | | |")
                continue
            out.append(
                f"| {peer} | {row['mode']} | {row['calls_per_s']:.0f} | "
                f"{_ratio(row['calls_per_s'], ours)} |"
            )
        out.append("")
    if "waiters" in res:
        out += [
            "### 5. Waiters at scale: duplicates parked on one token in one process",
            "",
            "| peer | waiters | connections | threads | RSS, MiB | wake all, ms |",
            "|---|---|---|---|---|---|",
        ]
        for key, row in res["waiters"].items():
            peer = key.split("|")[0]
            if "skipped" in row or "error" in row:
                why = row.get("skipped") or row.get("error")
                out.append(f"| {peer} | {row.get('waiters', key.split('|')[1])} | {why} | | | |")
                continue
            out.append(
                f"| {peer} | {row['waiters']} | {row['connections']} | {row['threads']} | "
                f"{row['rss_mib']:.1f} | {row['wake_all_ms']:.1f} |"
            )
        out.append("")
    if "crash" in res:
        out += [
            "### 6. Crash: the primary's process is SIGKILLed (lease or lock TTL 2 s)",
            "",
            "| peer | a duplicate had a result after | client retries |",
            "|---|---|---|",
        ]
        for peer, row in res["crash"].items():
            if "error" in row:
                out.append(f"| {peer} | {row['error']} | |")
            else:
                out.append(f"| {peer} | {row['recovered_s']:.2f} s | {row['client_retries']} |")
        out.append("")
    if "http" in res and "latency" in res["http"]:
        http = res["http"]
        out += [
            "### 7. HTTP: sequential POSTs with a fresh Idempotency-Key, and a storm through "
            "three replicas",
            "",
            "| in front of a trivial app | median (p99), ms | overhead vs the app alone, ms |",
            "|---|---|---|",
        ]
        for name, row in http["latency"].items():
            out.append(f"| {name} | {_ms(row)} | {row['overhead_ms']:.3f} |")
        out += [
            "",
            "| storm through 3 replicas | requests | executions | statuses | all responses after |",
            "|---|---|---|---|---|",
        ]
        for name, row in http["storm"].items():
            statuses = ", ".join(f"{k}: {v}" for k, v in sorted(row["statuses"].items()))
            out.append(
                f"| {name} | {row['requests']} | {row['executions']} | {statuses} | "
                f"{row['all_done_s']:.3f} s |"
            )
        out.append("")
    if "variants" in res:
        out += [
            "### 8. strands-dedup with and without hiredis, on asyncio and uvloop",
            "",
            "| variant | floor SET NX PX, ms | fresh, ms | x floor | replay, ms | x floor |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in res["variants"].items():
            if "error" in row:
                out.append(f"| {name} | {row['error']} | | | | |")
                continue
            floor = row["floor"]["median"]
            out.append(
                f"| {name} | {floor:.3f} | {row['fresh']['median']:.3f} | "
                f"{row['fresh']['median'] / floor:.2f}x | {row['replay']['median']:.3f} | "
                f"{row['replay']['median'] / floor:.2f}x |"
            )
        out.append("")
    if "capacity" in res:
        out += capacity_table(res["capacity"])
    return "\n".join(out)


def capacity_table(capacity: dict[str, Any]) -> list[str]:
    """The capacity scenario's headline figures (its whole report: capacity-latest.json)."""
    out = [
        "### 9. Capacity: what one call costs Redis (private servers; see capacity-latest.json)",
        "",
        "| subject | command µs per fresh call | per replay | bytes per completed call | keys |",
        "|---|---|---|---|---|",
    ]
    for name, row in capacity["cost"].items():
        out.append(
            f"| {name} | {row['fresh_command_usec']:.2f} | {row['replay_command_usec']:.2f} | "
            f"{row['bytes_per_completed_call']:.0f} | {row['keys_per_completed_call']:.2f} |"
        )
    out.append("")
    for where, rates in capacity["throughput"].items():
        out += [f"| tokens/s at concurrency 64, {where} | median |", "|---|---|"]
        out += [f"| {name} | {rate:.0f} |" for name, rate in rates.items()]
        out.append("")
    for target in capacity["targets"]:
        verdict = "met" if target["met"] else "missed"
        out.append(f"- target {verdict}: {target['name']} (measured {target['measured']:.2f}x)")
    return [*out, ""]


def draw_plots(report: dict[str, Any], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = report["scenarios"]
    written = []
    if "fresh" in res and "replay" in res:
        fig, ax = plt.subplots(figsize=(8, 4))
        peers = list(res["fresh"])
        width = 0.2
        for i, (scenario, mode) in enumerate(
            [("fresh", "async"), ("fresh", "sync"), ("replay", "async"), ("replay", "sync")]
        ):
            values = [(_median(res[scenario], p, mode) or 0.0) for p in peers]
            ax.bar(
                [x + i * width for x in range(len(peers))],
                values,
                width,
                label=f"{scenario} {mode}",
            )
        ax.set_xticks([x + 1.5 * width for x in range(len(peers))], peers, fontsize=8)
        ax.set_ylabel("median latency, ms")
        ax.set_title("One call: fresh and replay")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "latency.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if "storm" in res:
        fig, ax = plt.subplots(figsize=(8, 4))
        by_peer: dict[str, list[tuple[int, float, int]]] = {}
        for row in res["storm"].values():
            if "all_done_s" in row and row["processes"] == 1:
                point = (row["n"], row["all_done_s"], row["ok"])
                by_peer.setdefault(row["peer"], []).append(point)
        for peer, points in by_peer.items():
            points.sort()
            line = ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=peer)
            for n, seconds, ok in points:
                if ok < n:  # the others got an error, not the result
                    ax.annotate(
                        f"{ok}/{n} ok",
                        (n, seconds),
                        fontsize=7,
                        color=line[0].get_color(),
                        xytext=(4, -10),
                        textcoords="offset points",
                    )
        ax.set_xscale("log")
        ax.set_xlabel("concurrent duplicates (one process)")
        ax.set_ylabel("seconds until every caller had an answer")
        ax.text(
            0.3,
            0.93,
            "n/N ok: only n callers got the result; the others an error",
            transform=ax.transAxes,
            fontsize=7,
        )
        ax.set_title("Storm of duplicates (the call takes 0.2 s)")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out / "storm.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def write_report(report: dict[str, Any], out: Path, *, plots: bool = True) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / "latest.json"
    json_path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    md_path = out / "latest.md"
    md_path.write_text(markdown(report) + "\n")
    written = [json_path, md_path]
    if plots:
        written += draw_plots(report, out)
    return written
