#!/usr/bin/env bash
# One GPU lease for issue 13's speed figures, sized for <= 8 minutes on an H100/H200, rows written as it goes:
#   1. SD 1.5 at 512 px: LoRA r4 batch 1+1 and 4+4, memory='8gb', full fine-tune with 8-bit Adam + checkpointing,
#      full fine-tune batch 4+4 in bf16 (the MFU target), then SDXL at 1024 px: LoRA, memory='16gb'.
#   2. FLUX.1-dev at 512 px: LoRA with checkpointing, memory='12gb' (nf4 QLoRA).
# Each part has its own timeout; results land in benchmarks/results/gpu_speed.md and are copied to $OUT.
# The GPU image may lack diffusers/peft: put their wheels in .whl/ first (pip download -d .whl diffusers peft
# accelerate transformers bitsandbytes safetensors tokenizers --no-deps) and carry .whl.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
python3 -c "import torch, diffusers, peft; print(torch.__version__, torch.cuda.get_device_name(), 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
timeout 240 python3 benchmarks/gpu_speed.py --models sd15 sdxl --steps 30 2>&1 | grep -v torchvision | tee "$OUT/speed_sd.log"
cp benchmarks/results/gpu_speed.md "$OUT/" 2>/dev/null || true
timeout 200 python3 benchmarks/gpu_speed.py --models flux --steps 10 2>&1 | grep -v torchvision | tee "$OUT/speed_flux.log"
cp benchmarks/results/gpu_speed.md "$OUT/" 2>/dev/null || true
