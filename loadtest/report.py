"""Results on disk and on screen: results.json, results.csv and the end-of-run table.

Data flow: the runner's records (one flat dict per workload x level, nested dicts for the
latency summaries) -> `write_json` (a JSON list, one record per level, as is) /
`write_csv` (nested keys flattened as `ttft_ms_p50`, dicts of counts as JSON strings) /
`format_table` (a fixed-width text table for stdout). `load_results` reads a results.json back
for `--compare`.
"""
from __future__ import annotations

import csv
import json
import math
from pathlib import Path

LATENCIES = ("ttft_ms", "itl_ms", "e2e_ms")


def write_json(records: list[dict], path: Path) -> None:
    path.write_text(json.dumps(records, indent=2, allow_nan=False, default=_jsonable) + "\n")


def _jsonable(value):
    raise TypeError(f"not JSON-serializable: {type(value).__name__}")


def load_results(path: Path) -> list[dict]:
    """A results.json written by this tool; ValueError when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read results file {path}: {e}") from None
    if not isinstance(data, list) or not all(isinstance(r, dict) and "workload" in r for r in data):
        raise ValueError(f"{path} is not a loramux-loadtest results.json (a list of level records)")
    return data


def flatten(record: dict) -> dict:
    """One CSV row: {a: {b: x}} -> {a_b: x}; dicts of counts (failed_by_reason, churn) -> JSON text."""
    row: dict = {}
    for key, value in record.items():
        if isinstance(value, dict) and key in (*LATENCIES, "tpot_ms"):
            row.update({f"{key}_{k}": v for k, v in value.items()})
        elif isinstance(value, dict):
            row[key] = json.dumps(value, sort_keys=True)
        else:
            row[key] = value
    return row


def write_csv(records: list[dict], path: Path) -> None:
    rows = [flatten(r) for r in records]
    fields: list[str] = []
    for row in rows:  # union of keys, first-seen order (records with churn add a column)
        fields += [k for k in row if k not in fields]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def _fmt(value, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def format_table(records: list[dict]) -> str:
    """The end-of-run table: one line per level."""
    head = ("workload", "level", "ok", "fail", "drop", "req/s", "out tok/s", "tot tok/s",
            "ttft p50", "ttft p99", "itl p50", "itl p99", "e2e p50", "e2e p99", "batch", "affinity")
    lines = [head]
    for r in records:
        level = f"c={r['concurrency']}" if r.get("mode", "closed") == "closed" else f"r={_fmt(r.get('rate'), 2)}"
        lines.append((
            r["workload"], level, str(r["ok"]), str(r["failed"]), str(r.get("disconnected", 0)),
            _fmt(r["requests_per_s"], 2), _fmt(r["output_tokens_per_s"]), _fmt(r.get("total_tokens_per_s")),
            *(_fmt(r[k][p]) for k in LATENCIES for p in ("p50", "p99")),
            _fmt(r.get("mean_batch_size"), 2), _fmt(r.get("affinity"), 3),
        ))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    text = ["  ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths, strict=True))) for row in lines]
    text.insert(1, "-" * len(text[0]))
    notes = [f"{r['workload']} {_level_label(r)}: failed {r['failed_by_reason']}" for r in records if r["failed"]]
    churn = [f"{r['workload']} {_level_label(r)}: churn {_churn_line(r['churn'])}" for r in records if r.get("churn")]
    return "\n".join(text + notes + churn) + "\n(latencies in ms; batch = mean sequences per engine step; affinity = share of adapter " \
        "requests whose adapter was already held (device or host) where they ran)"


def _level_label(r: dict) -> str:
    return f"c={r['concurrency']}" if r.get("mode", "closed") == "closed" else f"rate={r.get('rate')}"


def _churn_line(churn: dict) -> str:
    return ", ".join(f"{op} ok={v['ok']} failed={sum(v['failed'].values())}" for op, v in churn.items())
