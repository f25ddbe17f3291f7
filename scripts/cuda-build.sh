#!/usr/bin/env bash
# Builds and links the release `dimple` binary with `--features cuda` on a machine without a
# GPU or a CUDA toolkit, ready to copy to a GPU machine and run with scripts/gpu-check.sh.
#
#   scripts/cuda-build.sh                 # -> target-cuda/release/dimple (stripped) and
#                                         #    target-cuda/release/dimple.gz (for transfer)
#   OUT=/tmp/dimple-cuda scripts/cuda-build.sh
#
# The binary is about 76 MB (candle's PTX kernels are embedded), 28 MB gzipped;
# scripts/gpu-check.sh takes either.
#
# nvcc, the CUDA 13.0 headers and libraries come from NVIDIA's pip wheels, in the virtual
# environment .ci/cuda-check uses ($HOME/.cache/dimple-cuda-venv, or DIMPLE_CUDA_VENV). The
# link needs what a toolkit would hold: a CUDA_HOME whose lib64 has the unversioned library
# names (symlinks to the wheels' cudart, nvrtc, cuBLAS, cuBLASLt, cuRAND and NCCL) and a
# driver stub lib64/stubs/libcuda.so (soname libcuda.so.1) that defines, as empty functions,
# every driver entry point cudarc declares. The GPU machine's real driver replaces the stub
# when the binary starts; point LD_LIBRARY_PATH at the NVIDIA Python packages' libraries there
# (scripts/gpu-check.sh finds them itself).
#
# Cold, expect 15-25 minutes on 2 cores (nvcc compiling candle's kernels, then the release
# build). The build directory is target-cuda/ (CARGO_TARGET_DIR overrides) so that the CPU
# build is not rebuilt afterwards. CUDA_COMPUTE_CAP defaults to 90 (H100/H200).
set -euo pipefail

cd "$(dirname "$0")/.."
venv="${DIMPLE_CUDA_VENV:-$HOME/.cache/dimple-cuda-venv}"
out="${OUT:-}"

# The toolkit wheels: .ci/cuda-check installs them (given a cargo command that does nothing
# else, `--version`) when they are missing.
if [ ! -x "$venv/bin/python" ] || ! ls "$venv"/lib/python3*/site-packages/nvidia/cu13/bin/nvcc >/dev/null 2>&1; then
    DIMPLE_CUDA_VENV="$venv" .ci/cuda-check --version >&2
fi
site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
nv="$site/nvidia"
if [ ! -x "$nv/cu13/bin/nvcc" ]; then
    echo "cuda-build: no nvcc under $nv/cu13/bin (run .ci/cuda-check once to install the wheels)" >&2
    exit 1
fi

# A CUDA_HOME made of links to the wheels, and the driver stub.
home="${DIMPLE_CUDA_HOME:-$HOME/.cache/dimple-cuda-home}"
mkdir -p "$home/lib64/stubs"
ln -sfn "$nv/cu13/bin" "$home/bin"
ln -sfn "$nv/cu13/include" "$home/include"
link() { # NAME TARGET
    if [ ! -e "$2" ]; then
        echo "cuda-build: $2 is missing from the wheels" >&2
        exit 1
    fi
    ln -sfn "$2" "$home/lib64/$1"
}
link libcudart.so "$nv/cu13/lib/libcudart.so.13"
link libnvrtc.so "$nv/cu13/lib/libnvrtc.so.13"
link libcublas.so "$nv/cu13/lib/libcublas.so.13"
link libcublasLt.so "$nv/cu13/lib/libcublasLt.so.13"
link libcurand.so "$nv/cu13/lib/libcurand.so.10"
link libnccl.so "$nv/nccl/lib/libnccl.so.2"

cudarc="$(cargo metadata --format-version 1 --locked --features dimple-cli/cuda 2>/dev/null |
    python3 -c 'import json, sys, os
m = json.load(sys.stdin)
print(next(os.path.dirname(p["manifest_path"]) for p in m["packages"] if p["name"] == "cudarc"))')"
stub="$home/lib64/stubs/libcuda.so"
if [ ! -f "$stub" ] || [ "$cudarc/src/driver/sys/mod.rs" -nt "$stub" ]; then
    src="$(mktemp -d)/libcuda.c"
    grep -ohE '^\s*(pub\s+)?fn (cu[A-Za-z0-9_]+)\(' "$cudarc"/src/driver/sys/*.rs |
        sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/\1/' | sort -u |
        awk '{ printf "int %s(void) { return 999; }\n", $1 }' >"$src"
    count="$(wc -l <"$src")"
    if [ "$count" -lt 100 ]; then
        echo "cuda-build: found only $count driver functions in $cudarc/src/driver/sys" >&2
        exit 1
    fi
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stub" "$src"
    echo "cuda-build: driver stub with $count entry points at $stub" >&2
fi
ln -sfn "$stub" "$home/lib64/libcuda.so"

export CUDA_HOME="$home" CUDA_PATH="$home"
export PATH="$nv/cu13/bin:$PATH"
export CUDA_COMPUTE_CAP="${CUDA_COMPUTE_CAP:-90}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target-cuda}"
export LIBRARY_PATH="$home/lib64:$home/lib64/stubs${LIBRARY_PATH:+:$LIBRARY_PATH}"
nvcc --version | tail -n 2 >&2
cargo build --release --locked -p dimple-cli --features cuda

bin="$CARGO_TARGET_DIR/release/dimple"
strip "$bin"
if [ -n "$out" ]; then
    cp "$bin" "$out"
    bin="$out"
fi
gzip -9 -c "$bin" >"$bin.gz"
echo "cuda-build: $bin ($(du -h "$bin" | cut -f1)), $bin.gz ($(du -h "$bin.gz" | cut -f1)); needs at run time:" >&2
readelf -d "$bin" | awk '/NEEDED/ { print "  " $NF }' >&2
echo "$bin"
