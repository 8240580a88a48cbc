"""Tiny random GPT-2 and Llama checkpoints, made with transformers, and its logits as the oracle."""

from __future__ import annotations

import os
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

VOCAB = 96
# Large initial weights: the logits spread out, so the argmax is never a near tie.
INIT = 0.3
TIE = 1e-4  # a greedy token is right if its logit is within this of the top one


def gpt2(directory: Path) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=VOCAB,
        n_positions=128,
        n_embd=64,
        n_layer=4,
        n_head=4,
        initializer_range=INIT,
        eos_token_id=VOCAB - 1,
        bos_token_id=VOCAB - 1,
    )
    GPT2LMHeadModel(config).eval().save_pretrained(directory)
    return directory


def llama(directory: Path) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,  # fewer than 2 ranks: tensor 2 replicates it
        max_position_embeddings=128,
        initializer_range=INIT,
        tie_word_embeddings=False,
        eos_token_id=VOCAB - 1,
        bos_token_id=1,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    )
    LlamaForCausalLM(config).eval().save_pretrained(directory)
    return directory


def reference_logits(directory: Path, token_ids: list[int]) -> torch.Tensor:
    """transformers' logits [len, vocab] for one sequence, float32."""
    from transformers import AutoModelForCausalLM

    model = _cached(directory, AutoModelForCausalLM)
    with torch.inference_mode():
        return model(torch.tensor([token_ids])).logits[0].float()


_MODELS: dict[Path, object] = {}


def _cached(directory: Path, cls) -> object:
    if directory not in _MODELS:
        _MODELS[directory] = cls.from_pretrained(directory).eval()
    return _MODELS[directory]


def check_greedy(directory: Path, prompt: list[int], generated: list[int]) -> None:
    """Every generated token is transformers' argmax at its position (within TIE)."""
    logits = reference_logits(directory, prompt + generated)
    for k, token in enumerate(generated):
        row = logits[len(prompt) + k - 1]
        gap = float(row.max() - row[token])
        assert gap <= TIE, f"token {k} ({token}) is {gap} below the top logit {int(row.argmax())}"
