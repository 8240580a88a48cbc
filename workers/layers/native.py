"""The C++ kernels for CPU, built for this machine on first use and cached.

One extension (`torch.utils.cpp_extension`: a C++ compiler and ninja) holds them all: decode
attention over the paged KV cache (`paged_decode.cpp`), attention over packed sequences
(`packed_attention.cpp`), a block's residual add and norm (`add_norm.cpp`: LayerNorm, RMSNorm),
SwiGLU's gating (`swiglu.cpp`), rotary positions (`rotary.cpp`), greedy sampling's argmax
(`argmax.cpp`) and the LM head's argmax screened from int8 logits (`screen.cpp`), with the
vector helpers they share in `vec.h` (ninja rebuilds what includes it when it changes). The
first worker to start on a machine builds it (about 45 s on 2 cores, `-O3 -march=native`);
later ones load it from torch's extension cache (`TORCH_EXTENSIONS_DIR`).
Where it cannot be built, `kernels()` logs why and returns None, and each caller keeps its
portable path (torch.compile, torch's flash attention).
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import logging
import os
from pathlib import Path
from types import ModuleType

import torch

log = logging.getLogger("baton.worker")

HERE = Path(__file__).parent
SOURCES = [
    HERE / n
    for n in (
        "kernels.cpp",
        "paged_decode.cpp",
        "packed_attention.cpp",
        "add_norm.cpp",
        "swiglu.cpp",
        "rotary.cpp",
        "argmax.cpp",
        "screen.cpp",
        "mkldnn_view.cpp",
    )
]
DTYPES = (torch.float32, torch.bfloat16)  # what the kernels read and write
HEAD_DIMS = (16, 32, 64, 128)  # the packed attention's (decode's: any)


def _isa() -> str:
    """What the build is specialised for (-march=native): a short hash of the CPU's flags, so a
    cache shared by machines of different instruction sets never hands one the other's binary."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "")
    except OSError:
        flags = ""
    return hashlib.sha1(flags.encode()).hexdigest()[:10]


def build_directory() -> Path:
    """Where the extension is built and cached: named after the CPU's instruction set and the
    sources' place (ninja's build file names them by path, so two checkouts sharing one cache
    would rebuild each time they took turns)."""
    from torch.utils.cpp_extension import get_default_build_root

    root = os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root()
    where = hashlib.sha1(str(HERE.resolve()).encode()).hexdigest()[:8]
    return Path(root) / f"baton_kernels_{_isa()}_{where}"


@functools.cache
def kernels() -> ModuleType | None:
    """The module, built or loaded once per process; None, logged, where it cannot be built."""
    try:
        from torch.utils.cpp_extension import load

        directory = build_directory()
        directory.mkdir(parents=True, exist_ok=True)
        with open(directory / "baton.lock", "a") as held:
            # torch's own build lock is a file that a builder killed mid-build (a worker
            # stopped while starting) leaves behind, and every later load would wait on it for
            # ever; ours is a lock the kernel drops with its holder, and under it nobody else
            # builds, so a torch lock file found here is such a leftover
            fcntl.lockf(held, fcntl.LOCK_EX)
            (directory / "lock").unlink(missing_ok=True)
            return load(
                directory.name,
                [str(s) for s in SOURCES],
                extra_cflags=["-O3", "-march=native", "-fopenmp"],
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
            )
    except Exception as e:  # no compiler, no ninja, a read-only cache: the portable paths work
        log.warning("the C++ kernels could not be built (%s); using the portable paths", e)
        return None
