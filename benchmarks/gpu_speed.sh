#!/usr/bin/env bash
# One GPU lease for issue 13's speed figures, sized for <= 8 minutes on an H100/H200, rows written as it goes:
#   1. SD 1.5 at 512 px: LoRA r4 batch 1+1 and 4+4, memory='8gb', full fine-tune with 8-bit Adam + checkpointing,
#      full fine-tune batch 4+4 in bf16 (the MFU target), then SDXL at 1024 px: LoRA, memory='16gb'.
#   2. FLUX.1-dev at 512 px: LoRA with checkpointing, memory='12gb' (nf4 QLoRA).
# Each part has its own timeout; results land in benchmarks/results/gpu_speed.md and are copied to $OUT.
# Environment (wheels in .whl/ if the GPU image lacks diffusers/peft): benchmarks/gpu_env.sh.
source benchmarks/gpu_env.sh
timeout 240 python3 benchmarks/gpu_speed.py --models sd15 sdxl --steps 30 2>&1 | grep -v torchvision | tee "$OUT/speed_sd.log"
cp benchmarks/results/gpu_speed.md "$OUT/" 2>/dev/null || true
timeout 200 python3 benchmarks/gpu_speed.py --models flux --steps 10 2>&1 | grep -v torchvision | tee "$OUT/speed_flux.log"
cp benchmarks/results/gpu_speed.md "$OUT/" 2>/dev/null || true
