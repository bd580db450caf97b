#!/usr/bin/env bash
# The GPU half of BENCHMARKS.md, in stages that each fit the lent GPU machine's 10-minute limit
# per command. That machine has jax (CUDA), flax, optax, orbax, torch, einops and pytest but
# reaches no package index, so the reference travels as wheels in .whl/ (git-ignored).
#
# Here, once per session:          bash experiments/gpu.sh wheels
# There, from the repository root: bash experiments/gpu.sh STAGE [bench.py options]
# (results go to $OUT, or /tmp/gpu), where STAGE is one of
#   float32    bench, large config, float32 (TF32 math on both sides), with sampling
#   bfloat16   bench, large config, bfloat16 on both sides, with sampling
#   compile    bench, large config, float32 against torch.compile, training only
#   profile    profile_unet.py's ablations and XLA kernel table, large config ([--dtype bfloat16])
#   tests      the test suite on the GPU (not the live parity: it needs torch 2.13 CPU)
set -euo pipefail
cd "$(dirname "$0")/.."
stage=${1:?"usage: bash experiments/gpu.sh wheels|float32|bfloat16|compile|profile|tests [options]"}
extra=("${@:2}")
out=${OUT:-/tmp/gpu}
mkdir -p "$out"

if [[ $stage == wheels ]]; then
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    python3 -m pip download --no-deps --only-binary=:all: -d .whl \
        denoising-diffusion-pytorch==2.3.4 ema-pytorch==0.8.3
    exit
fi

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
export PYTHONPATH="$PWD:/tmp/site" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true; } |
    tee "$out/gpu.txt"
python3 -c 'import jax, torch; print(jax.devices(), torch.__version__, torch.cuda.is_available())'

bench() {
    python3 experiments/bench.py --config large "$@" "${extra[@]}" 2>&1 | tee "$out/$stage.log"
}
case $stage in
    float32) bench --out "$out/gpu-large-float32.json" ;;
    bfloat16) bench --dtype bfloat16 --out "$out/gpu-large-bfloat16.json" ;;
    compile) bench --torch-compile --skip-sampling --out "$out/gpu-large-float32-torch-compile.json" ;;
    profile)
        python3 experiments/profile_unet.py --config large --trace /tmp/trace "${extra[@]}" 2>&1 |
            tee "$out/profile.log"
        ;;
    tests) python3 -m pytest -q -n 4 -p no:cacheprovider -m "not live" 2>&1 | tee "$out/tests.log" ;;
    *) echo "unknown stage $stage" >&2 && exit 2 ;;
esac
