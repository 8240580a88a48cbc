"""Soak: 100,000 tiny jobs through one fleet; the broker's and the controller's resident memory
must stay flat after warm-up (nothing per job is kept past its TTL-bounded journal row and the
bounded in-memory window of finished jobs).

    python -m benchmarks.soak [--quick] [--num N]

Writes benchmarks/results/soak.json and soak.md: resident memory (RSS) of `baton up` (the
broker) and of the controller, sampled every `--every` jobs, and the growth after warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

from benchmarks.common import CONFIG, RESULTS, machine
from broker.client import Client
from controller.launch import Fleet

WARMUP = 0.2  # the first fifth of the jobs fills the bounded windows (finished jobs, journal pages)
FLAT_MB = 32.0  # growth after warm-up that still counts as flat


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def soak(endpoint: str, num: int, every: int, window: int) -> list[dict[str, float]]:
    samples: list[dict[str, float]] = []
    async with Client(endpoint, timeout_s=120) as client:
        status = await client.status()
        pids = {"broker": status.get("pid"), "controller": status["controllers"][0]["pid"]}
        jobs = ({"id": f"soak-{i}", "task": "echo", "text": f"tiny job {i}"} for i in range(num))
        t0 = time.perf_counter()
        done = failed = 0
        async for result in client.run(jobs, window=window):
            done += 1
            failed += result.status != "ok"
            if done % every == 0 or done == num:
                row = {"jobs": done, "seconds": time.perf_counter() - t0, "failed": failed}
                row.update({f"{name}_rss_mb": rss_mb(pid) for name, pid in pids.items() if pid})
                samples.append(row)
                print(json.dumps(row), file=sys.stderr)
    return samples


def growth(samples: list[dict[str, float]], key: str, num: int) -> float:
    warm = [s[key] for s in samples if s["jobs"] >= WARMUP * num]
    return max(warm) - warm[0] if warm else float("nan")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 jobs instead of 100,000")
    ap.add_argument("--num", type=int, default=None)
    ap.add_argument("--every", type=int, default=None, help="sample every N jobs")
    ap.add_argument("--window", type=int, default=1024, help="jobs outstanding")
    args = ap.parse_args(argv)
    num = args.num or (10_000 if args.quick else 100_000)
    every = args.every or max(1, num // 50)
    sets = ["limits.max_queued=200000"]
    with Fleet(CONFIG, sets) as fleet:
        samples = asyncio.run(soak(fleet.endpoint, num, every, args.window))
    keys = [k for k in samples[-1] if k.endswith("_rss_mb")]
    out = {
        "num": num,
        "failed": samples[-1]["failed"],
        "jobs_per_s": num / samples[-1]["seconds"],
        "growth_after_warmup_mb": {k: growth(samples, k, num) for k in keys},
        "flat_mb": FLAT_MB,
        "samples": samples,
        "machine": machine(),
    }
    out["flat"] = all(g <= FLAT_MB for g in out["growth_after_warmup_mb"].values())
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "soak.json").write_text(json.dumps(out, indent=2))
    lines = [
        f"Soak: {num} echo jobs, {out['jobs_per_s']:.0f} jobs/s, {out['failed']} failed",
        "",
        "| process | RSS at warm-up end (MB) | RSS at the end (MB) | growth after warm-up (MB) |",
        "|---|---|---|---|",
    ]
    warm = next(s for s in samples if s["jobs"] >= WARMUP * num)
    for k in keys:
        lines.append(
            f"| {k.removesuffix('_rss_mb')} | {warm[k]:.1f} | {samples[-1][k]:.1f} | {out['growth_after_warmup_mb'][k]:.1f} |"
        )
    (RESULTS / "soak.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if out["flat"] and not out["failed"] else 1


if __name__ == "__main__":
    sys.exit(main())
