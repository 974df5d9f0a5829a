#!/usr/bin/env bash
# Installs everything megatron-prolong needs on this machine; safe to run again (a stamp file
# keyed on the requirements skips the work when nothing changed).
#
# Torch: where no NVIDIA GPU is visible, the CPU wheel is installed first (pip would otherwise take
# a several-GB CUDA build to satisfy megatron-core's `torch` requirement). On a GPU cluster, use
# the NGC PyTorch container or install torch for your CUDA, then `pip install -e .[gpu]`.
set -euo pipefail
export PIP_ROOT_USER_ACTION=ignore
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TORCH_CPU_VERSION=${TORCH_CPU_VERSION:-2.13.0}
stamp=.setup-done
key=$(cat setup.py constraints.txt scripts/setup.sh | sha256sum | cut -c1-16)
if [[ -f $stamp && $(cat $stamp) == "$key" ]] && $PY -c "import megatron_prolong, megatron.core" 2>/dev/null; then
  exit 0
fi
# Every install is held to constraints.txt: the tested ranges CI was green with.
pip_install() { $PY -m pip install --disable-pip-version-check -q -c constraints.txt "$@"; }
echo "[setup] installing megatron-prolong and its dependencies (first run only)" >&2
if ! $PY -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    pip_install torch
  else
    pip_install "torch==${TORCH_CPU_VERSION}"
  fi
fi
pip_install -e ".[dev]"
# mosaicml-streaming, for one test only: the cross-check of the project's MDS writer against
# streaming's (tests/test_mds_writer.py). It declares torchvision (which would replace the CPU
# torch with a CUDA build) and transformers<5, so it goes into .test-deps/streaming, outside the
# environment, without its declared dependencies, with the modules its writer imports: pip never
# sees it in the environment, and nothing there imports it.
rm -rf .test-deps/streaming
pip_install --no-deps --target .test-deps/streaming \
  mosaicml-streaming zstd python-snappy cramjam brotli catalogue xxhash
echo "$key" > $stamp
echo "[setup] done" >&2
