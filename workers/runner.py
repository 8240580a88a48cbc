"""The model runner of one worker: its stage of the model, its KV cache, and one forward per
micro-batch.

It owns what the model must not: the paged KV cache (blocks of `block_size` slots for this
stage's layers and this rank's KV heads, sized from `kv_memory`), and the attention metadata
built from a batch's header (positions, slot mapping, block tables). The controller's block
manager decides which slots each sequence uses; the runner only follows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from workers import models
from workers.layers import native
from workers.layers.attention import Attention, Context, Workspace
from workers.layers.mlp import GatedMLP
from workers.layers.norm import LayerNorm, RMSNorm
from workers.layers.paged import PagedDecode
from workers.layers.parallel import TPGroup
from workers.layers.rotary import Rotary
from workers.loader import ModelInfo
from workers.pool import Pooled, units
from workers.pool import pooled as is_pooled
from workers.prefetch import Prefetcher
from workers.sampler import sample

VECTOR = 16  # the C++ kernels read a row 16 floats at a time (vec.h)


@dataclass(slots=True)
class Step:
    """What one forward hands on: tensors for the next stage, or (last stage) the result."""

    tensors: list[torch.Tensor]
    body: dict[str, Any]


def free_memory(device: torch.device) -> int:
    """Bytes free for the cache on `device` now (after the weights are in)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot tell the free memory: /proc/meminfo has no MemAvailable")


def use_packed_kernels(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> bool:
    """Give a model the C++ kernels (built or loaded now) where they apply, on CPU in float32 or
    bfloat16: its attention layers the packed attention (head size 16 to 128: an encoder's
    texts, a decoder's fresh prompts); its norms the fused residual add (float32 LayerNorm,
    RMSNorm; hidden size a multiple of 16); SwiGLU's gating and rotary positions their single
    passes (widths a multiple of 16, half a head too). Elsewhere, or where the kernels cannot be
    built (logged), torch's flash attention and separate ops stay. Whether the attention has
    it."""
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    if not layers or device.type != "cpu" or dtype not in native.DTYPES:
        return False
    module = native.kernels()
    if module is None:
        return False
    for m in model.modules():
        if isinstance(m, LayerNorm) and m.weight.dtype == torch.float32:
            if m.weight.shape[0] % VECTOR == 0:
                m.fused = module.add_norm
        elif isinstance(m, RMSNorm) and m.weight.shape[0] % VECTOR == 0:
            m.fused = module.rms_norm
        elif isinstance(m, GatedMLP) and m.down.in_local % VECTOR == 0:
            m.fused = module.silu_and_mul
        elif isinstance(m, Rotary) and m.cos.shape[1] % (2 * VECTOR) == 0:
            m.fused = module.rotary
    if layers[0].head_dim not in native.HEAD_DIMS:
        return False
    for attn in layers:
        attn.packed = module.packed_attention
    return True


class ModelRunner:
    def __init__(
        self,
        info: ModelInfo,
        stage: int,
        pipeline: int,
        tp: TPGroup,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        block_size: int = 16,
        kv_memory: float = 0.25,
        compile: bool = False,
        stages: list[int] | None = None,
        encoder_kernel: bool = False,
        pooled: Pooled | None = None,
        prefetch: str = "auto",
        prefetch_distance: int = 2,
        screen: bool = False,
    ) -> None:
        self.info, self.tp, self.block_size = info, tp, block_size
        self.device = torch.device(device)
        self.model = models.build(info, stage, pipeline, tp, device, dtype, stages, pooled, screen)
        self.prefetcher: Prefetcher | None = None
        # a GPU cannot compute from the pool's host memory: its pooled layers are always copied
        if pooled is not None and (prefetch == "always" or self.device.type == "cuda"):
            chosen = [u for u in units(self.model) if all(is_pooled(p) for _, p in u.params)]
            if any(u.layer is not None for u in chosen):
                self.prefetcher = Prefetcher(self.model, chosen, prefetch_distance, self.device)
        self.num_blocks = 0
        self.native_decode = False
        if info.decoder:
            self.allocate_kv_cache(kv_memory, dtype, compile)
        self.argmax: Callable[[torch.Tensor], torch.Tensor] | None = None
        if encoder_kernel:  # now, not at the first batch: the worker is not yet ready
            use_packed_kernels(self.model, self.device, dtype)
            if self.device.type == "cpu" and dtype in native.DTYPES and (k := native.kernels()):
                self.argmax = k.argmax

    def allocate_kv_cache(self, kv_memory: float, dtype: torch.dtype, compile: bool) -> None:
        """One tensor [layers, 2, slots, kv_heads, head_dim]; each layer's attention gets views
        of its K and V slots."""
        layers = [m for m in self.model.modules() if isinstance(m, Attention)]
        if not layers:
            return  # a stage with no layers (more stages than layers is refused earlier)
        kv_heads, d = layers[0].kv_heads, layers[0].head_dim
        per_block = self.block_size * self.info.kv_bytes_per_token(len(layers), kv_heads, dtype)
        budget = kv_memory if kv_memory > 1 else kv_memory * free_memory(self.device)
        self.num_blocks = int(budget // per_block)
        if self.num_blocks < 1:
            raise ValueError(
                f"kv.memory = {kv_memory} leaves room for no KV block of {per_block} bytes"
            )
        slots = self.num_blocks * self.block_size
        # Zeroed, not left as found: attention reads whole blocks and masks the slots past a
        # sequence's end, but a masked value still meets a zero weight (0 * v), and a NaN that
        # recycled memory happened to hold would poison the sum.
        self.kv_cache = torch.zeros(
            len(layers), 2, slots, kv_heads, d, dtype=dtype, device=self.device
        )
        workspace = Workspace()
        kernel = PagedDecode(self.device, dtype) if compile else None
        # the C++ kernel reads each sequence's own length: no grouping by length for it
        self.native_decode = kernel is not None and kernel.native is not None
        for i, attn in enumerate(layers):
            attn.k_cache, attn.v_cache = self.kv_cache[i, 0], self.kv_cache[i, 1]
            attn.block_size, attn.workspace, attn.kernel = self.block_size, workspace, kernel
        if kernel is not None:  # now, not at the first step: the worker is not yet ready
            by_block = (-1, self.block_size, kv_heads, d)
            kernel.warm(
                self.kv_cache[0, 0].view(by_block),
                self.kv_cache[0, 1].view(by_block),
                layers[0].heads,
            )

    def counters(self) -> dict[str, int]:
        """The prefetcher's running counts, when there is one."""
        p = self.prefetcher
        return {"prefetches": p.prefetches, "stalls": p.stalls} if p is not None else {}

    @torch.inference_mode()
    def run(self, body: dict[str, Any], tensors: list[torch.Tensor]) -> Step:
        """One micro-batch through this stage. `body` and `tensors` as the wire's `batch`."""
        task = body.get("task", "embed")
        if task == "echo":  # routed through every stage like any batch, but nothing to compute
            return Step([], {})
        x = tensors[0].to(self.device, non_blocking=True)
        seq_lens = body["seq_lens"]
        if task == "embed":
            ctx = Context.encoder(seq_lens, bool(body.get("padded", False)), self.device)
            return Step([self.model(x, ctx)], {})
        if not self.info.decoder:
            raise ValueError(f"task {task!r} needs a decoder; {self.info.name} is an encoder")
        slot_mapping, block_tables = tensors[1], tensors[2]
        ctx = Context.decoder(
            seq_lens,
            body["context_lens"],
            slot_mapping,
            block_tables,
            self.block_size,
            self.device,
            by_length=not self.native_decode,
        )
        h = self.model(x, ctx)
        if not self.model.last:
            return Step([h, slot_mapping, block_tables], {})
        rows = body["sample"]
        if not rows:
            return Step([], {"token_ids": []})
        ends = torch.tensor(seq_lens, device=self.device).cumsum(0) - 1
        return Step([], {"token_ids": self.sample(h[ends[[r[0] for r in rows]]], rows)})

    def sample(self, h: torch.Tensor, rows: list[list]) -> list[int]:
        """One token for each sample row (`sampler.sample`'s rows) from its hidden row: greedy
        rows by a screened head's `greedy` where the model has one, the rest from logits."""
        if not self.model.screened:
            return sample(self.model.logits(h), rows, self.argmax)
        greedy = [i for i, r in enumerate(rows) if r[1] <= 0]
        if len(greedy) == len(rows):
            return self.model.greedy(h).tolist()
        out = [0] * len(rows)
        if greedy:
            for i, t in zip(greedy, self.model.greedy(h[greedy]).tolist(), strict=True):
                out[i] = t
        drawn = [i for i, r in enumerate(rows) if r[1] > 0]
        logits = self.model.logits(h[drawn])
        for i, t in zip(drawn, sample(logits, [rows[i] for i in drawn], self.argmax), strict=True):
            out[i] = t
        return out
