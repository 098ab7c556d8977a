#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for trying the project's Slurm path (and for its tests): munge, a
# MariaDB for accounting, slurmdbd, slurmctld and slurmd, all on localhost, every file under one directory. Needs
# root and Debian's packages (slurm-wlm slurmdbd munge mariadb-server; `install` gets them with apt-get).
#
#   sudo bash tools/local_slurm_cluster.sh install          # the packages (once per machine)
#   sudo bash tools/local_slurm_cluster.sh start /tmp/slurm  # prints `export SLURM_CONF=/tmp/slurm/slurm.conf`
#   SLURM_CONF=/tmp/slurm/slurm.conf sbatch --wrap hostname; sacct
#   sudo bash tools/local_slurm_cluster.sh stop /tmp/slurm
#
# The node has this machine's CPUs, 8 GPUs that are only a count (GPUS_PER_NODE=n to change it: jobs that ask for
# GPUs are scheduled, their processes find none) and one partition, `debug`; accounting (sacct) is on, as
# NeMo-Run's Slurm scheduler reads job states from it. Everything runs as root: it is a test cluster, not a shared one.
set -euo pipefail
cmd=${1:?usage: local_slurm_cluster.sh install|start DIR|stop DIR}
packages=(slurm-wlm slurmdbd munge mariadb-server)

case "$cmd" in
install)
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y --no-install-recommends "${packages[@]}" || {
    apt-get update -qq && apt-get install -y --no-install-recommends "${packages[@]}"; }
  ;;
start)
  dir=$(realpath -m "${2:?give the cluster directory}")
  for bin in munged mariadbd slurmdbd slurmctld slurmd sacctmgr; do
    command -v "$bin" >/dev/null || { echo "missing $bin: run \`$0 install\` first (as root)" >&2; exit 3; }
  done
  [ "$(id -u)" = 0 ] || { echo "the daemons run as root: start the cluster as root" >&2; exit 3; }
  mkdir -p "$dir"/{state,spool,db} /run/munge
  chown munge:munge /run/munge
  host=$(hostname -s)
  # Four ports from here (slurmctld, slurmd, slurmdbd, MariaDB), all free now and below Linux's ephemeral range
  # (32768-60999), where an outgoing connection could take one before the daemon binds it.
  base=$(python3 -c '
import random, socket
while True:
    base = random.randrange(20000, 32760)
    try:
        for port in range(base, base + 4):
            with socket.socket() as s:
                s.bind(("", port))
    except OSError:
        continue
    print(base)
    break')
  gpus=${GPUS_PER_NODE:-8}
  cat > "$dir/slurm.conf" <<EOF
ClusterName=local
SlurmctldHost=$host(127.0.0.1)
SlurmctldPort=$base
SlurmdPort=$((base + 1))
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/slurmctld.log
SlurmdLogFile=$dir/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$((base + 2))
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
MinJobAge=3600
MpiDefault=none
GresTypes=gpu
NodeName=$host NodeAddr=127.0.0.1 CPUs=$(nproc) Gres=gpu:$gpus State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
  dbd_port=$((base + 2)) db_port=$((base + 3))
  # Jobs ask for GPUs (--gpus-per-node); the node declares this many, backed by plain files instead of devices, so
  # a job is scheduled as on a GPU cluster while its processes find no GPU.
  mkdir -p "$dir/gpus"
  for i in $(seq 0 $((gpus - 1))); do touch "$dir/gpus/gpu$i"; done
  echo "AutoDetect=off
NodeName=$host Name=gpu File=$dir/gpus/gpu[0-$((gpus - 1))]" > "$dir/gres.conf"
  cat > "$dir/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$dbd_port
SlurmUser=root
LogFile=$dir/slurmdbd.log
PidFile=$dir/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$db_port
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$dir/slurmdbd.conf"
  export SLURM_CONF=$dir/slurm.conf
  pgrep -x munged >/dev/null || runuser -u munge -- munged --force
  if [ ! -d "$dir/db/mysql" ]; then
    mariadb-install-db --user=mysql --datadir="$dir/db" > "$dir/mariadb-install.log" 2>&1 || {
      echo "mariadb-install-db failed (the mysql user must reach $dir):" >&2; cat "$dir/mariadb-install.log" >&2; exit 1; }
  fi
  chown -R mysql:mysql "$dir/db"
  mariadbd --user=mysql --datadir="$dir/db" --socket="$dir/db/mysql.sock" --port="$db_port" \
    --bind-address=127.0.0.1 --pid-file="$dir/db/mariadb.pid" > "$dir/mariadb.log" 2>&1 &
  for _ in $(seq 60); do mariadb --socket="$dir/db/mysql.sock" -e 'select 1' >/dev/null 2>&1 && break; sleep 0.5; done
  mariadb --socket="$dir/db/mysql.sock" -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
    CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
    GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
  slurmdbd
  for _ in $(seq 60); do sacctmgr -n list cluster >/dev/null 2>&1 && break; sleep 0.5; done
  sacctmgr -i add cluster local >/dev/null 2>&1 || true
  slurmctld
  slurmd
  for _ in $(seq 120); do
    [ "$(sinfo -h -o %T 2>/dev/null)" = idle ] && { echo "export SLURM_CONF=$SLURM_CONF"; exit 0; }
    sleep 0.5
  done
  echo "the node did not become idle; see $dir/slurmctld.log and $dir/slurmd.log" >&2
  exit 1
  ;;
stop)
  dir=$(realpath -m "${2:?give the cluster directory}")
  for pidfile in slurmd.pid slurmctld.pid slurmdbd.pid db/mariadb.pid; do
    [ -f "$dir/$pidfile" ] && kill "$(cat "$dir/$pidfile")" 2>/dev/null || true
  done
  ;;
*)
  echo "usage: local_slurm_cluster.sh install|start DIR|stop DIR" >&2
  exit 2
  ;;
esac
