#!/usr/bin/env bash
# Registers, spills and stack of every fused kernel at sm_90, without a GPU: the kernel
# sources concatenated as NVRTC sees them (contract.cuh + tiles.cuh + the stage's .cu),
# compiled by nvcc with `ptxas -v`. nvcc comes from the nvidia-cuda-nvcc wheel
# (`pip install nvidia-cuda-nvcc`) or a CUDA toolkit; NVCC=path overrides.
#
#   scripts/gpu/resources.sh [flash1|flash2] [ARCH]
set -euo pipefail
cd "$(dirname "$0")/../.."
stage="${1:-flash2}"
arch="${2:-sm_90}"
nvcc="${NVCC:-$(command -v nvcc || python3 -c 'import nvidia, os; print(os.path.join(nvidia.__path__[0], "cu13", "bin", "nvcc"))')}"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cat crates/attn-cuda/kernels/contract.cuh crates/attn-naive/kernels/tiles.cuh \
  "crates/attn-$stage/kernels/$stage.cu" > "$tmp/$stage.cu"
"$nvcc" -std=c++17 -arch="$arch" -cubin -Xptxas -v "$tmp/$stage.cu" -o "$tmp/$stage.cubin" 2>&1 |
  grep -E "Compiling entry|registers|spill" | paste - - - |
  perl -ne "/function '([^']+)'.*?(\d+) bytes stack.*?(\d+) bytes spill stores.*?(\d+) bytes spill loads.*?Used (\d+) registers/ and printf \"%-36s %4d registers  %4d B spilled  %4d B stack\\n\", \$1, \$5, \$3, \$2" |
  sort
