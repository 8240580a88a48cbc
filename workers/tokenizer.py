"""Text -> token ids, exactly as sentence-transformers tokenizes for this model."""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Tokenizer as HFTokenizer

from workers.checkpoint import ModelInfo


@dataclass(slots=True)
class Encoded:
    ids: list[int]
    truncated: bool


class Tokenizer:
    def __init__(self, info: ModelInfo) -> None:
        self.max_seq_length = info.max_seq_length
        self._tok = HFTokenizer.from_file(str(info.path / "tokenizer.json"))
        # tokenizer.json ships with fixed padding to 128 and truncation at 128;
        # sentence-transformers replaces both: no padding, truncation at max_seq_length.
        self._tok.no_padding()
        self._tok.enable_truncation(max_length=self.max_seq_length)

    def encode(self, texts: list[str]) -> list[Encoded]:
        # Truncation moves the cut-off tokens into `overflowing`; non-empty means it was cut.
        return [
            Encoded(ids=e.ids, truncated=bool(e.overflowing))
            for e in self._tok.encode_batch(texts, add_special_tokens=True)
        ]
