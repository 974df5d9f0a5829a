#!/usr/bin/env bash
# Set-up (first run only), then the tiny end-to-end demo on CPU: builds an offline corpus,
# tokenizes and packs it with document boundaries, trains a tiny Llama-3, evaluates it at steps 20
# and 40 (held-out validation loss by domain and position, synthetic recall at 4K: the table is
# printed at the end) and leaves a checkpoint, TensorBoard logs and runs/demo_cpu/eval/ (results
# JSON, recall heatmap, history chart). Extra arguments are key=value overrides.
#   bash scripts/demo.sh                                                  # one process
#   NPROC=4 bash scripts/demo.sh parallel.tensor=2 parallel.pipeline=2    # TP=2 x PP=2 on 4 processes
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
NPROC=${NPROC:-1}
if [[ $NPROC -gt 1 ]]; then
  export OMP_NUM_THREADS=1
  exec python3 -m torch.distributed.run --standalone --nproc-per-node "$NPROC" \
    -m megatron_prolong.train examples/demo_cpu.yaml "$@"
fi
exec python3 -m megatron_prolong.train examples/demo_cpu.yaml "$@"
