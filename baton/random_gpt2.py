"""A GPT-2-layout checkpoint with random weights, and a real tokenizer for it, made locally.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with `tokenizers` on the
standard library's docstrings, and the weights are drawn at random (GPT-2's initialisation), so
what the model writes is noise. What it costs to run is what a trained model of the same shape
costs, which is what the demo and the benchmarks measure. The directory is a Hugging Face one
(config.json, model.safetensors, tokenizer.json): point `model.path` at a real checkpoint instead
and nothing else changes.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from baton.workload import paragraphs

EOS = "<|endoftext|>"
GPT2_VOCAB = 50257


@dataclass(slots=True, frozen=True)
class Shape:
    layers: int = 4
    hidden: int = 256
    heads: int = 4
    positions: int = 1024
    vocab: int = 8192  # GPT2_VOCAB for GPT-2's own vocabulary size
    tokenizer_vocab: int = 8192  # what BPE may learn from the stdlib text (at most vocab)
    seed: int = 0


def ensure(directory: str | Path, shape: Shape = Shape()) -> Path:
    """The checkpoint at `directory`, made first if it is missing or of another shape."""
    directory = Path(directory)
    stamp = directory / "baton-random.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(shape):
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer(min(shape.tokenizer_vocab, shape.vocab))
    tokenizer.save(str(directory / "tokenizer.json"))
    eos = tokenizer.token_to_id(EOS)
    (directory / "config.json").write_text(json.dumps(config(shape, eos), indent=2))
    save_file(weights(shape), str(directory / "model.safetensors"), metadata={"format": "pt"})
    stamp.write_text(json.dumps(asdict(shape)))  # last: a half-made directory is made again
    return directory


def train_tokenizer(vocab: int) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(paragraphs(), trainer)
    return tok


def config(shape: Shape, eos: int) -> dict:
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": shape.vocab,
        "n_positions": shape.positions,
        "n_embd": shape.hidden,
        "n_layer": shape.layers,
        "n_head": shape.heads,
        "n_inner": None,
        "activation_function": "gelu_new",
        "layer_norm_epsilon": 1e-5,
        "initializer_range": 0.02,
        "bos_token_id": eos,
        "eos_token_id": eos,
        "tie_word_embeddings": True,
        "baton_note": "random weights: made by baton.random_gpt2, not a trained model",
    }


def weights(shape: Shape) -> dict[str, torch.Tensor]:
    """GPT2LMHeadModel's tensors (Conv1D weights stored [in, out]); the LM head is tied."""
    gen = torch.Generator().manual_seed(shape.seed)
    h, n = shape.hidden, 4 * shape.hidden

    def normal(*size: int) -> torch.Tensor:
        return torch.randn(*size, generator=gen) * 0.02

    out = {
        "transformer.wte.weight": normal(shape.vocab, h),
        "transformer.wpe.weight": normal(shape.positions, h),
        "transformer.ln_f.weight": torch.ones(h),
        "transformer.ln_f.bias": torch.zeros(h),
    }
    for i in range(shape.layers):
        p = f"transformer.h.{i}"
        out |= {
            f"{p}.ln_1.weight": torch.ones(h),
            f"{p}.ln_1.bias": torch.zeros(h),
            f"{p}.attn.c_attn.weight": normal(h, 3 * h),
            f"{p}.attn.c_attn.bias": torch.zeros(3 * h),
            f"{p}.attn.c_proj.weight": normal(h, h),
            f"{p}.attn.c_proj.bias": torch.zeros(h),
            f"{p}.ln_2.weight": torch.ones(h),
            f"{p}.ln_2.bias": torch.zeros(h),
            f"{p}.mlp.c_fc.weight": normal(h, n),
            f"{p}.mlp.c_fc.bias": torch.zeros(n),
            f"{p}.mlp.c_proj.weight": normal(n, h),
            f"{p}.mlp.c_proj.bias": torch.zeros(h),
        }
    return out
