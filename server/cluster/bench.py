"""`python -m server.cluster.bench`: the cluster against the single server, and the Ray hop, in one run.

One run, on one machine, same model and flags for both targets:
  1. the single server (`loramux serve`, a subprocess) and the cluster (`--replicas 2` on a local Ray
     started here, one CPU per replica) and a trivial Ray Serve echo deployment on the same proxy;
  2. `loramux-loadtest` (a subprocess: the external client) against each: 64 synthetic adapters
     uploaded through the API, skewed (Zipf) adapter traffic, closed loop at concurrency 32, two
     levels (the first warms every replica's adapters; the second is the measured one);
     throughput per replica = cluster / replicas, and affinity as the replicas count it;
  3. the Ray hop: sequential non-streaming requests at concurrency 1, the three targets interleaved:
     the echo's latency through Ray's HTTP proxy, and (cluster - single server) for the same
     one-token completion.
Prints a table and writes JSON (default docs/ray-bench.json). `--model tiny` (default) writes the
tests' tiny random Llama (needs the repository's tests/); `--model default` is the embedded SmolLM2.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from server.settings import ServerSettings

FLAGS = dict(max_batch_size=32, max_num_batched_tokens=2048, kv_cache_tokens=32768, max_adapters_per_batch=8,
             max_cpu_adapters=64, max_lora_rank=16, device="cpu", log_level="warning")


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready after {timeout:.0f}s")


def _loadtest(url: str, out: Path, args) -> list[dict]:
    cmd = [sys.executable, "-m", "loadtest", "--url", url, "--workload", "skewed", "--concurrency", "32,32",
           "--requests", str(args.requests), "--upload-synthetic", "64", "--rank", "8",
           "--max-tokens", str(args.max_tokens), "--prompt-tokens", "32", "--token-id-range", args.token_range,
           "--out", str(out), "--no-plots", "--no-progress", "--timeout", "300"]
    subprocess.run(cmd, check=True)
    return json.loads((out / "results.json").read_text())


def _sequential(targets: dict[str, tuple[str, str, dict]], n: int) -> dict[str, list[float]]:
    """Latency of one request at a time, the targets interleaved round-robin (so that the machine's
    load drifts over all of them alike); the first 3 rounds warm connections and caches."""
    clients = {k: httpx.Client(base_url=url, timeout=60) for k, (url, _, _) in targets.items()}
    times: dict[str, list[float]] = {k: [] for k in targets}
    try:
        for i in range(n + 3):
            for k, (_, path, body) in targets.items():
                t0 = time.perf_counter()
                clients[k].post(path, json=body).raise_for_status()
                if i >= 3:
                    times[k].append(time.perf_counter() - t0)
    finally:
        for c in clients.values():
            c.close()
    return times


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m server.cluster.bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="tiny", help="tiny (the tests' random Llama) | default | a path")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--requests", type=int, default=256, help="requests per loadtest level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--hop-requests", type=int, default=40)
    p.add_argument("--max-cpu-adapters", type=int, default=FLAGS["max_cpu_adapters"],
                   help="adapters held in host memory per server / per replica (Serve's multiplexed LRU)")
    p.add_argument("--json", type=Path, default=Path("docs/ray-bench.json"))
    args = p.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="loramux-raybench-"))
    model = args.model
    if model == "tiny":
        from tests.real_server import save_tiny_model  # the repository's tests package

        model = str(save_tiny_model(work / "model"))
        args.token_range, dtype = "3:250", "float32"
    else:
        args.token_range, dtype = "1000:10000", "auto"
    flags = {**FLAGS, "model": model, "dtype": dtype, "max_cpu_adapters": args.max_cpu_adapters}
    single_port, cluster_port = _free_port(), _free_port()
    single_url, cluster_url = f"http://127.0.0.1:{single_port}", f"http://127.0.0.1:{cluster_port}"
    cli = [sys.executable, "-m", "server", "serve", "--port", str(single_port), "--adapter-dir", str(work / "single")]
    cli += [f"--{k.replace('_', '-')}={v}" for k, v in flags.items()]
    single = subprocess.Popen(cli, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    from ray import serve

    from server.cluster.app import deploy, init_ray

    settings = ServerSettings(**flags, adapter_dir=str(work / "cluster"), port=cluster_port, replicas=args.replicas)
    result: dict = {"model": args.model, "replicas": args.replicas, "machine": f"{os.cpu_count()} CPUs, "
                    f"{platform.machine()}", "flags": flags}
    try:
        t0 = time.monotonic()
        init_ray(settings)
        deploy(settings)
        result["cluster_start_s"] = round(time.monotonic() - t0, 1)

        @serve.deployment(ray_actor_options={"num_cpus": 0})
        class Echo:
            async def __call__(self, request):
                return await request.json()

        serve.run(Echo.bind(), name="echo", route_prefix="/echo")
        _wait_ready(single_url, 300)
        # --- throughput and affinity: the same loadtest against each target -------------------------
        result["single"] = _loadtest(single_url, work / "lt-single", args)
        result["cluster"] = _loadtest(cluster_url, work / "lt-cluster", args)
        # --- the Ray hop: sequential, non-streaming, concurrency 1 -----------------------------------
        body = {"prompt": [5, 6, 7, 8], "max_tokens": 1, "temperature": 0}
        n = args.hop_requests
        lat = _sequential({"echo": (cluster_url, "/echo", {"hello": "world"}),
                           "single": (single_url, "/v1/completions", body),
                           "cluster": (cluster_url, "/v1/completions", body)}, n)
        result["hop_ms"] = {k: {"median": 1e3 * statistics.median(v), "mean": 1e3 * statistics.fmean(v),
                                "p10": 1e3 * statistics.quantiles(v, n=10)[0],
                                "p90": 1e3 * statistics.quantiles(v, n=10)[-1]} for k, v in lat.items()}
    finally:
        single.terminate()
        single.wait(timeout=60)
        serve.shutdown()
        import ray

        ray.shutdown()
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, default=str))
    print(_table(result))
    print(f"wrote {args.json}")
    return 0


def _table(r: dict) -> str:
    s, c = r["single"][-1], r["cluster"][-1]  # the measured (second) level of each
    n = r["replicas"]
    hop = r["hop_ms"]
    extra = hop["cluster"]["median"] - hop["single"]["median"]
    rows = [
        ("single server: out tok/s (c=32, skewed, 64 adapters)", f"{s['output_tokens_per_s']:.1f}"),
        (f"cluster ({n} replicas): out tok/s", f"{c['output_tokens_per_s']:.1f}"),
        ("cluster: out tok/s per replica", f"{c['output_tokens_per_s'] / n:.1f}"),
        ("per replica / single", f"{c['output_tokens_per_s'] / n / s['output_tokens_per_s']:.2f}"),
        ("affinity: cluster (single server)", f"{c.get('affinity') or float('nan'):.3f} "
                                               f"({s.get('affinity') or float('nan'):.3f})"),
        ("e2e p50 ms: cluster (single)", f"{c['e2e_ms']['p50']:.0f} ({s['e2e_ms']['p50']:.0f})"),
        ("echo through Ray's proxy, median ms", f"{hop['echo']['median']:.1f}"),
        ("single server 1-token completion, median ms", f"{hop['single']['median']:.1f}"),
        ("cluster 1-token completion, median ms", f"{hop['cluster']['median']:.1f}"),
        ("cluster - single (the Ray hops), ms", f"{extra:.1f}"),
        ("(cluster - single) / echo", f"{extra / hop['echo']['median']:.2f}"),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(w)}  {v}" for k, v in rows)


if __name__ == "__main__":
    sys.exit(main())
