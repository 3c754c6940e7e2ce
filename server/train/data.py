"""Training data: JSONL records -> token ids and a loss mask, tokenized as the server tokenizes.

`read_jsonl` accepts `{"prompt", "completion"}` or `{"messages": [...]}` records and refuses bad
files with one-line `TrainDataError`s; `tokenize_record` renders chats prefix by prefix with the
model's chat template so that exactly the assistant turns (and the completion + EOS) are targets.
"""
from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path


class TrainDataError(ValueError):
    """A bad data file or record: reported as one CLI line."""


@dataclass
class Example:
    ids: list[int]
    mask: list[bool]  # mask[j]: token j is a target (predicted from ids[:j])


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        raise TrainDataError(f"data file {str(p)!r} does not exist")
    records = []
    for n, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise TrainDataError(f"{p}:{n}: invalid JSON ({e.msg})") from None
        ok_pc = isinstance(rec, dict) and isinstance(rec.get("prompt"), str) and isinstance(rec.get("completion"), str)
        ok_chat = isinstance(rec, dict) and isinstance(rec.get("messages"), list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in rec["messages"])
        if not (ok_pc or ok_chat):
            raise TrainDataError(f"{p}:{n}: expected {{'prompt', 'completion'}} strings or a 'messages' list "
                                 "of {'role', 'content'}")
        if ok_chat and not any(m["role"] == "assistant" for m in rec["messages"]):
            raise TrainDataError(f"{p}:{n}: 'messages' has no assistant turn to learn")
        records.append(rec)
    if not records:
        raise TrainDataError(f"data file {str(p)!r} holds no records")
    return records


def tokenize_record(tokenizer, rec: dict) -> Example:
    """Ids + loss mask, tokenized the way the server tokenizes requests (prompt text, then completion)."""
    if "messages" not in rec:  # completions API: prompt with special tokens, completion + eos learned
        prompt = tokenizer.encode(rec["prompt"], add_special_tokens=True)
        target = tokenizer.encode(rec["completion"], add_special_tokens=False) + list(tokenizer.eos_token_ids[:1])
        return Example(prompt + target, [False] * len(prompt) + [True] * len(target))
    # Chat: segment i is the text added by turn i; assistant turns (minus their generation prompt)
    # are targets. Rendering prefixes mirrors the server (template(prefix, add_generation_prompt)).
    msgs, ids, mask, done = rec["messages"], [], [], ""
    for i, m in enumerate(msgs):
        if m["role"] == "assistant":
            head = tokenizer.apply_chat_template(msgs[:i], add_generation_prompt=True)
            full = tokenizer.apply_chat_template(msgs[: i + 1], add_generation_prompt=False)
            if not (head.startswith(done) and full.startswith(head)):
                raise TrainDataError("the chat template does not render conversations prefix by prefix")
            for text, target in ((head[len(done):], False), (full[len(head):], True)):
                seg = tokenizer.encode(text, add_special_tokens=False)
                ids += seg
                mask += [target] * len(seg)
            done = full
    return Example(ids, mask)


def tokenize_records(tokenizer, records: Sequence[dict], seq_len: int) -> list[Example]:
    """Tokenize and cut to `seq_len` (+1 for the shifted target); drop those left without a target."""
    out = []
    for rec in records:
        ex = tokenize_record(tokenizer, rec)
        ex = Example(ex.ids[: seq_len + 1], ex.mask[: seq_len + 1])
        if any(ex.mask[1:]):
            out.append(ex)
    if not out:
        raise TrainDataError(f"no example keeps a completion token within --seq-len {seq_len}")
    return out
