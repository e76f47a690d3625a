#!/usr/bin/env bash
# Issue 7/18's GPU measurements in parts that each fit one 10-minute device command.
#
#   bash bench/gpu_session.sh PART [OPTION ...]
#
# PART:
#   check      versions, nvidia-smi, the GPU tests (Triton kernels, NF4, fused LoRA/loss), bench/kernels.py
#   phi-3      bench/throughput.py, Phi-3-mini-4k shape, seq 2048 x batch 1, all four engines
#   phi-2      the same for the Phi-2 shape
#   ablate-3   phicore-qlora on Phi-3-mini-4k with one issue-7 change switched off per run
#              (--phicore-option; bench/NOTES.md gives each change's prediction); the options
#              given after the part, or all of them (two commands' worth: split them)
#   profile-3  phicore-qlora and hf-qlora on Phi-3-mini-4k with --profile (what still costs time)
#   compile-3  phicore-qlora on Phi-3-mini-4k: eager, --compile, and --compile with CUDA graphs
#              (the H200 steps were host-bound: 111 ms of GPU work in a 263-340 ms step)
#   memory-2   phicore-qlora and phicore-lora on Phi-2 with --memory-peak: what is alive at the
#              step's peak, by allocating line, beside the planner's terms (the planner missed
#              Phi-2 QLoRA on the H200 by 17 %; LoRA and Phi-3 within 6 %; CPU within 2 %)
#
# Done so far (bench/results/cuda-h200-2026-11-26-*, bench/NOTES.md "Measured on a GPU"): every part
# once, on an H200. Next lease: check (the fixed RoPE path, the compiled stack, and kernels.py's
# GPU-only times: calls queued behind a spin kernel, launch cost out), compile-3 (CUDA graphs
# against the host-bound steps), memory-2, then phi-3 (the steps now use phicore's checkpoint
# node: less host work per layer), then the ablations not yet measured (torch-checkpoint
# unfused-lora torch-rms-norm torch-rope sdpa-attention).
#
# Results go to $OUT (the device tool's return folder; bench/results/ when unset). hf-qlora needs bitsandbytes, which the device
# image lacks: carry a wheel in .whl/ (ignored by git); this script installs it when present:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_24_x86_64 -d .whl bitsandbytes==0.50.2
set -euo pipefail
cd "$(dirname "$0")/.."
part="${1:?part: check | phi-3 | phi-2 | ablate-3 | profile-3 | compile-3 | memory-2}"
shift
out="${OUT:-bench/results}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # phicore and kernels from this checkout
ckpt=/tmp/phicore-bench-ckpt

case "$part" in
  check)
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$out/gpu.txt"
    python3 -c "import bitsandbytes, transformers, peft; print('bnb', bitsandbytes.__version__, 'transformers', transformers.__version__, 'peft', peft.__version__)" 2>&1 | tee -a "$out/gpu.txt" || true
    # every failure listed (no -x), and the kernel bench still runs after a failing test
    python3 -m pytest -q -rfEs -p no:cacheprovider tests/test_fused_kernels.py tests/test_nf4_kernels.py \
      tests/test_lora_fused.py tests/test_loss.py tests/test_offload.py tests/test_flex_attention.py \
      tests/test_nf4_gemv.py "tests/test_compile.py::test_cuda_compiled_training_matches_eager" \
      "tests/test_memory_plan.py::test_cuda_batch_size_auto_probes_and_trains" \
      2>&1 | tee "$out/gpu-tests.txt" | tail -40 || true
    python3 bench/kernels.py --device cuda --json "$out/kernels-cuda.json" | tail -30
    ;;
  phi-3|phi-2)
    shape=$([ "$part" = phi-3 ] && echo phi-3-mini-4k || echo phi-2)
    python3 bench/throughput.py --shape "$shape" --device cuda --seq-len 2048 --batch-size 1 --warmup 5 \
      --engines phicore-qlora,hf-qlora,phicore-lora,hf-lora --keep-checkpoint "$ckpt-$shape" --json "$out/cuda-$shape-seq2048-b1.json"
    ;;
  ablate-3)
    options=("$@")
    [ ${#options[@]} -gt 0 ] || options=(full-logits-loss unfused-lora torch-nf4 torch-rms-norm torch-rope
                                         torch-swiglu sdpa-attention offload-checkpoints torch-checkpoint)
    for option in none "${options[@]}"; do  # "none": the baseline, in the same lease
      flag=(--phicore-option "$option"); [ "$option" = none ] && flag=()
      python3 bench/throughput.py --shape phi-3-mini-4k --device cuda --seq-len 2048 --batch-size 1 --steps 6 --warmup 5 \
        --new-tokens 0 --peak-size 0 --engines phicore-qlora "${flag[@]}" \
        --keep-checkpoint "$ckpt-phi-3-mini-4k" --json "$out/ablate-$option.json" 2>&1 | tail -4
    done
    ;;
  profile-3)
    python3 bench/throughput.py --shape phi-3-mini-4k --device cuda --seq-len 2048 --batch-size 1 --steps 4 --warmup 5 \
      --new-tokens 0 --engines phicore-qlora,hf-qlora --profile \
      --keep-checkpoint "$ckpt-phi-3-mini-4k" --json "$out/cuda-phi-3-mini-4k-profile.json"
    ;;
  compile-3)
    for option in none compile compile-cudagraphs; do
      flag=(--phicore-option "$option"); [ "$option" = none ] && flag=()
      python3 bench/throughput.py --shape phi-3-mini-4k --device cuda --seq-len 2048 --batch-size 1 --steps 6 --warmup 5 \
        --new-tokens 32 --gen-repeats 2 --peak-size 0 --engines phicore-qlora "${flag[@]}" \
        --keep-checkpoint "$ckpt-phi-3-mini-4k" --json "$out/compile-$option.json" 2>&1 | tail -4
    done
    ;;
  memory-2)
    python3 bench/throughput.py --shape phi-2 --device cuda --seq-len 2048 --batch-size 1 --steps 2 --warmup 2 \
      --new-tokens 0 --peak-size 0 --engines phicore-qlora,phicore-lora --memory-peak \
      --keep-checkpoint "$ckpt-phi-2" --json "$out/cuda-phi-2-memory-peak.json"
    ;;
  *) echo "unknown part: $part (check | phi-3 | phi-2 | ablate-3 | profile-3 | compile-3 | memory-2)" >&2; exit 2 ;;
esac
