#!/usr/bin/env bash
# A real single-node Slurm on localhost for the tests: munged, mariadb, slurmdbd (so that
# sacct works; submitit needs it for jobs that died without a result), slurmctld, slurmd.
#
#   bash slurm/local_cluster.sh start    install (apt-get) if missing, start what is not running
#   bash slurm/local_cluster.sh stop     stop exactly the daemons this script started
#   bash slurm/local_cluster.sh status   exit 0 when every daemon runs and the node is usable
#   bash slurm/local_cluster.sh env      print `export SLURM_CONF=...` for a shell
#
# Everything (config, keys, state, logs, pid files, the database) lives under one folder,
# $DDPM_SLURM_DIR (default /tmp/ddpm-slurm); no system file is touched, except that
# /etc/slurm/slurm.conf is made a link to ours when no Slurm config exists there, so that a
# plain `sbatch` works too (the link is removed again by `stop`). Clients find the cluster
# through SLURM_CONF=$DDPM_SLURM_DIR/slurm.conf. Runs as root, without systemd or cgroups.
#
# Two partitions: `low` (default; its jobs are preempted and requeued, GraceTime 60 s) and
# `high` (PriorityTier 10: its jobs preempt those of `low`).
set -euo pipefail

DIR="${DDPM_SLURM_DIR:-/tmp/ddpm-slurm}"
DB_PORT="${DDPM_SLURM_DB_PORT:-16033}"
CTLD_PORT="${DDPM_SLURM_CTLD_PORT:-16817}"
SLURMD_PORT="${DDPM_SLURM_SLURMD_PORT:-16818}"
DBD_PORT="${DDPM_SLURM_DBD_PORT:-16819}"
GRACE="${DDPM_SLURM_GRACE_S:-60}"
NODE="$(hostname -s)"
CONF="$DIR/slurm.conf"
export SLURM_CONF="$CONF"
PKGS=(slurmctld slurmd slurm-client munge slurmdbd mariadb-server)
DAEMONS=(munged mariadbd slurmdbd slurmctld slurmd)

log() { echo "local_cluster: $*" >&2; }
die() { log "error: $*"; exit 1; }

pid_of() {  # the pid from our pid file, only when that process is alive and is that daemon
  local f="$DIR/run/$1.pid" pid
  [[ -s $f ]] || return 1
  pid="$(tr -dc 0-9 <"$f")"
  [[ -n $pid && -r /proc/$pid/cmdline ]] || return 1
  tr '\0' ' ' <"/proc/$pid/cmdline" | grep -q -- "$1" || return 1
  echo "$pid"
}

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
  local hw
  # The node's real CPU layout and memory, as slurmd sees them (a mismatch drains the node).
  hw="$(slurmd -C | head -1 | sed -e 's/^NodeName=[^ ]* //' -e 's/ *UpTime=.*//')"
  cat >"$CONF.tmp" <<EOF
# Written by slurm/local_cluster.sh: a single-node test cluster. Do not edit; it is rewritten.
ClusterName=ddpm
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket.2,cred_expire=5
StateSaveLocation=$DIR/state/ctld
SlurmdSpoolDir=$DIR/state/slurmd
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
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
NodeName=$NODE NodeAddr=127.0.0.1 $hw State=UNKNOWN
PartitionName=low Nodes=$NODE Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=$GRACE
PartitionName=high Nodes=$NODE MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
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

start_slurmd() {
  if ! running slurmd; then
    slurmd -N "$NODE"
  fi
  wait_for 60 "node $NODE" node_usable
}

node_usable() {
  local state
  state="$(sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1)"
  case "$state" in
    idle* | mixed* | allocated* | completing*) return 0 ;;
    down* | drain* | fail*) scontrol update nodename="$NODE" state=resume >/dev/null 2>&1; return 1 ;;
    *) return 1 ;;
  esac
}

link_etc() {
  if [[ ! -e /etc/slurm/slurm.conf && -d /etc/slurm ]]; then
    ln -s "$CONF" /etc/slurm/slurm.conf
  fi
}

cmd_start() {
  local t0=$SECONDS
  mkdir -p "$DIR"/{run,log,state/ctld,state/slurmd}
  chmod 755 "$DIR"
  install
  write_config
  start_munged
  start_mariadb
  start_slurmdbd
  start_slurmctld
  start_slurmd
  link_etc
  log "up in $((SECONDS - t0)) s: node $NODE, partitions low (default) and high; export SLURM_CONF=$CONF"
}

cmd_stop() {
  local d pid
  # Reverse start order; only pids from our own pid files, checked against their command line.
  for d in slurmd slurmctld slurmdbd mariadbd munged; do
    if pid="$(pid_of "$d")"; then
      kill -TERM "$pid" 2>/dev/null || true
      for ((i = 0; i < 80; i++)); do [[ -d /proc/$pid ]] || break; sleep 0.25; done
      if [[ -d /proc/$pid ]]; then kill -KILL "$pid" 2>/dev/null || true; fi
      log "stopped $d ($pid)"
    fi
    rm -f "$DIR/run/$d.pid"
  done
  if [[ -L /etc/slurm/slurm.conf && $(readlink /etc/slurm/slurm.conf) == "$CONF" ]]; then
    rm -f /etc/slurm/slurm.conf
  fi
}

cmd_status() {
  local d ok=0
  for d in "${DAEMONS[@]}"; do
    if pid="$(pid_of "$d")"; then echo "$d: running ($pid)"; else echo "$d: stopped"; ok=1; fi
  done
  if ((ok == 0)) && node_usable; then echo "node $NODE: $(sinfo -h -n "$NODE" -o %T)"; else ok=1; fi
  return $ok
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env   (state in \$DDPM_SLURM_DIR, default /tmp/ddpm-slurm)" >&2; exit 2 ;;
esac
