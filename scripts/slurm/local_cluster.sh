#!/usr/bin/env bash
# `make test-slurm`: a real one-node SLURM on 127.0.0.1 runs a 2-task job of
# the smoke config through scripts/slurm/launch.py, then one process resumes
# the job's run.
#
#   scripts/slurm/local_cluster.sh            # PY=.venv/bin/python DATA=data/kjv
#
# 1. Installs Debian's slurm-wlm and munge with apt-get when missing (root
#    only; otherwise says what it needs and exits 3; also 3 when the daemons
#    cannot start on this machine).
# 2. Starts munged, slurmctld and slurmd with their key, sockets, state,
#    spool and logs under a temporary directory (nothing in /etc is read or
#    changed): one node, this host at 127.0.0.1 with its CPU count,
#    select/cons_tres, proctrack/linuxproc and no cgroups (containers lack
#    them). A trap cancels the jobs and stops the daemons on any exit.
# 3. Submits the smoke config as 2 tasks on the node (2 processes x 4 fake CPU
#    devices, gloo collectives; the trainer derives jax.distributed from
#    srun's SLURM_* variables) for 4 steps with checkpoints at 2 and 4, on a
#    mesh that splits every weight over both processes (fsdp=8), with the
#    data in 2 shards (config.data.shards=2, one per process), and waits.
#    Checks: both tasks joined one cluster, step 4 holds both shards' data
#    positions, metrics.jsonl has steps 1..4.
# 4. One process (8 fake devices, the same mesh) on the job's workdir without
#    --config.data.shards=2 is refused in one line naming it: it would cut the
#    data into 1 shard, not the checkpoint's 2 (qtrain/train/data_state.py).
#    With it, one process resumes a copy of the workdir from step 2 (step 4
#    removed) and owns both shards, so it trains on the job's global batches:
#    its loss at steps 3 and 4 and its held-out loss at step 4 equal the
#    job's (float32 rounding only: another process count, same mesh).
#
# KEEP=1 keeps the temporary directory (logs, run) for a look.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
DATA=${DATA:-data/kjv}
t0=$SECONDS
say() { echo "test-slurm [$((SECONDS - t0))s]: $*"; }
fail() { echo "test-slurm: FAILED: $*" >&2; exit 1; }
# The machine cannot host the daemons (a container without what munged or
# slurmd need): not a failure of qtrain's launcher; exit 3 like a missing
# package, after saying why.
cannot() { echo "test-slurm: cannot run SLURM on this machine: $*" >&2; exit 3; }

# --- 1. the packages --------------------------------------------------------
missing=()
for cmd in sbatch srun sinfo scancel slurmctld slurmd munged; do
  command -v "$cmd" >/dev/null || missing+=("$cmd")
done
if ((${#missing[@]})); then
  if [[ $(id -u) != 0 ]] || ! command -v apt-get >/dev/null; then
    echo "test-slurm: needs ${missing[*]} (Debian packages slurm-wlm and munge); this is not" \
         "root with apt-get, so install them as root:" \
         "apt-get install -y --no-install-recommends slurm-wlm munge" >&2
    exit 3
  fi
  say "installing slurm-wlm and munge (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null ||
    { apt-get update -q >/dev/null && \
      apt-get install -y -q --no-install-recommends slurm-wlm munge >/dev/null; } ||
    { echo "test-slurm: apt-get could not install slurm-wlm and munge (see above)" >&2; exit 3; }
fi
[[ -x $PY ]] || fail "$PY is missing: run \`make install\` (or set PY)"
[[ -f $DATA/meta.json ]] || fail "$DATA/meta.json is missing: run \`make data\` first"

# --- 2. the cluster ---------------------------------------------------------
T=$(mktemp -d /tmp/qtrain-slurm.XXXXXX)
chmod 700 "$T"
export SLURM_CONF=$T/slurm.conf
stop() {
  set +e
  if [[ -f $T/slurmctld.pid ]]; then
    scancel --full --signal=KILL --user="$(id -un)" 2>/dev/null
    scancel --user="$(id -un)" 2>/dev/null
  fi
  for d in slurmd slurmctld; do  # Their own pid files: no other daemon is touched.
    [[ -f $T/$d.pid ]] && kill "$(cat "$T/$d.pid")" 2>/dev/null
  done
  [[ -S $T/munge.sock ]] && munged --stop --socket="$T/munge.sock" >/dev/null 2>&1
  if [[ ${KEEP:-0} == 1 ]]; then echo "test-slurm: kept $T"; else rm -rf "$T"; fi
}
trap stop EXIT
trap 'exit 130' INT TERM

head -c 1024 /dev/urandom >"$T/munge.key"
chmod 400 "$T/munge.key"
munged --force --socket="$T/munge.sock" --key-file="$T/munge.key" \
  --pid-file="$T/munged.pid" --log-file="$T/munged.log" --seed-file="$T/munged.seed" ||
  cannot "munged did not start: $(tail -3 "$T/munged.log" 2>/dev/null)"

# Two distinct free ports (both sockets open at once), for slurmctld and slurmd.
read -r CTLD_PORT SLURMD_PORT < <("$PY" -c '
import socket
s = [socket.socket() for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*(x.getsockname()[1] for x in s))')
NODE=$(hostname -s)
mkdir -p "$T/state" "$T/spool"
cat >"$SLURM_CONF" <<EOF
ClusterName=qtrain
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=$(id -un)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$T/munge.sock
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
# The trainer's coordinator port is 61440 + job id mod 4096: a random first id
# keeps two of these clusters on one machine from sharing it.
FirstJobId=$((RANDOM % 4096 + 1))
StateSaveLocation=$T/state
SlurmdSpoolDir=$T/spool
SlurmctldPidFile=$T/slurmctld.pid
SlurmdPidFile=$T/slurmd.pid
SlurmctldLogFile=$T/slurmctld.log
SlurmdLogFile=$T/slurmd.log
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$(nproc) State=UNKNOWN
PartitionName=local Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF
slurmctld -f "$SLURM_CONF" -i || cannot "slurmctld did not start: $(tail -5 "$T/slurmctld.log")"
slurmd -f "$SLURM_CONF" -N "$NODE" || cannot "slurmd did not start: $(tail -5 "$T/slurmd.log")"
for _ in $(seq 60); do
  state=$(sinfo -h -n "$NODE" -o %T 2>/dev/null || true)
  [[ $state == idle ]] && break
  sleep 0.5
done
[[ $state == idle ]] || cannot "node $NODE is '${state}', not idle: $(tail -5 "$T/slurmd.log")"
say "SLURM up: node $NODE, $(nproc) CPUs"

# --- 3. the 2-task job ------------------------------------------------------
RUN=$T/run
# A CI runner's own cluster variables must not leak into the job or the checks.
for v in $(compgen -e | grep -E '^(SLURM_|JAX_COORDINATOR)' | grep -v '^SLURM_CONF$' || true); do
  unset "$v"
done
"$PY" scripts/slurm/launch.py --config=configs/default.py:smoke --workdir="$RUN" \
  --tasks_per_node=2 --cpu_devices=4 --time=10 --wait \
  --config.data.dir="$(realpath "$DATA")" --config.train.steps=4 \
  --config.train.checkpoint_every=2 --config.train.eval_every=4 \
  --config.train.sample_tokens=0 --config.mesh.data=1 --config.mesh.fsdp=8 \
  --config.data.shards=2 || fail "the job failed: $(tail -30 "$RUN"/slurm/slurm-*.out)"
LOG=$(ls "$RUN"/slurm/slurm-*.out)
say "2-task job done"
grep -q "distributed: process 0 of 2 from the SLURM job step, coordinator $NODE:" "$LOG" ||
  fail "no 2-process start-up in $LOG: $(head -20 "$LOG")"
for i in 0 1; do
  [[ -f $RUN/checkpoints/4/data/process_$i-of-2.json ]] ||
    fail "step 4 lacks shard $i's data position: $(ls -R "$RUN/checkpoints" | head -20)"
done
"$PY" - "$RUN" <<'EOF' || fail "metrics.jsonl"
import json, sys
rows = [json.loads(l) for l in open(f"{sys.argv[1]}/metrics.jsonl")]
steps = [r["step"] for r in rows if "loss" in r]
assert steps == [1, 2, 3, 4], steps  # One writer (process 0), one row per step.
EOF

# --- 4. one process resumes the job ------------------------------------------
one() {  # One process with 8 fake devices, the job's config and mesh.
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu "$PY" -m qtrain.train \
    --config=configs/default.py:smoke --config.data.dir="$(realpath "$DATA")" \
    --config.train.sample_tokens=0 --config.train.steps=4 --config.train.checkpoint_every=2 \
    --config.train.eval_every=4 --config.mesh.data=1 --config.mesh.fsdp=8 "$@"
}
if one --workdir="$RUN" >"$T/same.log" 2>&1; then
  fail "one process resumed 2 shards' data positions as 1 shard: $(tail -5 "$T/same.log")"
fi
grep -q "saved by 2 processes or shards .*config.data.shards=0 (1 shards).*--config.data.shards=2" \
  "$T/same.log" || fail "one process on the job's workdir: $(tail -5 "$T/same.log")"
say "one process without --config.data.shards=2 refused, naming it"
# A copy without step 4: one process resumes step 2 and trains steps 3 and 4.
cp -r "$RUN" "$T/one"
rm -rf "$T/one/checkpoints/4"
one --workdir="$T/one" --config.data.shards=2 >"$T/one.log" 2>&1 ||
  fail "one process: $(tail -20 "$T/one.log")"
grep -q "resumed from checkpoint step 2" "$T/one.log" ||
  fail "one process did not resume step 2: $(head -20 "$T/one.log")"
"$PY" - "$RUN" "$T/one" <<'EOF' || fail "one process's losses differ from the job's"
import json, sys
def metrics(workdir, key):
  return {r["step"]: r[key] for r in map(json.loads, open(f"{workdir}/metrics.jsonl")) if key in r}
job, one = sys.argv[1:]
# The same global batches (both shards, in shard order) and the same mesh
# (fsdp=8) from the same step-2 state; only the collectives differ (gloo
# between 2 processes vs XLA's in one) and may sum in another order: float32
# rounding. test_multihost sees <= 1 ulp (1.2e-7 relative) after 6 steps; 1e-6
# leaves 8x. A wrong shard, batch or position moves the loss by > 1e-3.
for key, steps in (("loss", (3, 4)), ("eval_loss", (4,))):
  a, b = metrics(job, key), metrics(one, key)
  for s in steps:
    assert abs(a[s] - b[s]) <= 1e-6 * abs(a[s]), (key, s, a[s], b[s])
    print(f"{key} at step {s}: job {a[s]:.7f}, one process from step 2 {b[s]:.7f}")
EOF
say "passed"
