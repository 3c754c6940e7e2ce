"""Trainer data handling and CLI edges: what is learned (loss mask), one-line errors for bad input,
and `--upload` hot-loading a trained adapter into the real server app (tiny model, real engine).
"""
from __future__ import annotations

import pytest

from server.train import trainer as T
from tests.server.model.tiny import save_tiny_hf


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from server.model.loader import load_model

    root = tmp_path_factory.mktemp("tiny_cli")
    save_tiny_hf(root, "untied")
    return root, load_model(str(root), "float32", "cpu").tokenizer


def _targets(tok, ex: T.Example) -> list[int]:
    return [i for i, m in zip(ex.ids, ex.mask, strict=True) if m]


def test_prompt_completion_mask_is_completion_plus_eos(tiny):
    _, tok = tiny
    ex = T.tokenize_record(tok, {"prompt": "Q: hi ", "completion": "A: yo"})
    assert ex.ids == tok.encode("Q: hi ") + tok.encode("A: yo", add_special_tokens=False) + [2]
    assert _targets(tok, ex) == tok.encode("A: yo", add_special_tokens=False) + [2]  # config eos id is 2


def test_chat_mask_covers_every_assistant_turn_only(tiny):
    _, tok = tiny
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "ok!"}]
    ex = T.tokenize_record(tok, {"messages": msgs})
    # The tiny template renders "<role>content\n" per turn; the ids are those of the whole text.
    assert tok.decode(ex.ids) == "<user>hi\n<assistant>yo\n<user>again\n<assistant>ok!\n"
    assert tok.decode(_targets(tok, ex)) == "yo\nok!\n"


def test_truncation_drops_examples_without_targets(tiny):
    _, tok = tiny
    recs = [{"prompt": "x" * 40, "completion": "y"}, {"prompt": "a", "completion": "bcd"}]
    out = T.tokenize_records(tok, recs, seq_len=8)
    assert len(out) == 1 and len(out[0].ids) == 5
    with pytest.raises(T.TrainDataError, match="seq-len"):
        T.tokenize_records(tok, recs[:1], seq_len=8)


@pytest.mark.parametrize("content,expect", [
    (None, "does not exist"),
    ('{"prompt": "a", "completion": "b"}\n{not json\n', ":2: invalid JSON"),
    ('{"prompt": "a"}\n', ":1: expected"),
    ('{"messages": [{"role": "user", "content": "a"}]}\n', "no assistant turn"),
    ("\n\n", "holds no records"),
])
def test_bad_data_is_one_line_error(tiny, tmp_path, capsys, content, expect):
    data = tmp_path / "d.jsonl"
    if content is not None:
        data.write_text(content)
    rc = T.main(["--model", str(tiny[0]), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags,expect", [
    (["--target-modules", "q_proj,lm_head"], "target modules"),
    (["--rank", "0"], "rank must be positive"),
    (["--model", "/nonexistent/model"], "does not exist"),
    (["--dtype", "float64"], "--dtype"),
    (["--out", __file__], "not a directory"),
])
def test_bad_options_are_one_line_errors(tiny, tmp_path, capsys, flags, expect):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n')
    argv = ["--model", str(tiny[0]), "--data", str(data), "--out", str(tmp_path / "o"), "--no-progress"]
    rc = T.main(argv + flags)  # later flags win
    err = capsys.readouterr().err.strip()
    assert rc == 2 and expect in err and "Traceback" not in err, err


def test_upload_hot_loads_into_the_running_server(tiny, tmp_path):
    """Train -> save -> `upload_adapter` into the real app over the real engine -> it serves."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.engine.builder import build_async_engine as build_engine
    from server.settings import ServerSettings

    root, tok = tiny
    data = [{"prompt": "ab", "completion": "cd"}] * 4
    from server.model.loader import load_model

    loaded = load_model(str(root), "float32", "cpu")
    cfg = T.TrainConfig(rank=2, steps=2, batch_size=2, seq_len=16)
    result = T.train_lora(loaded.model, T.tokenize_records(tok, data, 16), cfg)
    out = T.save_peft(tmp_path / "ad", result.weights, cfg, str(root))

    settings = ServerSettings(model=str(root), dtype="float32", device="cpu", kv_cache_tokens=512,
                              adapter_dir=str(tmp_path / "store"), admin_key="adm", max_lora_rank=8)
    with TestClient(create_app(build_engine(settings), settings)) as client:
        with pytest.raises(RuntimeError, match="401"):
            T.upload_adapter("http://testserver", out, "mine", "wrong-key", client=client)
        info = T.upload_adapter("http://testserver", out, "mine", "adm", client=client)
        assert info["name"] == "mine" and info["rank"] == 2, info
        r = client.post("/v1/completions", headers={"Authorization": "Bearer adm"},
                        json={"model": "mine", "prompt": "ab", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["model"] == "mine", r.text
        listed = client.get("/v1/adapters", headers={"Authorization": "Bearer adm"}).json()
        assert [a["name"] for a in listed["data"]] == ["mine"]
