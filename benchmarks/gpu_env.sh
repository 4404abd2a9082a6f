# Sourced by the benchmarks/gpu_*.sh scripts: the GPU machine's environment, set up once.
# The GPU image may lack diffusers/peft: put their wheels in .whl/ first (pip download -d .whl diffusers peft
# accelerate transformers bitsandbytes safetensors tokenizers --no-deps) and carry .whl.
set -u
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  # --upgrade: a /tmp/site left by an earlier call is replaced, not an error; a failed install stops the script.
  python3 -m pip install -q --no-index --no-deps --upgrade --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD/src
else
  export PYTHONPATH=$PWD/src
fi
python3 -c "import torch, diffusers, peft; print(torch.__version__, torch.cuda.get_device_name(), 'diffusers', diffusers.__version__, 'peft', peft.__version__)"
