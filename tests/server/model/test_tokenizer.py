"""Tokenizer wrapper: round trips, chat templates (sandboxed), incremental detokenization."""
from __future__ import annotations

import pytest

from server.model.tokenizer import ChatTemplateError, IncrementalDetokenizer, Tokenizer
from tests.server.model.tiny import byte_tokenizer

TEXTS = ["Hello, world!", "naïve café — ünïcödé", "東京は日本の首都です", "emoji 🦙🚀 mixed 한국어 ok", "a\nb\tc  d"]


@pytest.fixture(scope="module")
def tok():
    template = ("{% if messages[0]['role'] == 'bad' %}{{ raise_exception('bad role') }}{% endif %}"
                "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
                "{% if add_generation_prompt %}[assistant] {% endif %}")
    # Byte-level vocabulary of single bytes: every multi-byte character spans several tokens.
    base = byte_tokenizer()
    return Tokenizer(base, eos_token_ids=(base.token_to_id("$"),), bos_token_id=None, chat_template=template)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8"))  # one token per byte in this vocabulary
    assert tok.decode(ids) == text


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("chunk", [1, 2, 3])
def test_incremental_equals_full_decode(tok, text, chunk):
    prompt = tok.encode("prompt: ")
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, prompt)
    pieces = [detok.add(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    assert "".join(pieces) == text == detok.text
    assert all("\ufffd" not in p for p in pieces)  # never half a character


def test_incremental_holds_back_partial_character(tok):
    detok = IncrementalDetokenizer(tok, [])
    emoji = "🦙".encode()  # 4 bytes -> 4 tokens
    assert [detok.add([b]) for b in tok.encode("🦙")[:3]] == ["", "", ""]
    assert detok.add(tok.encode("🦙")[3:]) == "🦙" and len(emoji) == 4


def test_chat_template(tok):
    msgs = [{"role": "user", "content": "hi"}]
    assert tok.apply_chat_template(msgs) == "[user] hi$[assistant] "
    assert tok.apply_chat_template(msgs, add_generation_prompt=False) == "[user] hi$"
    with pytest.raises(ChatTemplateError, match="bad role"):
        tok.apply_chat_template([{"role": "bad", "content": "x"}])


def test_template_is_sandboxed():
    evil = Tokenizer(byte_tokenizer(), chat_template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ChatTemplateError):
        evil.apply_chat_template([{"role": "user", "content": "x"}])
    assert not Tokenizer(byte_tokenizer()).has_chat_template
    with pytest.raises(ChatTemplateError):
        Tokenizer(byte_tokenizer()).apply_chat_template([])
