"""Deterministic text workloads built from the running Python's standard-library docstrings.

Nothing is downloaded or stored: the same Python yields the same texts in the same order, so a
demo or benchmark run is reproducible. Modules are imported in sorted order and their public
members walked in sorted order; texts are deduplicated, keeping first occurrences. The walk runs
in a fresh, isolated interpreter (`python -I -S`), because third-party imports in the caller
monkeypatch stdlib members (torch replaces inspect.getfile) and would change the texts.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
import re
import subprocess
import sys
import warnings

# modules with side effects on import (printing, browsers, GUI, readline hooks) or that are
# shims whose content depends on what else is installed
SKIP = frozenset(
    {
        "antigravity",
        "distutils",
        "ensurepip",
        "idlelib",
        "lib2to3",
        "pydoc_data",
        "readline",
        "rlcompleter",
        "test",
        "this",
        "tkinter",
        "turtle",
        "turtledemo",
    }
)
_BLANK = re.compile(r"\n\s*\n")


def paragraphs(n: int | None = None) -> list[str]:
    """Whole paragraphs of docstrings, whitespace-normalised; cycles when n exceeds the supply."""
    return _take(_paragraphs(), n)


def docstrings(n: int | None = None) -> list[str]:
    """Whole docstrings (long-tailed lengths), whitespace-normalised; cycles like paragraphs."""
    return _take(_docstrings(), n)


def _take(texts: tuple[str, ...], n: int | None) -> list[str]:
    if n is None:
        return list(texts)
    return [texts[i % len(texts)] for i in range(n)]


@functools.cache
def _paragraphs() -> tuple[str, ...]:
    out = (" ".join(p.split()) for doc in _raw() for p in _BLANK.split(doc))
    return tuple(dict.fromkeys(p for p in out if p))


@functools.cache
def _docstrings() -> tuple[str, ...]:
    return tuple(dict.fromkeys(d for d in (" ".join(r.split()) for r in _raw()) if d))


@functools.cache
def _raw() -> tuple[str, ...]:
    """Cleaned docstrings (paragraph breaks kept) in a fixed order."""
    proc = subprocess.run(
        [sys.executable, "-I", "-S", __file__], capture_output=True, timeout=120, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"workload walk failed: {proc.stderr.decode(errors='replace')[-2000:]}")
    return tuple(json.loads(proc.stdout))


def _walk() -> list[str]:
    docs: list[str] = []
    for name in sorted(sys.stdlib_module_names):
        if name.startswith("_") or name in SKIP:
            continue
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecated modules warn on import
                module = importlib.import_module(name)
        except Exception:  # platform-specific or missing optional modules
            continue
        docs.append(_doc(module))
        for obj in _members(module, module.__name__):
            docs.append(_doc(obj))
            if inspect.isclass(obj):
                docs.extend(_doc(m) for m in _members(obj, module.__name__))
    return [d for d in docs if d]


def _members(owner: object, module: str) -> list[object]:
    """Public members defined in `module` (re-exports would repeat another module's text)."""
    names = vars(owner) if inspect.isclass(owner) else dir(owner)
    out = []
    for name in sorted(names):
        if name.startswith("_"):
            continue
        try:
            obj = getattr(owner, name)
        except Exception:
            continue
        if getattr(obj, "__module__", None) == module and not inspect.ismodule(obj):
            out.append(obj)
    return out


def _doc(obj: object) -> str:
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


if __name__ == "__main__":
    # ASCII JSON on the byte stream: independent of the child's locale
    sys.stdout.buffer.write(json.dumps(_walk(), ensure_ascii=True).encode())
