#!/bin/bash
# Shared launch logic for slurm/stage1.sh, stage2.sh and sft.sh (sourced, not run).
# One srun task per GPU; rank/world/rendezvous come from Slurm (the first node of the
# allocation is the rendezvous host). Preemption: Slurm sends SIGUSR1 to this batch shell
# (#SBATCH --signal=B:USR1@...); the trap forwards it to the srun step, every rank finishes its
# step, the run saves a checkpoint and exits 0, then the job requeues itself and resumes from
# RUN_DIR/checkpoints/latest.
#
# Variables (all optional): REPO_DIR, RUN_DIR, GPUS_PER_NODE (8), GPU_KIND (h100|h200, for the
# dry run), MASTER_PORT (29500), VENV (a virtualenv to activate), EXTRA_OVERRIDES (more
# key=value), DRY_RUN_ONLY=1 (validate the settings and stop; works without Slurm).

set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
GPU_KIND=${GPU_KIND:-h100}
MASTER_PORT=${MASTER_PORT:-29500}

prolong_env() {
    if [[ -n ${VENV:-} ]]; then
        # shellcheck disable=SC1091
        source "${VENV}/bin/activate"
    fi
    cd "${REPO_DIR}"
    export PYTHONPATH="${REPO_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
    export CUDA_DEVICE_MAX_CONNECTIONS=1   # TP/SP communication overlap ordering
    export NCCL_ASYNC_ERROR_HANDLING=1
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-8}
}

# prolong_train NODES RECIPE [key=value ...]
prolong_train() {
    local nodes=$1 recipe=$2
    shift 2
    local overrides=("$@")
    if [[ -n ${EXTRA_OVERRIDES:-} ]]; then
        read -r -a extra <<< "${EXTRA_OVERRIDES}"
        overrides+=("${extra[@]}")
    fi
    prolong_env
    # Validate layout, budget and memory before any GPU time is spent (exit 4: does not fit).
    python -m megatron_prolong.train "${recipe}" "${overrides[@]}" \
        --dry-run --nodes "${nodes}" --gpus-per-node "${GPUS_PER_NODE}" --gpu "${GPU_KIND}"
    if [[ ${DRY_RUN_ONLY:-0} == 1 ]]; then
        return 0
    fi

    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
    export MASTER_ADDR MASTER_PORT
    export WORLD_SIZE=$((nodes * GPUS_PER_NODE))
    echo "launching ${WORLD_SIZE} ranks, rendezvous ${MASTER_ADDR}:${MASTER_PORT}, run_dir ${RUN_DIR}"

    PREEMPTED=0
    trap 'PREEMPTED=1; echo "preemption signal: forwarding to the training ranks"; kill -USR1 "${SRUN_PID}" 2>/dev/null || true' USR1 TERM
    # The single quotes are deliberate: SLURM_PROCID/SLURM_LOCALID expand inside each task.
    # shellcheck disable=SC2016
    srun --nodes="${nodes}" --ntasks-per-node="${GPUS_PER_NODE}" --kill-on-bad-exit=1 \
        bash -c 'export RANK=${SLURM_PROCID} LOCAL_RANK=${SLURM_LOCALID}; exec python -m megatron_prolong.train "$@"' \
        prolong "${recipe}" "${overrides[@]}" &
    SRUN_PID=$!
    local rc=0
    # `wait` returns early when a trapped signal arrives: keep waiting for the ranks to save.
    while kill -0 "${SRUN_PID}" 2>/dev/null; do
        wait "${SRUN_PID}" && rc=0 || rc=$?
    done
    if [[ ${PREEMPTED} == 1 && ${rc} == 0 ]]; then
        echo "checkpoint saved; requeueing job ${SLURM_JOB_ID} to resume"
        scontrol requeue "${SLURM_JOB_ID}"
    fi
    return "${rc}"
}
