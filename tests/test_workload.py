"""Workloads are deterministic, whole, normalised texts, whatever the caller imported first."""

from __future__ import annotations

import hashlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

from baton.workload import docstrings, paragraphs

REPO = Path(__file__).resolve().parent.parent


def digest(texts: list[str]) -> str:
    return hashlib.sha256("\x00".join(texts).encode()).hexdigest()


def test_paragraphs_shape():
    ps = paragraphs()
    assert len(ps) >= 2000  # enough for the demo without repeating
    assert len(set(ps)) == len(ps)
    for p in ps:
        assert p and p == " ".join(p.split())  # non-empty, one line, single spaces


def test_docstrings_shape_long_tailed():
    ds = docstrings()
    assert len(ds) >= 1000 and len(set(ds)) == len(ds)
    assert all(d and d == " ".join(d.split()) for d in ds)
    lengths = [len(d) for d in ds]
    assert max(lengths) > 20 * statistics.median(lengths)  # a long tail, not uniform
    # whole docstrings are longer than their paragraphs
    assert statistics.mean(lengths) > statistics.mean(len(p) for p in paragraphs())


def test_n_prefix_and_cycle():
    ps = paragraphs()
    assert paragraphs(10) == ps[:10]
    assert paragraphs(0) == []
    more = paragraphs(len(ps) + 5)
    assert len(more) == len(ps) + 5 and more[len(ps) :] == ps[:5]
    assert docstrings(3) == docstrings()[:3]


def test_results_are_copies():
    ps = paragraphs(3)
    ps.append("mine")
    assert paragraphs(3) == ps[:3]


def test_same_texts_in_a_fresh_interpreter_that_imported_torch_first():
    # torch monkeypatches stdlib members; the workload must not notice
    code = (
        "import json, sys, torch, zmq\n"
        "from baton.workload import paragraphs, docstrings\n"
        "json.dump([paragraphs(), docstrings()], sys.stdout)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, capture_output=True, timeout=120, check=True
    )
    ps, ds = json.loads(out.stdout)
    assert digest(ps) == digest(paragraphs())
    assert digest(ds) == digest(docstrings())
