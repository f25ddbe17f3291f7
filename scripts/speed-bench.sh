#!/usr/bin/env bash
# Engine speed, this tree against a baseline commit, in one run on one machine.
#
#   scripts/speed-bench.sh [BASE_REV]      (default BASE_REV: the commit before the engine
#                                           speed work, 7d09128)
#
# Builds `dimple` in release mode twice: from this working tree, and from BASE_REV checked
# out under ~/.cache/dimple-speed-base (its own target directory) with this tree's benchmark
# source (crates/dimple-cli/src/bench_random.rs) copied in, so both sides measure the same
# way; where that source does not build at BASE_REV, with the baseline's own.
# DIMPLE_BENCH_SOURCE=FILE gives the baseline another benchmark source instead (one that
# builds there and counts FLOPs like this tree's).
# Then runs `dimple bench-random` on the `speed` shape (random f32 weights: 8 layers, hidden
# 512, 8/2 heads, MLP 1536, vocab 32768; 64 prompt ids, 64 response slots, 16 steps,
# maskgit_plus, greedy) at 1, 4 and 16 concurrent requests in exact and cached mode, the new
# build first and the baseline right after, and prints both tables.
# Extra arguments after `--` go to both benchmark runs.
set -euo pipefail
cd "$(dirname "$0")/.."
base="${1:-7d09128}"
shift || true
[ "${1:-}" = "--" ] && shift
extra=("$@")
cache="${XDG_CACHE_HOME:-$HOME/.cache}/dimple-speed-base"
target="${CARGO_TARGET_DIR:-$PWD/target}"

echo "==> building this tree"
cargo build --release --locked -p dimple-cli
mkdir -p "$target/speed"
cp "$target/release/dimple" "$target/speed/dimple-new"
new="$target/speed/dimple-new"

echo "==> building baseline $base"
if [ ! -d "$cache/.git" ] && [ ! -f "$cache/.git" ]; then
  rm -rf "$cache"
  git worktree add --detach "$cache" "$base" >/dev/null
else
  git -C "$cache" checkout --quiet --detach "$base"
  git -C "$cache" checkout --quiet -- .
fi
cp "${DIMPLE_BENCH_SOURCE:-crates/dimple-cli/src/bench_random.rs}" "$cache/crates/dimple-cli/src/bench_random.rs"
# A target directory of its own: cargo names workspace crates' artifacts alike in both trees
# and records their sources relative to the package, so a shared directory could hand one
# tree's compiled crates to the other. Sources touched: a checkout keeps old mtimes.
find "$cache/crates" "$cache/proto" -type f -exec touch {} +
if ! (cd "$cache" && CARGO_TARGET_DIR="$target/speed-base" cargo build --release --locked -p dimple-cli); then
  # The benchmark may use request options the baseline lacks: build it with its own
  # benchmark source then. Latencies are measured alike; FLOP columns follow each build's
  # own accounting.
  echo "==> this tree's benchmark does not build at $base: using the baseline's own" >&2
  git -C "$cache" checkout --quiet -- crates/dimple-cli/src/bench_random.rs
  touch "$cache/crates/dimple-cli/src/bench_random.rs"
  (cd "$cache" && CARGO_TARGET_DIR="$target/speed-base" cargo build --release --locked -p dimple-cli)
fi
cp "$target/speed-base/release/dimple" "$target/speed/dimple-base"
old="$target/speed/dimple-base"

args=(bench-random --shape speed --device cpu --concurrency 1,4,16 --prompt-tokens 64
      --response-tokens 64 --steps 16 --modes exact,cached "${extra[@]}")
echo
echo "==> new ($(git rev-parse --short HEAD)$(git diff --quiet || echo '+changes'))"
"$new" "${args[@]}"
echo
echo "==> baseline ($base)"
"$old" "${args[@]}"
