#!/usr/bin/env bash
# Runs on the GPU machine, from the folder scripts/gpu/build.sh filled, with no build step:
# every GPU test, compute-sanitizer (memcheck, racecheck, synccheck) over a small run of every kernel,
# the timings beside PyTorch, and a short table last. Full logs go to OUT.
#
#   cd .device && ./run.sh OUT
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: run.sh OUTDIR}"
mkdir -p "$out"
summary=()
status=0
note() { summary+=("$1"); }

nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$out/gpu.txt"

# cuBLAS for the unfused stages' products: the loader's, or the one PyTorch's wheels bring.
# ATTN_GEMM=cublas makes a missing library an error rather than a quiet fallback to our
# own kernel (ATTN_GEMM=own runs that kernel on purpose).
if ! ldconfig -p | grep -q 'libcublas\.so'; then
  cublas_dir="$(python3 -c 'import site, glob, os; print(next((os.path.dirname(p) for s in site.getsitepackages() for p in glob.glob(s + "/nvidia/**/libcublas.so*", recursive=True)), ""))')"
  [ -n "$cublas_dir" ] && export LD_LIBRARY_PATH="$cublas_dir${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
export ATTN_GEMM="${ATTN_GEMM:-cublas}"
echo "products: ATTN_GEMM=$ATTN_GEMM, LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}" | tee -a "$out/gpu.txt"

# 1. Every GPU test (SKIP_TESTS=1 skips), and the suite's wall time: each test in a process
#    of its own, TEST_JOBS (5) at a time, so that one binary's NVRTC compiles and slow tests
#    overlap with the rest (the GPU is shared; the tests do not time anything). --nocapture
#    keeps a skipping test's "skipped:" line in its log.
if [ -z "${SKIP_TESTS:-}" ]; then
  suite_start=$(date +%s)
  mkdir -p "$out/tests"
  one_test() {  # binary test-name: one line "binary test rc seconds"
    local s=$(date +%s)
    "$1" --exact "$2" --test-threads=1 --nocapture > "$out/tests/$(basename "$1").$2.log" 2>&1
    echo "$(basename "$1") $2 $? $(( $(date +%s) - s ))"
  }
  export -f one_test; export out
  for t in $(ls "$here"/bin/test-* | grep -E -- "${TESTS:-.}"); do  # TESTS: a regex of names
    "$t" --list 2>/dev/null | sed -n 's/: test$//p' | sed "s|^|$t |"
  done | xargs -P "${TEST_JOBS:-5}" -L 1 bash -c 'one_test "$0" "$1"' > "$out/tests.txt"
  for name in $(cut -d' ' -f1 "$out/tests.txt" | sort -u); do
    passed=$(awk -v b="$name" '$1 == b && $3 == 0' "$out/tests.txt" | wc -l)
    failed=$(awk -v b="$name" '$1 == b && $3 != 0 {print $2}' "$out/tests.txt" | tr '\n' ' ')
    slowest=$(awk -v b="$name" '$1 == b' "$out/tests.txt" | sort -k4 -n | tail -1 | cut -d' ' -f2,4)
    if [ -z "$failed" ]; then
      note "$name: $passed passed (slowest: ${slowest} s)"
    else
      note "$name: $passed passed, FAILED: $failed(see tests/$name.*.log)"; status=1
    fi
    if grep -q "skipped:" "$out/tests/$name".*.log; then note "$name: some tests SKIPPED (no device?)"; status=1; fi
  done
  note "GPU test suite: $(( $(date +%s) - suite_start )) s"
fi

# 2. compute-sanitizer over the smoke run, which launches every kernel once (SKIP_SANITIZER=1
#    skips; SMOKE_STAGES narrows it).
for tool in ${SANITIZER_TOOLS-memcheck racecheck synccheck}; do
  compute-sanitizer --tool "$tool" --error-exitcode 3 "$here/bin/attn" gpu-bench --smoke ${SMOKE_STAGES:+--stages "$SMOKE_STAGES"} > "$out/sanitizer-$tool.log" 2>&1
  rc=$?
  errors="$(grep -Eo '(ERROR|RACECHECK) SUMMARY: .*' "$out/sanitizer-$tool.log" | tail -1)"
  note "compute-sanitizer $tool: ${errors:-no summary} (exit $rc)"
  [ "$rc" -eq 0 ] || status=1
done

# 2b. compute-sanitizer over tests whose kernels the smoke run does not launch: the decode
#     kernel's (every element type, paged caches, the score modifiers, split-KV and its
#     merge) and the packed batch's in one launch (the work list, the moved base pointers,
#     the mask and bias blocks; forward and backward).
sanitize_test() {  # label test-name [test binary, default test-attn-flash2]
  for tool in ${SANITIZER_TOOLS-memcheck racecheck synccheck}; do
    compute-sanitizer --tool "$tool" --error-exitcode 3 "$here/bin/${3:-test-attn-flash2}" --exact "$2" --test-threads=1 > "$out/sanitizer-$1-$tool.log" 2>&1
    rc=$?
    errors="$(grep -Eo '(ERROR|RACECHECK) SUMMARY: .*' "$out/sanitizer-$1-$tool.log" | tail -1)"
    note "compute-sanitizer $tool, $1: ${errors:-no summary} (exit $rc)"
    [ "$rc" -eq 0 ] || status=1
  done
}
sanitize_test decode flash2_gpu_decode_kernel_matches_the_reference
sanitize_test packed tensor_core_packed_batch_in_one_launch_equals_the_calls_per_sequence_and_the_reference
# a block of a larger problem (a ring's block) in every GPU stage: the placed diagonal and
# dropout offsets
sanitize_test placed every_stage_computes_a_placed_block_as_the_reference_does test-attn-stages

# 2b''. Packed batches on the tensor cores: one launch against the documents one by one, a
#       uniform batch of the same tokens and the padded batch (SKIP_PACKED=1 skips).
if [ -z "${SKIP_PACKED:-}" ]; then
  for hd in ${PACKED_SHAPES:-8:64 16:128}; do
    "$here/bin/attn" gpu-bench --packed --heads "${hd%%:*}" --head-dim "${hd##*:}" --repeats 7 > "$out/packed-h${hd%%:*}-d${hd##*:}.log" 2>&1 || { note "gpu-bench --packed FAILED ($hd)"; status=1; }
    echo; echo "== packed, h ${hd%%:*}, d ${hd##*:} =="; tail -7 "$out/packed-h${hd%%:*}-d${hd##*:}.log"
  done
fi

# 2c. Decoding: the decode kernel beside PyTorch SDPA on the issue's grid (b 1, 8, 64; n_k
#     4 096, 32 768, 131 072; h 32, kv 8, d 128, bf16), in the same call (SKIP_DECODE=1
#     skips; DECODE_BATCH, DECODE_SEQ narrow it).
if [ -z "${SKIP_DECODE:-}" ]; then
  python3 "$here/decode_sdpa.py" --attn "$here/bin/attn" --batch "${DECODE_BATCH:-1,8,64}" --seq "${DECODE_SEQ:-4096,32768,131072}" --csv "$out/decode.csv" > "$out/decode.log" 2>"$out/decode.err" || { note "decode_sdpa.py FAILED (decode.err)"; status=1; }
  echo; echo "== decode =="; tail -12 "$out/decode.log"
fi

# 3. Timings: ours, then PyTorch on the same shapes, in the same call (SKIP_SEQ=1: only
#    the paper setting below).
if [ -z "${SKIP_SEQ:-}" ]; then
  "$here/bin/attn" gpu-bench --seq "${SEQ:-1024,4096,16384}" --stages "${SEQ_STAGES:-naive,chunked,flash1,flash2,flash2-bf16}" --csv "$out/attn-gpu.csv" > "$out/attn-gpu.log" 2>&1 || { note "gpu-bench FAILED"; status=1; }
  python3 "$here/sdpa_gpu.py" --seq "${SEQ:-1024,4096,16384}" --csv "$out/sdpa-gpu.csv" > "$out/sdpa-gpu.log" 2>&1 || { note "sdpa_gpu.py FAILED"; status=1; }
  python3 "$here/sdpa_gpu.py" --seq "${SEQ:-1024,4096,16384}" --dtype bf16 --csv "$out/sdpa-bf16-gpu.csv" > "$out/sdpa-bf16-gpu.log" 2>&1 || { note "sdpa_gpu.py --dtype bf16 FAILED"; status=1; }
fi

# 3b. FlashAttention-2 on the FlashAttention-2 paper's setting (batch·n = 16 384, hidden 2 048,
#     d = 64 and 128), beside PyTorch's memory-efficient backend, in the same call.
if [ -z "${SKIP_PAPER:-}" ]; then
  "$here/bin/attn" gpu-bench --paper --stages "${PAPER_STAGES:-flash2,flash2-dq-pass}" --csv "$out/flash2-paper.csv" > "$out/flash2-paper.log" 2>&1 || { note "gpu-bench --paper FAILED"; status=1; }
  python3 "$here/sdpa_gpu.py" --paper --csv "$out/sdpa-paper.csv" > "$out/sdpa-paper.log" 2>&1 || { note "sdpa_gpu.py --paper FAILED"; status=1; }
fi

# 3c. The tensor-core (bf16 / fp16) stages on the paper setting beside PyTorch's flash and
#     cuDNN backends, in the same call (SKIP_TC=1 skips; TC_STAGES picks the stages).
if [ -z "${SKIP_TC:-}" ]; then
  "$here/bin/attn" gpu-bench --paper --stages "${TC_STAGES:-flash2-bf16,flash2-f16}" --csv "$out/tc-paper.csv" > "$out/tc-paper.log" 2>&1 || { note "gpu-bench --paper (tensor cores) FAILED"; status=1; }
  for dt in bf16 f16; do
    python3 "$here/sdpa_gpu.py" --paper --dtype "$dt" --csv "$out/sdpa-$dt-paper.csv" > "$out/sdpa-$dt-paper.log" 2>&1 || { note "sdpa_gpu.py --dtype $dt FAILED"; status=1; }
  done
fi

# 3d. Chunked attention beside the seed project's chunked PyTorch code at its README's
#     setting (b 1, h 8, d 64, causal, n 65 536), fp32, in the same call; and the unfused
#     stages on our own GEMM kernel instead of cuBLAS, for the before/after (SKIP_SEED=1
#     skips).
if [ -z "${SKIP_SEED:-}" ]; then
  "$here/bin/attn" gpu-bench --seq "${SEED_SEQ:-65536}" --stages chunked --causal-only --repeats 3 --csv "$out/chunked-seed.csv" > "$out/chunked-seed.log" 2>&1 || { note "gpu-bench (chunked, seed setting) FAILED"; status=1; }
  python3 "$here/sdpa_gpu.py" --seed "$(ls "$here"/wheels/memory_efficient_attention_pytorch-*.whl)" --seq "${SEED_SEQ:-65536}" --causal-only --repeats 3 --csv "$out/seed-gpu.csv" > "$out/seed-gpu.log" 2>&1 || { note "sdpa_gpu.py --seed FAILED"; status=1; }
  ATTN_GEMM=own "$here/bin/attn" gpu-bench --seq "${OWN_SEQ:-4096,16384}" --stages naive,chunked --csv "$out/attn-gpu-own-gemm.csv" > "$out/attn-gpu-own-gemm.log" 2>&1 || { note "gpu-bench (ATTN_GEMM=own) FAILED"; status=1; }
  echo; echo "== chunked, the seed's setting: ours =="; cat "$out/chunked-seed.log"
  echo; echo "== the seed's chunked code =="; cat "$out/seed-gpu.log"
  echo; echo "== naive and chunked on our own GEMM kernel (ATTN_GEMM=own) =="; cat "$out/attn-gpu-own-gemm.log"
fi

# 3e. The softcap's cost on the tensor cores (SOFTCAP=C): the paper setting at n 4 096 and
#     16 384 with and without it, twice in alternation, and each point's time with the
#     softcap over the time without, forward and backward (the smaller of the two runs each).
if [ -n "${SOFTCAP:-}" ]; then
  for r in 1 2; do
    for mode in plain softcap; do
      extra=(); [ "$mode" = softcap ] && extra=(--softcap "$SOFTCAP")
      "$here/bin/attn" gpu-bench --paper --paper-n "${SOFTCAP_N:-4096,16384}" --stages "${TC_STAGES:-flash2-bf16,flash2-f16}" "${extra[@]}" --csv "$out/$mode-$r.csv" > "$out/$mode-$r.log" 2>&1 || { note "gpu-bench ($mode, run $r) FAILED"; status=1; }
    done
  done
  echo; echo "== softcap $SOFTCAP over plain (the faster of two runs each) =="
  python3 - "$out" <<'PY' | tee "$out/softcap-ratio.txt"
import csv, glob, sys
best = {}
for path in sorted(glob.glob(sys.argv[1] + "/*-[12].csv")):
    mode = path.rsplit("/", 1)[1].split("-")[0]
    for row in csv.DictReader(line for line in open(path) if not line.startswith("#")):
        key = (row["stage"], row["head_dim"], row["n"], row["causal"])
        for part in ("forward", "backward"):
            t = float(row[part + "_ms"])
            slot = best.setdefault((mode, part) + key, t)
            best[(mode, part) + key] = min(slot, t)
print("stage        d    n      causal  forward (ms)         ratio  backward (ms)        ratio")
for (mode, part, *key), plain in sorted(best.items()):
    if mode != "plain" or part != "forward":
        continue
    f, fc = plain, best.get(("softcap", "forward", *key), float("nan"))
    b, bc = best[("plain", "backward", *key)], best.get(("softcap", "backward", *key), float("nan"))
    print(f"{key[0]:12} {key[1]:>3} {key[2]:>6} {key[3]:>6}  {fc:8.3f} / {f:8.3f}  {fc / f:5.2f}  {bc:8.3f} / {b:8.3f}  {bc / b:5.2f}")
PY
fi

# 4. The GPU figures from those two files (the same command draws them on any machine),
#    and the live path of `attn plots` (measures on this device), small sizes.
if [ -z "${SKIP_SEQ:-}" ]; then
  "$here/bin/attn" plots --only gpu --gpu-csv "$out/attn-gpu.csv" --sdpa-csv "$out/sdpa-gpu.csv" --sdpa-csv "$out/sdpa-bf16-gpu.csv" --out "$out/plots" > "$out/plots.log" 2>&1 || { note "plots FAILED"; status=1; }
  "$here/bin/attn" plots --only gpu --quick --out "$out/plots-live" > "$out/plots-live.log" 2>&1 || { note "plots (live) FAILED"; status=1; }
  echo; echo "== ours (attn gpu-bench) =="; cat "$out/attn-gpu.log"
  echo; echo "== PyTorch scaled_dot_product_attention =="; cat "$out/sdpa-gpu.log" "$out/sdpa-bf16-gpu.log"
fi
if [ -f "$out/flash2-paper.log" ]; then
  echo; echo "== FlashAttention-2 paper setting: ours =="; cat "$out/flash2-paper.log"
  echo; echo "== FlashAttention-2 paper setting: PyTorch efficient =="; cat "$out/sdpa-paper.log"
fi
if [ -f "$out/tc-paper.log" ]; then
  echo; echo "== tensor cores, paper setting: ours =="; cat "$out/tc-paper.log"
  echo; echo "== tensor cores: PyTorch flash / cuDNN (bf16) =="; cat "$out/sdpa-bf16-paper.log"
fi
echo; echo "== summary =="; printf '%s\n' "${summary[@]}"
exit $status
