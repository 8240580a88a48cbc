"""Text <-> token ids with the model's own tokenizer.json.

Encoders tokenize exactly as sentence-transformers does (no padding, truncation at
max_seq_length, flagged). Decoders never truncate a prompt: one too long is refused instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

from workers.loader import ModelInfo


@dataclass(slots=True)
class Encoded:
    ids: list[int]
    truncated: bool


class Tokenizer:
    def __init__(self, info: ModelInfo) -> None:
        if info.tokenizer is None:
            raise ValueError(f"{info.path} has no tokenizer.json")
        self.max_seq_length = info.max_seq_length
        self._tok = HFTokenizer.from_file(str(info.tokenizer))
        # tokenizer.json may ship with fixed padding and truncation (MiniLM's: both at 128);
        # sentence-transformers replaces both: no padding, truncation at max_seq_length.
        self._tok.no_padding()
        if info.decoder:
            self._tok.no_truncation()
        else:
            self._tok.enable_truncation(max_length=self.max_seq_length)

    def encode(self, texts: list[str]) -> list[Encoded]:
        # Truncation moves the cut-off tokens into `overflowing`; non-empty means it was cut.
        return [
            Encoded(ids=e.ids, truncated=bool(e.overflowing))
            for e in self._tok.encode_batch(texts, add_special_tokens=True)
        ]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)
