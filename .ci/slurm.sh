# A real single-node Slurm for the tests (tests/test_slurm.py). Sourced by .ci/run, with
# `set -euo pipefail` active, as root on Debian 12 (no systemd, no cgroups); also runnable by
# hand: `. .ci/slurm.sh`. Idempotent: a second run on the same machine reuses the daemons.
#
# Exports SLURM_CONF (the config lives in a scratch dir, not /etc/slurm) so that sbatch, squeue,
# scancel and sinfo in the tests find this cluster.
#
# The node declares at least 8 CPUs (SlurmdParameters=config_overrides lets slurmd accept more
# than the machine has): the tests run a 4-task worker array beside a driver on a 2-core CI
# machine, and workers spend most of their time waiting on the store, so they may share cores.

EVOMERGE_SLURM_DIR="${EVOMERGE_SLURM_DIR:-/tmp/evomerge-slurm}"
export SLURM_CONF="${EVOMERGE_SLURM_DIR}/slurm.conf"

_slurm_alive() {  # _slurm_alive PIDFILE: the daemon named in PIDFILE is running
  [[ -s "$1" ]] && kill -0 "$(cat "$1")" 2>/dev/null
}

_slurm_start() {
  local dir=$EVOMERGE_SLURM_DIR host cpus mem
  if ! command -v slurmctld >/dev/null || ! command -v slurmd >/dev/null \
      || ! command -v munged >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
      slurmctld slurmd munge >/dev/null
  fi

  # munge: the package creates /etc/munge/munge.key; munged refuses to run as root.
  if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    install -d -o munge -g munge -m 0755 /run/munge
    runuser -u munge -- /usr/sbin/munged
    local i
    for i in $(seq 50); do
      munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
      sleep 0.1
    done
  fi

  if _slurm_alive "$dir/slurmctld.pid" && _slurm_alive "$dir/slurmd.pid"; then
    echo "slurm: reusing the running daemons ($SLURM_CONF)"
  else
    host=$(hostname -s)
    cpus=$(nproc)
    if (( cpus < 8 )); then cpus=8; fi
    mem=$(( $(awk '/^MemTotal/ {print int($2 / 1024)}' /proc/meminfo) - 1024 ))
    mkdir -p "$dir/state" "$dir/spool"
    cat >"$SLURM_CONF" <<EOF
# Single-node test cluster written by .ci/slurm.sh (no cgroups, no accounting).
ClusterName=evomerge-ci
SlurmctldHost=${host}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SlurmdParameters=config_overrides
MailProg=/bin/true
ReturnToService=2
MinJobAge=600
KillWait=10
StateSaveLocation=${dir}/state
SlurmdSpoolDir=${dir}/spool
SlurmctldPidFile=${dir}/slurmctld.pid
SlurmdPidFile=${dir}/slurmd.pid
SlurmctldLogFile=${dir}/slurmctld.log
SlurmdLogFile=${dir}/slurmd.log
NodeName=${host} CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
    # A half-dead pair (one daemon gone) is restarted whole.
    local pidfile
    for pidfile in "$dir/slurmd.pid" "$dir/slurmctld.pid"; do
      if _slurm_alive "$pidfile"; then
        kill "$(cat "$pidfile")"
        sleep 1
      fi
    done
    /usr/sbin/slurmctld -f "$SLURM_CONF"
    /usr/sbin/slurmd -f "$SLURM_CONF"
  fi

  local state="" i
  for i in $(seq 100); do
    state=$(sinfo -h -o %t 2>/dev/null || true)
    [[ "$state" == idle* || "$state" == mix* || "$state" == alloc* ]] && break
    sleep 0.2
  done
  if [[ "$state" != idle* && "$state" != mix* && "$state" != alloc* ]]; then
    echo "slurm: the node did not come up (sinfo state '${state}'); see ${dir}/*.log" >&2
    return 1
  fi
  echo "slurm: node $(hostname -s) ${state}, SLURM_CONF=${SLURM_CONF}"
}

_slurm_start
