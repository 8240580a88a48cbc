"""Llama (`LlamaForCausalLM`): RMSNorm, rotary positions (with `llama3` scaling), grouped-query
attention, SwiGLU MLP, LM head tied or untied."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from workers.layers.attention import Context, SelfAttention
from workers.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from workers.layers.mlp import GatedMLP
from workers.layers.norm import RMSNorm
from workers.layers.parallel import TPGroup
from workers.layers.rotary import Rotary
from workers.loader import ModelInfo, Target
from workers.models.stage import Decoder


def parse(config: dict[str, Any], directory: Path) -> ModelInfo:
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or heads
    if heads % kv_heads:
        raise ValueError(f"{directory}: {heads} heads do not group over {kv_heads} KV heads")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{directory}: hidden_act {config['hidden_act']!r}; Llama uses silu")
    eos = config.get("eos_token_id")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    tokenizer = directory / "tokenizer.json"
    return ModelInfo(
        family="llama",
        name=directory.name,
        path=directory,
        decoder=True,
        hidden_size=hidden,
        num_layers=config["num_hidden_layers"],
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=config.get("head_dim") or hidden // heads,
        intermediate_size=config["intermediate_size"],
        vocab_size=config["vocab_size"],
        max_position=config["max_position_embeddings"],
        norm_eps=config.get("rms_norm_eps", 1e-6),
        hidden_act="silu",
        max_seq_length=config["max_position_embeddings"],
        tokenizer=tokenizer if tokenizer.is_file() else None,
        # several end tokens (Llama 3's list): any of them ends a sequence; the first is reported
        eos_token_id=eos[0] if isinstance(eos, list) else eos,
        tie_word_embeddings=config.get("tie_word_embeddings", False),
        extra={
            "eos_token_ids": eos if isinstance(eos, list) else [eos] if eos is not None else [],
            # transformers 5 writes both under "rope_parameters"; older exports apart
            "rope_theta": rope.get("rope_theta", config.get("rope_theta", 10000.0)),
            "rope_scaling": rope
            if rope.get("rope_type", rope.get("type", "default")) != "default"
            else None,
            "attention_bias": config.get("attention_bias", False),
            "mlp_bias": config.get("mlp_bias", False),
        },
    )


class Block(nn.Module):
    def __init__(self, info: ModelInfo, tp: TPGroup, dtype: torch.dtype, rotary: Rotary) -> None:
        super().__init__()
        h, x = info.hidden_size, info.extra
        self.input_norm = RMSNorm(h, info.norm_eps, dtype)
        self.attn = SelfAttention(
            h,
            info.num_heads,
            info.num_kv_heads,
            info.head_dim,
            tp,
            bias=x["attention_bias"],
            dtype=dtype,
            rotary=rotary,
        )
        self.post_attention_norm = RMSNorm(h, info.norm_eps, dtype)
        self.mlp = GatedMLP(h, info.intermediate_size, tp, x["mlp_bias"], dtype)

    def forward(self, x: torch.Tensor, ctx: Context) -> torch.Tensor:
        x, h = self.post_attention_norm.add(x, self.attn(self.input_norm(x), ctx))
        return x + self.mlp(h)


_BLOCK = re.compile(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)")
_BLOCK_PARTS = {
    "input_layernorm": ("input_norm", None),
    "self_attn.q_proj": ("attn.qkv", "q"),
    "self_attn.k_proj": ("attn.qkv", "k"),
    "self_attn.v_proj": ("attn.qkv", "v"),
    "self_attn.o_proj": ("attn.out", None),
    "post_attention_layernorm": ("post_attention_norm", None),
    "mlp.gate_proj": ("mlp.gate_up", 0),
    "mlp.up_proj": ("mlp.gate_up", 1),
    "mlp.down_proj": ("mlp.down", None),
}


class Llama(Decoder):
    gated = True

    def build(self, info: ModelInfo, dtype: torch.dtype) -> None:
        tp, first, last = self.tp, self.first, self.last
        h, v = info.hidden_size, info.vocab_size
        self.rotary = Rotary(
            info.head_dim, info.max_position, info.extra["rope_theta"], info.extra["rope_scaling"]
        )
        self.embed = VocabParallelEmbedding(v, h, tp, dtype) if first else None
        self.layers = nn.ModuleDict(
            {str(i): Block(info, tp, dtype, self.rotary) for i in self.layer_ids}
        )
        self.norm = RMSNorm(h, info.norm_eps, dtype) if last else None
        self.lm_head = ParallelLMHead(v, h, tp, dtype=dtype) if last else None

    def targets(self, name: str) -> list[Target]:
        if name == "model.embed_tokens.weight":
            tied = [Target("lm_head.weight")] if self.info.tie_word_embeddings else []
            return [Target("embed.weight"), *tied]
        if name == "lm_head.weight":
            return [] if self.info.tie_word_embeddings else [Target("lm_head.weight")]
        if name == "model.norm.weight":
            return [Target("norm.weight")]
        m = _BLOCK.fullmatch(name)
        if m is None or m.group(2) not in _BLOCK_PARTS:
            return []  # e.g. rotary inv_freq buffers older exports carry
        path, shard = _BLOCK_PARTS[m.group(2)]
        return [Target(f"layers.{m.group(1)}.{path}.{m.group(3)}", shard)]
