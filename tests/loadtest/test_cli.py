"""The whole CLI against the stub server: files written, numbers sane, adapters cleaned up, errors one line."""
from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from loadtest.cli import main

ROOT = Path(__file__).resolve().parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def test_sweep_writes_json_csv_and_pngs(stub, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main([
        "--url", stub.url, "--workload", "distinct,identical,base", "--concurrency", "1,4",
        "--requests", "8", "--prompt-tokens", "6:2", "--max-tokens", "5", "--stream",
        "--upload-synthetic", "4", "--rank", "4", "--churn", "50", "--seed", "3", "--out", str(out),
        "--no-progress",
    ])
    assert rc == 0
    records = json.loads((out / "results.json").read_text())
    assert [(r["workload"], r["concurrency"]) for r in records] == [
        ("distinct", 1), ("distinct", 4), ("identical", 1), ("identical", 4), ("base", 1), ("base", 4)]
    for r in records:
        assert r["ok"] == 8 and r["failed"] == 0 and r["failed_by_reason"] == {}
        assert r["output_tokens_per_s"] > 0 and r["requests_per_s"] > 0
        assert r["output_tokens_per_s"] == pytest.approx(8 * 5 / r["duration_s"])
        for key in ("ttft_ms", "itl_ms", "e2e_ms"):
            assert set(r[key]) >= {"p50", "p90", "p99"} and r[key]["p50"] > 0
        assert r["mean_batch_size"] is not None and 0 < r["mean_batch_size"] <= r["concurrency"] + 1e-9
    # The stub's batch size is the number in flight: exactly 1 at concurrency 1.
    assert all(r["mean_batch_size"] == pytest.approx(1.0) for r in records if r["concurrency"] == 1)
    assert [r["distinct_adapters"] for r in records] == [4, 4, 1, 1, 0, 0]
    # Churn ran beside the traffic, tallied apart, and everything this run uploaded is gone.
    assert sum(r["churn"]["upload"]["ok"] for r in records) > 0
    assert stub.adapters == {}
    uploads = {name for op, name, status in stub.events if op == "upload" and status == 201}
    deleted = {name for op, name, status in stub.events if op == "delete" and status == 204}
    assert len(uploads) >= 4 and uploads == deleted
    # Requests carried the synthetic adapters (distinct / identical) and none for base.
    used = [b.get("adapter") for b in stub.completions]
    assert used.count(None) == 16 and all(a is None or a.startswith("loadtest-") for a in used)
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert len(rows) == 6 and float(rows[0]["ttft_ms_p50"]) > 0 and rows[0]["workload"] == "distinct"
    for png in ("throughput.png", "latency.png"):
        assert (out / png).read_bytes()[:8] == PNG
    table = capsys.readouterr().out
    assert "out tok/s" in table and "identical" in table

    # --compare plots several result files on one chart.
    assert main(["--compare", str(out / "results.json"), str(out / "results.json"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "compare_throughput.png").read_bytes()[:8] == PNG


def test_open_loop_and_non_stream(stub, tmp_path):
    out = tmp_path / "open"
    rc = main(["--url", stub.url, "--workload", "base", "--rate", "200", "--burstiness", "0.5",
               "--requests", "10", "--max-tokens", "3", "--out", str(out), "--no-plots", "--no-progress"])
    assert rc == 0
    (r,) = json.loads((out / "results.json").read_text())
    assert r["mode"] == "open" and r["rate"] == 200 and r["ok"] == 10 and r["failed"] == 0
    assert r["ttft_ms"]["p50"] is None and r["e2e_ms"]["p50"] > 0  # no TTFT without streaming
    assert not (out / "throughput.png").exists()


def test_failed_setup_still_deletes_uploaded_adapters(stub, tmp_path, capsys):
    stub.reject_uploads_after = 2
    rc = main(["--url", stub.url, "--upload-synthetic", "4", "--rank", "2", "--out", str(tmp_path), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 1 and "uploading synthetic adapter" in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert stub.adapters == {}  # the two that went up were deleted


def test_bad_flags_are_one_line_errors(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        main(["--concurrency", "1,x"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err
    for argv in (["--workload", "zipfy"], ["--concurrency", "0"], ["--url", "ftp://x"], ["--requests", "0"]):
        assert main([*argv, "--out", str(tmp_path)]) == 1
        err = capsys.readouterr().err.strip()
        assert err.startswith("loramux-loadtest: error:") and "\n" not in err


def test_unreachable_server_one_line_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "loadtest", "--url", "http://127.0.0.1:9", "--workload", "base",
         "--out", str(tmp_path), "--no-progress"],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("loramux-loadtest: error: cannot reach the server")
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_ctrl_c_deletes_uploaded_adapters(make_stub, tmp_path):
    stub = make_stub(ttft_s=0.0, itl_s=0.01)
    proc = subprocess.Popen(
        [sys.executable, "-m", "loadtest", "--url", stub.url, "--upload-synthetic", "3", "--rank", "2",
         "--concurrency", "2", "--requests", "500", "--max-tokens", "20", "--out", str(tmp_path), "--no-progress"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        # A child inherits an ignored SIGINT (and Python then keeps ignoring it): start it with the
        # default disposition, as a shell does, whatever an earlier test left in this process.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.monotonic() + 90  # bounded; generous for a loaded 2-core machine
    while len(stub.completions) < 4 and time.monotonic() < deadline:  # traffic is flowing
        time.sleep(0.02)
    assert len(stub.adapters) == 3
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=90)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    assert stub.adapters == {}
