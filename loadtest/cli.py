"""`loramux-loadtest` / `python -m loadtest`: flags -> RunConfig -> sweep -> table, JSON, CSV, PNGs.

Data flow: argv -> `build_parser()` -> `config_from_args()` (a validated `RunConfig`) ->
`asyncio.run(runner.run(...))`, writing results.json / results.csv after every level (a
failure late in a sweep keeps the levels already measured) -> table on stdout -> plots.
`--compare A.json B.json ...` skips the run and plots the given files on one chart; `--soak`,
`--burst` and `--chat` run their own modes (soak.py, burst.py, chat.py) instead of the sweep.
Every error ends in one line on stderr and a non-zero exit, never a traceback; the adapters
this run uploaded are deleted in a `finally`, on success, failure and Ctrl-C alike.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

from loadtest import report
from loadtest.admin import LoadTestError, delete_adapters_sync
from loadtest.runner import RunConfig, run
from loadtest.synthetic import ALL_MODULES
from loadtest.workload import WORKLOADS, LengthDist

PROG = "loramux-loadtest"
EPILOG = """Meant for servers you run yourself (usually on loopback): it sends traffic only to --url,
in bounded amounts (--requests per level or --duration, --timeout per request)."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of usage + error
        self.exit(2, f"{PROG}: error: {message} (see --help)\n")


def _csv(cast):
    def parse(text: str):
        try:
            return tuple(cast(x) for x in text.split(",") if x.strip())
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad list {text!r}") from None
    return parse


def _length(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Throughput and latency of a loramux server vs concurrency and adapter mix.",
                epilog=EPILOG)
    a = p.add_argument
    a("--url", default="http://127.0.0.1:8000", help="server base URL (default %(default)s)")
    a("--api-key", default=os.environ.get("LORAMUX_API_KEY"), help="inference key (env LORAMUX_API_KEY)")
    a("--admin-key", default=os.environ.get("LORAMUX_ADMIN_KEY"), help="admin key for uploads (env LORAMUX_ADMIN_KEY)")
    a("--workload", "--workloads", dest="workloads", type=_csv(str), default=("distinct",),
      help=f"comma list of {', '.join(WORKLOADS)} (default distinct)")
    a("--concurrency", type=_csv(int), default=(1, 2, 4, 8), help="closed-loop levels (default 1,2,4,8)")
    a("--rate", type=_csv(float), default=(), help="open-loop levels in requests/s (replaces --concurrency)")
    a("--burstiness", type=float, default=1.0, help="gamma shape of inter-arrivals: 1 = Poisson, <1 burstier")
    a("--max-concurrency", type=int, default=None, help="open loop: cap on requests in flight")
    a("--requests", type=int, default=None, help="requests per level (default 32; a cap with --duration)")
    a("--duration", type=float, default=None, help="seconds per level")
    a("--prompt-tokens", type=_length, default=LengthDist("fixed", 32), help="N, MEAN:STD or LO-HI (default 32)")
    a("--max-tokens", type=_length, default=LengthDist("fixed", 32),
      help="output tokens, held with ignore_eos: N, MEAN:STD or LO-HI (default 32)")
    a("--prompt-mode", choices=("ids", "words"), default="ids", help="random token ids (exact lengths) or words")
    a("--token-id-range", default="1000:10000", help="LO:HI of prompt token ids (default %(default)s)")
    a("--seed", type=int, default=0)
    a("--stream", action="store_true", help="stream (SSE): needed for TTFT and inter-token latency")
    a("--temperature", type=float, default=0.0)
    a("--disconnect-fraction", type=float, default=0.0, help="share of clients that drop at a random token")
    a("--zipf-alpha", type=float, default=1.5, help="skewed workload exponent (default 1.5)")
    a("--adapters", type=int, default=None, help="use the first N adapters registered on the server")
    a("--adapter-names", type=_csv(str), default=(), help="comma list of registered adapters to use")
    a("--upload-synthetic", type=int, default=0, metavar="N", help="upload N random adapters first, delete after")
    a("--rank", type=int, default=8, help="rank of synthetic adapters (default 8)")
    a("--target-modules", type=_csv(str), default=ALL_MODULES, help="synthetic adapters' modules (default all 7)")
    a("--churn", type=float, default=0.0, metavar="OPS_PER_S", help="upload/replace/delete adapters during traffic")
    a("--warmup", type=int, default=0, help="unmeasured requests before each level (--chat: first turns on the base model)")
    a("--timeout", type=float, default=300.0, help="per-request timeout in seconds")
    a("--out", type=Path, default=Path("loadtest-results"), help="output directory (default %(default)s)")
    a("--no-plots", action="store_true")
    a("--no-progress", action="store_true")
    a("--compare", nargs="+", type=Path, metavar="FILE", help="plot these results.json files together; no run")
    a("--soak", type=float, default=None, metavar="SECONDS",
      help="soak instead of a sweep: traffic (first --concurrency level, --disconnect-fraction, default 0.1), "
           "adapter churn on adapters in use (--churn ops/s, default 0.5), bad uploads; reports RSS, open "
           "descriptors, threads and p99 after --soak-warmup and at the end, and the KV blocks once drained")
    a("--soak-warmup", type=float, default=60.0, metavar="SECONDS", help="soak warm-up (default 60)")
    a("--burst", type=int, default=None, metavar="N",
      help="overload check instead of a sweep: N requests at once on top of steady traffic (first --concurrency "
           "level, --duration seconds per phase, default 30); statuses, steady p99 with and without the burst, RSS")
    a("--chat", type=int, default=None, metavar="N",
      help="chat workload instead of a sweep: N multi-turn conversations sharing one system prompt "
           "(/v1/chat/completions, streamed; conversation i on adapter i mod pool; --concurrency's first level "
           "= conversations in flight; user turns --prompt-tokens words, replies --max-tokens tokens, the "
           "replies fed back as history); TTFT, throughput, cached prompt tokens per turn; chat.json")
    a("--turns", type=int, default=4, help="--chat: turns per conversation (default 4)")
    a("--system-tokens", type=int, default=512,
      help="--chat: words (about one token each) of the shared system prompt (default 512)")
    a("--debug", action="store_true", help="show tracebacks")
    return p


def _burst(args) -> int:
    from loadtest.burst import BurstConfig, format_burst, run_burst, write_burst

    cfg = config_from_args(args)
    burst = BurstConfig(url=cfg.url, burst=args.burst, concurrency=cfg.concurrency[0],
                        phase_s=args.duration or 30.0, prompt_tokens=_typical(args.prompt_tokens),
                        max_tokens=_typical(args.max_tokens), token_range=cfg.token_range, api_key=cfg.api_key,
                        timeout_s=args.timeout, seed=args.seed)
    result = asyncio.run(run_burst(burst))
    print(format_burst(result))
    print(f"wrote {write_burst(result, args.out)}")
    return 0 if result["passed"] else 1


def _chat(args) -> int:
    from loadtest.chat import ChatConfig, format_chat, run_chat, write_chat

    cfg = config_from_args(args)
    chat = ChatConfig(common=cfg, conversations=args.chat, turns=args.turns, system_tokens=args.system_tokens,
                      concurrency=cfg.concurrency[0])
    owned: set[str] = set()
    try:
        result = asyncio.run(run_chat(chat, owned))
    finally:
        if owned:
            left = delete_adapters_sync(cfg.url, sorted(owned), cfg.admin_key)
            if left:
                print(f"warning: could not delete adapters {', '.join(left)}", file=sys.stderr)
    print(format_chat(result))
    print(f"wrote {write_chat(result, args.out)}")
    return 0


def _typical(dist: LengthDist) -> int:
    return int(dist.a if dist.kind != "uniform" else (dist.a + dist.b) / 2)


def _soak(args) -> int:
    from loadtest.soak import SoakConfig, format_report, run_soak, write_report

    cfg = config_from_args(args)
    soak = SoakConfig(url=cfg.url, seconds=args.soak, warmup_s=min(args.soak_warmup, args.soak / 2),
                      window_s=min(60.0, args.soak / 4), concurrency=cfg.concurrency[0],
                      adapters=args.adapters or 8, rank=args.rank, prompt_tokens=_typical(args.prompt_tokens),
                      max_tokens=_typical(args.max_tokens), token_range=cfg.token_range,
                      disconnect_fraction=args.disconnect_fraction or 0.1, churn_per_s=args.churn or 0.5,
                      seed=args.seed, api_key=cfg.api_key, admin_key=cfg.admin_key, timeout_s=args.timeout)
    owned: set[str] = set()
    try:
        report_ = asyncio.run(run_soak(soak, owned, progress=not args.no_progress))
    finally:
        if owned:
            left = delete_adapters_sync(cfg.url, sorted(owned), cfg.admin_key)
            if left:
                print(f"warning: could not delete adapters {', '.join(left)}", file=sys.stderr)
    print(format_report(report_))
    print(f"wrote {write_report(report_, args.out)}")
    return 0 if report_["passed"] else 1


def config_from_args(args) -> RunConfig:
    """A validated RunConfig; ValueError with a user-facing message otherwise."""
    url = args.url.rstrip("/")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--url must look like http://HOST:PORT, got {args.url!r}")
    try:
        lo, hi = (int(x) for x in args.token_id_range.split(":"))
    except ValueError:
        raise ValueError(f"--token-id-range must be LO:HI, got {args.token_id_range!r}") from None
    requests = args.requests if args.requests is not None or args.duration is not None else 32
    return RunConfig(
        url=url, workloads=args.workloads, concurrency=args.concurrency, rates=args.rate,
        burstiness=args.burstiness, max_concurrency=args.max_concurrency, requests=requests,
        duration_s=args.duration, prompt_len=args.prompt_tokens, output_len=args.max_tokens,
        prompt_mode=args.prompt_mode, token_range=(lo, hi), seed=args.seed, stream=args.stream,
        temperature=args.temperature, disconnect_fraction=args.disconnect_fraction, zipf_alpha=args.zipf_alpha,
        api_key=args.api_key, admin_key=args.admin_key or args.api_key, adapter_names=args.adapter_names,
        adapters=args.adapters, upload_synthetic=args.upload_synthetic, rank=args.rank,
        target_modules=args.target_modules, churn=args.churn, warmup=args.warmup, timeout_s=args.timeout,
        progress=not args.no_progress,
    )


def _compare(files: list[Path], out: Path) -> int:
    from loadtest.plots import plot_compare  # matplotlib only when plotting

    runs = {}
    for f in files:
        label = f.parent.name if f.name == "results.json" and f.parent.name else f.stem
        runs[label if label not in runs else str(f)] = report.load_results(f)
    out.mkdir(parents=True, exist_ok=True)
    for path in plot_compare(runs, out):
        print(f"wrote {path}")
    return 0


def _run(cfg: RunConfig, out: Path, plots: bool) -> int:
    out.mkdir(parents=True, exist_ok=True)
    owned: set[str] = set()
    records: list[dict] = []

    def save(rec: dict) -> None:
        records.append(rec)
        report.write_json(records, out / "results.json")
        report.write_csv(records, out / "results.csv")

    host = urlsplit(cfg.url).hostname
    if host not in ("127.0.0.1", "localhost", "::1"):
        print(f"note: sending load to {host}; use this only against servers you run", file=sys.stderr)
    try:
        asyncio.run(run(cfg, owned, on_record=save))
    finally:
        if owned:  # uploaded (or maybe uploaded) by this run: delete, whatever happened
            left = delete_adapters_sync(cfg.url, sorted(owned), cfg.admin_key)
            if left:
                print(f"warning: could not delete adapters {', '.join(left)}", file=sys.stderr)
    print(report.format_table(records))
    if plots and records:
        from loadtest.plots import plot_run

        for path in plot_run(records, out):
            print(f"wrote {path}")
    print(f"wrote {out / 'results.json'} and {out / 'results.csv'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.compare:
            return _compare(args.compare, args.out)
        if args.soak is not None:
            return _soak(args)
        if args.burst is not None:
            return _burst(args)
        if args.chat is not None:
            return _chat(args)
        return _run(config_from_args(args), args.out, plots=not args.no_plots)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted (uploaded adapters were deleted)", file=sys.stderr)
        return 130
    except (LoadTestError, ValueError, OSError) as e:
        if args.debug:
            raise
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug of ours: still one line unless --debug
        if args.debug:
            raise
        print(f"{PROG}: unexpected error: {type(e).__name__}: {e} (rerun with --debug)", file=sys.stderr)
        return 1
