#!/usr/bin/env bash
# A real single-node Slurm on this machine, for the tests of the sbatch wrappers (and for trying
# them by hand). Needs root and apt (Debian packages slurm-wlm + munge, Slurm 22.05).
#
#   bash cluster/slurm/local_slurm.sh install   # apt-get install, only when missing
#   bash cluster/slurm/local_slurm.sh start     # install if needed, configure, start, wait idle
#   bash cluster/slurm/local_slurm.sh stop      # stop the daemons this script started
#   bash cluster/slurm/local_slurm.sh status
#
# The node is "localhost" at 127.0.0.1 with this machine's CPUs (POLYSHIFT_SLURM_CPUS to
# override), one partition "debug". Configuration: /etc/slurm/slurm.conf (written only when
# absent or written by this script: a site's own configuration is never replaced); state, logs
# and pid files under /var/lib/polyshift-slurm.
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
MARK="# written by polyshift cluster/slurm/local_slurm.sh"
STATE=/var/lib/polyshift-slurm
# getconf, not nproc: nproc obeys OMP_NUM_THREADS, which test processes set to 1.
CPUS="${POLYSHIFT_SLURM_CPUS:-$(getconf _NPROCESSORS_ONLN)}"

log() { echo "local_slurm: $*" >&2; }

need_root() {
    if [ "$(id -u)" != 0 ]; then
        log "must run as root (it installs packages and starts the Slurm daemons)"
        exit 3
    fi
}

install() {
    need_root
    if command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
        && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return 0
    fi
    log "installing slurm-wlm and munge (apt)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq slurm-wlm munge >/dev/null
}

configure() {
    mkdir -p "$CONF_DIR" "$STATE/ctld" "$STATE/d" "$STATE/log" "$STATE/run"
    if [ -f "$CONF" ] && ! grep -qF "$MARK" "$CONF"; then
        log "$CONF exists and was not written by this script; leaving it alone"
        exit 4
    fi
    local mem
    mem=$(awk '/MemTotal/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    cat >"$CONF" <<EOF
$MARK
ClusterName=polyshift
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/d
SlurmctldPidFile=$STATE/run/slurmctld.pid
SlurmdPidFile=$STATE/run/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
NodeName=localhost NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
    # munge refuses a key that others can read; the package creates one, make sure it exists.
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 400 /etc/munge/munge.key
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install
    configure
    mkdir -p /run/munge && chown munge:munge /run/munge
    if ! munge -n </dev/null >/dev/null 2>&1; then
        log "starting munged"
        runuser -u munge -- /usr/sbin/munged --force
        touch "$STATE/run/munged.ours"  # stop only a munged that this script started
    fi
    if ! running "$STATE/run/slurmctld.pid"; then
        # A fresh controller: jobs of an earlier session would be recovered and block the node.
        rm -rf "${STATE:?}/ctld" && mkdir -p "$STATE/ctld"
        log "starting slurmctld"
        /usr/sbin/slurmctld -f "$CONF"
    fi
    if ! running "$STATE/run/slurmd.pid"; then
        log "starting slurmd"
        /usr/sbin/slurmd -f "$CONF"
    fi
    local i state
    for i in $(seq 1 60); do
        state=$(sinfo -h -n localhost -o %T 2>/dev/null || true)
        case "$state" in
            idle* | mixed* | allocated*) log "node localhost is $state"; return 0 ;;
            down* | drain*) scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true ;;
        esac
        sleep 0.5
    done
    log "the node did not become idle (state: ${state:-unknown}); see $STATE/log"
    exit 5
}

stop_pidfile() {
    local pidfile=$1 name=$2 i
    if running "$pidfile"; then
        log "stopping $name"
        kill "$(cat "$pidfile")" 2>/dev/null || true
        for i in $(seq 1 40); do
            running "$pidfile" || break
            sleep 0.25
        done
        running "$pidfile" && kill -9 "$(cat "$pidfile")" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

stop() {
    stop_pidfile "$STATE/run/slurmd.pid" slurmd
    stop_pidfile "$STATE/run/slurmctld.pid" slurmctld
    if [ -f "$STATE/run/munged.ours" ]; then
        stop_pidfile /run/munge/munged.pid munged
        rm -f "$STATE/run/munged.ours"
    fi
}

status() {
    for d in slurmctld slurmd; do
        if running "$STATE/run/$d.pid"; then echo "$d: running"; else echo "$d: stopped"; fi
    done
    if running /run/munge/munged.pid; then echo "munged: running"; else echo "munged: stopped"; fi
    sinfo 2>/dev/null || true
}

case "${1:-}" in
    install) install ;;
    start) need_root; start ;;
    stop) need_root; stop ;;
    status) status ;;
    *) echo "usage: $0 {install|start|stop|status}" >&2; exit 2 ;;
esac
