"""GPT-2 (`GPT2LMHeadModel`): learned positions, pre-LayerNorm blocks, fused QKV stored as
Conv1D ([in, out], read transposed), GELU MLP, LM head tied to the token embedding."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.layers.attention import Context, SelfAttention
from workers.layers.embedding import Embedding, ParallelLMHead, VocabParallelEmbedding
from workers.layers.mlp import MLP
from workers.layers.norm import LayerNorm
from workers.layers.parallel import TPGroup
from workers.loader import ModelInfo, Target
from workers.models.stage import Decoder


def parse(config: dict[str, Any], directory: Path) -> ModelInfo:
    hidden, heads = config["n_embd"], config["n_head"]
    if hidden % heads:
        raise ValueError(f"{directory}: n_embd {hidden} not divisible by {heads} heads")
    tokenizer = directory / "tokenizer.json"
    return ModelInfo(
        family="gpt2",
        name=directory.name,
        path=directory,
        decoder=True,
        hidden_size=hidden,
        num_layers=config["n_layer"],
        num_heads=heads,
        num_kv_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=config.get("n_inner") or 4 * hidden,
        vocab_size=config["vocab_size"],
        max_position=config["n_positions"],
        norm_eps=config.get("layer_norm_epsilon", 1e-5),
        hidden_act=config.get("activation_function", "gelu_new"),
        max_seq_length=config["n_positions"],
        tokenizer=tokenizer if tokenizer.is_file() else None,
        eos_token_id=config.get("eos_token_id"),
        tie_word_embeddings=config.get("tie_word_embeddings", True),
    )


class Block(nn.Module):
    def __init__(self, info: ModelInfo, tp: TPGroup, dtype: torch.dtype) -> None:
        super().__init__()
        h, heads, d = info.hidden_size, info.num_heads, info.head_dim
        self.ln_1 = LayerNorm(h, info.norm_eps, dtype=dtype)
        self.attn = SelfAttention(h, heads, heads, d, tp, dtype=dtype)
        self.ln_2 = LayerNorm(h, info.norm_eps, dtype=dtype)
        self.mlp = MLP(h, info.intermediate_size, info.hidden_act, tp, dtype)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), ctx)
        return x + self.mlp(self.ln_2(x))


_BLOCK = re.compile(r"h\.(\d+)\.(.+)\.(weight|bias)")
# checkpoint part -> (our module path, shard id, stored as Conv1D [in, out])
_BLOCK_PARTS = {
    "ln_1": ("ln_1", None, False),
    "attn.c_attn": ("attn.qkv", "qkv", True),
    "attn.c_proj": ("attn.out", None, True),
    "ln_2": ("ln_2", None, False),
    "mlp.c_fc": ("mlp.up", None, True),
    "mlp.c_proj": ("mlp.down", None, True),
}


class GPT2(Decoder):
    def build(self, info: ModelInfo, dtype: torch.dtype) -> None:
        tp = self.tp
        first, last = self.first, self.last
        self.embed = (
            VocabParallelEmbedding(info.vocab_size, info.hidden_size, tp, dtype) if first else None
        )
        self.pos = Embedding(info.max_position, info.hidden_size, dtype) if first else None
        self.layers = nn.ModuleDict({str(i): Block(info, tp, dtype) for i in self.layer_ids})
        self.norm = LayerNorm(info.hidden_size, info.norm_eps, dtype=dtype) if last else None
        self.lm_head = (
            ParallelLMHead(info.vocab_size, info.hidden_size, tp, dtype=dtype) if last else None
        )

    def embed_tokens(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.embed(ids) + self.pos(positions)

    def targets(self, name: str) -> list[Target]:
        name = name.removeprefix("transformer.")
        if name == "wte.weight":
            tied = [Target("lm_head.weight")] if self.info.tie_word_embeddings else []
            return [Target("embed.weight"), *tied]
        if name == "lm_head.weight":
            return [] if self.info.tie_word_embeddings else [Target("lm_head.weight")]
        if name == "wpe.weight":
            return [Target("pos.weight")]
        if name.startswith("ln_f."):
            return [Target(f"norm.{name[len('ln_f.') :]}")]
        m = _BLOCK.fullmatch(name)
        if m is None or m.group(2) not in _BLOCK_PARTS:
            return []  # e.g. the causal-mask buffers older exports carry
        path, shard, conv = _BLOCK_PARTS[m.group(2)]
        kind = m.group(3)
        return [Target(f"layers.{m.group(1)}.{path}.{kind}", shard, conv and kind == "weight")]
