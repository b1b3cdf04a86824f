#!/usr/bin/env bash
# A single-node Slurm cluster on this Debian machine, from Debian's packages, for trying and testing the slurm
# profile: munged, MariaDB + slurmdbd (so that `sacct`, which the executor plugin asks for job states, has its
# accounting database), slurmctld and slurmd, with a `cpu` partition (the default) and a `gpu` partition.
#
#   bash workflow/profiles/slurm/cluster.sh up       install what is missing, write the configuration, start the
#                                                    daemons that are not running, check that `sbatch` is accepted
#   bash workflow/profiles/slurm/cluster.sh status   which daemons run, the partitions, the queue
#   bash workflow/profiles/slurm/cluster.sh down     stop the daemons (packages, configuration and accounting stay)
#
# `up` is idempotent: a daemon already running is left alone unless its configuration changed. Every step that
# fails stops the script with a message naming the daemon and the end of its log. It needs root (packages,
# daemons, /etc/slurm) and no systemd: the daemons are started directly, so it works in a container too.
# It refuses to overwrite a Slurm or slurmdbd configuration it did not write: this is for a machine of your own,
# never for a node of a real cluster.
set -euo pipefail

MARK="# written by arq's workflow/profiles/slurm/cluster.sh"
CLUSTER=arq
ACCOUNT=arq
ETC=/etc/slurm
LOGS=/var/log/slurm
STATE=/var/lib/slurm
PACKAGES=(munge slurmctld slurmd slurmdbd slurm-client mariadb-server)
WAIT_S=${ARQ_SLURM_WAIT_S:-60}

die() { echo "cluster.sh: $*" >&2; exit 1; }
say() { echo "cluster.sh: $*"; }

log_tail() { [[ -f $1 ]] && { echo "--- last lines of $1:"; tail -n 15 "$1"; } >&2 || true; }

# running PIDFILE: is the process in PIDFILE alive?
running() { [[ -f $1 ]] && kill -0 "$(cat "$1" 2>/dev/null)" 2>/dev/null; }

# wait_until NAME LOG CMD...: poll CMD until it succeeds, or fail naming the daemon NAME with its LOG
wait_until() {
  local name=$1 log=$2; shift 2
  local t0=$SECONDS
  until "$@" >/dev/null 2>&1; do
    (( SECONDS - t0 < WAIT_S )) || { log_tail "$log"; die "$name did not start within ${WAIT_S} s (check: $*)"; }
    sleep 1
  done
}

# write_conf FILE OWNER MODE: stdin to FILE if it differs; exit status 0 when it changed. A file that exists
# without our mark is somebody else's configuration: refuse.
write_conf() {
  local file=$1 owner=$2 mode=$3 tmp
  tmp=$(mktemp)
  { echo "$MARK"; cat; } >"$tmp"
  if [[ -f $file ]] && ! grep -qxF "$MARK" "$file"; then
    rm -f "$tmp"; die "$file exists and was not written by this script: not touching another Slurm set-up"
  fi
  if [[ -f $file ]] && cmp -s "$tmp" "$file"; then rm -f "$tmp"; return 1; fi
  install -o "${owner%:*}" -g "${owner#*:}" -m "$mode" "$tmp" "$file"; rm -f "$tmp"
  say "wrote $file"
}

install_packages() {
  [[ -f /etc/debian_version ]] || die "this script uses Debian's packages; /etc/debian_version is missing"
  local missing=()
  for p in "${PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq || die "apt-get update failed (no package mirror?)"
    # policy-rc.d-less containers: the packages' own service starts are not needed (the daemons start below)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null \
      || die "apt-get install ${missing[*]} failed"
  fi
}

node_line() {
  # slurmd -C reads this machine's sockets, cores, threads and memory, which slurmd checks the configuration against
  local hw gpus
  hw=$(slurmd -C | head -n 1) || die "slurmd -C could not read this machine's hardware"
  gpus=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU ' || true)
  if ((gpus > 0)); then echo "$hw Gres=gpu:$gpus State=UNKNOWN"; else echo "$hw State=UNKNOWN"; fi
}

CHANGED=()  # daemons whose configuration write_configs changed

write_configs() {
  local node gres_types=""
  node=$(node_line)
  if [[ $node == *Gres=* ]]; then gres_types="GresTypes=gpu"; fi
  local host=${node#NodeName=}; host=${host%% *}
  mkdir -p "$ETC" "$LOGS" "$STATE/slurmctld" "$STATE/slurmd"
  chown slurm:slurm "$LOGS" "$STATE/slurmctld"
  if write_conf "$ETC/slurm.conf" root:root 644 <<EOF; then CHANGED+=(slurmctld slurmd); fi
ClusterName=$CLUSTER
SlurmctldHost=$host
SlurmUser=slurm
AuthType=auth/munge
# no cgroups: works in containers; jobs are tracked by their process tree
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
$gres_types
JobAcctGatherType=jobacct_gather/linux
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
ReturnToService=2
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
StateSaveLocation=$STATE/slurmctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
$node
PartitionName=cpu Nodes=ALL Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=ALL MaxTime=INFINITE State=UP
EOF
  if [[ $node == *Gres=gpu:* ]]; then
    local n=${node##*Gres=gpu:}; n=${n%% *}
    if write_conf "$ETC/gres.conf" root:root 644 <<EOF; then CHANGED+=(slurmctld slurmd); fi
Name=gpu File=/dev/nvidia[0-$((n - 1))]
EOF
  fi
  if write_conf "$ETC/slurmdbd.conf" slurm:slurm 600 <<EOF; then CHANGED+=(slurmdbd); fi
AuthType=auth/munge
DbdHost=localhost
SlurmUser=slurm
PidFile=/run/slurmdbd.pid
LogFile=$LOGS/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StorageLoc=slurm_acct_db
EOF
}

stop_pid() {  # stop_pid NAME PIDFILE
  local name=$1 pidfile=$2 t0=$SECONDS
  running "$pidfile" || return 0
  kill "$(cat "$pidfile")"
  while running "$pidfile"; do
    (( SECONDS - t0 < WAIT_S )) || die "$name (pid $(cat "$pidfile")) did not stop within ${WAIT_S} s"
    sleep 1
  done
  say "stopped $name"
}

start_munge() {
  mkdir -p /run/munge && chown munge:munge /run/munge
  [[ -s /etc/munge/munge.key ]] || { mungekey --create && chown munge:munge /etc/munge/munge.key; }
  if ! running /run/munge/munged.pid; then
    runuser -u munge -- /usr/sbin/munged || { log_tail /var/log/munge/munged.log; die "munged did not start"; }
  fi
  wait_until munged /var/log/munge/munged.log bash -c 'munge -n | unmunge'
}

start_mariadb() {
  mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
  if ! mysqladmin ping >/dev/null 2>&1; then
    (setsid mysqld_safe --user=mysql >/dev/null 2>&1 &)
  fi
  wait_until mariadb /var/log/mysql/error.log mysqladmin ping
  # slurmdbd logs in over the local socket as the Unix user slurm: no password to keep anywhere
  mysql -u root <<'EOF' || die "mariadb: could not create slurmdbd's database and user"
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED VIA unix_socket;
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
EOF
}

start_daemon() {  # start_daemon NAME PIDFILE LOG CHECK...
  local name=$1 pidfile=$2 log=$3; shift 3
  if ! running "$pidfile"; then
    "/usr/sbin/$name" || { log_tail "$log"; die "$name did not start"; }
  fi
  wait_until "$name" "$log" "$@"
}

up() {
  [[ $(id -u) == 0 ]] || die "needs root (packages, daemons, /etc/slurm); run it with sudo"
  install_packages
  write_configs
  for d in slurmd slurmctld slurmdbd; do
    if [[ " ${CHANGED[*]} " == *" $d "* ]]; then stop_pid "$d" "/run/$d.pid"; fi
  done
  start_munge
  start_mariadb
  start_daemon slurmdbd /run/slurmdbd.pid "$LOGS/slurmdbd.log" sacctmgr -n list cluster
  # the cluster, an account and this user must exist in the database before slurmctld registers
  sacctmgr -n list cluster format=cluster%30 | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
  sacctmgr -n list account format=account%30 | grep -qw "$ACCOUNT" || sacctmgr -i add account "$ACCOUNT" \
    cluster="$CLUSTER" description="arq test cluster" >/dev/null
  # (slurmdbd makes root a user of its own account `root`: the user joins ours and takes it as the default)
  local me; me=$(id -un)
  if [[ -z $(sacctmgr -n list assoc user="$me" account="$ACCOUNT" format=user%30) ]]; then
    sacctmgr -i add user "$me" account="$ACCOUNT" >/dev/null
  fi
  sacctmgr -i modify user "$me" set defaultaccount="$ACCOUNT" >/dev/null || true
  start_daemon slurmctld /run/slurmctld.pid "$LOGS/slurmctld.log" scontrol ping
  start_daemon slurmd /run/slurmd.pid "$LOGS/slurmd.log" bash -c 'sinfo -h -o %T | grep -qE "idle|mix|alloc"'
  # a node that was down when slurmctld last saw it comes back
  if sinfo -h -o %T | grep -qE "down|drain"; then scontrol update nodename=ALL state=resume || true; fi
  local out
  out=$(sbatch --parsable --wait -p cpu -t 1 -o /dev/null --wrap true 2>&1) \
    || { log_tail "$LOGS/slurmctld.log"; die "sbatch was refused or its test job failed: $out"; }
  say "up: cluster '$CLUSTER', account '$ACCOUNT'; a test job ($out) ran; partitions:"
  sinfo -o '%P %a %D %c %m %G %T'
}

status() {
  for d in munged slurmdbd slurmctld slurmd; do
    local pidfile=/run/$d.pid; [[ $d == munged ]] && pidfile=/run/munge/munged.pid
    if running "$pidfile"; then echo "$d: running (pid $(cat "$pidfile"))"; else echo "$d: not running"; fi
  done
  if mysqladmin ping >/dev/null 2>&1; then echo "mariadb: running"; else echo "mariadb: not running"; fi
  if running /run/slurmctld.pid; then sinfo -o '%P %a %D %c %m %G %T'; squeue; fi
}

down() {
  [[ $(id -u) == 0 ]] || die "needs root; run it with sudo"
  running /run/slurmctld.pid && { scancel --user="$(id -un)" 2>/dev/null || true; }
  stop_pid slurmd /run/slurmd.pid
  stop_pid slurmctld /run/slurmctld.pid
  stop_pid slurmdbd /run/slurmdbd.pid
  if mysqladmin ping >/dev/null 2>&1; then mysqladmin shutdown && say "stopped mariadb"; fi
  stop_pid munged /run/munge/munged.pid
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  *) die "usage: $0 up | status | down" ;;
esac
