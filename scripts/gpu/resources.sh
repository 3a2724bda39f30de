#!/usr/bin/env bash
# Registers, spills and stack of the fused kernels at sm_90, without a GPU: each module's
# sources concatenated as NVRTC sees them (attn-cuda's headers, then the stage's kernels),
# compiled by nvcc with `ptxas -v`. nvcc comes from the nvidia-cuda-nvcc wheel
# (`pip install nvidia-cuda-nvcc`) or a CUDA toolkit; NVCC=path overrides.
#
#   scripts/gpu/resources.sh [flash1|flash2] [ARCH]
#
# flash2 covers the shipped modules: the CUDA-core kernels, the 3xTF32 forward and backward
# (TF32_D, default 128; the backward's tiling TF32B_KW warps, default 8, and TF32B_BR query
# rows, default 32, as the stage picks them at d = 128) and the tensor-core forward and
# backward (TC_D, default 128; bf16).
set -euo pipefail
cd "$(dirname "$0")/../.."
stage="${1:-flash2}"
arch="${2:-sm_90}"
nvcc="${NVCC:-$(command -v nvcc || python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "bin", "nvcc"))')}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
h=crates/attn-cuda/kernels
k="crates/attn-$stage/kernels"
report() { # NAME DEFINES SOURCES...
  local name="$1" defines="$2"; shift 2
  cat "$@" > "$tmp/$name.cu"
  # shellcheck disable=SC2086
  "$nvcc" -std=c++17 -arch="$arch" -cubin -Xptxas -v $defines "$tmp/$name.cu" -o "$tmp/$name.cubin" 2>&1 |
    grep -E "Compiling entry|registers|spill" | paste - - - |
    perl -ne "/function '([^']+)'.*?(\d+) bytes stack.*?(\d+) bytes spill stores.*?(\d+) bytes spill loads.*?Used (\d+) registers/ and printf \"%-36s %4d registers  %4d B spilled  %4d B stack\\n\", \$1, \$5, \$3, \$2" |
    sort
}
report "$stage" "" "$h/contract.cuh" "$h/tiles.cuh" "$k/$stage.cu"
if [ "$stage" = flash2 ]; then
  report tf32 "-DTF32_D=${TF32_D:-128}" "$h/contract.cuh" "$h/tiles.cuh" "$h/mma.cuh" "$k/tf32.cuh" "$k/flash2_tf32.cu"
  report tf32_backward "-DTF32_D=${TF32_D:-128} -DTF32B_KW=${TF32B_KW:-8} -DTF32B_BR=${TF32B_BR:-32}" \
    "$h/contract.cuh" "$h/tiles.cuh" "$h/mma.cuh" "$k/tf32.cuh" "$k/flash2_tf32_backward.cu"
  for part in forward backward; do
    report "tc_$part" "-DTC_D=${TC_D:-128} -DTC_BF16=1" "$h/contract.cuh" "$h/tiles.cuh" "$h/mma.cuh" \
      "$k/tc.cuh" "$k/flash2_tc_$part.cu"
  done
fi
