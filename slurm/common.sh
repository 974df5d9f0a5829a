#!/bin/bash
# Shared launch logic for slurm/stage1.sh, stage2.sh and sft.sh (sourced, not run; preprocess.sh
# sources it for prolong_python_env).
# One srun task per GPU (or per CPU process with DEVICE=cpu); rank/world/rendezvous come from
# Slurm (the first node of the allocation is the rendezvous host).
#
# Preemption: Slurm signals the batch shell (#SBATCH --signal=B:USR1@..., scancel --batch
# --signal=USR1 or TERM); the trap forwards SIGUSR1 to the srun step, every rank finishes its
# step, saves a checkpoint and exits 0, and this script requeues the job, which resumes from
# RUN_DIR/checkpoints/latest. A signal sent to the step's processes directly (scancel --signal
# without --batch) is honoured the same way: the run leaves
# RUN_DIR/preempted, and the job is requeued on it. A signal before srun starts requeues at once.
# `scancel JOB` (cancel) also saves a checkpoint, but the job stays cancelled.
#
# Variables (all optional): REPO_DIR, RUN_DIR, RECIPE, VENV (a virtualenv to activate),
# TASKS_PER_NODE (srun tasks per node; default GPUS_PER_NODE, 8), DEVICE (cuda | cpu: adds
# training.device=...; cpu runs the tasks as CPU processes over gloo), GPU_KIND (h100|h200, for
# the dry run), MASTER_PORT (default: derived from the job id), EXTRA_OVERRIDES (more key=value,
# applied last), DRY_RUN_ONLY=1 (validate the settings and stop; works without Slurm),
# MAX_REQUEUES_WITHOUT_PROGRESS (default 5: requeues in a row with no new checkpoint before the
# job stops requeueing itself and exits 3).
# Exit 75 from the ranks (a checkpoint save ran out of disk space) requeues the job too.
# CPU smoke test of a launch: docs/training.md, "Slurm".

set -euo pipefail

# Exit status the training uses for a retryable failure (a save out of disk space):
# megatron_prolong/training/checkpoint.py EXIT_RETRYABLE.
EXIT_RETRYABLE=75

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
TASKS_PER_NODE=${TASKS_PER_NODE:-${GPUS_PER_NODE}}
GPU_KIND=${GPU_KIND:-h100}
# Jobs that share a node must not share a rendezvous port.
MASTER_PORT=${MASTER_PORT:-$((20000 + ${SLURM_JOB_ID:-9500} % 20000))}

# The job's Python: VENV activated, run from REPO_DIR with the repository on PYTHONPATH
# (slurm/preprocess.sh needs only this).
prolong_python_env() {
    if [[ -n ${VENV:-} ]]; then
        # shellcheck disable=SC1091
        source "${VENV}/bin/activate"
    fi
    cd "${REPO_DIR}"
    export PYTHONPATH="${REPO_DIR}${PYTHONPATH:+:${PYTHONPATH}}"
}

prolong_env() {
    prolong_python_env
    export CUDA_DEVICE_MAX_CONNECTIONS=1   # TP/SP communication overlap ordering
    export NCCL_ASYNC_ERROR_HANDLING=1
    export TORCH_NCCL_ASYNC_ERROR_HANDLING=1
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-8}}
}

stamp() { date +%Y-%m-%dT%H:%M:%S.%N | cut -c1-23; }

on_preemption_signal() {
    PREEMPTED=1
    echo "[$(stamp)] preemption signal: forwarding SIGUSR1 to the training ranks"
    if [[ -n ${SRUN_PID:-} ]]; then
        kill -USR1 "${SRUN_PID}" 2>/dev/null || true
    fi
}

# What a requeue must have moved to count as progress: the newest checkpoint and the step the
# last preemption stopped at.
progress_key() {
    local latest step
    latest=$(cat "${RUN_DIR}/checkpoints/latest" 2>/dev/null || true)
    step=$(sed -n 's/^step \([0-9]*\) .*/\1/p' "${RUN_DIR}/preempted" 2>/dev/null || true)
    echo "checkpoint=${latest:-none},step=${step:-none}"
}

requeue() {
    # A cancelled job (scancel: SIGTERM, the job already ending) stays cancelled; a running one,
    # or one at its time limit, is requeued.
    local job state
    job=$(scontrol show job "${SLURM_JOB_ID}" 2>/dev/null || true)
    state=$(grep -o 'JobState=[A-Z_]*' <<< "${job}" || true)
    if [[ ${state} != JobState=RUNNING && ${job} != *Reason=TimeLimit* ]]; then
        echo "[$(stamp)] $1; job ${SLURM_JOB_ID} is ${state#JobState=} (cancelled): not requeueing"
        return 0
    fi
    # Requeues that bring no progress (a --time shorter than the --signal lead signals every run
    # at once) stop after MAX_REQUEUES_WITHOUT_PROGRESS in a row instead of looping forever.
    local key count=1 old_key="" old_count=0 limit=${MAX_REQUEUES_WITHOUT_PROGRESS:-5}
    local state_file="${RUN_DIR}/requeues_without_progress"
    key=$(progress_key)
    if [[ ! ${limit} =~ ^[0-9]{1,6}$ ]]; then
        echo "[$(stamp)] error: MAX_REQUEUES_WITHOUT_PROGRESS=${limit} is not a number" >&2
        return 2
    fi
    if [[ -f ${state_file} && ! -L ${state_file} ]]; then
        read -r old_key old_count < "${state_file}" || true
        # Data, not code: bash arithmetic would evaluate a crafted count (a[$(cmd)]).
        if [[ ! ${old_count} =~ ^[0-9]{1,6}$ ]]; then
            echo "[$(stamp)] warning: ${state_file} holds no count; starting again from 0" >&2
            old_key="" old_count=0
        fi
        if [[ ${old_key} == "${key}" ]]; then
            count=$((10#${old_count} + 1))
        fi
    fi
    if (( count > limit )); then
        echo "[$(stamp)] error: $1, but ${limit} requeues in a row brought no new checkpoint" \
            "(${key}): not requeueing job ${SLURM_JOB_ID}. A --time shorter than the --signal" \
            "lead signals every run at once: raise --time (or MAX_REQUEUES_WITHOUT_PROGRESS)" \
            "and resubmit; the run resumes from its last checkpoint." >&2
        rm -f "${state_file}"
        return 3
    fi
    mkdir -p "${RUN_DIR}"
    rm -f "${state_file}"  # a symbolic link planted there is removed, not written through
    echo "${key} ${count}" > "${state_file}"
    echo "[$(stamp)] $1; requeueing job ${SLURM_JOB_ID} to resume"
    scontrol requeue "${SLURM_JOB_ID}"
}

# prolong_train NODES RECIPE [key=value ...]
prolong_train() {
    local nodes=$1 recipe=$2
    shift 2
    local overrides=("$@")
    if [[ -n ${DEVICE:-} ]]; then
        overrides+=("training.device=${DEVICE}")
    fi
    if [[ -n ${EXTRA_OVERRIDES:-} ]]; then
        read -r -a extra <<< "${EXTRA_OVERRIDES}"
        overrides+=("${extra[@]}")
    fi
    # From here on a preemption signal is never fatal to this script.
    PREEMPTED=0
    SRUN_PID=
    trap on_preemption_signal USR1 TERM
    prolong_env
    # Validate layout, budget and memory before any GPU time is spent (exit 4: does not fit).
    python -m megatron_prolong.train "${recipe}" "${overrides[@]}" \
        --dry-run --nodes "${nodes}" --gpus-per-node "${TASKS_PER_NODE}" --gpu "${GPU_KIND}"
    if [[ ${DRY_RUN_ONLY:-0} == 1 ]]; then
        return 0
    fi
    if [[ ${PREEMPTED} == 1 ]]; then
        requeue "preempted before the training step started"
        return
    fi

    MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)
    export MASTER_ADDR MASTER_PORT
    export WORLD_SIZE=$((nodes * TASKS_PER_NODE))
    echo "[$(stamp)] launching ${WORLD_SIZE} ranks, rendezvous ${MASTER_ADDR}:${MASTER_PORT}," \
        "run_dir ${RUN_DIR}, restart ${SLURM_RESTART_COUNT:-0}"

    # The single quotes are deliberate: SLURM_PROCID/SLURM_LOCALID expand inside each task.
    # shellcheck disable=SC2016
    srun --nodes="${nodes}" --ntasks-per-node="${TASKS_PER_NODE}" --kill-on-bad-exit=1 \
        bash -c 'export RANK=${SLURM_PROCID} LOCAL_RANK=${SLURM_LOCALID}; exec python -m megatron_prolong.train "$@"' \
        prolong "${recipe}" "${overrides[@]}" &
    SRUN_PID=$!
    local rc=0
    # `wait` returns early when a trapped signal arrives: keep waiting for the ranks to save.
    while kill -0 "${SRUN_PID}" 2>/dev/null; do
        wait "${SRUN_PID}" && rc=0 || rc=$?
    done
    # The ranks write RUN_DIR/preempted when they stopped for a signal, whoever sent it.
    if [[ ${rc} == 0 && (${PREEMPTED} == 1 || -f ${RUN_DIR}/preempted) ]]; then
        requeue "checkpoint saved ($(cat "${RUN_DIR}/preempted" 2>/dev/null || echo "no marker"))" \
            || return
    fi
    # 75 (EX_TEMPFAIL): a save ran out of disk space and removed its partial checkpoint;
    # retried like a preemption (the no-progress limit stops a disk that stays full).
    if [[ ${rc} == "${EXIT_RETRYABLE}" ]]; then
        requeue "exit ${rc}: a checkpoint save ran out of disk space (retryable)" || return
        return 0
    fi
    return "${rc}"
}
