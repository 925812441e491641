#!/usr/bin/env bash
# Issue 15's GPU measurements with `python -m sct.bench step`, in groups that each fit one ~10-minute device call
# on one H100/H200 (bf16, batch 32, one GPU). Every group runs under its own timeout and logs to OUT/<group>.log;
# the tables (OUT/<group>.md) are printed last. docs/benchmarks.md ("GPU step benchmark") lists which number each
# group measures.
#
#   bash scripts/gpu_bench.sh --prepare             # once, on the CPU machine: pure-Python wheels into .whl (ignored)
#   bash scripts/gpu_bench.sh OUT [GROUP ...]       # on the GPU machine, from the repo root, .whl carried along
#   SCT_BENCH_TINY=1 bash scripts/gpu_bench.sh OUT table   # CPU rehearsal of the same command lines, tiny shapes
#
# Groups (default: table profile):
#   table    edm2-xl and dit-xl/2 x {diffusion, sCT, sCD guided}, torch engine: s/step, split, MFU, peak GiB  (~5 min)
#   profile  torch.profiler of the edm2-xl and dit-xl/2 sCT steps: top kernels, matmul/elementwise/idle shares (~3 min)
#   options  edm2-xl sCT with channels_last, and with torch.compile (inductor) of the gradient path          (~6 min)
#   zero     edm2-xl sCT under DeepSpeed ZeRO-2 and ZeRO-3 on one rank (fresh process each)                (~4 min)
#   memory   edm2-xxl sCD (student + guided teacher) at batch 32: no / 64x64-level / full checkpointing        (~4 min)
set -uo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" == "--prepare" ]]; then  # GPU.md: the GPU machine has torch but not these, and no package index
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    loguru==0.7.3 webdataset==1.0.2 braceexpand==0.1.7 hjson==3.1.0 pydantic==2.14.4 \
    pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
  "${PYTHON:-.venv/bin/python}" -m pip wheel -q --no-deps --no-build-isolation deepspeed==0.19.8 -w .whl
  ls .whl
  exit 0
fi

OUT=${1:-runs/gpu_bench}
shift || true
GROUPS_TO_RUN=("$@")
[[ $# -eq 0 ]] && GROUPS_TO_RUN=(table profile)
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD DS_ACCELERATOR=cuda
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1

BENCH=(--configs configs/sCT_xl_512.yaml --batch 32 --steps 10 --warmup 3 --precision bf16)
UNET=() DIT=() COMPILE=()
if [[ -n "${SCT_BENCH_TINY:-}" ]]; then  # same command lines, shapes a CPU runs in seconds
  export OMP_NUM_THREADS=1
  BENCH=(--configs configs/sCT_xl_512.yaml --batch 2 --steps 1 --warmup 1 --precision bf16)
  TINY=(data.shape=[4,8,8] model.backbone.img_resolution=8 data.num_classes=10 model.backbone.label_dim=10)
  UNET=("${TINY[@]}" model.backbone.model_channels=16 model.backbone.channel_mult=[1,2] model.backbone.num_blocks=1
        model.backbone.attn_resolutions=[4])
  DIT=("${TINY[@]}" model.backbone.hidden_size=32 model.backbone.depth=2 model.backbone.num_heads=2)
  COMPILE=(model.compile_backend=aot_eager)  # inductor's C++ code generation takes minutes on a busy 2-core CPU
fi

bench() {  # bench GROUP NAME SECONDS ARGS...: one `sct.bench step` call, its table appended to OUT/GROUP.md
  local group=$1 name=$2 limit=$3
  shift 3
  echo "== $group/$name: python -m sct.bench step $*" | tee -a "$OUT/$group.log"
  if timeout "$limit" $PY -m sct.bench step "$@" --out "$OUT/$group-$name.md" >> "$OUT/$group.log" 2>&1; then
    { echo "### $name"; echo; cat "$OUT/$group-$name.md"; echo; } >> "$OUT/$group.md"
  else
    echo "### $name: FAILED or timed out (rc $?), see $OUT/$group.log" | tee -a "$OUT/$group.md"
  fi
}

$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available() and torch.cuda.get_device_name())" | tee "$OUT/device.txt"
for group in "${GROUPS_TO_RUN[@]}"; do
  : > "$OUT/$group.md"
  case $group in
    table)
      bench table edm2-xl 240 "${BENCH[@]}" --objectives diffusion sct scd --backbones edm2-xl "${UNET[@]}"
      bench table dit-xl2 180 "${BENCH[@]}" --objectives diffusion sct scd --backbones dit-xl/2 "${DIT[@]}" ;;
    profile)
      bench profile edm2-xl 120 "${BENCH[@]}" --steps 3 --objectives sct --backbones edm2-xl --profile "$OUT/traces" --profile-steps 2 "${UNET[@]}"
      bench profile dit-xl2 120 "${BENCH[@]}" --steps 3 --objectives sct --backbones dit-xl/2 --profile "$OUT/traces" --profile-steps 2 "${DIT[@]}"
      grep -h -A 40 "^## profile" "$OUT/profile.log" > "$OUT/profile-breakdown.md" || true
      cat "$OUT/profile-breakdown.md" >> "$OUT/profile.md" ;;
    options)
      bench options channels_last 150 "${BENCH[@]}" --objectives sct --backbones edm2-xl model.channels_last=true "${UNET[@]}"
      bench options compile 360 "${BENCH[@]}" --objectives sct --backbones edm2-xl model.compile=backbone "${COMPILE[@]}" "${UNET[@]}" ;;
    zero)
      bench zero edm2-xl 300 "${BENCH[@]}" --objectives sct --backbones edm2-xl --engines zero2 zero3 --isolate "${UNET[@]}" ;;
    memory)
      XXL=(--configs configs/sCM_xxl_512.yaml --batch "${BENCH[3]}" --steps 3 --warmup 2 --precision bf16 --objectives scd --backbones edm2-xxl)
      bench memory none 120 "${XXL[@]}" "${UNET[@]}"
      bench memory level64 120 "${XXL[@]}" model.backbone.checkpointing=true model.backbone.checkpoint_min_resolution=64 "${UNET[@]}"
      bench memory all 120 "${XXL[@]}" model.backbone.checkpointing=true "${UNET[@]}" ;;
    *) echo "unknown group $group (table, profile, options, zero, memory)"; exit 2 ;;
  esac
done
for group in "${GROUPS_TO_RUN[@]}"; do
  echo; echo "## $group ($(cat "$OUT/device.txt"))"; echo; cat "$OUT/$group.md"
done
