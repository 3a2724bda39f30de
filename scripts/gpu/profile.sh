#!/usr/bin/env bash
# Nsight Compute on the fused FlashAttention-2 kernels at one paper-setting shape (batch 4,
# 16 heads, n = 4096, d = 128 unless D is set): occupancy, registers, where warps stall.
# STAGES picks the gpu-bench stages that launch them (default: flash2,flash2-v3); SECTIONS
# adds Nsight sections (e.g. SourceCounters for the instructions warps stall on).
# Runs on the GPU machine from the folder scripts/gpu/build.sh filled.
#
#   cd .device && ./profile.sh OUT [kernel-regex ...]
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: profile.sh OUTDIR [kernel-regex ...]}"
shift
mkdir -p "$out"
d="${D:-128}"
kernels=("$@")
[ ${#kernels[@]} -gt 0 ] || kernels=("flash2_forward_v8" "flash2_forward_v3_d$d" "flash2_backward_kv_atomic_dq_d$d" "flash2_backward_q_d$d")
for k in "${kernels[@]}"; do
  ncu --kernel-name "regex:^$k\$" --launch-count 1 \
    --section SpeedOfLight --section Occupancy --section LaunchStats \
    --section WarpStateStats --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
    --section SchedulerStats ${SECTIONS:+$(printf -- '--section %s ' $SECTIONS)} \
    "$here/bin/attn" gpu-bench --seq 4096 --batch 4 --heads $((2048 / d)) --head-dim "$d" \
    --stages "${STAGES:-flash2,flash2-v3}" --repeats 1 > "$out/ncu-$k.log" 2>&1
  echo "== $k"
  grep -E "Registers Per Thread|Achieved Occupancy|Theoretical Occupancy|Block Limit (Registers|Shared Mem)|Compute \(SM\) Throughput|Memory Throughput|Duration|Issue Slots Busy|Stall" "$out/ncu-$k.log" | head -20
done
