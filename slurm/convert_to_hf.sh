#!/bin/bash
# Export a run's latest checkpoint to a Hugging Face model directory (CPU only, one task):
#   RUN_DIR=runs/sft OUT=exports/prolong-8b-sft sbatch slurm/convert_to_hf.sh
# Uses tools/convert.py mcore-to-hf (docs/convert.md); rope_theta and max_position_embeddings
# come from the run's resolved config.yaml.
#SBATCH --job-name=prolong-convert
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=128G
#SBATCH --time=04:00:00
#SBATCH --output=logs/%x-%j.out

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
RUN_DIR=${RUN_DIR:-${REPO_DIR}/runs/sft}
OUT=${OUT:-${REPO_DIR}/exports/$(basename "${RUN_DIR}")-hf}
TOKENIZER_DIR=${TOKENIZER_DIR:-${REPO_DIR}/checkpoints/Meta-Llama-3-8B-Instruct}
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
CHECKPOINT="${RUN_DIR}/checkpoints/$(cat "${LATEST_FILE}")/dist"
echo "converting ${CHECKPOINT} -> ${OUT}"
python tools/convert.py mcore-to-hf \
    --checkpoint "${CHECKPOINT}" \
    --model-config "${RUN_DIR}/config.yaml" \
    --tokenizer-dir "${TOKENIZER_DIR}" \
    --dtype "${DTYPE}" \
    --out "${OUT}"
