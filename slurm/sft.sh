#!/bin/bash
# ProLong SFT (UltraChat, 64K packed) on N nodes x 8 GPUs:  sbatch slurm/sft.sh   (repo root)
# Starts from stage 2's latest weights with a new optimizer and schedule.
# Needs (see docs/training.md, "Data preparation"):
#   STAGE2_RUN  the stage-2 run directory
#   SFT_DATA    UltraChat tokenized with tools/preprocess_data.py --sft (loss masks included)
#   TOKENIZER   the Llama-3 tokenizer.model
#SBATCH --job-name=prolong-sft
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=12:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
# shellcheck source=slurm/common.sh
source "${REPO_DIR}/slurm/common.sh"

NODES=${SLURM_JOB_NUM_NODES:-${NODES:-8}}
RECIPE=${RECIPE:-examples/sft.yaml}
RUN_DIR=${RUN_DIR:-${REPO_DIR}/runs/sft}
STAGE2_RUN=${STAGE2_RUN-${REPO_DIR}/runs/stage2_512k}
export SFT_DATA=${SFT_DATA:-${REPO_DIR}/data/ultrachat}
TOKENIZER=${TOKENIZER-${REPO_DIR}/checkpoints/Meta-Llama-3-8B-Instruct/original/tokenizer.model}

prolong_train "${NODES}" "${RECIPE}" \
    "run_dir=${RUN_DIR}" \
    ${STAGE2_RUN:+"checkpoint.load=${STAGE2_RUN}"} \
    ${TOKENIZER:+"data.tokenizer_path=${TOKENIZER}"}
