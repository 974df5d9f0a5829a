#!/bin/bash
# ProLong stage 2 (512K) on N nodes x 8 GPUs:  sbatch slurm/stage2.sh   (from the repo root)
# One model replica per node (TP=2 x CP=4); DP = nodes. Starts from stage 1's latest
# checkpoint with its weights and optimizer state, the LR schedule restarted.
# Needs (see docs/training.md, "Data preparation"):
#   STAGE1_RUN    the stage-1 run directory (its checkpoints/latest is loaded)
#   PROLONG_DATA  the 512K mixture's indexed datasets
#   TOKENIZER     the Llama-3 tokenizer.model
#SBATCH --job-name=prolong-stage2
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@600
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
# shellcheck source=slurm/common.sh
source "${REPO_DIR}/slurm/common.sh"

NODES=${SLURM_JOB_NUM_NODES:-${NODES:-8}}
RECIPE=${RECIPE:-examples/stage2_512k.yaml}
RUN_DIR=${RUN_DIR:-${REPO_DIR}/runs/stage2_512k}
STAGE1_RUN=${STAGE1_RUN-${REPO_DIR}/runs/stage1_64k}
export PROLONG_DATA=${PROLONG_DATA:-${REPO_DIR}/data/prolong-512k}
TOKENIZER=${TOKENIZER-${REPO_DIR}/checkpoints/Meta-Llama-3-8B-Instruct/original/tokenizer.model}

prolong_train "${NODES}" "${RECIPE}" \
    "run_dir=${RUN_DIR}" \
    ${STAGE1_RUN:+"checkpoint.load=${STAGE1_RUN}"} \
    ${TOKENIZER:+"data.tokenizer_path=${TOKENIZER}"}
