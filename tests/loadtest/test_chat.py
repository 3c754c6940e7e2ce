"""`loramux-loadtest --chat N`: the chat workload's mechanics against the stub, and one short run against
the REAL engine (tiny model) where the second turn of a conversation must find its prefix cached.

Against the stub (tests/loadtest/stub_server.py, which logs every chat body and the reply it streamed):
each turn's messages are the previous turn's plus the reply actually received plus a new user turn;
one system prompt for all; conversation i keeps one adapter, i mod pool; the cached fraction equals
Σ cached / Σ prompt of the usage the stub sent; a failed turn ends its conversation (counted, the rest
skipped); chat.json written; uploads deleted; bad flags give one line, never a traceback.
"""
from __future__ import annotations

import json

from loadtest.cli import main
from tests.real_server import save_tiny_model, tiny_server


def _run(url: str, out, *extra: str) -> int:
    return main(["--url", url, "--chat", "3", "--turns", "3", "--system-tokens", "20", "--prompt-tokens", "5",
                 "--max-tokens", "4", "--concurrency", "2", "--upload-synthetic", "2", "--rank", "4",
                 "--out", str(out), "--no-progress", *extra])


def _conversations(chats: list[dict]) -> list[list[dict]]:
    """The stub's chat log grouped by conversation (a turn-1 body starts one), turns in order."""
    convs: list[list[dict]] = []
    for c in chats:
        msgs = c["body"]["messages"]
        if len(msgs) == 2:
            convs.append([c])
            continue
        # The previous turn of this conversation is the logged body whose messages this one extends.
        prev = [conv for conv in convs if conv[-1]["body"]["messages"] == msgs[:-2]]
        assert len(prev) == 1, msgs
        prev[0].append(c)
    return convs


def test_history_grows_with_the_replies_received(stub, tmp_path, capsys):
    out = tmp_path / "chat"
    assert _run(stub.url, out) == 0, capsys.readouterr().err
    report = json.loads((out / "chat.json").read_text())
    convs = _conversations(stub.chats)
    assert len(convs) == 3 and all(len(conv) == 3 for conv in convs)
    systems = {conv[0]["body"]["messages"][0]["content"] for conv in convs}
    assert len(systems) == 1 and len(next(iter(systems)).split()) == 20  # one shared system prompt
    for conv in convs:
        assert len({c["body"]["adapter"] for c in conv}) == 1  # a conversation keeps its adapter
        for t, c in enumerate(conv, start=1):
            msgs = c["body"]["messages"]
            assert [m["role"] for m in msgs] == ["system"] + ["user", "assistant"] * (t - 1) + ["user"]
            assert len(msgs[-1]["content"].split()) == 5
            assert c["body"]["stream"] and c["body"]["stream_options"] == {"include_usage": True}
            assert c["body"]["ignore_eos"] and c["body"]["max_tokens"] == 4
            if t > 1:  # the reply the stub streamed last turn, fed back verbatim
                assert msgs[-2]["content"] == conv[t - 2]["reply"]
                assert c["usage"]["prompt_tokens_details"]["cached_tokens"] == conv[t - 2]["usage"]["prompt_tokens"]
    # Conversation i uses adapter i mod 2: two adapters, the first used by conversations 0 and 2.
    assert len({conv[0]["body"]["adapter"] for conv in convs}) == 2
    assert stub.adapters == {}  # uploads deleted
    assert (report["requests"], report["ok"], report["failed"], report["skipped_turns"]) == (9, 9, 0, 0)
    usages = [c["usage"] for c in stub.chats]
    cached = sum(u["prompt_tokens_details"]["cached_tokens"] for u in usages)
    assert report["cached_tokens"] == cached
    assert report["cached_fraction"] == cached / sum(u["prompt_tokens"] for u in usages)
    for t in ("1", "2", "3"):
        turn = [conv[int(t) - 1]["usage"] for conv in convs]
        want = sum(u["prompt_tokens_details"]["cached_tokens"] for u in turn) / sum(u["prompt_tokens"] for u in turn)
        assert report["per_turn"][t]["cached_fraction"] == want
        assert report["per_turn"][t]["ttft_p50_ms"] > 0
    assert report["output_tokens"] == 9 * 4 and report["output_tokens_per_s"] > 0
    assert len(report["records"]) == 9 and all(r["ttft"] is not None and len(r["itl"]) == 3
                                               for r in report["records"])
    assert "cached fraction" in capsys.readouterr().out


def test_a_failed_turn_ends_its_conversation(stub, tmp_path):
    stub.fail_chat_turns = {2}
    out = tmp_path / "chat"
    assert _run(stub.url, out) == 0
    report = json.loads((out / "chat.json").read_text())
    assert (report["requests"], report["ok"], report["failed"], report["skipped_turns"]) == (6, 3, 3, 3)
    assert report["failed_by_reason"] == {"503 overloaded": 3}
    assert report["per_turn"]["2"]["ok"] == 0 and report["per_turn"]["3"]["ok"] == 0
    assert stub.adapters == {}


def test_bad_flags_give_one_line(stub, tmp_path, capsys):
    assert _run(stub.url, tmp_path / "chat", "--turns", "0") == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--turns" in err and "Traceback" not in err
    assert _run("http://127.0.0.1:9", tmp_path / "chat") == 1  # nothing listens: one line too
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cannot reach" in err


def test_second_turn_is_cached_on_the_real_engine(tmp_path):
    """The tiny model's byte-level tokenizer: 8 words of system prompt are ~50 tokens, 3 full blocks."""
    model_dir = save_tiny_model(tmp_path / "tiny")
    with tiny_server(model_dir, tmp_path / "adapters") as live:
        out = tmp_path / "chat"
        assert main(["--url", live.url, "--chat", "2", "--turns", "2", "--system-tokens", "8",
                     "--prompt-tokens", "3", "--max-tokens", "4", "--concurrency", "2", "--upload-synthetic", "2",
                     "--rank", "4", "--timeout", "60", "--out", str(out), "--no-progress"]) == 0
        report = json.loads((out / "chat.json").read_text())
        assert report["ok"] == 4 and report["failed"] == 0
        second = [r for r in report["records"] if r["turn"] == 2]
        assert len(second) == 2 and all(r["cached_tokens"] > 0 for r in second), second
        assert live.engine.adapters.list() == []
