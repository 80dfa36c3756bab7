#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, on loopback only: munged, slurmctld and slurmd.
# It is what `xdt sweep --launcher slurm` is tested against (tests/test_slurm.py; .ci/run
# starts it), and a way to try a sweep on Slurm without a cluster.
#
#   scripts/slurm_local.sh start    install what is missing (apt-get), configure, start the
#                                   daemons and wait until the node is idle
#   scripts/slurm_local.sh stop     stop slurmd, slurmctld and munged
#   scripts/slurm_local.sh status   say whether the cluster answers (exit 0 when it does)
#
# Made for a container or a VM without systemd: the daemons run as plain background processes,
# with proctrack/linuxproc and task/none, so no cgroups are needed. The daemons run as root and
# jobs run as the submitting user with the submitting environment (sbatch's --export=ALL), so a
# job finds the repository's .venv python. `start` twice is harmless. It refuses to touch a
# slurm.conf that it did not write (a real cluster's). It needs root (or password-less sudo).
set -euo pipefail

CONF=/etc/slurm/slurm.conf
MARKER="# written by xdt scripts/slurm_local.sh"
KEY=/etc/munge/munge.key
LOGS=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
MUNGE_PID=/run/munge/munged.pid
WAIT_S=${SLURM_LOCAL_WAIT_S:-90}
NODE=$(hostname -s)

say() { echo "slurm_local: $*" >&2; }
die() { say "error: $*"; exit 1; }

alive() { # alive PIDFILE: the process the pid file names is running
  [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null
}

install_missing() {
  local packages=()
  command -v munged >/dev/null || packages+=(munge)
  command -v slurmctld >/dev/null || packages+=(slurmctld)
  command -v slurmd >/dev/null || packages+=(slurmd)
  command -v sinfo >/dev/null || packages+=(slurm-client)
  command -v runuser >/dev/null || packages+=(util-linux)
  [ ${#packages[@]} -eq 0 ] && return
  say "installing ${packages[*]} with apt-get"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
}

munge_key() {
  [ -s "$KEY" ] && return
  say "creating the munge key $KEY"
  mkdir -p "$(dirname "$KEY")"
  dd if=/dev/urandom of="$KEY" bs=1024 count=1 status=none
  chown munge:munge "$KEY"
  chmod 0400 "$KEY"
}

start_munge() {
  if munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1; then
    return
  fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /run/munge /var/lib/munge /var/log/munge
  chmod 0755 /run/munge
  # munged refuses root; it runs as the munge user, as its systemd unit does.
  runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID"
  for _ in $(seq 50); do
    munge -n </dev/null 2>/dev/null | unmunge >/dev/null 2>&1 && return
    sleep 0.1
  done
  die "munged does not answer; see /var/log/munge/munged.log"
}

# The node line comes from `slurmd -C` (the real CPUs, sockets, cores and memory), so the
# controller never drains the node for a topology it does not have.
config_text() {
  local node_line
  node_line=$(slurmd -C | head -n 1)
  [[ "$node_line" == NodeName=* ]] || die "slurmd -C printed no node line: $node_line"
  cat <<EOF
$MARKER; it rewrites this file on start
ClusterName=xdt-local
SlurmctldHost=$NODE(127.0.0.1)
$node_line NodeAddr=127.0.0.1 NodeHostname=$NODE State=UNKNOWN
PartitionName=local Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# A requeued job waits cred_expire seconds before it may start again (default 120).
AuthInfo=cred_expire=5
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
# No cgroups in a container: track a job's processes through /proc, bind no CPUs.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=2
# Short timeouts: a requeued or cancelled job is back (or gone) within seconds.
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
MessageTimeout=10
KillWait=10
MinJobAge=600
InactiveLimit=0
Waittime=0
JobRequeue=1
EOF
}

write_config() {
  if [ -e "$CONF" ] && ! grep -qF "$MARKER" "$CONF"; then
    die "$CONF exists and was not written by this script; not touching a real cluster's config"
  fi
  local text
  text=$(config_text)
  if [ -e "$CONF" ] && [ "$(cat "$CONF")" = "$text" ]; then
    return 1 # unchanged
  fi
  mkdir -p "$(dirname "$CONF")"
  printf '%s\n' "$text" >"$CONF.tmp"
  mv "$CONF.tmp" "$CONF"
  say "wrote $CONF"
}

node_state() {
  sinfo -h -N -n "$NODE" -o %t 2>/dev/null | head -n 1 || true
}

wait_idle() {
  local state="" resumed=0
  for _ in $(seq $((WAIT_S * 2))); do
    state=$(node_state)
    # slurmctld may report the node idle from its saved state before slurmd has registered:
    # ask slurmd itself too.
    case "$state" in
      idle | mix | alloc | comp) scontrol show slurmd >/dev/null 2>&1 && return ;;
      down* | drain* | drng* | fail*)
        if [ "$resumed" = 0 ]; then
          scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true
          resumed=1
        fi ;;
    esac
    sleep 0.5
  done
  die "node $NODE is not idle after ${WAIT_S} s (sinfo says '${state:-nothing}'); see $LOGS/slurmctld.log and $LOGS/slurmd.log"
}

stop_daemon() { # stop_daemon NAME PIDFILE
  alive "$2" || return 0
  local pid
  pid=$(cat "$2")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 100); do
    kill -0 "$pid" 2>/dev/null || { say "stopped $1"; return 0; }
    sleep 0.1
  done
  kill -9 "$pid" 2>/dev/null || true
  say "killed $1 (it did not stop within 10 s)"
}

as_root() { # run this script as root: through sudo when that needs no password
  [ "$(id -u)" = 0 ] && return
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    exec sudo -n "$0" "$@"
  fi
  die "$1 needs root (apt-get, /etc/slurm, the daemons); run it as root or with sudo"
}

start() {
  install_missing
  munge_key
  start_munge
  if write_config; then # a new or changed config: restart what runs under the old one
    stop_daemon slurmd "$SLURMD_PID"
    stop_daemon slurmctld "$CTLD_PID"
  fi
  mkdir -p /var/spool/slurmctld /var/spool/slurmd "$LOGS"
  alive "$CTLD_PID" || slurmctld
  alive "$SLURMD_PID" || slurmd
  wait_idle
  # One real job step end to end (munge, slurmctld, slurmd, slurmstepd): a node that looks
  # idle but cannot run a job fails here, with Slurm's message, rather than in the tests.
  timeout 60 srun --job-name=slurm_local-check --time=1 --ntasks=1 true ||
    die "a test job did not run; see $LOGS/slurmd.log"
  say "up: node $NODE runs jobs (partition local, $(sinfo -h -o %c) CPUs)"
}

stop() {
  stop_daemon slurmd "$SLURMD_PID"
  stop_daemon slurmctld "$CTLD_PID"
  stop_daemon munged "$MUNGE_PID"
}

status() {
  local state
  if command -v sinfo >/dev/null && state=$(node_state) && [ -n "$state" ]; then
    echo "up: node $NODE is $state"
  else
    echo "down: Slurm does not answer (start it with scripts/slurm_local.sh start)"
    return 1
  fi
}

case "${1:-}" in
  start) as_root start; start ;;
  stop) as_root stop; stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
