"""Tiny random GPT-2 and Llama checkpoints, made with transformers, and its logits as the oracle;
and `Engine`, just enough of a scheduler to drive model runners in one process, with the
`scenario` every model-level decoder test runs (chunked prefill, joins, a shared prefix)."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from workers.layers.parallel import TPGroup
from workers.models import load_info
from workers.runner import ModelRunner

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


BLOCK = 4
SOLO = TPGroup(0, 1, None)


class Engine:
    """Just enough of a scheduler to drive runners: each sequence owns fixed blocks, except
    that a sequence may start on another's full blocks (a shared prefix)."""

    def __init__(
        self,
        directory,
        pipeline: int,
        tp: TPGroup = SOLO,
        compiled: bool = False,
        dtype: torch.dtype = torch.float32,
        screen: bool = False,
    ) -> None:
        info = load_info(str(directory))
        self.runners = [
            ModelRunner(
                info,
                s,
                pipeline,
                tp,
                dtype=dtype,
                block_size=BLOCK,
                kv_memory=4 << 20,
                compile=compiled,  # the C++ kernels: decode attention, and fresh prompts
                encoder_kernel=compiled,
                screen=screen,  # greedy tokens from the screened LM head, where the CPU has one
            )
            for s in range(pipeline)
        ]
        self.blocks_each = 40
        self.tables: dict[int, list[int]] = {}

    def table(self, seq: int, shared: list[int] = ()) -> list[int]:
        if seq not in self.tables:
            own = list(range(seq * self.blocks_each, (seq + 1) * self.blocks_each))
            self.tables[seq] = [*shared, *own][: self.blocks_each]
        return self.tables[seq]

    def step(self, work: list[tuple[int, list[int], int, bool]]) -> list[int]:
        """work: (sequence, its new token ids, tokens cached before them, samples?)."""
        seq_lens = [len(ids) for _, ids, _, _ in work]
        context_lens = [c + len(ids) for _, ids, c, _ in work]
        slots = []
        for seq, ids, cached, _ in work:
            table = self.table(seq)
            slots += [
                table[p // BLOCK] * BLOCK + p % BLOCK for p in range(cached, cached + len(ids))
            ]
        width = max(len(self.table(s)) for s, *_ in work)
        tables = torch.full((len(work), width), -1, dtype=torch.int32)
        for i, (seq, *_) in enumerate(work):
            tables[i, : len(self.table(seq))] = torch.tensor(self.table(seq))
        body = {
            "task": "generate",
            "seq_lens": seq_lens,
            "context_lens": context_lens,
            "sample": [[i, 0.0, 0, 1.0, -1, 0] for i, w in enumerate(work) if w[3]],
        }
        x = torch.tensor([t for _, ids, _, _ in work for t in ids])
        tensors = [x, torch.tensor(slots), tables]
        for runner in self.runners:
            out = runner.run(body, tensors)
            tensors = out.tensors
        return out.body["token_ids"]


A = [5, 17, 3, 44, 9, 12, 30, 2, 7, 61, 8]  # 11 tokens: two full blocks and a part
B = [70, 4, 4, 19, 23]
C = A[:8] + [50, 51, 52]  # shares A's two full blocks


def scenario(engine: Engine) -> dict[int, list[int]]:
    """Greedy tokens of A, B and C: A's prompt in two chunks, B joining while A decodes, C
    starting on A's cached blocks while both decode."""
    a, b, c = A, B, C
    out = {0: [], 1: [], 2: []}
    # a's prompt in two chunks; only the second samples
    assert engine.step([(0, a[:6], 0, False)]) == []
    out[0] += engine.step([(0, a[6:], 6, True)])
    # a decodes while b's whole prompt joins the same micro-batch
    got = engine.step([(0, out[0][-1:], len(a), True), (1, b, 0, True)])
    out[0].append(got[0])
    out[1].append(got[1])
    # c starts on a's first two blocks: only its last three prompt tokens are computed
    engine.table(2, shared=engine.table(0)[:2])
    for k in range(6):
        work = [
            (0, out[0][-1:], len(a) + len(out[0]) - 1, True),
            (1, out[1][-1:], len(b) + len(out[1]) - 1, True),
        ]
        if k == 0:
            work.append((2, c[8:], 8, True))
        else:
            work.append((2, out[2][-1:], len(c) + len(out[2]) - 1, True))
        for seq, token in zip((0, 1, 2), engine.step(work), strict=True):
            out[seq].append(token)
    return out
