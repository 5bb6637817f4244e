#!/usr/bin/env bash
# The model benchmark on a GPU machine, in at most ~8 minutes; results as JSON under $OUT.
#
#   OUT=/some/dir bash benchmarks/gpu.sh
#
# Written for a machine that reaches no package index and has its own python3 with PyTorch (CUDA), numpy,
# onnx and onnxruntime, but nothing of the service's runtime (no pydantic, no pydicom). So it runs only code
# that needs none of that:
#   1. python -m benchmarks.core: backbone + head, fp32 and int8, batch 1/32/256, with ONNX Runtime's TensorRT
#      execution provider where the installed onnxruntime has it, else CUDA's, else the CPU's (said so in
#      core.json: an onnxruntime-gpu wheel is ~300 MB, too large to bring along in most set-ups); int8's
#      agreement with fp32; the machine's numpy GEMM rate; and the Triton `onnxruntime`-backend configs for a
#      GPU (KIND_GPU, dynamic batching, the TensorRT accelerator) in $OUT/triton/;
#   2. python -m benchmarks.eager --device cuda: the same torch model (runs/bundled/checkpoint.pt) on the GPU,
#      fp32 and fp16 autocast, batch 1/32/256.
# Inputs: build/bench_inputs.npy (the cleaned images of the last `make bench`), synthetic ones without it.
# What to bring to that machine besides the repository: build/bench_inputs.npy and runs/bundled/checkpoint.pt
# (both ignored by git, ~15 MB together); optionally wheels in .whl/ (installed with --no-index first).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-build/gpu}
PY=${PYTHON:-python3}
mkdir -p "$OUT/triton"
LOG="$OUT/gpu.log"
exec > >(tee "$LOG") 2>&1
export PYTHONUNBUFFERED=1
start=$(date +%s)

if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --target /tmp/fusc-site .whl/*.whl \
    && export PYTHONPATH="/tmp/fusc-site${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv >"$OUT/nvidia-smi.csv" 2>&1 \
  || echo "no nvidia-smi" >"$OUT/nvidia-smi.csv"
echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"

available=$("$PY" -c "import onnxruntime as o; print(' '.join(o.get_available_providers()))" 2>/dev/null || true)
echo "onnxruntime providers: ${available:-none (onnxruntime missing)}"
case " $available " in
  *" TensorrtExecutionProvider "*) providers=tensorrt ;;
  *" CUDAExecutionProvider "*) providers=cuda ;;
  *) providers=cpu; echo "this onnxruntime has no GPU provider: ONNX Runtime runs on the CPU here" ;;
esac

inputs=()
[ -f build/bench_inputs.npy ] && inputs=(--inputs build/bench_inputs.npy)

# TensorRT builds an engine per batch shape on first use: the time limit leaves room for that.
timeout 300 "$PY" -m benchmarks.core --providers "$providers" "${inputs[@]}" --batches 1 32 256 --seconds 3 \
  --out "$OUT/core.json" --triton-config "$OUT/triton" || echo "benchmarks.core failed or timed out: $?"

if "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  timeout 150 "$PY" -m benchmarks.eager --device cuda "${inputs[@]}" --seconds 3 --out "$OUT/torch_cuda.json" \
    || echo "benchmarks.eager failed or timed out: $?"
else
  echo '{"skipped": "torch sees no CUDA device"}' >"$OUT/torch_cuda.json"
fi
echo "done in $(($(date +%s) - start)) s; files in $OUT"
