#!/usr/bin/env bash
# GPU check for a machine with one NVIDIA GPU and no toolchain: runs a `dimple` binary built
# with `--features cuda` (its path is the first argument) from the repository root.
#
#   scripts/gpu-check.sh target/release/dimple            # parity subset + throughput
#   scripts/gpu-check.sh target-cuda/release/dimple.gz    # the same, from scripts/cuda-build.sh
#   GOLDEN_CASES=all scripts/gpu-check.sh ./dimple         # every single-request golden case
#   SKIP_BENCH=1 scripts/gpu-check.sh ./dimple             # parity only
#   DIMPLE_CHECK_DEVICE=cpu BENCH_SHAPE=small BENCH_DTYPE=f32 scripts/gpu-check.sh ./dimple
#                                                          # the script itself, on a CPU build
#
# 1. Golden parity on the GPU at tp 1 (f32): `dimple generate --json` on golden generation
#    cases (tests/fixtures/golden) must reproduce the official step history exactly.
# 2. Speed: `dimple bench-random` on a Dimple-7B-shaped model with pseudo-random bf16
#    weights (28 layers, hidden 3584, 28/4 heads, MLP 18944, vocab 152064) at 1, 8 and 32
#    concurrent requests of 64 response slots, exact and cached: per-step time, slots/s,
#    useful FLOP/s and model FLOP utilisation; before it, batch invariance in bf16 (one
#    request alone and in a batch of 8 decode the same tokens: the padded batched attention
#    of the tensor-op path must not let a request's tokens depend on its batch).
# Both parts run the tensor-op path (crates/dimple-model/src/attention.rs): the golden cases
# check it in f32 against the reference, the benchmark in bf16 at scale.
#
# The CUDA libraries (cudart, cuBLAS, cuRAND, NVRTC, NCCL) are found in the NVIDIA Python
# packages of python3 (or set DIMPLE_CUDA_LIBS to a colon-separated list of directories).
# Exit status: 0 when every parity case matched and the benchmark ran.
set -uo pipefail

bin="${1:?usage: scripts/gpu-check.sh PATH_TO_DIMPLE_BUILT_WITH_CUDA}"
if [ ! -s "$bin" ]; then
    echo "no binary at $bin" >&2
    exit 2
fi
bin="$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")"
if [[ "$bin" == *.gz ]]; then
    # The gzipped binary scripts/cuda-build.sh also writes.
    plain="$(mktemp -d)/dimple"
    if ! gzip -dc "$bin" >"$plain"; then
        echo "cannot decompress $bin" >&2
        exit 2
    fi
    chmod +x "$plain"
    bin="$plain"
fi
cd "$(dirname "$0")/.."
golden="tests/fixtures/golden"
status=0

libs="${DIMPLE_CUDA_LIBS:-}"
if [ -z "$libs" ]; then
    libs="$(python3 - <<'PY' 2>/dev/null
import glob, importlib.util, os
spec = importlib.util.find_spec("nvidia")
dirs = []
for root in (spec.submodule_search_locations if spec else []):
    dirs += sorted(d for d in glob.glob(os.path.join(root, "*", "lib")) if os.path.isdir(d))
print(":".join(dirs))
PY
)"
fi
export LD_LIBRARY_PATH="${libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
echo "== device"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
if ! "$bin" --version; then
    echo "cannot run $bin (missing CUDA libraries?)" >&2
    exit 2
fi

echo "== golden parity on the GPU (tp 1, f32)"
if [ "${GOLDEN_CASES:-}" = "all" ]; then
    cases="$(cd "$golden" && ls gen_*.json | grep -v '^gen_batch' | sed 's/\.json$//')"
else
    cases="${GOLDEN_CASES:-gen_text_n16_thrnone_cache0 gen_text_n16_thrnone_cache1 gen_text_n24_thr0p9_cache0
        gen_text_n24_thr0p9_cache1 gen_text_n16_entropy_cache0 gen_text_n16_topk_margin_cache0
        gen_text_n16_dream_cache1 gen_prior_n24_thr0p9_cache1 gen_image_n16_thr0p5_cache1 gen_image_n24_thrnone_cache0}"
fi
passed=0
failed=0
for case in $cases; do
    # The case's call as `dimple generate` flags (python3 reads the json; no numpy needed).
    args="$(python3 - "$golden/$case.json" <<'PY'
import json, sys
j = json.load(open(sys.argv[1]))
p = j["params"]
a = ["--input-ids", ",".join(str(t) for t in j["input_ids"][0]),
     "--max-new-tokens", str(p["max_new_tokens"]), "--steps", str(p["steps"]),
     "--alg", p["alg"], "--pipeline", p["decoding_pipeline"]]
if p.get("alg_p_threshold") is not None:
    a += ["--threshold", repr(p["alg_p_threshold"])]
if not p["use_original_confidence"]:
    a += ["--no-original-confidence"]
if p["use_cache"]:
    a += ["--cache"]
fixed = (j.get("tokens_hook") or {}).get("fixed_response_positions")
if fixed:
    a += ["--prior", ",".join(f"{k}:{v}" for k, v in sorted(fixed.items(), key=lambda kv: int(kv[0])))]
src = j.get("pixel_values_source")
if src:
    a += ["--image", "tests/fixtures/golden/image1.png"]
print(" ".join(a))
PY
)"
    started=$(date +%s.%N)
    # shellcheck disable=SC2086 # word splitting of the generated flags is intended
    out="$("$bin" generate --model "$golden" --device "${DIMPLE_CHECK_DEVICE:-cuda}" --dtype f32 --tp 1 --json $args 2>/tmp/gpu-check-$case.err)"
    rc=$?
    secs=$(python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.2f}')" "$started" "$(date +%s.%N)")
    if [ $rc -ne 0 ]; then
        echo "FAIL $case: dimple exited with $rc: $(tail -n 3 /tmp/gpu-check-$case.err)"
        failed=$((failed + 1))
        continue
    fi
    printf '%s' "$out" >"/tmp/gpu-check-$case.json"
    verdict="$(python3 - "$golden/$case" "/tmp/gpu-check-$case.json" <<'PY'
import json, struct, sys
base = sys.argv[1]
got = json.load(open(sys.argv[2]))
case = json.load(open(base + ".json"))
raw = open(base + ".safetensors", "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
header = json.loads(raw[8:8 + n])
h = header["history"]
fmt = {"I64": "q", "I32": "i", "F32": "f"}[h["dtype"]]
steps, b, l = h["shape"]
s, e = h["data_offsets"]
vals = struct.unpack("<%d%s" % (steps * b * l, fmt), raw[8 + n + s:8 + n + e])
m = case["params"]["max_new_tokens"]
want = [[int(v) for v in vals[k * l + l - m:(k + 1) * l]] for k in range(steps)]
hist = got["history"]
if hist == want and got["steps"] == case["steps_taken"]:
    print("ok %d steps" % len(hist))
else:
    first = next((k for k in range(min(len(hist), len(want))) if hist[k] != want[k]), min(len(hist), len(want)))
    print("MISMATCH at step %d (%d steps, reference %d): got %s want %s" % (
        first, len(hist), len(want), hist[first] if first < len(hist) else None, want[first] if first < len(want) else None))
PY
)"
    case "$verdict" in
        ok*) echo "ok   $case (${verdict#ok }, ${secs}s)"; passed=$((passed + 1)) ;;
        *) echo "FAIL $case: $verdict"; failed=$((failed + 1)) ;;
    esac
done
echo "golden parity: $passed passed, $failed failed"
[ "$failed" -eq 0 ] || status=1

if [ -z "${SKIP_BENCH:-}" ]; then
    echo "== speed: ${BENCH_SHAPE:-7b} shape (7b: Dimple-7B), random ${BENCH_DTYPE:-bf16} weights, tp 1, 64 response slots"
    # Per-step time, slots/s and model FLOP utilisation (useful FLOP/s over the H200's dense
    # bf16 peak, BENCH_PEAK_TFLOPS) at 1, 8 and 32 concurrent requests, exact and cached;
    # first, batch invariance: one request alone and in a batch of 8 must decode alike.
    # shellcheck disable=SC2086
    if ! timeout "${BENCH_TIMEOUT:-420}" "$bin" bench-random --shape "${BENCH_SHAPE:-7b}" --tp 1 \
        --device "${DIMPLE_CHECK_DEVICE:-cuda}" --dtype "${BENCH_DTYPE:-bf16}" \
        --concurrency "${BENCH_CONCURRENCY:-1,8,32}" --response-tokens 64 --steps "${BENCH_STEPS:-16}" \
        --prompt-tokens "${BENCH_PROMPT:-128}" --modes exact,cached --check-invariance 7 \
        --peak-tflops "${BENCH_PEAK_TFLOPS:-989}"; then
        echo "FAIL: bench-random did not complete (or batch invariance failed)" >&2
        status=1
    fi
fi
exit $status
