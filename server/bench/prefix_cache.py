"""`python -m server.bench.prefix_cache`: the chat workload with the prefix cache on vs off, in one run.

    python -m server.bench.prefix_cache --rounds 2 --json docs/bench-prefix-cache.json

Flow, per round, for `--prefix-caching on` then `off` (one server at a time: never two on the machine):
  1. `loramux serve --model default` (the embedded SmolLM2-135M) as a subprocess on 127.0.0.1, a free
     port, a fresh temporary --adapter-dir, the same flags apart from --prefix-caching; wait for /ready;
  2. `loramux-loadtest --chat` as a subprocess (the external client): it uploads `--adapters` synthetic
     rank-8 adapters, sends `--warmup` unmeasured first turns on the base model (other system text),
     then `--conversations` conversations of `--turns` turns at `--concurrency`, conversation i on
     adapter i mod pool, one shared system prompt of `--system-tokens` words, user turns of
     `--user-tokens` words, replies of `--max-tokens` tokens fed back as history; it deletes the adapters;
  3. the server is stopped (SIGTERM) before the next one starts.
Rounds alternate on/off/on/off so drift on a shared machine hits both alike; the summary takes each
figure's median over rounds. Prints a table (TTFT p50/p90, TTFT p50 of turn 1 and of later turns,
throughput, cached fraction; on, off, and their ratio) and writes JSON (`--json`).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

SERVER_FLAGS = {"max-batch-size": 32, "max-adapters-per-batch": 32, "max-lora-rank": 8,
                "kv-cache-tokens": 32768, "max-num-batched-tokens": 2048, "log-level": "warning"}
# (label, key in the loadtest's chat.json, lower is better)
FIGURES = (("TTFT p50 ms", "ttft_p50", True), ("TTFT p90 ms", "ttft_p90", True),
           ("TTFT p50 turn 1 ms", "ttft_p50_ms_turn1", True), ("TTFT p50 turns 2+ ms", "ttft_p50_ms_later_turns", True),
           ("output tok/s", "output_tokens_per_s", False), ("requests/s", "requests_per_s", False),
           ("cached fraction", "cached_fraction", False))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, proc: subprocess.Popen, timeout: float, path: str = "/ready") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with {proc.returncode} before {path}")
        try:
            if httpx.get(f"{url}{path}", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def _loadtest_argv(url: str, out: Path, args) -> list[str]:
    return [sys.executable, "-m", "loadtest", "--url", url, "--chat", str(args.conversations),
            "--turns", str(args.turns), "--concurrency", str(args.concurrency),
            "--system-tokens", str(args.system_tokens), "--prompt-tokens", str(args.user_tokens),
            "--max-tokens", str(args.max_tokens), "--upload-synthetic", str(args.adapters), "--rank", "8",
            "--warmup", str(args.warmup), "--seed", str(args.seed), "--timeout", "900",
            "--out", str(out), "--no-progress"]


def run_one(mode: str, work: Path, args) -> dict:
    """One server with --prefix-caching `mode`, one chat run against it; the loadtest's report."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    tag = f"{mode}-{int(time.time() * 1000) % 10**8}"
    cmd = [sys.executable, "-m", "server", "serve", "--model", args.model, "--host", "127.0.0.1", "--port", str(port),
           "--adapter-dir", str(work / f"adapters-{tag}"), "--prefix-caching", mode]
    cmd += [f"--{k}={v}" for k, v in SERVER_FLAGS.items()]
    log = (work / f"server-{tag}.log").open("w")
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    try:
        t0 = time.monotonic()
        _wait_ready(url, server, 900)  # a cold start may build the C++ ops first
        start_s = time.monotonic() - t0
        out = work / f"chat-{tag}"
        done = subprocess.run(_loadtest_argv(url, out, args), capture_output=True, text=True)
        print(done.stdout, end="", flush=True)
        if done.returncode != 0:
            raise RuntimeError(f"loramux-loadtest --chat failed ({done.returncode}): {done.stderr.strip()[-500:]}")
        report = json.loads((out / "chat.json").read_text())
    finally:
        server.terminate()
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()
    for rec in report.pop("records"):  # keep per-request figures, not every inter-token gap
        rec.pop("itl", None)
        report.setdefault("requests_detail", []).append(rec)
    report["server_start_s"] = round(start_s, 1)
    return report


def _figure(report: dict, key: str) -> float | None:
    if key in ("ttft_p50", "ttft_p90"):
        return report["ttft_ms"][key[5:]]
    return report.get(key)


def summarize(runs: list[dict]) -> dict:
    """Median over rounds of each figure, per mode, and the ratios (off/on for latencies, on/off else)."""
    out = {}
    for label, key, lower in FIGURES:
        row = {}
        for mode in ("on", "off"):
            vals = [v for r in runs if r["mode"] == mode if (v := _figure(r["report"], key)) is not None]
            row[mode] = statistics.median(vals) if vals else None
        on, off = row["on"], row["off"]
        if key == "cached_fraction":
            row["ratio"] = None
        elif on and off:
            row["ratio"] = off / on if lower else on / off
        else:
            row["ratio"] = None
        row["ratio_means"] = ("off / on" if lower else "on / off") if key != "cached_fraction" else None
        out[label] = row
    return out


def format_table(summary: dict, rounds: int) -> str:
    lines = [f"prefix cache on vs off (median of {rounds} round{'s' if rounds > 1 else ''})",
             f"{'':<22} {'on':>9} {'off':>9} {'ratio':>18}"]
    for label, row in summary.items():
        def fmt(v, label=label):
            if v is None:
                return "-"
            return f"{v:.3f}" if label in ("cached fraction", "requests/s") else f"{v:.1f}"
        ratio = "" if row["ratio"] is None else f"{row['ratio']:.2f}x ({row['ratio_means']})"
        lines.append(f"{label:<22} {fmt(row['on']):>9} {fmt(row['off']):>9} {ratio:>18}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.bench.prefix_cache", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="default", help="what `loramux serve --model` gets (default: embedded SmolLM2)")
    p.add_argument("--rounds", type=int, default=1, help="on/off pairs, alternated (default 1)")
    p.add_argument("--conversations", type=int, default=32)
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--adapters", type=int, default=32, help="synthetic rank-8 adapters uploaded per server")
    p.add_argument("--system-tokens", type=int, default=512, help="words of the shared system prompt (~1 token each)")
    p.add_argument("--user-tokens", type=int, default=32, help="words per user turn")
    p.add_argument("--max-tokens", type=int, default=32, help="tokens per reply (ignore_eos)")
    p.add_argument("--warmup", type=int, default=4, help="unmeasured base-model first turns per server")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=Path("docs/bench-prefix-cache.json"))
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be >= 1")
    work = Path(tempfile.mkdtemp(prefix="loramux-prefixbench-"))
    t0 = time.monotonic()
    runs = []
    try:
        for rnd in range(1, args.rounds + 1):
            for mode in ("on", "off"):
                print(f"--- round {rnd}: --prefix-caching {mode}", flush=True)
                runs.append({"round": rnd, "mode": mode, "report": run_one(mode, work, args)})
    except (RuntimeError, OSError, ValueError) as e:  # one line; the server logs stay in `work`
        print(f"prefix_cache bench: error: {e} (server logs in {work})", file=sys.stderr)
        return 1
    summary = summarize(runs)
    result = {
        "command": "python -m server.bench.prefix_cache " + shlex.join(sys.argv[1:] if argv is None else argv),
        "machine": f"{os.cpu_count()} CPUs, {platform.machine()}, load average at the end "
                   f"{'/'.join(f'{x:.1f}' for x in os.getloadavg())}",
        "server": {"model": args.model, **SERVER_FLAGS},
        "workload": {k: getattr(args, k) for k in ("conversations", "turns", "concurrency", "adapters",
                                                   "system_tokens", "user_tokens", "max_tokens", "warmup", "seed")},
        "loadtest_argv": _loadtest_argv("URL", Path("OUT"), args)[1:],
        "wall_s": round(time.monotonic() - t0, 1),
        "summary": summary,
        "runs": runs,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(format_table(summary, args.rounds))
    print(f"wrote {args.json} ({result['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
