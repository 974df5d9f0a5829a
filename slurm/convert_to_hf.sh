#!/bin/bash
# Export a run's latest checkpoint to a Hugging Face model directory (CPU only, one task):
#   RUN_DIR=runs/sft OUT=exports/prolong-8b-sft sbatch slurm/convert_to_hf.sh
# Uses tools/convert.py mcore-to-hf (docs/convert.md); rope_theta and max_position_embeddings
# come from the run's resolved config.yaml. Variables: REPO_DIR, VENV, RUN_DIR, OUT, DTYPE
# (bf16), TOKENIZER_DIR (tokenizer files copied into OUT; empty: none, e.g. the byte tokenizer of
# the CPU smoke test), HF_CONFIG (a config.json for the fields the run does not hold: token ids).
# CPU smoke test: RUN_DIR=runs/smoke/sft TOKENIZER_DIR= DTYPE=fp32 sbatch --partition=cpu
#   --cpus-per-task=1 --mem=4G --time=30 slurm/convert_to_hf.sh   (docs/training.md, "Slurm")
#SBATCH --job-name=prolong-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
RUN_DIR=${RUN_DIR:-${REPO_DIR}/runs/sft}
OUT=${OUT:-${REPO_DIR}/exports/$(basename "${RUN_DIR}")-hf}
TOKENIZER_DIR=${TOKENIZER_DIR-${REPO_DIR}/checkpoints/Meta-Llama-3-8B-Instruct}
DTYPE=${DTYPE:-bf16}

if [[ -n ${VENV:-} ]]; then
    # shellcheck disable=SC1091
    source "${VENV}/bin/activate"
fi
cd "${REPO_DIR}"

LATEST_FILE="${RUN_DIR}/checkpoints/latest"
if [[ ! -f ${LATEST_FILE} ]]; then
    echo "error: ${LATEST_FILE} not found; RUN_DIR must be a training run with a saved checkpoint" >&2
    exit 2
fi
echo "converting ${RUN_DIR}/checkpoints/$(cat "${LATEST_FILE}") -> ${OUT}"
python tools/convert.py mcore-to-hf \
    --checkpoint "${RUN_DIR}" \
    --model-config "${RUN_DIR}/config.yaml" \
    ${TOKENIZER_DIR:+--tokenizer-dir "${TOKENIZER_DIR}"} \
    ${HF_CONFIG:+--hf-config "${HF_CONFIG}"} \
    --dtype "${DTYPE}" \
    --out "${OUT}"
