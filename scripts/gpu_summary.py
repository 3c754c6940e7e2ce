"""Reads the stage outputs of scripts/gpu_check.sh and prints every figure next to its target (issue #19);
writes summary.json beside them. Missing stages are reported as missing, never invented.

    python scripts/gpu_summary.py OUT_DIR
"""
from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def _load(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def main(argv: list[str]) -> int:
    out = Path(argv[1] if len(argv) > 1 else "out")
    lines, summary = [], {}
    env = _load(out / "env.json")
    summary["env"] = env
    lines.append(f"env: {env}")
    try:
        suite = ET.parse(out / "gpu_tests.xml").getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    except (OSError, ET.ParseError, AttributeError):
        counts = None
    summary["gpu_tests"] = counts
    lines.append(f"gpu tests: {counts}")

    att = _load(out / "attention.json")
    pick = next((r for r in (att or {}).get("records", []) if r["op"] == "decode" and
                 (r["batch"], r["context"]) == (64, 2048)), None)
    summary["attention_decode_b64_2k_pct_of_peak"] = pick and pick["pct_of_peak"]
    lines.append("paged decode attention, batch 64, 2k context: " + (
        f"{pick['pct_of_peak']:.1f}% of nominal HBM ({pick['pct_of_copy_bw']:.1f}% of copy)  target >= 60%"
        if pick else "not measured"))

    lora = _load(out / "lora_kernels.json")
    recs = [r for r in (lora or {}).get("records", []) if r["impl"] in ("triton",) and r["batch_size"] == 64
            and r["num_adapters"] == 64]
    best = max(recs, key=lambda r: r["floor_ms"] / r["median_ms"], default=None)
    summary["lora_b64_distinct_pct_of_floor"] = best and 100 * best["floor_ms"] / best["median_ms"]
    lines.append("LoRA shrink+expand, batch 64, 64 distinct: " + (
        f"{100 * best['floor_ms'] / best['median_ms']:.1f}% of the copy-bandwidth floor (hidden {best['hidden']}, "
        f"r{best['rank']})  target >= 60%" if best else "not measured (CUDA only)"))

    eng = _load(out / "engine.json")
    by = {(r["mix"], r["batch_size"]): r for r in (eng or {}).get("records", [])}
    bmax = max((b for _, b in by), default=None)
    base, dist = by.get(("none", bmax)), by.get(("distinct", bmax))
    ratio = dist["output_tokens_per_s"] / base["output_tokens_per_s"] if base and dist else None
    summary["engine_distinct_over_base"] = ratio
    summary["engine_batch"] = bmax
    lines.append(f"engine distinct/base at batch {bmax}: " + (f"{ratio:.2f}  target >= 0.7 (batch 32, llama3-8b)"
                                                               if ratio is not None else "not measured"))
    print("\n".join(lines))
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
