"""Whether this machine computes a half-precision dtype natively, so that asking for it pays.

On CPU, oneDNN runs bfloat16 matmuls on AVX-512 BF16 or AMX and float16 ones on AVX-512 FP16 or
AMX-FP16; elsewhere torch emulates them in float32 with conversions on every product, which is
slower than float32 itself. On a machine with AVX-512 BF16 (and no FP16) bfloat16 matmuls ran
at 3x float32 (docs/performance.md). CUDA computes both natively.
"""

from __future__ import annotations

from pathlib import Path

NATIVE_CPU = {
    "bfloat16": ("avx512_bf16", "amx_bf16"),
    "float16": ("avx512_fp16", "amx_fp16"),
}


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> set[str]:
    """The first processor's feature flags (empty where the kernel does not say)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.partition(":")[2].split())
    return set()


def refusal(dtype: str, device: str, flags: set[str] | None = None) -> str | None:
    """Why `dtype` on `device` would not pay (a message naming what is missing), or None."""
    needs = NATIVE_CPU.get(dtype)
    if needs is None or device != "cpu":
        return None
    flags = cpu_flags() if flags is None else flags
    if any(f in flags for f in needs):
        return None
    return (
        f"model.dtype = {dtype!r} on this CPU would be emulated, slower than float32: it has "
        f"none of the instructions that compute {dtype} natively ({', '.join(needs)}); "
        'use model.dtype = "float32"'
    )
