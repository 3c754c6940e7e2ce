#!/usr/bin/env bash
# `make gpu-check`: one script for a fresh GPU machine (one H200, no network, 15 minutes of device time in
# all, one or two of them to start it), so it finishes within 5 minutes. Stages run in order of value; each
# writes $OUT/<stage>.log and $OUT/<stage>.json as it ends, so whatever finished before a time-out is kept:
#   1 env           torch / triton / CUDA versions and the device
#   2 gpu_tests     the @pytest.mark.gpu tests: LoRA kernels (SGMV), paged attention, quantized matmul,
#                   the model with Triton attention vs HF, HF and PEFT parity on CUDA, the sampler
#   3 attention     kernels.bench_attention: decode at batch 64 / 2k context vs HBM bandwidth (target >= 60%)
#   4 lora_kernels  kernels.bench --tiny: shrink+expand at batch 64 distinct vs the copy floor (target >= 60%)
#   5 engine        server.bench --shape llama3-8b, 32 distinct rank-16 adapters: distinct/base at batch 32
#                   (target >= 0.7, eager launches, no CUDA graphs)
#   6 summary       every figure next to its target ($OUT/summary.json)
# The GPU image has torch 2.11, triton 3.6, transformers, peft, safetensors, tokenizers, httpx, numpy and
# pytest, but no fastapi, uvicorn, pydantic, python-multipart or gguf: nothing this script runs may import
# them. `make gpu-check DRY_RUN=1` runs every stage on the CPU with tiny shapes (Triton interpreter) and
# records any import of those packages by our code (scripts/gpu_image_sim), so only the device is left
# to chance. Never installs anything: it uses .venv if it sees CUDA there, else the system python.
set -uo pipefail
cd "$(dirname "$0")/.."
REPO="$PWD"
export OUT="${OUT:-$REPO/out}"
mkdir -p "$OUT"
DRY="${DRY_RUN:-0}"
if [ "$DRY" = 1 ]; then
  PY="${PYTHON:-$REPO/.venv/bin/python}"
  DEVICE=cpu
  export PYTHONPATH="$REPO/scripts/gpu_image_sim:$REPO"
  export LORAMUX_REPO="$REPO"
  rm -f "$OUT/forbidden_imports.log"
elif [ -x .venv/bin/python ] && .venv/bin/python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
  PY=.venv/bin/python; DEVICE=cuda; export PYTHONPATH="$REPO"
else
  PY="${PYTHON:-python3}"; DEVICE=cuda; export PYTHONPATH="$REPO"
fi
unset TRITON_INTERPRET
status=0

# stage NAME SECONDS CMD...: runs CMD with a time limit, log to $OUT/NAME.log, {rc, seconds} to $OUT/NAME.json.
stage() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s) =="
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
  local rc=${PIPESTATUS[0]}
  printf '{"stage": "%s", "rc": %d, "seconds": %d, "dry_run": %s}\n' "$name" "$rc" $((SECONDS - t0)) \
    "$([ "$DRY" = 1 ] && echo true || echo false)" > "$OUT/$name.status.json"
  [ "$rc" -eq 0 ] || status=1
}

stage env 60 "$PY" -c "
import json, os, torch, triton
info = {'torch': torch.__version__, 'triton': triton.__version__, 'cuda': torch.cuda.is_available(),
        'device': torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu'}
print(json.dumps(info)); json.dump(info, open(os.path.join(os.environ['OUT'], 'env.json'), 'w'))"

GPU_TESTS="tests/kernels/test_triton_sgmv.py tests/kernels/test_triton_attention.py tests/kernels/test_triton_qmatmul.py
  tests/server/model/test_triton_attention_model.py tests/server/model/test_hf_parity.py
  tests/adapters/test_peft_parity.py tests/server/engine/test_sampler.py"
# In the dry run the gpu tests skip (no CUDA): collecting them checks their imports against the image.
# shellcheck disable=SC2086
stage gpu_tests 120 "$PY" -m pytest -m gpu $GPU_TESTS -q -p no:cacheprovider -o addopts="" \
  --junitxml="$OUT/gpu_tests.xml"

if [ "$DRY" = 1 ]; then
  stage attention 120 "$PY" -m kernels.bench_attention --device cpu --dry-run --json "$OUT/attention.json"
  stage lora_kernels 180 "$PY" -m kernels.bench --device cpu --tiny --dtypes float32 --json "$OUT/lora_kernels.json"
  stage engine 180 "$PY" -m server.bench --device cpu --shape tiny --batch-sizes 1,4 --mixes none,distinct \
    --rank 8 --new-tokens 4 --prompt-tokens 8 --repeats 1 --byte-tokenizer --json "$OUT/engine.json"
else
  stage attention 60 "$PY" -m kernels.bench_attention --device cuda --json "$OUT/attention.json"
  stage lora_kernels 60 "$PY" -m kernels.bench --device cuda --tiny --json "$OUT/lora_kernels.json"
  stage engine 120 "$PY" -m server.bench --device cuda --shape llama3-8b --batch-sizes 1,32 --mixes none,distinct \
    --rank 16 --new-tokens 32 --repeats 1 --byte-tokenizer --json "$OUT/engine.json"
fi

stage summary 30 "$PY" scripts/gpu_summary.py "$OUT"
if [ "$DRY" = 1 ] && [ -s "$OUT/forbidden_imports.log" ]; then
  echo "forbidden imports (the GPU image lacks these packages):"
  cat "$OUT/forbidden_imports.log"
  status=1
fi
exit $status
