#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying `run.py sweep --launcher slurm` and for the tests.
#
#   scripts/slurm_local.sh start     # prints `export SLURM_CONF=...`: run it (or eval the output) in your shell
#   scripts/slurm_local.sh status
#   scripts/slurm_local.sh stop      # ends only the munged, slurmctld and slurmd that `start` started
#
# Debian/Ubuntu's slurmctld, slurmd and munge (installed with apt-get when missing, as root). This host is the
# controller and the only node, with `nproc` CPUs, in one partition `debug` (time limit 1 day, enforced at
# submission). Everything (munge key and socket, slurm.conf, spool, logs, pid files) lives in one state folder,
# $SLURM_LOCAL_DIR (default ${TMPDIR:-/tmp}/gazesup_slurm_local); the ports are $SLURM_LOCAL_PORT and the next one
# (default 6817, 6818). The daemons run as root (a test cluster, not a shared one).
set -euo pipefail

DIR=${SLURM_LOCAL_DIR:-${TMPDIR:-/tmp}/gazesup_slurm_local}
PORT=${SLURM_LOCAL_PORT:-6817}
CONF=$DIR/slurm.conf
SOCKET=$DIR/munge.socket

die() { echo "error: slurm_local.sh: $*" >&2; exit 2; }

# the pid in FILE if that process is alive and is DAEMON started with our state folder
our_pid() {
    local file=$1 daemon=$2 pid
    [[ -f $file ]] || return 1
    pid=$(cat "$file" 2>/dev/null) || return 1
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/cmdline ]] || return 1
    local cmd
    cmd=$(tr '\0' ' ' < "/proc/$pid/cmdline")
    [[ $cmd == *"$daemon"* && $cmd == *"$DIR"* ]] || return 1
    echo "$pid"
}

install_packages() {
    local missing=()
    command -v munged >/dev/null || missing+=(munge)
    command -v slurmctld >/dev/null || missing+=(slurmctld)
    command -v slurmd >/dev/null || missing+=(slurmd)
    command -v sbatch >/dev/null || missing+=(slurm-client)
    ((${#missing[@]})) || return 0
    [[ $(id -u) == 0 ]] || die "missing ${missing[*]}: install them as root (apt-get install ${missing[*]})"
    command -v apt-get >/dev/null || die "missing ${missing[*]} and no apt-get: install Slurm and munge yourself"
    echo "slurm_local.sh: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

write_conf() {
    local host cpus mem_mb
    host=$(hostname -s)
    cpus=$(nproc)
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
    cat > "$CONF" <<EOF
# one-node test cluster written by scripts/slurm_local.sh
ClusterName=gazesup_local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$PORT
SlurmdPort=$((PORT + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$SOCKET
CredType=cred/munge
StateSaveLocation=$DIR/ctld
SlurmdSpoolDir=$DIR/slurmd
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/slurmctld.log
SlurmdLogFile=$DIR/slurmd.log
# containers rarely allow cgroups: track a job's processes through /proc
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
# look at the queue every 5 s (a requeued job becomes eligible again after Slurm's fixed delay)
SchedulerParameters=sched_interval=5
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
MpiDefault=none
KillWait=30
# reject a job whose request exceeds its partition's limits when it is submitted (as many clusters do)
EnforcePartLimits=ALL
NodeName=$host NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=$host Default=YES MaxTime=1-00:00:00 State=UP
EOF
}

start() {
    install_packages
    if our_pid "$DIR/slurmctld.pid" slurmctld >/dev/null && our_pid "$DIR/slurmd.pid" slurmd >/dev/null; then
        echo "slurm_local.sh: already running ($DIR)" >&2
        echo "export SLURM_CONF=$CONF"
        return 0
    fi
    stop_daemons quiet
    mkdir -p "$DIR"
    chmod 0700 "$DIR"
    mkdir -p "$DIR/ctld" "$DIR/slurmd"
    if [[ ! -f $DIR/munge.key ]]; then
        (umask 077 && dd if=/dev/urandom of="$DIR/munge.key" bs=1024 count=1 status=none)
    fi
    chmod 0400 "$DIR/munge.key"
    write_conf
    # munged refuses root without --force; --trusted-group keeps its permission checks quiet on a root-owned /tmp
    munged --force --socket="$SOCKET" --key-file="$DIR/munge.key" --pid-file="$DIR/munged.pid" \
        --log-file="$DIR/munged.log" --seed-file="$DIR/munged.seed" \
        || die "munged did not start; see $DIR/munged.log"
    SLURM_CONF=$CONF slurmctld -f "$CONF" -i || die "slurmctld did not start; see $DIR/slurmctld.log"
    SLURM_CONF=$CONF slurmd -f "$CONF" || die "slurmd did not start; see $DIR/slurmd.log"
    local i state=""
    for i in $(seq 1 60); do
        state=$(SLURM_CONF=$CONF sinfo -h -o %T 2>/dev/null | head -1 || true)
        [[ $state == idle* || $state == mixed* || $state == allocated* ]] && break
        sleep 0.5
    done
    [[ $state == idle* || $state == mixed* || $state == allocated* ]] \
        || die "the node did not come up (state '${state:-none}'); see $DIR/slurmctld.log and $DIR/slurmd.log"
    echo "slurm_local.sh: one-node Slurm up: $(hostname -s), $(nproc) CPUs, partition debug; state in $DIR" >&2
    echo "export SLURM_CONF=$CONF"
}

stop_daemons() {
    local quiet=${1:-} name pid stopped=()
    for name in slurmd slurmctld munged; do
        pid=$(our_pid "$DIR/$name.pid" "$name") || continue
        kill -TERM "$pid" 2>/dev/null || true
        for _ in $(seq 1 40); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.25
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
        stopped+=("$name ($pid)")
    done
    if [[ -z $quiet ]]; then
        if ((${#stopped[@]})); then
            echo "slurm_local.sh: stopped ${stopped[*]}" >&2
        else
            echo "slurm_local.sh: nothing of ours was running ($DIR)" >&2
        fi
    fi
}

status() {
    local name pid
    for name in munged slurmctld slurmd; do
        if pid=$(our_pid "$DIR/$name.pid" "$name"); then echo "$name: running (pid $pid)"; else echo "$name: stopped"; fi
    done
    [[ -f $CONF ]] && SLURM_CONF=$CONF sinfo 2>/dev/null || true
}

case ${1:-} in
    start) start ;;
    stop) stop_daemons ;;
    status) status ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
