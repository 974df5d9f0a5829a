#!/usr/bin/env bash
# A throw-away one-node Slurm cluster on this machine, to run the slurm/ scripts for real (tests,
# or a launch smoke test before spending GPU hours). Needs root on a Debian-like system.
#
#   bash scripts/slurm_local.sh start DIR    # first run: apt-get install slurm-wlm munge
#   export SLURM_CONF=DIR/slurm.conf         # then sinfo, sbatch, squeue, scontrol, scancel
#   bash scripts/slurm_local.sh stop DIR
#
# `start` writes everything into DIR (an empty directory of your choice; keep its path short:
# it holds the munge socket): a MUNGE key and daemon on DIR/munge.socket, slurm.conf for this
# host (its real cores and memory as `slurmd -C` reports them, one partition `cpu`, requeue
# allowed; a requeued job may start again after CRED_EXPIRE seconds, default 10, where Slurm's
# default is 120; a cancelled job's processes get SIGKILL KILL_WAIT seconds after SIGTERM, default
# 180 for loaded test machines, where Slurm's is 30), slurmctld and slurmd on free TCP ports, their
# state, spool and logs. Nothing outside DIR is configured, the system's own munge/slurm
# services are not touched, and several such clusters can run side by side. `stop` cancels the
# cluster's jobs and stops the daemons that `start` started (by the process ids it recorded).
#
# Exit status: 0 ok; 3 this machine cannot host it (not root, not Debian-like, no apt-get, the
# install failed): the one-line reason is on stderr and tests skip with it; 1 anything else
# (a daemon did not come up: its log is printed).
set -euo pipefail

CANNOT=3
PACKAGES=(slurm-wlm munge)

die() { echo "slurm_local: $*" >&2; exit 1; }
cannot() { echo "slurm_local: cannot run here: $*" >&2; exit "${CANNOT}"; }

have_slurm() {
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null \
        && command -v sbatch >/dev/null && command -v munged >/dev/null
}

install_packages() {
    have_slurm && return 0
    [[ $(id -u) == 0 ]] || cannot "slurm-wlm and munge are not installed and installing them needs root"
    grep -qsE '^ID(_LIKE)?=.*debian' /etc/os-release || [[ -f /etc/debian_version ]] \
        || cannot "not a Debian-like system (the harness installs Debian's slurm-wlm and munge)"
    command -v apt-get >/dev/null || cannot "apt-get not found"
    echo "slurm_local: installing ${PACKAGES[*]} (first run only)" >&2
    local apt=(apt-get -q -y --no-install-recommends -o DPkg::Lock::Timeout=600)
    export DEBIAN_FRONTEND=noninteractive
    if ! "${apt[@]}" install "${PACKAGES[@]}" >"${DIR}/apt.log" 2>&1; then
        # Package lists may be missing or stale on a fresh machine.
        apt-get -q -o DPkg::Lock::Timeout=600 update >>"${DIR}/apt.log" 2>&1 || true
        "${apt[@]}" install "${PACKAGES[@]}" >>"${DIR}/apt.log" 2>&1 \
            || cannot "apt-get install ${PACKAGES[*]} failed: $(tail -n 1 "${DIR}/apt.log")"
    fi
    have_slurm || cannot "${PACKAGES[*]} installed but slurmctld/slurmd/sbatch/munged not found"
}

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

wait_for() {  # wait_for SECONDS WHAT COMMAND...
    local seconds=$1 what=$2
    shift 2
    local end=$((SECONDS + seconds))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= end)); then
            echo "slurm_local: ${what} did not come up within ${seconds}s; logs:" >&2
            tail -n 30 "${DIR}"/*.log >&2 || true
            stop_cluster
            exit 1
        fi
        sleep 0.5
    done
}

munge_works() { munge -n -S "${DIR}/munge.socket" | unmunge -S "${DIR}/munge.socket"; }
node_idle() { [[ $(sinfo -h -o %T) == idle ]]; }

write_config() {
    local host node ctld_port slurmd_port
    host=$(hostname -s)
    # The hardware line slurmd itself detects (CPUs, sockets, cores, threads, memory).
    node=$(slurmd -C | head -n 1)
    [[ ${node} == NodeName=* ]] || die "slurmd -C printed no node line: ${node}"
    ctld_port=$(free_port)
    slurmd_port=$(free_port)
    while [[ ${slurmd_port} == "${ctld_port}" ]]; do slurmd_port=$(free_port); done
    mkdir -p "${DIR}/state" "${DIR}/spool"
    cat >"${DIR}/slurm.conf" <<EOF
# Written by scripts/slurm_local.sh: a one-node test cluster, everything under ${DIR}.
ClusterName=prolong-local
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${ctld_port}
SlurmdPort=${slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire is also how long a requeued job waits before it may start again (default 120 s);
# the scheduler passes often, so that such a job starts as soon as it may.
AuthInfo=socket=${DIR}/munge.socket,cred_expire=${CRED_EXPIRE:-10}
SchedulerParameters=sched_interval=2,bf_interval=1
StateSaveLocation=${DIR}/state
SlurmdSpoolDir=${DIR}/spool
SlurmctldPidFile=${DIR}/slurmctld.pid
SlurmdPidFile=${DIR}/slurmd.pid
SlurmctldLogFile=${DIR}/slurmctld.log
SlurmdLogFile=${DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
# Every process of a job step is tracked and signalled, as on a production cluster.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobRequeue=1
ReturnToService=2
# How long a cancelled job's processes have between SIGTERM and SIGKILL: production clusters use
# 30 s (Slurm's default), which a save of the tests' tiny model fits on a quiet machine; a loaded
# one (load average 15+ on 2 cores) needs more, and a healthy job never waits for it.
KillWait=${KILL_WAIT:-180}
MinJobAge=3600
InactiveLimit=0
SlurmctldTimeout=60
SlurmdTimeout=60
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
${node%% UpTime=*} NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=cpu Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
}

start_cluster() {
    install_packages
    [[ -e ${DIR}/slurm.conf ]] && die "${DIR} already holds a cluster; stop it first or use an empty directory"
    write_config
    # MUNGE: our own key and daemon; munged insists on private files.
    dd if=/dev/urandom of="${DIR}/munge.key" bs=1024 count=1 status=none
    chmod 700 "${DIR}"
    chmod 600 "${DIR}/munge.key"
    munged --force --key-file="${DIR}/munge.key" --socket="${DIR}/munge.socket" \
        --pid-file="${DIR}/munged.pid" --log-file="${DIR}/munged.log" \
        --seed-file="${DIR}/munged.seed" || die "munged failed: $(tail -n 3 "${DIR}/munged.log")"
    wait_for 20 munged munge_works
    export SLURM_CONF=${DIR}/slurm.conf
    slurmctld -f "${SLURM_CONF}" || die "slurmctld failed: $(tail -n 5 "${DIR}/slurmctld.log")"
    wait_for 30 slurmctld scontrol ping
    slurmd -f "${SLURM_CONF}" || die "slurmd failed: $(tail -n 5 "${DIR}/slurmd.log")"
    # The node registers, then the partition accepts jobs.
    wait_for 60 "slurmd (node idle)" node_idle
    echo "SLURM_CONF=${SLURM_CONF}"
}

stop_pidfile() {  # stop_pidfile NAME: the daemon whose pid `start` recorded, TERM then KILL
    local file=${DIR}/$1.pid pid
    [[ -f ${file} ]] || return 0
    pid=$(cat "${file}")
    if [[ -n ${pid} ]] && kill -0 "${pid}" 2>/dev/null; then
        kill -TERM "${pid}" 2>/dev/null || true
        for _ in $(seq 50); do kill -0 "${pid}" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "${pid}" 2>/dev/null || true
    fi
    rm -f "${file}"
}

stop_cluster() {
    export SLURM_CONF=${DIR}/slurm.conf
    if [[ -f ${SLURM_CONF} ]] && scontrol ping >/dev/null 2>&1; then
        # Jobs first (their steps would outlive slurmd), then the daemons.
        local jobs
        mapfile -t jobs < <(squeue -h -o %i 2>/dev/null)
        if ((${#jobs[@]})); then scancel --full "${jobs[@]}" >/dev/null 2>&1 || true; fi
        local end=$((SECONDS + 40))
        while [[ -n $(squeue -h -o %i 2>/dev/null) ]] && ((SECONDS < end)); do sleep 0.5; done
    fi
    stop_pidfile slurmd
    stop_pidfile slurmctld
    stop_pidfile munged
}

[[ $# == 2 ]] || { sed -n '2,20p' "$0" >&2; exit 2; }
DIR=$(mkdir -p "$2" && cd "$2" && pwd)
case $1 in
    start) start_cluster ;;
    stop) stop_cluster ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
