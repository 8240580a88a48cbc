"""Soak: 100,000 mixed jobs (4 echo : 1 embed) through one fleet while its controller and a
worker are stopped (SIGSTOP) past the silence timeout in turn; every job must end exactly once,
none failed, and the resident memory of every process must stay flat after warm-up.

    python -m benchmarks.soak [--quick] [--num N] [--strike-every N] [--out DIR]

The fleet runs with short silence timeouts (`workers.heartbeat_ms` 300, `workers.dead_after_ms`
2000). Jobs come in runs of 64 of one task (256 echo, then 64 embed, ...; interleaved one by one
they would cut every embed batch down to one text). Every `--strike-every` results (20,000; 2,000 with --quick) one process is stopped for
3 × dead_after (6 s) and continued: the controller first, then the last worker, alternating. A
stopped controller is dropped by the broker and must register again (its late results taken
once or dropped); a stopped worker is declared dead and its replica restarted.

Checked: each id gets exactly one final result on the wire (entries counted in the client's
reader, before its per-id futures could hide a duplicate) and from the client, none fails, and
`status` says done == N. Resident memory (RSS) of the broker (`baton up`), the controller and
each worker (by rank: pids are read from `status` at every sample, since a worker declared dead
is replaced) is sampled every N/50 results; growth after warm-up (the first fifth of the jobs, or
of the jobs a replacement process served) must stay under 32 MB. Each sample also holds the CPU
share other processes used since the previous one (the machine is shared).

Writes benchmarks/results/soak.json and soak.md for the full run (100,000 jobs, the default);
--quick (10,000 jobs) or any other --num writes soak-quick.json/.md instead, so the committed
full results stay; --out DIR writes there instead.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import uvloop

from baton.client import RETRY_ON, Client
from baton.launch import Fleet
from benchmarks.common import CONFIG, RESULTS, Meter, machine
from wire.protocol import Message

WARMUP = 0.2  # the first fifth of the jobs fills the bounded windows (finished jobs, journal pages)
FLAT_MB = 32.0  # growth after warm-up that still counts as flat
HEARTBEAT_MS, DEAD_AFTER_MS = 300, 2000
STOP_S = 3 * DEAD_AFTER_MS / 1000  # a fault's duration, well past the silence timeout
EMBED_EVERY = 5  # one job in five is an embed, the rest echo
# in runs of RUN same-task jobs: the controller forms each batch from a run of one task at the
# head of its queue, so jobs interleaved one by one (4 echo, 1 embed, ...) would make every embed
# batch a single text and the soak a measure of that (about 4 times slower)
RUN = 64
WORDS = "the quick brown fox jumps over the lazy dog while a queue of jobs waits".split()  # noqa: SIM905


def rss_mb(pid: int | None) -> float | None:
    """Resident memory in MB; None if the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except (OSError, TypeError):
        return None
    return None


def job(i: int) -> dict[str, str]:
    if (i // RUN) % EMBED_EVERY == EMBED_EVERY - 1:  # 2 to ~40 tokens, different texts
        words = [WORDS[(i + k) % len(WORDS)] for k in range(1 + i % 29)]
        return {"id": f"soak-{i}", "task": "embed", "text": f"job {i}: " + " ".join(words)}
    return {"id": f"soak-{i}", "task": "echo", "text": f"tiny job {i}"}


class Counting(Client):
    """A Client that counts every final result entry per id as it comes off the wire: its own
    per-id futures settle once, so a second delivery of an id would be invisible above them."""

    def __init__(self, *a: Any, **kw: Any) -> None:
        super().__init__(*a, **kw)
        self.wire: Counter[str] = Counter()

    def _results(self, msg: Message) -> None:
        for e in msg.body.get("results") or ():
            if not isinstance(e, dict) or not isinstance(e.get("id"), str):
                continue
            err = e.get("error") if isinstance(e.get("error"), dict) else {}
            if e.get("status") == "ok" or err.get("code") not in RETRY_ON:  # busy is not an end
                self.wire[e["id"]] += 1
        super()._results(msg)


def pids(status: dict) -> dict[str, int | None]:
    """role -> current pid: broker, controller, worker<rank>."""
    out = {"broker": status.get("pid")}
    ctrls = status.get("controllers") or []
    out["controller"] = ctrls[0].get("pid") if ctrls else None
    for w in status.get("workers") or []:
        out[f"worker{w.get('rank')}"] = w.get("pid")
    return out


async def strike(client: Client, target: str, at: int, events: list[dict]) -> None:
    """Stop the controller or the last worker for STOP_S, then continue it."""
    status = await client.status()
    if target == "controller":
        pid = status["controllers"][0]["pid"]
    else:
        pid = max(status["workers"], key=lambda w: w["rank"])["pid"]
    event: dict[str, Any] = {"at_jobs": at, "target": target, "pid": pid, "stopped_s": STOP_S}
    events.append(event)
    print(json.dumps({"strike": event}), file=sys.stderr, flush=True)
    os.kill(pid, signal.SIGSTOP)
    event["t_stop"] = time.perf_counter()
    await asyncio.sleep(STOP_S)  # the fault's duration, not synchronisation
    try:
        os.kill(pid, signal.SIGCONT)
        event["continued"] = True
    except ProcessLookupError:  # declared dead and killed meanwhile: that is the replacement path
        event["continued"] = False
    event["t_cont"] = time.perf_counter()


async def soak(
    endpoint: str, num: int, every: int, strike_every: int, window: int
) -> dict[str, Any]:
    samples: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    got: Counter[str] = Counter()
    failed: Counter[str] = Counter()
    strikes: list[asyncio.Task] = []
    targets = ("controller", "worker")
    async with Counting(endpoint, timeout_s=120) as client:
        t0 = time.perf_counter()
        done = 0
        gap = {"longest_s": 0.0, "at_jobs": 0}
        last = t0
        times: list[float] = []  # when each result arrived
        meter = Meter()
        async for result in client.run((job(i) for i in range(num)), window=window):
            now = time.perf_counter()
            if now - last > gap["longest_s"]:
                gap = {"longest_s": now - last, "at_jobs": done}
            last = now
            times.append(now)
            done += 1
            got[result.id] += 1
            if not result.ok:
                failed[str((result.error or {}).get("code"))] += 1
            if done % strike_every == 0 and done < num:
                target = targets[len(strikes) % 2]
                strikes.append(asyncio.create_task(strike(client, target, done, events)))
            if done % every == 0 or done == num:
                status = await client.status()
                row: dict[str, Any] = {"jobs": done, "seconds": now - t0}
                # CPU of processes outside this benchmark since the last sample (the machine is
                # shared): a slow stretch with a high share was someone else's
                row["foreign_cpu"], meter = round(meter.foreign(), 3), Meter()
                row["pids"] = pids(status)
                row["rss_mb"] = {role: rss_mb(pid) for role, pid in row["pids"].items()}
                samples.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
        seconds = time.perf_counter() - t0
        await asyncio.gather(*strikes)
        status = await client.status()
        wire = client.wire
    for e in events:
        # the stall: the longest wait between two results in the minute after the stop
        window = [e["t_stop"]] + [t for t in times if e["t_stop"] < t <= e["t_stop"] + 60]
        e["stall_s"] = max((b - a for a, b in zip(window, window[1:], strict=False)), default=0.0)
        e["t_stop"] -= t0
        e["t_cont"] -= t0
    ids = {f"soak-{i}" for i in range(num)}
    return {
        "seconds": seconds,
        "results": sum(got.values()),
        "ids_with_one_result": sum(1 for i in ids if got[i] == 1),
        "ids_with_one_wire_result": sum(1 for i in ids if wire[i] == 1),
        "ids_missing": sum(1 for i in ids if got[i] == 0),
        "ids_repeated": sum(1 for i in ids if got[i] > 1),
        "ids_repeated_on_wire": sum(1 for i in ids if wire[i] > 1),
        "foreign_ids": sum(1 for i in set(got) | set(wire) if i not in ids),
        "failed": dict(failed),
        "status_jobs": status.get("jobs"),
        "status_workers": status.get("workers"),
        "status_controllers": [
            {k: c.get(k) for k in ("pid", "state", "epoch")} for c in status["controllers"]
        ],
        "longest_gap": gap,
        "strikes": events,
        "samples": samples,
    }


def growth(samples: list[dict[str, Any]], role: str) -> list[dict[str, Any]]:
    """Per process (pid) that held `role`: RSS after its warm-up and its growth since.
    Warm-up: the first fifth of the jobs it was there for (from the start, or from when it
    replaced another, to its last sample)."""
    runs: dict[int, list[dict[str, Any]]] = {}
    for s in samples:
        pid, mb = s["pids"].get(role), s["rss_mb"].get(role)
        if pid is not None and mb is not None:
            runs.setdefault(pid, []).append({"jobs": s["jobs"], "mb": mb})
    out = []
    for pid, rows in runs.items():
        first, end = rows[0]["jobs"], rows[-1]["jobs"]
        start = first if first > samples[0]["jobs"] else 0
        warm = [r for r in rows if r["jobs"] >= start + WARMUP * (end - start)]
        if not warm:
            continue
        out.append(
            {
                "pid": pid,
                "from_jobs": first,
                "to_jobs": end,
                "warm_mb": warm[0]["mb"],
                "end_mb": warm[-1]["mb"],
                "max_mb": max(r["mb"] for r in warm),
                "growth_mb": max(r["mb"] for r in warm) - warm[0]["mb"],
                "samples_after_warmup": len(warm),
            }
        )
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="10,000 jobs, strikes every 2,000")
    ap.add_argument("--num", type=int, default=None)
    ap.add_argument("--every", type=int, default=None, help="sample every N jobs (N/50)")
    ap.add_argument("--strike-every", type=int, default=None, help="a SIGSTOP every N jobs")
    ap.add_argument("--window", type=int, default=1024, help="jobs outstanding")
    ap.add_argument("--out", type=Path, default=None, help="directory for soak*.json/.md")
    args = ap.parse_args(argv)
    num = args.num or (10_000 if args.quick else 100_000)
    every = args.every or max(1, num // 50)
    strike_every = args.strike_every or max(1, num // 5)
    full = num == 100_000 and not args.quick
    name = "soak" if full else "soak-quick"
    out_dir = args.out or RESULTS
    with tempfile.TemporaryDirectory(prefix="baton-soak-") as tmp:
        executions = Path(tmp) / "executions"
        sets = [
            "limits.max_queued=200000",
            f"workers.heartbeat_ms={HEARTBEAT_MS}",
            f"workers.dead_after_ms={DEAD_AFTER_MS}",
            f'jobs.execution_log="{executions}"',
        ]
        with Fleet(CONFIG, sets, ready_timeout_s=240) as fleet:
            r = uvloop.run(soak(fleet.endpoint, num, every, strike_every, args.window))
            log = fleet.log
        runs = Counter(executions.read_text().split()) if executions.exists() else Counter()
    roles = list(dict.fromkeys(k for s in r["samples"] for k in s["pids"]))
    memory = {role: growth(r["samples"], role) for role in roles}
    worst = {role: max((p["growth_mb"] for p in ps), default=0.0) for role, ps in memory.items()}
    jobs = r["status_jobs"] or {}
    out = {
        "num": num,
        "mix": {
            "echo": sum(job(i)["task"] == "echo" for i in range(num)),
            "embed": sum(job(i)["task"] == "embed" for i in range(num)),
            "run": RUN,
        },
        "fleet": {"sets": sets, "stop_s": STOP_S, "strike_every": strike_every},
        "jobs_per_s": num / r["seconds"],
        "seconds": r["seconds"],
        "exactly_once": r["ids_with_one_result"] == num
        and r["ids_with_one_wire_result"] == num
        and not r["foreign_ids"],
        "failed": sum(r["failed"].values()),
        "failed_by_code": r["failed"],
        "status_done": jobs.get("done"),
        "status_done_equals_num": jobs.get("done") == num,
        "executions": {  # at-least-once: a run lost to a fault runs again
            "jobs_run": len(runs),
            "runs": sum(runs.values()),
            "jobs_run_more_than_once": sum(1 for n in runs.values() if n > 1),
        },
        "growth_after_warmup_mb": worst,
        "memory": memory,
        "flat_mb": FLAT_MB,
        "machine": machine(),
        **{k: v for k, v in r.items() if k not in ("seconds",)},
        "fleet_log": str(log),
    }
    out["flat"] = all(g <= FLAT_MB for g in worst.values())
    # the broker and the controller live through the whole soak; workers only between strikes
    out["flat_broker_controller"] = all(
        worst[r] <= FLAT_MB for r in ("broker", "controller") if r in worst
    )
    out["ok"] = (
        out["flat"] and out["exactly_once"] and not out["failed"] and out["status_done_equals_num"]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    text = markdown(out)
    (out_dir / f"{name}.md").write_text(text)
    print(text)
    print(f"written: {out_dir / name}.json, .md", file=sys.stderr)
    return 0 if out["ok"] else 1


def markdown(out: dict[str, Any]) -> str:
    s = out["strikes"]
    strikes = ", ".join(
        f"{e['target']} at {e['at_jobs']:,} (results stalled {e['stall_s']:.1f} s)" for e in s
    )
    foreign = max((x.get("foreign_cpu", 0.0) for x in out["samples"]), default=0.0)
    lines = [
        f"Soak: {out['num']:,} jobs ({out['mix']['echo']:,} echo, {out['mix']['embed']:,} "
        f"embed), {out['jobs_per_s']:,.0f} jobs/s ({out['seconds']:.0f} s), "
        f"{len(s)} SIGSTOPs of {out['fleet']['stop_s']:g} s "
        f"(dead_after 2 s): {strikes}. Other processes' CPU between two samples: at most "
        f"{foreign:.0%} of the cores.",
        "",
        f"- every id exactly one result (client and wire): "
        f"{'yes' if out['exactly_once'] else '**no**'} "
        f"({out['ids_with_one_result']:,} / {out['ids_with_one_wire_result']:,} of "
        f"{out['num']:,}; missing {out['ids_missing']}, repeated {out['ids_repeated']}, "
        f"repeated on the wire {out['ids_repeated_on_wire']})",
        f"- failed: {out['failed']} {out['failed_by_code'] or ''}".rstrip(),
        f"- status done: {out['status_done']} (== {out['num']:,}: "
        f"{'yes' if out['status_done_equals_num'] else '**no**'}); jobs {out['status_jobs']}",
        f"- model runs (execution log, at-least-once): {out['executions']['runs']:,} runs of "
        f"{out['executions']['jobs_run']:,} jobs, "
        f"{out['executions']['jobs_run_more_than_once']} run more than once",
        f"- longest wait between two results: {out['longest_gap']['longest_s']:.1f} s "
        f"(after {out['longest_gap']['at_jobs']:,})",
        "",
        "| process | pid | jobs seen | RSS after warm-up (MB) | RSS at the end (MB) | "
        "growth after warm-up (MB) |",
        "|---|---|---|---|---|---|",
    ]
    for role, procs in out["memory"].items():
        for p in procs:
            lines.append(
                f"| {role} | {p['pid']} | {p['from_jobs']:,}–{p['to_jobs']:,} | "
                f"{p['warm_mb']:.1f} | {p['end_mb']:.1f} | {p['growth_mb']:.1f} |"
            )
    lines += [
        "",
        f"Flat (every growth ≤ {out['flat_mb']:g} MB): {'yes' if out['flat'] else '**no**'}; "
        f"broker and controller: {'yes' if out['flat_broker_controller'] else '**no**'}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
