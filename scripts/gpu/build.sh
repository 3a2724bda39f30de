#!/usr/bin/env bash
# Builds everything the GPU machine runs, here, in release mode: the `attn` binary and the
# GPU test executables, stripped and copied with the scripts into one git-ignored folder
# (.device/ by default) that travels to the GPU machine, where nothing is built.
#
#   scripts/gpu/build.sh [DIR]
set -euo pipefail
cd "$(dirname "$0")/../.."
dir="${1:-.device}"
rm -rf "$dir" && mkdir -p "$dir/bin"
grep -qxF "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >> .git/info/exclude

cargo build --release -p attn-cli
cp target/release/attn "$dir/bin/attn"
# The GPU test executables (each stage crate's tests/gpu.rs, and the facade's tests/stages.rs,
# which compares stages on the GPU too), found from cargo's JSON messages.
cargo test --release --no-run --message-format=json -p attn-cuda -p attn-naive -p attn-chunked -p attn-flash1 -p attn-flash2 -p attn-ring --test gpu \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu":
        crate = m["target"]["src_path"].split("/crates/")[1].split("/")[0]
        shutil.copy(m["executable"], sys.argv[1] + "/bin/test-" + crate)
        print("test executable:", crate)
' "$dir"
cargo test --release --no-run --message-format=json -p attn --test stages \
  | python3 -c '
import json, sys, shutil
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "stages":
        shutil.copy(m["executable"], sys.argv[1] + "/bin/test-attn-stages")
        print("test executable: attn (stages)")
' "$dir"
strip "$dir"/bin/*
cp scripts/gpu/run.sh scripts/gpu/profile.sh benches/compare/sdpa_gpu.py benches/compare/decode_sdpa.py "$dir/"
# The seed project's wheel (pure Python), whose chunked attention run.sh times beside ours;
# the GPU machine has no network.
python3 -m pip download --quiet --no-deps --dest "$dir/wheels" memory-efficient-attention-pytorch==0.1.6
du -sh "$dir"
