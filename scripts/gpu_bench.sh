#!/usr/bin/env bash
# GPU throughput run of the local trainer (docs/training.md, "GPU benchmark").
#
#   bash scripts/gpu_bench.sh prepare      # here, on the CPU machine: .whl/ (wheels the GPU machine lacks) and
#                                          # .gpu/ (tokenised reddit rows + tokenizer); both gitignored
#   bash scripts/gpu_bench.sh [ARGS]       # there, in one device call; ARGS go to benchmarks/gpu_throughput.py
#   run(command="bash scripts/gpu_bench.sh --deadline 480 --child-timeout 200", carry=[".whl", ".gpu"], timeout_s=560)
#
# The GPU machine has torch 2.11 but not our pins of transformers/peft/bitsandbytes/pydantic; they travel as cp312
# wheels (bitsandbytes trimmed to its CUDA 13 library to fit the 64 MiB carry limit). Results: $OUT/results.jsonl
# (written as it goes), $OUT/summary.json, $OUT/stderr.log; the last stdout line is the summary JSON.
set -o pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = "prepare" ]; then
  python=.venv/bin/python
  mkdir -p .whl
  grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
  platforms="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
             --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any"
  for spec in transformers==5.23.0 peft==0.21.2 bitsandbytes==0.50.2 pydantic==2.12.5 pydantic-core==2.41.5 \
              pydantic-settings python-dotenv annotated-types typing-inspection orjson "regex>=2025.10.22" zstandard; do
    $python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $platforms \
      -d .whl "$spec" || exit 1
  done
  $python - <<'PY' || exit 1
import glob, os, zipfile
wheel = glob.glob(".whl/bitsandbytes-*.whl")[0]
with zipfile.ZipFile(wheel) as source:
    kept = [i for i in source.infolist()
            if not (i.filename.endswith(".so") and not i.filename.endswith("libbitsandbytes_cuda130.so"))]
    data = {i.filename: source.read(i) for i in kept}
os.remove(wheel)
with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED) as target:
    for name, blob in data.items():
        if name.endswith("/RECORD"):  # drop the lines of the removed libraries
            blob = b"".join(l for l in blob.splitlines(keepends=True)
                            if not l.split(b",")[0].endswith(b".so") or b"cuda130" in l)
        target.writestr(name, blob)
print(wheel, os.path.getsize(wheel) // 2**20, "MiB")
PY
  $python benchmarks/gpu_throughput.py --make-rows --rows .gpu/rows.json --tokenizer .gpu/tokenizer || exit 1
  du -sh .whl .gpu
  exit 0
fi

OUT=${OUT:-/tmp/fl_gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  2>&1 | grep -v -i "warning" | tail -5
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total,clocks.sm --format=csv | tee "$OUT/nvidia_smi.txt"
python3 -c "import torch, transformers, peft, bitsandbytes as b; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'peft', peft.__version__, 'bitsandbytes', b.__version__)" || exit 1
python3 benchmarks/gpu_throughput.py --out "$OUT" "$@" 2> >(grep -v -i "warn\|Loading weights" | tee "$OUT/stderr.log" >&2)
