"""PNG plots of one run or of several (`--compare`): throughput and latency vs batch size.

Data flow: records (results.json rows) -> `group(records, label)` -> {series label: records
sorted by level} -> `plot_throughput` (output tok/s, req/s and the server's mean batch size vs
concurrency, one line per series) and `plot_latency` (TTFT / ITL / e2e p50 solid, p90 dashed,
p99 dotted, one colour per series). The x axis is the closed-loop concurrency, or the request
rate for open-loop runs. matplotlib runs headless (Agg).
"""
from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402 (after the backend is chosen)

_STYLES = {"p50": "-", "p90": "--", "p99": ":"}


def _x(record: dict) -> float | None:
    return record.get("rate") if record.get("mode") == "open" else record.get("concurrency")


def group(records: Iterable[dict], label: str | None = None) -> dict[str, list[dict]]:
    """{series: records sorted by x}; a series is a workload (and mode), prefixed by `label`."""
    series: dict[str, list[dict]] = {}
    for r in records:
        if _x(r) is None:
            continue  # open loop without a cap has no concurrency to plot against in a mixed chart
        name = r["workload"] + (" (open)" if r.get("mode") == "open" else "")
        series.setdefault(f"{label}: {name}" if label else name, []).append(r)
    return {k: sorted(v, key=_x) for k, v in series.items()}


def _x_label(series: dict[str, list[dict]]) -> str:
    modes = {r.get("mode", "closed") for rs in series.values() for r in rs}
    return "request rate (req/s)" if modes == {"open"} else "concurrency (requests in flight)"


def _style_axis(ax, series, title: str, ylabel: str) -> None:
    xs = [_x(r) for rs in series.values() for r in rs]
    if xs and min(xs) > 0 and max(xs) / min(xs) >= 4:
        ax.set_xscale("log", base=2)  # sweeps are usually 1, 2, 4, ... 64
    ax.set_title(title)
    ax.set_xlabel(_x_label(series))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)


def plot_throughput(series: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """Output tokens/s, requests/s and mean server batch size vs concurrency."""
    panels = [("output_tokens_per_s", "output tokens / s"), ("requests_per_s", "requests / s"),
              ("mean_batch_size", "mean batch size (server)")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for name, rs in series.items():
            pts = [(_x(r), r.get(key)) for r in rs if r.get(key) is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=name)
        _style_axis(ax, series, ylabel, ylabel)
    axes[0].legend(fontsize="small")
    fig.suptitle(title or "throughput vs batch size")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency(series: dict[str, list[dict]], path: Path, title: str = "") -> Path:
    """TTFT, inter-token and end-to-end latency percentiles vs concurrency."""
    panels = [("ttft_ms", "time to first token (ms)"), ("itl_ms", "inter-token latency (ms)"),
              ("e2e_ms", "end-to-end latency (ms)")]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, (key, ylabel) in zip(axes, panels, strict=True):
        for i, (name, rs) in enumerate(series.items()):
            for p, style in _STYLES.items():
                pts = [(_x(r), r[key][p]) for r in rs if (r.get(key) or {}).get(p) is not None]
                if pts:
                    ax.plot(*zip(*pts, strict=True), style, marker=".", color=colours[i % len(colours)],
                            label=f"{name} {p}")
            if not any((r.get(key) or {}).get("p50") is not None for r in rs) and key != "e2e_ms":
                ax.text(0.5, 0.5, "needs --stream", transform=ax.transAxes, ha="center", alpha=0.5)
        _style_axis(ax, series, ylabel, "ms")
    axes[2].legend(fontsize="x-small", ncol=2)
    fig.suptitle(title or "latency percentiles vs batch size (p50 solid, p90 dashed, p99 dotted)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_run(records: list[dict], out_dir: Path) -> list[Path]:
    """throughput.png and latency.png of one run."""
    series = group(records)
    if not series:
        return []
    return [plot_throughput(series, out_dir / "throughput.png"), plot_latency(series, out_dir / "latency.png")]


def plot_compare(runs: dict[str, list[dict]], out_dir: Path) -> list[Path]:
    """compare_throughput.png and compare_latency.png: several result files on one chart each."""
    series: dict[str, list[dict]] = {}
    for label, records in runs.items():
        series |= group(records, label)
    if not series:
        raise ValueError("nothing to plot: the result files hold no closed-loop or capped open-loop levels")
    return [
        plot_throughput(series, out_dir / "compare_throughput.png", "throughput vs batch size (compare)"),
        plot_latency(series, out_dir / "compare_latency.png", "latency vs batch size (compare)"),
    ]
