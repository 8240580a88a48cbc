"""What every model family's pipeline stage shares: its place in the layout, and loading."""

from __future__ import annotations

import torch
from torch import nn

from workers.layers import native
from workers.layers.linear import Packed, packs_in_place
from workers.layers.parallel import TPGroup
from workers.loader import ModelInfo, Target, load
from workers.pool import Pooled, PoolError
from workers.pool import pooled as is_pooled


class Stage(nn.Module):
    """Layers `layers` of the model on this TP rank; the input side if `first`, the output
    side (pooling, or final norm and LM head) if `last`. Parameters are created straight on the
    device, each rank only its own shard; `load` fills them from the checkpoint."""

    gated = False  # the MLP has three matrices (gate, up, down) rather than two

    def __init__(
        self,
        info: ModelInfo,
        layers: range,
        first: bool,
        last: bool,
        tp: TPGroup,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        super().__init__()
        if layers and not (layers[0] >= 0 and layers[-1] < info.num_layers):
            raise ValueError(f"layers {layers} outside the model's 0..{info.num_layers - 1}")
        self.info, self.layer_ids, self.first, self.last, self.tp = info, layers, first, last, tp
        self.device = torch.device(device)
        with self.device:
            self.build(info, dtype)
        self.eval()  # inference only; there is no dropout anyway

    def build(self, info: ModelInfo, dtype: torch.dtype) -> None:
        raise NotImplementedError

    def targets(self, name: str) -> list[Target]:
        """Where checkpoint tensor `name` goes in this stage (empty: nowhere here)."""
        raise NotImplementedError

    def load(self, pooled: Pooled | None = None) -> Stage:
        """Read this stage's weights; `pooled` parameters straight into the pool's region."""
        if pooled is None:
            load(self, self.info.path)
        else:
            pooled.place(self)
            names = pooled.names
            load(self, self.info.path, {n for n, _ in self.named_parameters()} - names)
            with pooled.filling() as empty:  # another replica's worker may have filled it
                if empty:
                    load(self, self.info.path, names)
                    if self.device.type == "cpu":
                        pooled.packed = self.pack_pooled()
            if pooled.packed and native.kernels() is None:
                raise PoolError(
                    "the pool holds weights in oneDNN's layout and this worker has no C++ "
                    "kernels to read them (see the log for why they did not build)"
                )
        if self.device.type == "cpu":  # a GPU's pooled weights are CPU tensors: not for oneDNN
            pool_packed = pooled is not None and pooled.packed
            for m in self.modules():
                if isinstance(m, Packed):
                    m.pack(pool_packed)  # oneDNN's layout, private or in the pool
        return self

    def pack_pooled(self) -> bool:
        """The pooled weights oneDNN can read packed from the pool, written over their plain
        bytes there in its layout (by the worker filling the pool, under the shard's lock), so
        that every worker's matmuls run as fast on them as on private ones; whether the pool
        holds them so (not where the C++ kernels, which make the views, did not build)."""
        if native.kernels() is None:
            return False
        for m in self.modules():
            if isinstance(m, Packed) and is_pooled(m.weight) and packs_in_place(m.weight):
                m.pack_pooled()
        return True


class Decoder(Stage):
    """A pre-norm decoder: token embedding on the first stage, blocks, and on the last stage the
    final norm and LM head, applied only to the rows that sample (`logits`)."""

    embed: nn.Module | None
    layers: nn.ModuleDict
    norm: nn.Module | None
    lm_head: nn.Module | None

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed(ids)

    def forward(self, x: torch.Tensor, ctx) -> torch.Tensor:
        """Token ids [T] (first stage) or hidden [T, hidden] -> hidden [T, hidden]."""
        if self.first:
            x = self.embed_tokens(x, ctx.positions)
        for layer in self.layers.values():
            x = layer(x, ctx)
        return x

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Last stage: hidden rows [S, hidden] -> logits [S, vocab] in the model's dtype, on
        every rank (not widened to float32 here: for 300 rows of GPT-2's 50,257 that took as long
        as the LM head's bfloat16 matmul; the sampler widens only the rows that draw)."""
        return self.lm_head(self.norm(h))

    @property
    def screened(self) -> bool:
        """Whether `greedy` runs without the LM head's own matmul (ParallelLMHead)."""
        return bool(getattr(self.lm_head, "screened", False))

    def greedy(self, h: torch.Tensor) -> torch.Tensor:
        """Last stage, screened head: hidden rows [S, hidden] -> the argmax of their logits
        (products summed in float32) [S], on every rank."""
        return self.lm_head.greedy(self.norm(h))
