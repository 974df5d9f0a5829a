#!/usr/bin/env bash
# The GPU kit, on the GPU machine, from the repository root (docs/performance.md):
#   bash tools/gpu_kit/run.sh OUT_DIR [STAGE ...] [--profile] [--budget-s S] [--steps N]
# Installs the carried wheels (.whl/*.whl, made by tools/gpu_kit/fetch_wheels.py) into
# /tmp/site without an index or dependencies, puts this checkout and /tmp/site on PYTHONPATH,
# then runs tools/gpu_kit/run_kit.py: env, `pytest -m gpu`, the kernel check, the 64K benchmark
# per attention backend, the HF peer; results.json, results.md and kit.log land in OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/../.." || exit 2
export PYTHONUNBUFFERED=1 PIP_ROOT_USER_ACTION=ignore PIP_DISABLE_PIP_VERSION_CHECK=1
# 64K rows leave little free memory beside Adam state: growable segments keep the caching
# allocator from failing on fragmentation (ours and the HF peer alike).
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
site=${KIT_SITE:-/tmp/site}
wheels=(.whl/*.whl)
if [ -e "${wheels[0]}" ]; then
    echo "[kit] installing ${#wheels[@]} wheels from .whl/ into $site"
    if ! python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$site" "${wheels[@]}"; then
        echo "error: pip could not install .whl/*.whl into $site (one version of each, cp312" \
             "x86_64 wheels: rerun tools/gpu_kit/fetch_wheels.py)" >&2
        exit 2
    fi
else
    echo "[kit] no .whl/ here: using what this machine has installed"
fi
export PYTHONPATH="$PWD:$site${PYTHONPATH:+:$PYTHONPATH}"
exec python3 tools/gpu_kit/run_kit.py "$@"
