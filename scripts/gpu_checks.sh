#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of a few minutes (written for one H100 / H200):
#   1. the tests whose CUDA cases exist only where a GPU is: fp8 activations through torch._scaled_mm
#      (tests/infer/test_quant.py), the grouped-matmul MoE path in bfloat16 (tests/model/test_parity.py), and the decode
#      step captured as CUDA graphs (tests/infer/test_slot_batch.py);
#   2. `herd generate` on the GPU in bfloat16, plain and with --quantize fp8 / fp8-dynamic;
#   3. benchmarks/bench_quant.py on the GPU (perplexity and memory of every format; one 8192x8192 linear at 1 to
#      4096 rows: bfloat16 vs fp8 weights vs fp8 dynamic);
#   4. benchmarks/bench_fp8_matmul.py (where the time of one fp8 dynamic linear goes, against bfloat16);
#   5. benchmarks/bench_engine.py on the GPU (herd's engine on both batch layouts, the slot layout with CUDA graphs,
#      vs transformers' generate, bfloat16), then once more with the slot layout's step compiled (compile + graphs).
# Usage: scripts/gpu_checks.sh [OUTDIR]   with a CUDA build of torch and transformers importable by $PYTHON
# (default python3); herd is taken from src/ when it is not installed. Tables and JSON land in OUTDIR.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-gpu-results}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
export PYTHONPATH=$PWD/src:$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
run() {  # run NAME SECONDS CMD...: time-boxed, output appended to OUTDIR/gpu_checks.log, failures counted
    local name=$1 limit=$2
    shift 2
    echo "== $name ($(date +%T))" | tee -a "$OUT/gpu_checks.log"
    timeout "$limit" "$@" 2>&1 | tee -a "$OUT/gpu_checks.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "!! $name exited $rc"; status=1; }
}
run env 60 "$PY" -c "import torch, transformers; print('torch', torch.__version__, '| transformers',
transformers.__version__, '|', torch.cuda.get_device_name(), torch.cuda.get_device_capability(), '| grouped_mm',
hasattr(torch, '_grouped_mm'), '| scaled_mm', hasattr(torch, '_scaled_mm'))"
run tests 180 "$PY" -m pytest -q -p no:cacheprovider tests/infer/test_quant.py tests/model/test_parity.py -k "fp8 or grouped"
run slot_tests 120 "$PY" -m pytest -q -p no:cacheprovider tests/infer/test_slot_batch.py -k "cuda or captured"
ckpt=$(mktemp -d)
run init 60 "$PY" -m herd.cli init --preset tiny --out "$ckpt"
for q in none fp8 fp8-dynamic; do
    flags=()
    [ "$q" = none ] || flags=(--quantize "$q")
    run "generate-$q" 60 "$PY" -m herd.cli generate --model "$ckpt" --device cuda --dtype bfloat16 \
        --prompt-ids 1,2,3 --max-new-tokens 16 "${flags[@]}"
done
run bench_quant 150 "$PY" benchmarks/bench_quant.py --device cuda --dtype bfloat16 --layer-dim 8192 \
    --layer-batches 1,16,256,4096 --out "$OUT/bench_quant_cuda.json"
run bench_fp8_matmul 120 "$PY" benchmarks/bench_fp8_matmul.py --out "$OUT/bench_fp8_matmul.json"
run bench_engine 300 "$PY" benchmarks/bench_engine.py --device cuda --dtype bfloat16 --out "$OUT/bench_engine_cuda.json"
run bench_engine_compiled 420 "$PY" benchmarks/bench_engine.py --device cuda --dtype bfloat16 --compile --no-mixed \
    --out "$OUT/bench_engine_cuda_compiled.json"
exit $status
