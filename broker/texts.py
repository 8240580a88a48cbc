"""The model's own text, as the gateway and the Batch API speak it: the tokenizer for what is
said in text (streamed text, a stopped prompt's token count), the checkpoint's chat template,
and streamed tokens decoded a few at a time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from broker import openai_api as api


class Texts:
    """The model's own tokenizer, for what the gateway says in text: streamed text (decoded as
    the controller decodes a result), a stopped prompt's token count, and chat prompts."""

    def __init__(self, model_dir: Path | None, tokenizer: Path | None) -> None:
        self.tok = Tokenizer.from_file(str(tokenizer)) if tokenizer is not None else None
        self.template = None
        self.specials: dict[str, str] = {}
        settings = model_dir / "tokenizer_config.json" if model_dir is not None else None
        if settings is not None and settings.is_file():
            self._chat(model_dir, json.loads(settings.read_text()))

    def decode(self, ids: list[int]) -> str:
        # workers/tokenizer.py's decode, which made the result's text
        return self.tok.decode(ids, skip_special_tokens=True) if self.tok is not None else ""

    def count(self, prompt: str | list[int]) -> int:
        if isinstance(prompt, list) or self.tok is None:
            return len(prompt) if isinstance(prompt, list) else 0
        return len(self.tok.encode(prompt, add_special_tokens=True).ids)

    def chat(self, messages: list[dict[str, Any]], model: str) -> str:
        if self.template is None:
            raise api.bad(
                f"model {model!r} ships no chat template (tokenizer_config.json has no "
                "chat_template): use /v1/completions with a prompt",
                "messages",
                "chat_template_missing",
            )
        from jinja2 import TemplateError

        try:
            return self.template.render(
                messages=messages, add_generation_prompt=True, **self.specials
            )
        except TemplateError as e:
            raise api.bad(
                f"the model's chat template refused the messages: {e}", "messages"
            ) from None

    def _chat(self, model_dir: Path, settings: dict[str, Any]) -> None:
        source = settings.get("chat_template")
        if isinstance(source, list):  # named templates: the default one
            source = next((t.get("template") for t in source if t.get("name") == "default"), None)
        jinja_file = model_dir / "chat_template.jinja"
        if source is None and jinja_file.is_file():
            source = jinja_file.read_text()
        if not isinstance(source, str):
            return
        # the template is the checkpoint's, so it runs sandboxed, as transformers runs it
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def refuse(message: str) -> None:
            raise TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = refuse
        self.template = env.from_string(source)
        for key in ("bos_token", "eos_token"):
            token = settings.get(key)
            token = token.get("content") if isinstance(token, dict) else token
            if isinstance(token, str):
                self.specials[key] = token


class Incremental:
    """One choice's text as its tokens arrive, decoded a few tokens at a time rather than whole
    at every step (linear, not quadratic, in the output): vLLM's way, the last tokens decoded
    with and without the new ones and the difference taken, so that byte-level BPE pieces and
    SentencePiece's leading spaces come out as the whole decode has them. An incomplete UTF-8
    sequence decodes to U+FFFD: it is held back until its last byte comes."""

    def __init__(self, texts: Texts) -> None:
        self.texts = texts
        self.ids: list[int] = []
        self.text = ""
        self.prefix = 0  # ids[prefix:read] decoded to the end of self.text
        self.read = 0

    def add(self, ids: list[int]) -> str:
        self.ids += ids
        before = self.texts.decode(self.ids[self.prefix : self.read])
        after = self.texts.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self.text
