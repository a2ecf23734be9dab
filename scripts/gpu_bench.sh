#!/usr/bin/env bash
# One call on the GPU machine (see docs/training.md): install the carried wheels (.whl/, gitignored; the machine
# has torch but not our transformers/peft/bitsandbytes pins), then run benchmarks/gpu_throughput.py with the
# carried data (.gpu/rows.json, .gpu/tokenizer). Arguments pass through (e.g. --smoke, --deadline 500).
#   run(command="bash scripts/gpu_bench.sh --deadline 500", carry=[".whl", ".gpu"], timeout_s=560)
set -o pipefail
OUT=${OUT:-/tmp/fl_gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v -i "warning" | tail -5
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" || exit 1
python3 benchmarks/gpu_throughput.py --out "$OUT" "$@" 2> >(grep -v -i "warn\|Loading weights" | tee "$OUT/stderr.log" >&2)
