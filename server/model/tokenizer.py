"""Text <-> token ids, chat templates and incremental detokenization.

`Tokenizer` wraps a `tokenizers.Tokenizer` (built from a `tokenizer.json` or from GGUF metadata by
the loaders) with the model's special ids and its Jinja chat template, rendered in an immutable
sandbox (template text comes from a model file: it must not reach Python internals).
`IncrementalDetokenizer` turns a growing list of generated ids into text deltas without emitting
half of a multi-byte UTF-8 character (text ending in U+FFFD is held back until it completes).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import tokenizers
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The chat template is missing or rejected the messages (`raise_exception` in the template)."""


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


class Tokenizer:
    def __init__(self, tok: tokenizers.Tokenizer, *, eos_token_ids: Sequence[int] = (),
                 bos_token_id: int | None = None, chat_template: str | None = None) -> None:
        self.tok = tok
        self.eos_token_ids = tuple(int(t) for t in eos_token_ids)
        self.bos_token_id = bos_token_id
        self.chat_template = chat_template or None
        self._template = None
        self._special_ids = {tok.token_to_id(t.content) for t in tok.get_added_tokens_decoder().values()
                             if t.special}

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        return self.chat_template is not None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def is_special(self, token_id: int) -> bool:
        return token_id in self._special_ids

    def id_to_token_str(self, token_id: int) -> str:
        """Display string of one token (its decoded text; special tokens keep their name)."""
        if token_id in self._special_ids:
            return self.tok.id_to_token(token_id) or ""
        return self.tok.decode([token_id], skip_special_tokens=False)

    def _token_text(self, token_id: int | None) -> str:
        return "" if token_id is None else (self.tok.id_to_token(token_id) or "")

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            **extra: Any) -> str:
        """Render `messages` ([{role, content}, ...]) with the model's chat template."""
        if self.chat_template is None:
            raise ChatTemplateError("this model has no chat template; use the completions endpoint")
        if self._template is None:
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.globals["raise_exception"] = _raise_exception
            self._template = env.from_string(self.chat_template)
        eos = self.eos_token_ids[0] if self.eos_token_ids else None
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self._token_text(self.bos_token_id), eos_token=self._token_text(eos), **extra)
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed: {e}") from None


class IncrementalDetokenizer:
    """Text deltas of generated ids, correct across multi-byte characters split over tokens.

    Like vLLM's `detokenize_incrementally`: decode a short window of previous tokens ("prefix") and
    the window plus new tokens, emit the difference, and hold back text ending in U+FFFD.
    """

    _WINDOW = 6  # tokens of left context: enough for byte-level BPE spacing and split characters

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int], skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = list(prompt_ids)
        self.prefix_offset = max(len(self.ids) - self._WINDOW, 0)
        self.read_offset = len(self.ids)
        self.text = ""  # all text emitted so far

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, token_ids: Sequence[int]) -> str:
        """Append generated ids; return the newly completed text (may be "")."""
        self.ids.extend(int(t) for t in token_ids)
        prefix_text = self._decode(self.ids[self.prefix_offset : self.read_offset])
        new_text = self._decode(self.ids[self.prefix_offset :])
        if len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd"):
            return ""  # nothing complete yet (e.g. half of a UTF-8 character)
        delta = new_text[len(prefix_text) :]
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        self.text += delta
        return delta
