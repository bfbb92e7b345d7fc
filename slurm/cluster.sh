#!/usr/bin/env bash
# A one-node SLURM cluster on this machine, for tests and trying the job scripts:
#   slurm/cluster.sh start [DIR]   install (Debian packages, as root) and start munged, slurmctld, slurmd
#   slurm/cluster.sh stop  [DIR]   stop them, by the pid files under DIR
#   slurm/cluster.sh env   [DIR]   print the export line clients need (SLURM_CONF)
# DIR (default /tmp/ekx-slurm) holds slurm.conf, state, spool, logs and pid files.
# No systemd: the daemons are started directly. Not for production clusters.
set -euo pipefail
cmd=${1:-start}
DIR=$(realpath -m "${2:-/tmp/ekx-slurm}")
CONF="$DIR/slurm.conf"
HOST=$(hostname -s)

install() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v sbatch >/dev/null \
    && command -v munged >/dev/null && return
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
}

start_munge() {
  mkdir -p /etc/munge /run/munge /var/log/munge /var/lib/munge
  if [ ! -s /etc/munge/munge.key ]; then
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
  fi
  chown -R munge:munge /etc/munge /run/munge /var/log/munge /var/lib/munge
  chmod 0400 /etc/munge/munge.key
  chmod 0755 /run/munge   # clients need o+x on the socket's directory
  if ! munge -n </dev/null >/dev/null 2>&1; then
    runuser -u munge -- /usr/sbin/munged --pid-file=/run/munge/munged.pid
    cp /run/munge/munged.pid "$DIR/munged.pid"
  fi
}

write_conf() {
  local cpus mem
  cpus=$(nproc)
  mem=$(( $(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 * 9 / 10 ))
  mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log"
  cat > "$CONF" <<CONF
ClusterName=ekx
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerParameters=batch_sched_delay=0,sched_min_interval=100000
ReturnToService=2
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
SlurmctldPort=6817
SlurmdPort=6818
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
}

case "$cmd" in
  start)
    [ "$(id -u)" = 0 ] || { echo "cluster.sh start needs root" >&2; exit 1; }
    install
    mkdir -p "$DIR"
    write_conf
    start_munge
    export SLURM_CONF="$CONF"
    slurmctld -f "$CONF"
    slurmd -f "$CONF"
    for _ in $(seq 1 100); do
      if sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)'; then
        echo "SLURM up: export SLURM_CONF=$CONF"; exit 0
      fi
      sleep 0.2
    done
    echo "SLURM did not come up; logs in $DIR/log" >&2; exit 1 ;;
  stop)
    for d in slurmd slurmctld munged; do
      if [ -f "$DIR/$d.pid" ]; then kill "$(cat "$DIR/$d.pid")" 2>/dev/null || true; rm -f "$DIR/$d.pid"; fi
    done ;;
  env)
    echo "export SLURM_CONF=$CONF" ;;
  *)
    echo "usage: $0 start|stop|env [DIR]" >&2; exit 2 ;;
esac
