#!/usr/bin/env bash
# One GPU lease for the model families (issues 10 and 11), sized for about 8 minutes on an H100/H200:
#   1. benchmarks/gpu_families.py: fp16/bf16/fp32 pipelines of every family train with matching autocast,
#      fp32 trainable weights and a gradient scaler for fp16; a pipeline on cuda:1 trains on cuda:1 (2+ GPUs).
#   2. benchmarks/gpu_flux_memory.py: full-size FLUX.1-dev at random init, LoRA r16 at 512 px, bf16 base and
#      nf4 base: s/step and peak VRAM (rows appended to benchmarks/results/gpu_flux_memory.md, copied to $OUT).
# Environment (wheels in .whl/ if the GPU image lacks diffusers/peft): benchmarks/gpu_env.sh.
source benchmarks/gpu_env.sh
timeout 150 python3 benchmarks/gpu_families.py 2>&1 | grep -v "torchvision" | tee "$OUT/families.log"
timeout 420 python3 benchmarks/gpu_flux_memory.py --steps 8 2>&1 | grep -v "torchvision" | tee "$OUT/flux_memory.log"
cp benchmarks/results/gpu_flux_memory.md "$OUT/" 2>/dev/null || true
