"""peers: Baton against what users can get elsewhere (DESIGN.md), side by side in one run.

Workloads, each built once here with the project's own builders so that Baton and every peer
get identical inputs (the same texts; the same token ids and max_new_tokens):
  embeddings  all-MiniLM-L6-v2, the first 1,298 `paragraphs`, texts/s; peers sentence-transformers
              (float32: also the reference of every cosine), ONNX Runtime and OpenVINO on a graph
              exported here with torch.onnx.export, batches sorted by length; OpenVINO bfloat16
              only where the CPU has AVX-512 BF16 or AMX
  generation  the GPT-2 layout of benchmarks/common.gpt2 (8 x 512), 128 prompts of 32-256 tokens,
              16-256 new tokens each, greedy, ignore_eos, all at once, output tokens/s; peers
              transformers `generate` (padded static batches of 32) and vLLM's CPU build, float32
              and (vllm-bf16) bfloat16
  prefix      300 prompts sharing a 384-token prefix (own suffix 8-32), 32 new tokens each
              (vLLM with prefix caching on)
  single      one request alone, 128 prompt + 128 new tokens, ms per output token; a run is
              SINGLE_REQUESTS such requests one after another (a request alone lasts ~2 s here,
              too short a sample on this machine's noise)
  llama       the generation workload on DESIGN.md's Llama shape of that layout (benchmarks/
              common.llama: 2 KV heads, SwiGLU), a fleet and peers of its own

Baton runs through a whole fleet (tensor 1 x pipeline 1), as the other benchmarks: float32, and
`baton-bf16` (model.dtype = "bfloat16") where the CPU computes bfloat16 natively, which the -bf16
peers are measured against. Each peer runs
in its own process under the peers' virtualenv (.peers/, `make peers`; benchmarks/peer_runner.py),
loads and warms up once, then answers each repeat: per repeat and workload, Baton, then each
peer, in turn, every other repeat in the reverse order (the machine's speed drifts within a run,
measured up to +45 % from the first repeat to the third: a fixed order would hand it to the
last in line). A peer that is not installed (or fails to load) is skipped with a line saying so.
Not part of `make test` or `make bench`. Ratios: Baton's throughput / the peer's, and for
`single` the peer's ms per token / Baton's, so above 1 is Baton ahead everywhere.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import queue
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

from baton import bench
from baton.launch import REPO
from benchmarks import common
from benchmarks.common import MODEL, Figures, Report, log

PEERS_PYTHON = REPO / ".peers" / "bin" / "python"
LOGS = REPO / ".peers" / "logs"  # each peer's stderr (vLLM logs a lot), kept for a failure

EMBED_PEERS = ["sentence-transformers", "onnxruntime", "openvino", "openvino-bf16"]
GEN_PEERS = ["transformers", "vllm", "vllm-bf16"]
HEADLINE = {
    "embeddings": "texts_per_s",
    "generation": "output_tokens_per_s",
    "prefix": "output_tokens_per_s",
    "single": "ms_per_token",
    "llama": "output_tokens_per_s",
}
LOWER_IS_BETTER = {"ms_per_token"}
REFERENCE = "sentence-transformers"  # float32: what every embedding's cosine is taken against
LOAD_TIMEOUT_S = 1200.0  # vLLM compiles its model on load (~1.5 min here the first time)
RUN_TIMEOUT_S = 3600.0
SINGLE_REQUESTS = 4  # the `single` workload's requests a run, each sent when the last has ended


class Runner:
    """One peer process (.peers/bin/python -m benchmarks.peer_runner), in its own session so
    that it and whatever it starts (vLLM's engine processes) are stopped together."""

    def __init__(self, peer: str, log_path: Path, env: dict[str, str]) -> None:
        self.peer = peer
        self.log_path = log_path
        self._log: IO[bytes] = log_path.open("wb")
        self.proc = subprocess.Popen(
            [str(PEERS_PYTHON), "-m", "benchmarks.peer_runner"],
            cwd=REPO,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._log,
            env=env,
            text=True,
            start_new_session=True,
        )
        self._lines: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)  # the process closed its end: it has exited

    def ask(self, msg: dict[str, Any], timeout_s: float) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(msg) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._lines.get(timeout=timeout_s)
        except queue.Empty:
            raise RuntimeError(f"{self.peer}: no answer in {timeout_s:.0f} s") from None
        if line is None:
            raise RuntimeError(
                f"{self.peer}: exited ({self.proc.wait()}), last logged: {self.tail()!r}; "
                f"see {self.log_path}"
            )
        reply = json.loads(line)
        if not reply.get("ok"):
            raise RuntimeError(f"{self.peer}: {reply.get('error')}; see {self.log_path}")
        return reply

    def tail(self) -> str:
        """The log's last line: for a process that died, usually what killed it."""
        self._log.flush()
        try:
            lines = self.log_path.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return lines[-1] if lines else ""

    def close(self) -> None:
        """End of stdin asks it to exit; its whole session is ended after a grace period (vLLM's
        engine processes outlive a parent that is killed)."""
        try:
            if self.proc.stdin is not None:
                self.proc.stdin.close()
            self.proc.wait(timeout=60)
        except (OSError, subprocess.TimeoutExpired):
            pass
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.proc.pid, sig)  # the session it leads; its pid is its group's id
            except ProcessLookupError:
                break
            time.sleep(2.0)
        if self.proc.poll() is None:
            self.proc.wait()
        self._log.close()


def peer_env(threads: int) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "HF_HUB_OFFLINE": "1",  # every model is local; never try the network
            "TRANSFORMERS_OFFLINE": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            # vLLM's CPU worker binds its OpenMP threads to cores and by default keeps one core
            # back for its own engine process: on 2 cores that is 1 thread. Every other
            # contestant gets all the cores, so vLLM does too.
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}",
            "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            # its KV cache (GB): 2 holds every sequence of the generation workload at once
            "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2"),
            "VLLM_CACHE_ROOT": str(REPO / ".peers" / "cache" / "vllm"),  # compiled graphs
            "OMP_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false",
        }
    )
    env.pop("PYTHONPATH", None)  # the project's own paths are no business of the peers' venv
    return env


def probe(wanted: list[str]) -> tuple[dict[str, str | None], dict[str, str]]:
    """Per wanted peer: why it cannot run here, or None; and the peers' package versions."""
    from workers.precision import cpu_flags

    why: dict[str, str | None] = {}
    if not PEERS_PYTHON.exists():
        return {p: f"{PEERS_PYTHON} is missing (`make peers` builds it)" for p in wanted}, {}
    done = subprocess.run(
        [str(PEERS_PYTHON), "-m", "benchmarks.peer_runner", "--probe"],
        cwd=REPO,
        capture_output=True,
        text=True,
        env=peer_env(1),
        timeout=120,
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["?"]
        return {p: f"the peers' python failed: {tail[0]}" for p in wanted}, {}
    found = json.loads(done.stdout.strip().splitlines()[-1])
    missing: dict[str, list[str]] = found["missing"]
    flags = cpu_flags()
    for p in wanted:
        if missing.get(p):
            why[p] = f"not installed in .peers (no module {', '.join(missing[p])})"
        elif p.endswith("bf16") and not {"avx512_bf16", "amx_bf16"} & flags:
            why[p] = (
                "this CPU has neither avx512_bf16 nor amx_bf16, so bfloat16 would be emulated "
                "(slower than float32)"
            )
        else:
            why[p] = None
    return why, found["versions"]


def runners(
    stack: ExitStack, peers: list[str], spec: dict[str, Any], skipped: dict[str, str]
) -> dict[str, Runner]:
    """The peers that load, one at a time (the ONNX export is shared, and memory is not
    endless), each stopped at exit; one that fails to load goes into `skipped`."""
    LOGS.mkdir(parents=True, exist_ok=True)
    threads = spec["threads"]
    out: dict[str, Runner] = {}
    for peer in peers:
        log(f"loading peer {peer}")
        r = Runner(peer, LOGS / f"{peer}.log", peer_env(threads))
        stack.callback(r.close)
        try:
            reply = r.ask({"op": "load", "peer": peer, **spec}, LOAD_TIMEOUT_S)
        except RuntimeError as e:
            skipped[peer] = f"failed to load: {e}"
            log(f"peer {peer}: skipped, {skipped[peer]}")
            continue
        log(f"peer {peer}: loaded and warmed up in {reply['load_s']:.1f} s")
        out[peer] = r
    return out


def fleet_layouts(base: list[str]) -> dict[str, list[str]]:
    """Baton in float32, and in bfloat16 where the CPU computes it natively (as the -bf16 peers:
    elsewhere `baton up` refuses it)."""
    from workers.precision import refusal

    layouts = {"baton": base}
    if refusal("bfloat16", "cpu") is None:
        layouts["baton-bf16"] = [*base, 'model.dtype="bfloat16"']
    return layouts


def ask_run(r: Runner, workload: str, draw: int = 0) -> Figures:
    return r.ask({"op": "run", "workload": workload, "draw": draw}, RUN_TIMEOUT_S)["figures"]


def in_turn(run: Callable[[int], Figures], draws: int) -> Callable[[], Figures]:
    """Each call, `run` on the next of a workload's `draws` draws (its index)."""
    i = itertools.count()
    return lambda: run(next(i) % draws)


def baton_generate(
    endpoint: str, jobs: list[dict], warmup: list[dict], alone: bool = False
) -> Figures:
    """As common.generate without its Poisson part: a warm-up, then every job at once (`alone`:
    one at a time, each sent when the last has ended)."""
    bench.run(endpoint, warmup, bench.Load(concurrency=1 if alone else len(warmup)), progress=False)
    m = bench.run(endpoint, jobs, bench.Load(concurrency=1 if alone else len(jobs)), progress=False)
    if m["completed"] != len(jobs):
        raise RuntimeError(f"{m['completed']} of {len(jobs)} jobs completed: {m['errors']}")
    return {
        "output_tokens_per_s": m["output_throughput"],
        "ms_per_token": m["duration"] * 1000 / m["total_output_tokens"],
        "seconds": m["duration"],
    }


def cosines(vectors: Any, reference: Any) -> Figures:
    import numpy as np

    a = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cos = (a * b).sum(1)
    return {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean())}


def main(argv: Sequence[str] | None = None) -> dict:
    a = parse(argv)
    repeats = a.repeats or (1 if a.quick else 3)
    if a.quick:
        # a smoke run checks that everything runs, not the figures: never run a repeat again
        # because the machine is busy (common.interleave reads this at each attempt)
        common.DISTURBED = 1.0
    threads = os.cpu_count() or 1
    wanted = [p for p in EMBED_PEERS + GEN_PEERS if a.peers is None or p in a.peers]
    workloads = [w for w in HEADLINE if a.workloads is None or w in a.workloads]
    found, versions = probe(wanted)
    skipped = {p: why for p, why in found.items() if why is not None}
    for p, why in skipped.items():
        log(f"peer {p}: skipped, {why}")

    runs: dict[str, list[Figures]] = {}
    dist: list[dict] = []
    setup: dict[str, Any] = {"threads": threads, "repeats": repeats, "peer_versions": versions}
    notes: list[str] = []
    out_dir = Path(tempfile.mkdtemp(prefix="baton-peers-"))  # peers' embeddings, for cosines

    if "embeddings" in workloads:
        embed(a.quick, repeats, threads, wanted, skipped, out_dir, runs, dist, setup, notes)
    gen = [w for w in ("generation", "prefix", "single") if w in workloads]
    if gen:
        at = (a.quick, repeats, threads, wanted)
        generate(*at, common.gpt2(), gen, skipped, runs, dist, setup, notes)
    if "llama" in workloads:
        at = (a.quick, repeats, threads, wanted)
        generate(*at, common.llama(), ["llama"], skipped, runs, dist, setup, notes)

    ratios: dict[str, list[float]] = {}
    for name in runs:
        workload, _, who = name.partition(": ")
        if who.startswith("baton"):
            continue
        # each peer against Baton in its own precision; float32 Baton against the rest too
        mine = "baton-bf16" if who.endswith("-bf16") else "baton"
        base = f"{workload}: {mine}"
        if base not in runs:
            continue
        key = HEADLINE[workload]
        pairs = zip(runs[base], runs[name], strict=True)
        if key in LOWER_IS_BETTER:
            ratios[f"{workload}_{mine}_vs_{who}"] = [p[key] / b[key] for b, p in pairs]
        else:
            ratios[f"{workload}_{mine}_vs_{who}"] = [b[key] / p[key] for b, p in pairs]
    setup["skipped"] = {p: why for p, why in skipped.items()}
    notes += [f"{p} skipped: {why}" for p, why in skipped.items()]
    report = Report(
        "peers",
        "Baton (fleet tp1 x pp1) against the peers of DESIGN.md, interleaved",
        "",
        runs,
        ratios,
        [],
        setup,
        notes,
        dist,
    )
    return write(report, a.quick)


def embed(
    quick: bool,
    repeats: int,
    threads: int,
    wanted: list[str],
    skipped: dict[str, str],
    out_dir: Path,
    runs: dict[str, list[Figures]],
    dist: list[dict],
    setup: dict[str, Any],
    notes: list[str],
) -> None:
    import numpy as np

    from baton.client import BlockingClient
    from workers.loader import resolve_model_dir

    num = 40 if quick else 1298
    jobs = bench.workload("paragraphs", num)
    texts = [j["text"] for j in jobs]
    peers = [p for p in EMBED_PEERS if p in wanted and p not in skipped]
    spec = {
        "model": str(resolve_model_dir(MODEL)),
        "threads": threads,
        "out_dir": str(out_dir),
        # steady state: every system, Baton's fleets and each peer, first runs the whole
        # workload once, untimed (the first pass of each ran 5-20 % slower than the next)
        "workloads": {"embeddings": {"texts": texts, "warmup": texts}},
    }
    setup["embeddings"] = {"model": "all-MiniLM-L6-v2", "workload": "paragraphs"}
    setup["embeddings"] |= {"num": num, "peer_batch": 32, "peers_sort_by_length": True}
    setup["embeddings"] |= {"warmup": "one untimed pass of the whole workload, every system"}
    layouts = fleet_layouts([])
    vectors = {}
    with common.fleets(layouts) as f, ExitStack() as stack:

        def fleet(endpoint: str) -> Figures:
            figures, _ = common.serve(endpoint, jobs)
            return {k: figures[k] for k in ("texts_per_s", "seconds")}

        for n in layouts:  # warmed up as each peer is at load: the whole workload, untimed
            common.serve(f[n].endpoint, jobs)
        rs = runners(stack, peers, spec, skipped)
        alternatives: dict[str, Callable[[], Figures]] = {
            f"embeddings: {n}": lambda e=f[n].endpoint: fleet(e) for n in layouts
        }
        for p, r in rs.items():
            alternatives[f"embeddings: {p}"] = lambda r=r: ask_run(r, "embeddings")
        got = common.interleave(alternatives, repeats, dist, alternate=True)
        for n in layouts:  # not timed: Baton's own vectors, for the cosine
            with BlockingClient(f[n].endpoint) as c:
                results = c.embed(texts)
            vectors[n] = np.asarray([r.embedding for r in results], dtype=np.float32)
    for p in rs:
        vectors[p] = np.load(out_dir / f"{p}-embeddings.npy")
    if REFERENCE in vectors:
        for who, v in vectors.items():
            if who != REFERENCE:
                cos = cosines(v, vectors[REFERENCE])
                for figures in got[f"embeddings: {who}"]:
                    figures.update(cos)
                # the tables round to 3 digits, where every cosine reads 1
                notes.append(
                    f"embeddings: {who} against {REFERENCE} float32: cosine min "
                    f"{cos['cosine_min']:.8f}, mean {cos['cosine_mean']:.8f}"
                )
    else:
        notes.append(f"{REFERENCE} did not run: no cosines")
    runs.update(got)


def generate(
    quick: bool,
    repeats: int,
    threads: int,
    wanted: list[str],
    model: Path,
    workloads: list[str],
    skipped: dict[str, str],
    runs: dict[str, list[Figures]],
    dist: list[dict],
    setup: dict[str, Any],
    notes: list[str],
) -> None:
    """`workloads` on the decoder at `model`: a fleet of Baton's in each precision and a
    process of each generation peer's, loaded for it alone."""
    # Each run takes the next draw of its workload (every alternative draw i in its run i, a
    # disturbed run taken again the next one): no run meets prompts an earlier one left in a
    # prefix cache (Baton's, or vLLM's automatic one), which would flatter every repeat after
    # the first. The warm-up is a draw of its own.
    draws = repeats * common.ATTEMPTS
    makers: dict[str, Callable[[int], list[dict]]] = {}
    num = 8 if quick else 128
    outs = "16:64" if quick else "16:256"
    for w in ("generation", "llama"):
        if w in workloads:
            makers[w] = lambda s: bench.generation(num, "32:256", outs, tokenizer=model, seed=s)
            setup[w] = {"jobs": num, "input_tokens": "32:256", "output_tokens": outs}
    if "prefix" in workloads:
        n = 16 if quick else 300
        makers["prefix"] = lambda s: bench.generation(
            n, "8:32", "32", prefix_len=384, tokenizer=model, seed=s
        )
        setup["prefix"] = {"jobs": n, "prefix_tokens": 384, "suffix_tokens": "8:32"}
        setup["prefix"] |= {"output_tokens": 32, "vllm_prefix_caching": True}
    if "single" in workloads:
        makers["single"] = lambda s: bench.generation(
            SINGLE_REQUESTS, "128", "128", tokenizer=model, seed=s
        )
        setup["single"] = {"input_tokens": 128, "output_tokens": 128}
        setup["single"] |= {"requests": SINGLE_REQUESTS, "one_at_a_time": True}
    # workload -> (its draws, warm-up jobs)
    built = {w: ([make(s) for s in range(draws)], make(draws)[:4]) for w, make in makers.items()}
    alone = {w: w == "single" for w in built}  # jobs one at a time, each after the last
    setup["fresh_prompts"] = "a draw of its own for every run (seed = run index)"
    described = common.LLAMA_MODEL if model == common.LLAMA_DIR else common.GPT2_MODEL
    for w in workloads:
        setup[w]["model"] = described + ", greedy, ignore_eos"
    setup["vllm_kv_cache_gb"] = peer_env(threads)["VLLM_CPU_KVCACHE_SPACE"]
    setup["transformers_batch"] = 32

    def plain(jobs: list[dict]) -> list[dict]:
        return [{"token_ids": j["token_ids"], "max_new_tokens": j["max_new_tokens"]} for j in jobs]

    spec = {
        "model": str(model),
        "threads": threads,
        "workloads": {
            w: {"draws": [plain(jobs) for jobs in each], "warmup": plain(warm), "alone": alone[w]}
            for w, (each, warm) in built.items()
        },
    }
    peers = [p for p in GEN_PEERS if p in wanted and p not in skipped]
    layouts = fleet_layouts([f"model.path={model}"])
    with common.fleets(layouts, common.GPT2_CONFIG) as f, ExitStack() as stack:
        rs = runners(stack, peers, spec, skipped)
        endpoint = f["baton"].endpoint
        alternatives: dict[str, Callable[[], Figures]] = {}
        for w, (each, warm) in built.items():
            for n in layouts:
                alternatives[f"{w}: {n}"] = in_turn(
                    lambda d, e=f[n].endpoint, each=each, m=warm, a=alone[w]: baton_generate(
                        e, each[d], m, a
                    ),
                    draws,
                )
            for p, r in rs.items():
                alternatives[f"{w}: {p}"] = in_turn(lambda d, r=r, w=w: ask_run(r, w, d), draws)
        runs.update(common.interleave(alternatives, repeats, dist, alternate=True))
        notes += agreement(endpoint, rs, built)


def agreement(endpoint: str, rs: dict[str, Runner], built: dict[str, Any]) -> list[str]:
    """How far each contestant's greedy tokens for one job agree with transformers' (not
    timed): the same model on the same ids should give the same tokens, until float32
    rounding flips a near tie of the random weights' logits."""
    from baton.client import BlockingClient

    w = "single" if "single" in built else next(iter(built))
    job = built[w][0][0][0]  # the first job of the first draw
    with BlockingClient(endpoint) as c:
        got = c.generate([job["token_ids"]], max_new_tokens=job["max_new_tokens"], ignore_eos=True)
    tokens = {"baton": got[0].token_ids or []}
    for p, r in rs.items():
        tokens[p] = r.ask({"op": "tokens", "workload": w}, RUN_TIMEOUT_S)["tokens"]
    if "transformers" not in tokens:
        return [f"{w}: greedy tokens not compared (transformers did not run)"]
    ref = tokens["transformers"]
    out = []
    for who, ids in tokens.items():
        if who != "transformers":
            same = next(
                (i for i, (x, y) in enumerate(zip(ids, ref, strict=False)) if x != y),
                min(len(ids), len(ref)),
            )
            out.append(
                f"{w}, first job: {who}'s greedy tokens equal transformers' for the first "
                f"{same} of {len(ref)}"
            )
    return out


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a smoke test: little work, 1 repeat")
    p.add_argument("--repeats", type=int, default=None, help="override the number of repeats")
    p.add_argument(
        "--peers",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated subset of {','.join(EMBED_PEERS + GEN_PEERS)}",
    )
    p.add_argument(
        "--workloads",
        type=lambda s: s.split(","),
        default=None,
        help=f"comma-separated subset of {','.join(HEADLINE)}",
    )
    return p.parse_args(argv)


# --- output: common.write's shape, one table and one plot panel per workload ---


def summary(report: Report, quick: bool) -> dict[str, Any]:
    ratios = {k: statistics.median(v) for k, v in report.ratios.items()}
    return {
        "benchmark": report.name,
        "title": report.title,
        "quick": quick,
        "setup": report.setup,
        "repeats": max((len(v) for v in report.runs.values()), default=0),
        "alternatives": {
            name: {k: common.spread([f[k] for f in runs]) for k in runs[0]}
            for name, runs in report.runs.items()
        },
        "ratios": ratios,
        "ratio_spread": {k: common.spread(v) for k, v in report.ratios.items()},
        "targets": {},
    }


def part(report: Report, workload: str) -> Report:
    """The alternatives and ratios of one workload, for its table and panel."""
    return Report(
        workload,
        f"{HEADLINE[workload]}; ratios: Baton ahead above 1",
        HEADLINE[workload],
        {k: v for k, v in report.runs.items() if k.startswith(f"{workload}: ")},
        {k: v for k, v in report.ratios.items() if k.startswith(f"{workload}_")},
    )


def write(report: Report, quick: bool) -> dict[str, Any]:
    """results/peers.{json,md,png} (under results/quick/ for --quick, which must not overwrite
    the full results), as common.write; the markdown has one table per workload."""
    where = common.RESULTS / "quick" if quick else common.RESULTS
    where.mkdir(parents=True, exist_ok=True)
    out = summary(report, quick)
    out["machine"] = common.machine()
    out["headlines"] = HEADLINE
    out |= {"notes": report.notes, "runs": report.runs, "disturbance": report.disturbance}
    parts = [part(report, w) for w in HEADLINE if any(k.startswith(f"{w}: ") for k in report.runs)]
    md = [f"## peers: {report.title}", ""]
    md += [common.markdown(p, summary(p, quick)) for p in parts]
    if report.notes:
        md += ["", *(f"- {n}" for n in report.notes)]
    base = where / report.name
    base.with_suffix(".json").write_text(json.dumps(out, indent=2) + "\n")
    base.with_suffix(".md").write_text("\n".join(md) + "\n")
    try:
        plot(parts, quick, base.with_suffix(".png"))
    except ImportError:
        log("matplotlib is not installed (`make bench` installs it): no plot")
    log("\n".join(md))
    log(f"written: {base}.json, .md")
    return out


def plot(parts: list[Report], quick: bool, path: Path) -> None:
    """One panel per workload: its headline figure per alternative, min-max whiskers."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(len(parts), 1), figsize=(4.2 * max(len(parts), 1), 4), dpi=100)
    axes = [axes] if len(parts) <= 1 else list(axes)
    for ax, p in zip(axes, parts, strict=False):
        s = summary(p, quick)
        names = list(s["alternatives"])
        figs = [s["alternatives"][n][p.headline] for n in names]
        med = [f["median"] for f in figs]
        lo = [f["median"] - f["min"] for f in figs]
        hi = [f["max"] - f["median"] for f in figs]
        labels = [n.partition(": ")[2] for n in names]
        colors = ["#dd8452" if n.startswith("baton") else "#4c72b0" for n in labels]
        ax.bar(labels, med, yerr=[lo, hi], capsize=5, color=colors)
        ax.set_ylabel(p.headline + (" (lower is better)" if p.headline in LOWER_IS_BETTER else ""))
        shown = ", ".join(f"{k.partition('_vs_')[2]} {v:.2f}x" for k, v in s["ratios"].items())
        ax.set_title(f"{p.name}\nBaton vs: {shown}", fontsize=8)
        ax.tick_params(axis="x", labelsize=7, labelrotation=20)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
