#!/usr/bin/env bash
# One-command GPU check (< 8 min on one H200): kernel tests on CUDA, the kernel bench, and the
# engine bench on a 7B-shaped random-weight model when server/bench/engine.py exists.
# Writes JSON + text tables to $OUT (default ./out). Never installs from the network: it uses
# .venv if present, else the system python (the GPU image's torch 2.11 / triton 3.6) with PYTHONPATH=.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-./out}"
mkdir -p "$OUT"
if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  PY=.venv/bin/python
else
  PY="${PYTHON:-python3}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
status=0
"$PY" - <<'PY' | tee "$OUT/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "-")
PY

echo "== gpu tests (kernels, sampler, model and adapter parity on CUDA) =="
# The GPU image lacks some server-only packages (fastapi, gguf): keep going past collection errors.
timeout 200 "$PY" -m pytest -m gpu tests/kernels tests/server tests/adapters -q \
  --continue-on-collection-errors -p no:cacheprovider -o addopts="" 2>&1 | tee "$OUT/kernel_tests.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo "== kernel bench (cuda) =="
timeout 180 "$PY" -m kernels.bench --device cuda --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels_bench.txt"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

if [ -f server/bench/engine.py ]; then
  echo "== engine bench (llama-7b shape, random weights) =="
  timeout 170 "$PY" -m server.bench --device cuda --shape llama-7b --batch-sizes 1,8,32,64 --new-tokens 32 \
    --json "$OUT/engine.json" 2>&1 | tee "$OUT/engine_bench.txt"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
else
  echo "server/bench/engine.py not present: engine bench skipped" | tee "$OUT/engine_bench.txt"
fi
exit $status
