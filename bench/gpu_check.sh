#!/usr/bin/env bash
# Every GPU figure the benchmarks ask for, in one run on one GPU (< 8 minutes; each step has
# its own time limit, so a slow step is cut and named rather than eating the others' time):
#   1. the GPU, torch's CUDA, torchcodec's CUDA/NVDEC (or the one-line CPU fallback)
#   2. stage-1 decode frames/s per source and decode device (bench/source_bench.py)
#   3. GPU utilisation during `ekx extract` (nvidia-smi sampled every 0.5 s), decord CPU
#      decoding vs torchcodec NVDEC decoding, resnet50 on 1080p synthetic video
#   4. a full-scale head epoch (bench/heads_bench.py, EPIC-train-sized cache)
#   5. the phase-2 sweep (bench/sweep_bench.py, 8 configurations)
#   6. the backbone families' rows (bench/families_bench.py --device cuda)
# Needs the installed project with the torchcodec extra and FFmpeg (`apt-get install ffmpeg`,
# `make install`). Run from the repository root: bash bench/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
W=${EKX_GPU_CHECK_DIR:-/tmp/ekx-gpu-check}
mkdir -p "$W"
step() { echo; echo "=== $1 ($(date +%T))"; }
limit() { local s=$1; shift; timeout "$s" "$@"; local rc=$?; [ $rc -eq 124 ] && echo "TIMED OUT after ${s}s: $*"; return 0; }

step "1. device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
limit 60 "$PY" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
from pathlib import Path
from ekx.extract import sources
tc = sources.get("torchcodec")
print("torchcodec:", tc.missing() or tc.version())
clip = Path("../shared/clips/epic55_wall_04x04_zoom2_h264_1080p50.mp4")
if not tc.missing():
    dev, note = tc.resolve_device("cuda", clip if clip.exists() else None)
    print("torchcodec decode device:", dev, "|", note or "NVDEC works")
PY

step "2. decode frames/s per source and decode device (one process)"
limit 150 "$PY" bench/source_bench.py --work "$W" --decode-device cuda

step "3. GPU utilisation during ekx extract (resnet50, 1080p60 synthetic, --device cuda)"
for spec in "decord cpu 8" "torchcodec cuda 0"; do
  set -- $spec
  nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 500 > "$W/util.$1.txt" &
  SMI=$!
  start=$(date +%s.%N)
  limit 90 "$PY" -m ekx extract --backbone resnet50 --weights none --split train --device cuda \
    --source "$1" --decode-device "$2" --workers "$3" --annotations "$W/synth1080/annotations" \
    --videos "$W/synth1080/videos" --out "$W/util.$1.h5" --skip-errors 2>&1 | grep -v "━" | tail -3
  kill "$SMI" 2>/dev/null
  rm -f "$W/util.$1.h5"
  awk -v s="$1" '{n++; t+=$1; if ($1>m) m=$1} END {printf "%s: GPU utilisation mean %.0f%%, max %.0f%% over %d samples\n", s, t/n, m, n}' "$W/util.$1.txt"
done

step "4. a full-scale head epoch (67,217 x 16 x 2048 cache)"
limit 150 "$PY" bench/heads_bench.py --transformer-samples 12000

step "5. the phase-2 sweep (8 configurations)"
limit 120 "$PY" bench/sweep_bench.py --segments 5000 --epochs 1

step "6. backbone families on the GPU (timm, OpenCLIP, VideoMAE-B; random weights, 1080p50 clip)"
limit 150 "$PY" bench/families_bench.py --device cuda --workers 4

step "done"
