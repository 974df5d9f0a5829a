#!/bin/bash
# ProLong stage 1 (64K) on N nodes x 8 GPUs:  sbatch slurm/stage1.sh   (from the repo root)
#   more nodes:  sbatch --nodes=16 slurm/stage1.sh    (DP grows; the global batch stays 64 x 64K)
# Needs (see docs/training.md, "Data preparation"):
#   INIT_CKPT     Llama-3-8B-Instruct converted with tools/convert.py hf-to-mcore --rope-theta 8e6
#   PROLONG_DATA  the 64K mixture's indexed datasets (tools/import_prolong_mds.py or preprocess_data.py)
#   TOKENIZER     the Llama-3 tokenizer.model (tiktoken BPE file)
#SBATCH --job-name=prolong-stage1
#SBATCH --nodes=8
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --mem=0
#SBATCH --exclusive
#SBATCH --time=48:00:00
#SBATCH --requeue
#SBATCH --signal=B:USR1@300
#SBATCH --output=logs/%x-%j.out
#SBATCH --open-mode=append

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
# shellcheck source=slurm/common.sh
source "${REPO_DIR}/slurm/common.sh"

NODES=${SLURM_JOB_NUM_NODES:-${NODES:-8}}
RECIPE=${RECIPE:-examples/stage1_64k.yaml}
RUN_DIR=${RUN_DIR:-${REPO_DIR}/runs/stage1_64k}
INIT_CKPT=${INIT_CKPT-${REPO_DIR}/checkpoints/llama3-8b-instruct-mcore}
export PROLONG_DATA=${PROLONG_DATA:-${REPO_DIR}/data/prolong-64k}
TOKENIZER=${TOKENIZER-${REPO_DIR}/checkpoints/Meta-Llama-3-8B-Instruct/original/tokenizer.model}

prolong_train "${NODES}" "${RECIPE}" \
    "run_dir=${RUN_DIR}" \
    ${INIT_CKPT:+"checkpoint.load=${INIT_CKPT}"} \
    ${TOKENIZER:+"data.tokenizer_path=${TOKENIZER}"}
