#!/usr/bin/env bash
# A private Slurm on this machine, to try scripts/slurm/ and to test them against a real scheduler (docs/cluster.md).
#   bash scripts/slurm/local_cluster.sh up [--nodes N]     start (or reuse) it; prints the line to export
#   bash scripts/slurm/local_cluster.sh down [--purge]     stop its daemons (--purge: and delete its folder)
#   bash scripts/slurm/local_cluster.sh env                print `export SLURM_CONF=...` (eval "$(... env)")
# Everything lives under one folder, SLURM_LOCAL (default /tmp/vtprune-slurm): its own munge key, socket and
# daemon, slurm.conf, state, logs and pid files; nothing outside it is written and a system Slurm or munged is left
# alone. --nodes N > 1 starts N slurmd on this host as the emulated nodes node1..nodeN (their own ports), so multi-node
# jobs (scripts/slurm/multinode.sbatch) run here; every node's NodeAddr is 127.0.0.1 (the names do not resolve: take
# a node's address from `scontrol show node`, as multinode.sbatch does).
# Variables: SLURM_LOCAL (folder), SLURM_LOCAL_PORT (slurmctld's port, default 6817; node i listens on PORT + i),
#   SLURM_LOCAL_CPUS (CPUs per node as configured, default nproc), SLURM_LOCAL_MEM (MB per node, default 4000).
# Needs: Debian / Ubuntu packages slurm-wlm and munge (`apt-get install -y slurm-wlm munge`), and root (slurmd starts
# jobs as their user; munged runs with --force as root). Built for Slurm 22.05 (Debian 12) without systemd or writable
# cgroups: processes are tracked through /proc (proctrack/linuxproc, task/none), so `-c N` reserves N CPUs for
# scheduling but does not bind them (the sbatch scripts set OMP_NUM_THREADS), and there is no accounting (no sacct:
# `scontrol show job` answers for MinJobAge = 300 s after a job ends).
set -euo pipefail
B="${SLURM_LOCAL:-/tmp/vtprune-slurm}"
PORT="${SLURM_LOCAL_PORT:-6817}"
CPUS="${SLURM_LOCAL_CPUS:-$(nproc)}"
MEM="${SLURM_LOCAL_MEM:-4000}"
CMD="${1:-}"; [[ $# -gt 0 ]] && shift
NODES=1; PURGE=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --nodes) NODES="${2:?--nodes N}"; shift 2 ;;
        --nodes=*) NODES="${1#--nodes=}"; shift ;;
        --purge) PURGE=1; shift ;;
        *) echo "local_cluster.sh: unknown argument $1 (up [--nodes N] | down [--purge] | env)" >&2; exit 2 ;;
    esac
done
[[ "$NODES" =~ ^[1-9][0-9]*$ ]] || { echo "local_cluster.sh: --nodes $NODES: a positive integer" >&2; exit 2; }
HOST="$(hostname -s)"
_alive() { [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

down() {
    local f p pids=()
    # every daemon told at once, then waited for together (up to 10 s; what is left is killed): not one by one
    for f in "$B"/run/slurmd-*.pid "$B"/run/slurmctld.pid "$B"/run/munged.pid; do
        [[ -s "$f" ]] || continue
        p="$(cat "$f")"
        kill "$p" 2>/dev/null && pids+=("$p")
        rm -f "$f"
    done
    for _ in $(seq 1 40); do
        local left=()
        for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && left+=("$p"); done
        pids=("${left[@]}")
        [[ ${#pids[@]} -gt 0 ]] || break
        sleep 0.25
    done
    for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
    if [[ $PURGE == 1 ]]; then rm -rf "$B"; echo "local Slurm stopped; $B deleted"; else echo "local Slurm stopped ($B kept)"; fi
}

up() {
    local missing=() c
    for c in munged munge unmunge slurmctld slurmd sinfo sbatch; do command -v "$c" >/dev/null || missing+=("$c"); done
    if [[ ${#missing[@]} -gt 0 ]]; then
        echo "local_cluster.sh: not installed: ${missing[*]} (Debian / Ubuntu: apt-get install -y slurm-wlm munge)" >&2
        exit 3
    fi
    [[ "$(id -u)" == 0 ]] || { echo "local_cluster.sh: slurmd and this munged setup need root" >&2; exit 3; }
    mkdir -p "$B"/{etc,log,run,state,munge}
    chmod 755 "$B" "$B/run"; chmod 700 "$B/munge"   # munged wants its socket's folder searchable by all
    # 1. munge: a key of our own and a daemon on our own socket
    if [[ ! -s "$B/munge/munge.key" ]]; then
        head -c 1024 /dev/urandom > "$B/munge/munge.key"; chmod 400 "$B/munge/munge.key"
    fi
    if ! munge -n -S "$B/run/munge.sock" 2>/dev/null | unmunge -S "$B/run/munge.sock" >/dev/null 2>&1; then
        munged --force -S "$B/run/munge.sock" --key-file="$B/munge/munge.key" --pid-file="$B/run/munged.pid" \
            --log-file="$B/log/munged.log" --seed-file="$B/munge/munged.seed"
    fi
    # 2. slurm.conf, written each time from the variables (a running cluster with other nodes is restarted)
    local conf="$B/etc/slurm.conf" new="$B/etc/slurm.conf.new" i
    {
        echo "# written by scripts/slurm/local_cluster.sh ($NODES node(s), $CPUS CPUs and $MEM MB each)"
        echo "ClusterName=vtprune-local"
        echo "SlurmctldHost=$HOST(127.0.0.1)"
        echo "SlurmctldPort=$PORT"
        echo "SlurmUser=root"
        echo "SlurmdUser=root"
        echo "AuthType=auth/munge"
        echo "CredType=cred/munge"
        echo "AuthInfo=socket=$B/run/munge.sock"
        echo "StateSaveLocation=$B/state"
        echo "SlurmdSpoolDir=$B/state/slurmd-%n"
        echo "SlurmctldPidFile=$B/run/slurmctld.pid"
        echo "SlurmdPidFile=$B/run/slurmd-%n.pid"
        echo "SlurmctldLogFile=$B/log/slurmctld.log"
        echo "SlurmdLogFile=$B/log/slurmd-%n.log"
        echo "ProctrackType=proctrack/linuxproc"
        echo "TaskPlugin=task/none"
        echo "JobAcctGatherType=jobacct_gather/none"
        echo "AccountingStorageType=accounting_storage/none"
        echo "JobCompType=jobcomp/none"
        echo "MpiDefault=none"
        echo "SwitchType=switch/none"
        echo "SchedulerType=sched/backfill"
        echo "SelectType=select/cons_tres"
        echo "SelectTypeParameters=CR_CPU"
        echo "SlurmdParameters=config_overrides"
        echo "ReturnToService=2"
        echo "SlurmctldTimeout=30"
        echo "SlurmdTimeout=30"
        echo "InactiveLimit=0"
        echo "MinJobAge=300"
        echo "KillWait=5"
        echo "Waittime=0"
        echo "MaxArraySize=1001"
        echo "MailProg=/bin/true"
        if [[ "$NODES" == 1 ]]; then
            echo "NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
        else
            for i in $(seq 1 "$NODES"); do
                echo "NodeName=node$i NodeHostname=$HOST NodeAddr=127.0.0.1 Port=$((PORT + i)) CPUs=$CPUS RealMemory=$MEM State=UNKNOWN"
            done
        fi
        echo "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP"
    } > "$new"
    if [[ -s "$conf" ]] && ! cmp -s "$conf" "$new" && _alive "$B/run/slurmctld.pid"; then
        echo "local_cluster.sh: the configuration changed: restarting the daemons"
        for f in "$B"/run/slurmd-*.pid "$B"/run/slurmctld.pid; do
            [[ -s "$f" ]] && { kill "$(cat "$f")" 2>/dev/null || true; rm -f "$f"; }
        done
        sleep 1
    fi
    mv "$new" "$conf"
    export SLURM_CONF="$conf"
    # 3. the daemons (each daemonizes itself); a node's old pid file names a dead process after a crash
    _alive "$B/run/slurmctld.pid" || slurmctld -f "$conf"
    local names=("$HOST"); [[ "$NODES" == 1 ]] || names=($(seq -f 'node%g' 1 "$NODES"))
    for n in "${names[@]}"; do
        _alive "$B/run/slurmd-$n.pid" || { mkdir -p "$B/state/slurmd-$n"; slurmd -f "$conf" -N "$n"; }
    done
    # 4. ready when every node is idle (or busy with jobs from before)
    local s
    for _ in $(seq 1 120); do
        if s="$(sinfo -h -o '%T' 2>/dev/null)" && [[ -n "$s" ]] && ! grep -qvE '^(idle|mixed|allocated)$' <<< "$s"; then
            echo "local Slurm up: $NODES node(s) under $B"
            echo "export SLURM_CONF=$conf"
            return 0
        fi
        sleep 0.5
    done
    echo "local_cluster.sh: the nodes are not idle after 60 s:" >&2
    sinfo -N -l >&2 || true
    tail -n 20 "$B"/log/*.log >&2 || true
    exit 1
}

case "$CMD" in
    up) up ;;
    down) down ;;
    env) echo "export SLURM_CONF=$B/etc/slurm.conf" ;;
    -h|--help|"") sed -n 2,18p "$0"; [[ -n "$CMD" ]] ;;
    *) echo "local_cluster.sh: unknown command $CMD (up [--nodes N] | down [--purge] | env)" >&2; exit 2 ;;
esac
