#!/bin/bash
# Tokenize a corpus on a cluster: N shards as a Slurm array job, then their merge as a job
# that starts only when every shard succeeded (--dependency=afterok). From the repo root:
#
#   bash slurm/preprocess.sh submit 64 data/code-65536 --input 'stack/*.jsonl.gz' \
#       --tokenizer llama3 --tokenizer-path tokenizer.model --text-key content \
#       --group-key repo_name --group-sort-key path --min-doc-length 65536
#
# submit N PREFIX ARGS...  submits `shard` as array tasks 0..N-1 and `merge` after them;
#                          prints both job ids. ARGS are tools/preprocess_data.py options
#                          (everything but --output-prefix/--shard; quote globs).
# shard N PREFIX ARGS...   one array task: shard $SLURM_ARRAY_TASK_ID of N -> PREFIX.shard-I-of-N
# merge N PREFIX           tools/merge_datasets.py: the N shards -> PREFIX.bin/.idx (+ stats)
#
# Relative paths are taken from the repo root (REPO_DIR). Resubmitting the same command is the way to resume: complete shards are skipped, a shard that
# was killed is redone, a complete merge is skipped. Without Slurm, the same steps run by hand:
#   for i in $(seq 0 $((N-1))); do SLURM_ARRAY_TASK_ID=$i bash slurm/preprocess.sh shard N P ...; done
#   bash slurm/preprocess.sh merge N P
# Variables (optional): REPO_DIR, VENV (a virtualenv to activate), WORKERS (tokenizer processes
# per task; default SLURM_CPUS_PER_TASK), MAX_PARALLEL (array tasks at once, e.g. 32),
# SBATCH_ARGS (more sbatch options for both jobs, e.g. "--partition=cpu --account=me").
#SBATCH --job-name=prolong-preprocess
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=16
#SBATCH --mem=64G
#SBATCH --time=12:00:00
#SBATCH --output=logs/%x-%A_%a.out

set -euo pipefail

REPO_DIR=${REPO_DIR:-${SLURM_SUBMIT_DIR:-$(pwd)}}
# shellcheck source=slurm/common.sh
source "${REPO_DIR}/slurm/common.sh"

usage() {
    echo "usage: bash slurm/preprocess.sh submit|shard N PREFIX [preprocess_data.py options]" >&2
    echo "       bash slurm/preprocess.sh merge N PREFIX" >&2
    exit 2
}

[[ $# -ge 3 ]] || usage
STEP=$1
NUM_SHARDS=$2
PREFIX=$3
shift 3
[[ ${NUM_SHARDS} =~ ^[1-9][0-9]*$ ]] || { echo "error: N must be a positive integer, got '${NUM_SHARDS}'" >&2; exit 2; }

case ${STEP} in
    submit)
        cd "${REPO_DIR}"
        mkdir -p logs
        read -r -a extra <<< "${SBATCH_ARGS:-}"
        array="0-$((NUM_SHARDS - 1))${MAX_PARALLEL:+%${MAX_PARALLEL}}"
        shard_job=$(sbatch --parsable "${extra[@]}" --array="${array}" \
            --export="ALL,REPO_DIR=${REPO_DIR}" "${REPO_DIR}/slurm/preprocess.sh" \
            shard "${NUM_SHARDS}" "${PREFIX}" "$@")
        shard_job=${shard_job%%;*}   # --parsable prints "jobid[;cluster]"
        # the merge copies files: 2 CPUs; SBATCH_ARGS come last so that they win
        merge_job=$(sbatch --parsable --job-name=prolong-merge --cpus-per-task=2 \
            --output="logs/%x-%j.out" "${extra[@]}" --dependency="afterok:${shard_job}" \
            --export="ALL,REPO_DIR=${REPO_DIR}" \
            "${REPO_DIR}/slurm/preprocess.sh" merge "${NUM_SHARDS}" "${PREFIX}")
        merge_job=${merge_job%%;*}
        echo "shards: job ${shard_job} (array ${array}); merge: job ${merge_job} after all succeed"
        echo "output: ${PREFIX}.bin/.idx; resubmit the same command to resume after a failure"
        ;;
    shard)
        : "${SLURM_ARRAY_TASK_ID:?shard runs as an array task (or set SLURM_ARRAY_TASK_ID)}"
        prolong_python_env
        python tools/preprocess_data.py --workers "${WORKERS:-${SLURM_CPUS_PER_TASK:-1}}" \
            "$@" --output-prefix "${PREFIX}" --shard "${SLURM_ARRAY_TASK_ID}/${NUM_SHARDS}"
        ;;
    merge)
        [[ $# -eq 0 ]] || usage
        prolong_python_env
        python tools/merge_datasets.py --shards-of "${PREFIX}" --num-shards "${NUM_SHARDS}"
        ;;
    *)
        usage
        ;;
esac
