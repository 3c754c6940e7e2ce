"""HTTP vs in-process throughput, side by side in one run (issue: HTTP >= 0.85x the engine at batch 32).

    python scripts/http_vs_engine.py --out docs/http-vs-engine [--dtype auto] [--batch 32]

Same conditions on both sides: embedded model, `--batch` requests of `--prompt-tokens` prompt and
`--new-tokens` output tokens (held with ignore_eos), `--batch` distinct rank-`--rank` adapters on all
7 projections, slots padded to that rank, `--batch` slots and sequences. Order: engine bench, then a
loopback server + `loramux-loadtest --concurrency <batch>` (non-streaming, then streaming; one
unmeasured wave first), then the engine bench again; each engine figure is the best of the 2nd and 3rd of three
back-to-back runs of the point, and the ratio uses the mean of the two engine figures. Writes `summary.json` and
prints a table. Loopback only; the server it starts is stopped at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def engine_point(args, out: Path, tag: str) -> float:
    path = out / f"engine-{tag}.json"
    # The point runs three times back to back; the first warms up (the server side gets one unmeasured
    # wave too) and the best of the other two counts: noise can only favour the engine side.
    subprocess.run([sys.executable, "-m", "server.bench", "--batch-sizes", ",".join([str(args.batch)] * 3),
                    "--mixes", "distinct", "--repeats", "1",
                    "--rank", str(args.rank), "--prompt-tokens", str(args.prompt_tokens), "--new-tokens",
                    str(args.new_tokens), "--dtype", args.dtype, "--json", str(path)], check=True, cwd=ROOT)
    return max(r["output_tokens_per_s"] for r in json.loads(path.read_text())["records"][1:])


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url + "/ready", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server not ready in time")


def http_points(args, out: Path) -> dict[str, dict]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    store = Path(tempfile.mkdtemp(prefix="loramux-http-vs-engine-"))  # the server's adapter store
    server = subprocess.Popen([str(BIN / "loramux"), "serve", "--model", "default", "--port", str(port),
                               "--dtype", args.dtype, "--adapter-dir", str(store), "--max-batch-size", str(args.batch),
                               "--max-adapters-per-batch", str(args.batch), "--max-lora-rank", str(args.rank),
                               "--log-level", "warning"], cwd=ROOT, start_new_session=True)
    results = {}
    try:
        wait_ready(url, server)
        for mode in ("nostream", "stream"):
            d = out / f"http-{mode}"
            cmd = [str(BIN / "loramux-loadtest"), "--url", url, "--workload", "distinct", "--concurrency",
                   str(args.batch), "--requests", str(args.requests), "--warmup", str(args.batch),
                   "--max-tokens", str(args.new_tokens), "--prompt-tokens", str(args.prompt_tokens),
                   "--upload-synthetic", str(args.batch), "--rank", str(args.rank), "--out", str(d),
                   "--no-progress", "--no-plots"] + (["--stream"] if mode == "stream" else [])
            subprocess.run(cmd, check=True, cwd=ROOT)
            results[mode] = json.loads((d / "results.json").read_text())[0]
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
        shutil.rmtree(store, ignore_errors=True)
    return results


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path("http-vs-engine"))
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=128, help="measured HTTP requests (after one warm-up wave)")
    args = ap.parse_args()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    before = engine_point(args, out, "before")
    http = http_points(args, out)
    after = engine_point(args, out, "after")
    engine = (before + after) / 2
    rows = {"engine": {"output_tokens_per_s": engine, "before": before, "after": after}}
    for mode, rec in http.items():
        rows[f"http-{mode}"] = {"output_tokens_per_s": rec["output_tokens_per_s"], "ok": rec["ok"],
                                "failed": rec["failed"], "mean_batch_size": rec.get("mean_batch_size"),
                                "vs_engine": rec["output_tokens_per_s"] / engine}
    (out / "summary.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, **rows},
                                                 indent=1))
    print(f"\n| path (distinct, batch/concurrency {args.batch}) | output tok/s | vs engine | ok | failed | mean batch |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| in-process engine (mean of {before:.1f}, {after:.1f}) | {engine:.1f} | 1.00 | - | - | - |")
    for mode in http:
        r = rows[f"http-{mode}"]
        mb = r["mean_batch_size"]
        print(f"| HTTP {mode} | {r['output_tokens_per_s']:.1f} | {r['vs_engine']:.2f} | {r['ok']} | {r['failed']} | "
              f"{mb:.1f} |" if mb is not None else "- |")
    print(f"wrote {out / 'summary.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
