#!/usr/bin/env bash
# A real Slurm on this one machine for the tests: munged, mariadb, slurmdbd (so that sacct
# works; submitit needs it for jobs that died without a result), slurmctld, and slurmd: one on
# localhost (the default), or with --nodes N (N >= 2) one in each of N nodes, each a network +
# UTS namespace with its own hostname and address on a private bridge (slurm/local_nodes.sh).
#
#   bash slurm/local_cluster.sh start [--nodes N]   install (apt-get) if missing, start what is not running
#   bash slurm/local_cluster.sh stop [--nodes N]    stop exactly the daemons this script started, and
#                                                   remove the namespaces, links and bridge it made
#   bash slurm/local_cluster.sh status [--nodes N]  exit 0 when every daemon runs and every node is usable
#   bash slurm/local_cluster.sh env [--nodes N]     print `export SLURM_CONF=...` for a shell
#   bash slurm/local_cluster.sh exec NODE CMD...    run CMD inside node NODE of the N-node cluster
#   bash slurm/local_cluster.sh install             only install the packages (apt-get) if missing
#
# Everything (config, keys, state, logs, pid files, the database) lives under one folder,
# $DDPM_SLURM_DIR (default /tmp/ddpm-slurm, or /tmp/ddpm-slurm-nodes for N >= 2, whose daemons
# use other ports, so both clusters can run at once); no system file is touched, except that
# /etc/slurm/slurm.conf is made a link to ours when no Slurm config exists there, so that a
# plain `sbatch` works too (the link is removed again by `stop`). Clients find the cluster
# through SLURM_CONF=$DDPM_SLURM_DIR/slurm.conf. Runs as root, without systemd or cgroups.
# `--nodes N` may also be given as DDPM_SLURM_NODES=N.
#
# Two partitions: `low` (default; its jobs are preempted and requeued, GraceTime 60 s) and
# `high` (PriorityTier 10: its jobs preempt those of `low`).
set -euo pipefail

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }
usage() {
  echo "usage: $0 start|stop|status|env [--nodes N] | exec NODE CMD... | install   (state in \$DDPM_SLURM_DIR)" >&2
  exit 2
}

CMD="${1:-}"
(($# > 0)) && shift
NODES="${DDPM_SLURM_NODES:-1}"
if [[ $CMD != exec && ${1:-} == --nodes ]]; then
  (($# == 2)) || usage
  NODES="$2"
  shift 2
fi
[[ $CMD == exec || $# == 0 ]] || usage
if ! [[ $NODES =~ ^[0-9]+$ ]] || ((NODES < 1 || NODES > 64)); then
  echo "local_cluster: error: --nodes $NODES: give a whole number from 1 to 64" >&2
  exit 2
fi
[[ $CMD == exec ]] && ((NODES < 2)) && NODES=2  # exec is for the N-node cluster
# N >= 2 nodes: a cluster of its own (folder, ports), beside the single-node one.
MULTI=$((NODES > 1))
DIR="${DDPM_SLURM_DIR:-$( ((MULTI)) && echo /tmp/ddpm-slurm-nodes || echo /tmp/ddpm-slurm)}"
DB_PORT="${DDPM_SLURM_DB_PORT:-$((16033 + 100 * MULTI))}"
CTLD_PORT="${DDPM_SLURM_CTLD_PORT:-$((16817 + 100 * MULTI))}"
SLURMD_PORT="${DDPM_SLURM_SLURMD_PORT:-$((16818 + 100 * MULTI))}"
DBD_PORT="${DDPM_SLURM_DBD_PORT:-$((16819 + 100 * MULTI))}"
GRACE="${DDPM_SLURM_GRACE_S:-60}"
NODE="$(hostname -s)"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld)

pid_of() {  # pid_of NAME [PATTERN]: the pid in our pid file NAME.pid, only when that process is
  # alive and its command line has PATTERN (default NAME)
  local f="$DIR/run/$1.pid" pid
  [[ -s $f ]] || return 1
  pid="$(tr -dc 0-9 <"$f")"
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "${2:-$1}" || return 1
  echo "$pid"
}

stop_pid() {  # stop_pid PID WHAT: TERM, up to 20 s, then KILL
  local i
  kill -TERM "$1" 2>/dev/null || true
  for ((i = 0; i < 80; i++)); do [[ -d /proc/$1 ]] || break; sleep 0.25; done
  if [[ -d /proc/$1 ]]; then kill -KILL "$1" 2>/dev/null || true; fi
  log "stopped $2 ($1)"
}

if ((MULTI)); then
  # shellcheck source=slurm/local_nodes.sh
  source "$(dirname "${BASH_SOURCE[0]}")/local_nodes.sh"
  CTL_NAME="$NODE" CTL_ADDR="$SUBNET.1" SLURMD_NODES=()
  for ((i = 1; i <= NODES; i++)); do SLURMD_NODES+=("$(node_name "$i")"); done
  PART_NODES="$NODE_PREFIX[1-$NODES]"
else
  CTL_ADDR=127.0.0.1 SLURMD_NODES=("$NODE") PART_NODES="$NODE"
fi

running() { pid_of "$1" >/dev/null; }

wait_for() {  # wait_for SECONDS WHAT CMD...
  local t="$1" what="$2"; shift 2
  local end=$((SECONDS + t))
  while ((SECONDS < end)); do
    if declare -F "$1" >/dev/null; then
      "$@" >/dev/null 2>&1 && return 0
    elif timeout 10 "$@" >/dev/null 2>&1; then
      return 0
    fi
    sleep 0.25
  done
  die "$what did not come up in ${t}s (logs: $DIR/log)"
}

install() {
  local missing=()
  command -v slurmctld >/dev/null || missing+=(slurmctld)
  command -v slurmd >/dev/null || missing+=(slurmd)
  command -v sbatch >/dev/null || missing+=(slurm-client)
  command -v munged >/dev/null || missing+=(munge)
  command -v slurmdbd >/dev/null || missing+=(slurmdbd)
  command -v mariadbd >/dev/null || missing+=(mariadb-server)
  ((${#missing[@]} == 0)) && return 0
  [[ $(id -u) == 0 ]] || die "missing ${missing[*]}; run as root to install them with apt-get"
  log "installing ${PKGS[*]} (apt-get)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -q >"$DIR/log/apt.log" 2>&1 || die "apt-get update failed (see $DIR/log/apt.log)"
  apt-get install -y -q --no-install-recommends "${PKGS[@]}" >>"$DIR/log/apt.log" 2>&1 \
    || die "apt-get install failed (see $DIR/log/apt.log)"
}

write_config() {
  local hw sfx="" i
  # The machine's real CPU layout and memory, as slurmd sees them (a mismatch drains the node);
  # each node of an N-node cluster is this whole machine.
  hw="$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *UpTime=.*//')"
  ((MULTI)) && sfx="-%n"  # one slurmd per node: Slurm puts the node's name into these paths
  cat >"$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh: a ${NODES}-node test cluster. Do not edit; it is rewritten.
ClusterName=ddpm
SlurmctldHost=$NODE($CTL_ADDR)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd$sfx
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd$sfx.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd$sfx.log
# No cgroups here: track processes through /proc, bind nothing.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# Schedule every second (otherwise a requeued job waits ~120 s before it starts again).
SchedulerParameters=sched_interval=1,bf_interval=1
JobRequeue=1
# Refuse at submission what no node of the partition could ever run (instead of pending forever).
EnforcePartLimits=ALL
# A job in a partition of higher PriorityTier preempts; the victim gets its --signal at once
# (preempt_send_user_signal), GraceTime seconds to save, and is requeued.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
KillWait=30
MinJobAge=300
ReturnToService=2
MpiDefault=none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# For the slurmdbd plugin this names the munge socket (ours, not the system's).
AccountingStoragePass=$DIR/munge/munge.socket.2
$(if ((MULTI)); then for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=$(node_name "$i") NodeAddr=$(node_addr "$i") $hw State=UNKNOWN"
  done; else echo "NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN"; fi)
PartitionName=low Nodes=$PART_NODES Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=high Nodes=$PART_NODES MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
  if ! cmp -s "$CONF.tmp" "$CONF"; then
    mv "$CONF.tmp" "$CONF"
    # A running controller rereads a changed config (a restart would also work).
    if running slurmctld; then scontrol reconfigure >/dev/null 2>&1 || true; fi
  else
    rm -f "$CONF.tmp"
  fi
  cat >"$DIR/slurmdbd.conf.tmp" <<EOF
AuthType=auth/munge
AuthInfo=socket=$DIR/munge/munge.socket.2
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
LogFile=$DIR/log/slurmdbd.log
PidFile=$DIR/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/slurmdbd.conf.tmp"
  mv "$DIR/slurmdbd.conf.tmp" "$DIR/slurmdbd.conf"
  cat >"$DIR/env.sh" <<EOF
export SLURM_CONF=$CONF
EOF
}

start_munged() {
  running munged && return 0
  mkdir -p "$DIR/munge" && chmod 700 "$DIR/munge"
  [[ -s $DIR/munge/munge.key ]] || mungekey --create --keyfile="$DIR/munge/munge.key"
  chmod 600 "$DIR/munge/munge.key"
  rm -f "$DIR/munge/munge.socket.2"
  munged --force --socket="$DIR/munge/munge.socket.2" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/run/munged.pid" --log-file="$DIR/log/munged.log" \
    --seed-file="$DIR/munge/munge.seed"
  wait_for 20 munged test -S "$DIR/munge/munge.socket.2"
}

mysql_q() { mariadb --protocol=socket --socket="$DIR/run/mariadb.sock" -u root -e "$1"; }

start_mariadb() {
  if ! running mariadbd; then
    if [[ ! -d $DIR/mysql/mysql ]]; then
      mariadb-install-db --user=root --datadir="$DIR/mysql" --skip-test-db \
        >"$DIR/log/mariadb-install.log" 2>&1 || die "mariadb-install-db failed (see $DIR/log)"
    fi
    setsid mariadbd --user=root --datadir="$DIR/mysql" --socket="$DIR/run/mariadb.sock" \
      --port="$DB_PORT" --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadbd.pid" \
      --log-error="$DIR/log/mariadb.log" --skip-name-resolve --innodb-buffer-pool-size=32M \
      </dev/null >/dev/null 2>&1 &
    wait_for 60 mariadb mariadb --protocol=socket --socket="$DIR/run/mariadb.sock" -u root -e "SELECT 1"
  fi
  mysql_q "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
           GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1'; FLUSH PRIVILEGES;"
}

start_slurmdbd() {
  running slurmdbd && return 0
  slurmdbd
  wait_for 60 slurmdbd sacctmgr -n list cluster
  sacctmgr -i -Q add cluster ddpm >/dev/null 2>&1 || true
}

start_slurmctld() {
  running slurmctld && return 0
  slurmctld
  wait_for 60 slurmctld scontrol ping
}

slurmd_pid() {  # slurmd_pid NODE
  if ((MULTI)); then pid_of "slurmd-$1" "slurmd -N $1 "; else pid_of slurmd; fi
}

start_slurmd() {
  local n
  for n in "${SLURMD_NODES[@]}"; do
    slurmd_pid "$n" >/dev/null && continue
    if ((MULTI)); then
      mkdir -p "$DIR/state/slurmd-$n"
      node_exec "$n" slurmd -N "$n"  # inside the node's namespaces, which its children inherit
    else
      slurmd -N "$n"
    fi
  done
  for n in "${SLURMD_NODES[@]}"; do wait_for 60 "node $n" node_usable "$n"; done
}

node_usable() {  # node_usable NODE
  local state
  state="$(sinfo -h -n "$1" -o %T 2>/dev/null | head -1)"
  case "$state" in
    idle* | mixed* | allocated* | completing*) return 0 ;;
    down* | drain* | fail*) scontrol update nodename="$1" state=resume >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}

link_etc() {
  if [[ ! -e /etc/slurm/slurm.conf && -d /etc/slurm ]]; then
    ln -s "$CONF" /etc/slurm/slurm.conf
  fi
}

cmd_start() {
  local t0=$SECONDS made
  mkdir -p "$DIR"/{run,log,state/ctld,state/slurmd}
  chmod 755 "$DIR"
  if ((MULTI)); then
    made="$(made_nodes)"
    if ((made != 0 && made != NODES)); then
      echo "local_cluster: error: a $made-node cluster is up in $DIR; stop it first (stop --nodes $made)" >&2
      exit 2
    fi
  fi
  install
  if ((MULTI)); then nodes_up; fi
  write_config
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  link_etc
  log "up in $((SECONDS - t0)) s: nodes ${SLURMD_NODES[*]}, partitions low (default) and high; export SLURM_CONF=$CONF"
}

cmd_stop() {
  local d pid n i nodes=("${SLURMD_NODES[@]}")
  if ((MULTI)); then  # the nodes the last start made, whatever --nodes says now
    nodes=()
    for ((i = 1; i <= $(made_nodes); i++)); do nodes+=("$(node_name "$i")"); done
  fi
  # Reverse start order; only pids from our own pid files, checked against their command line.
  for n in "${nodes[@]}"; do
    if pid="$(slurmd_pid "$n")"; then stop_pid "$pid" "slurmd of $n"; fi
    rm -f "$DIR/run/slurmd.pid" "$DIR/run/slurmd-$n.pid"
  done
  for d in slurmctld slurmdbd mariadbd munged; do
    if pid="$(pid_of "$d")"; then stop_pid "$pid" "$d"; fi
    rm -f "$DIR/run/$d.pid"
  done
  if ((MULTI)); then nodes_down; fi
  if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
  fi
}

cmd_status() {
  local d n pid ok=0
  for d in "${DAEMONS[@]}"; do
    if pid="$(pid_of "$d")"; then echo "$d: running ($pid)"; else echo "$d: stopped"; ok=1; fi
  done
  for n in "${SLURMD_NODES[@]}"; do
    if pid="$(slurmd_pid "$n")"; then echo "slurmd of $n: running ($pid)"; else echo "slurmd of $n: stopped"; ok=1; fi
  done
  for n in "${SLURMD_NODES[@]}"; do
    if ((ok == 0)) && node_usable "$n"; then echo "node $n: $(sinfo -h -n "$n" -o %T)"; else ok=1; fi
  done
  return $ok
}

case "$CMD" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  exec) (($# >= 2)) || usage; node_exec "$@" ;;
  install) mkdir -p "$DIR/log"; install ;;
  *) usage ;;
esac
