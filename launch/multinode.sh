#!/usr/bin/env bash
# Start training on THIS node of a multi-node run. Run it once on every node, with the same arguments and
# environment except NODE_RANK.
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node001 launch/multinode.sh yamls/phase1.yaml run_name=phase1 save_folder=/shared/runs/phase1
#
# Environment:
#   NNODES          number of nodes (default 1)
#   NODE_RANK       this node, 0..NNODES-1 (default 0)
#   MASTER_ADDR     host name or IP of node 0, reachable from every node (required when NNODES > 1)
#   MASTER_PORT     rendezvous port on node 0 (default: 29500 multi-node, a free port on one node)
#   NPROC_PER_NODE  processes (GPUs) per node (default: the GPUs visible to torch)
#   NODE_TMPDIR     where this launch makes its own scratch folder modernbert-$USER-<launch>-node<rank> (default:
#                   $TMPDIR, else /tmp); <launch> is the SLURM job id, or manual-<host>-<pid> for a manual launch.
#                   Nothing else there is touched: only that folder left by an earlier run of the same SLURM job
#                   (requeue), and manual-launch folders whose launcher process has ended on this host, are removed.
#   CLEAN_SHM       1 (default): remove this user's streaming segments in /dev/shm that no live process maps
#                   (the project's own cleaner, modernbert_train.data.dataset.clean_stale_streaming_shm); 0: skip
#   PYTHON          interpreter with modernbert_train installed (default: the repo's .venv, else python3)
#   DRY_RUN         1: print the commands instead of running them
set -euo pipefail

usage() { sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//' >&2; }
die() { echo "multinode.sh: $*" >&2; exit 2; }

[[ $# -ge 1 ]] || { usage; die "missing RECIPE.yaml"; }
[[ $1 != -h && $1 != --help ]] || { usage; exit 0; }

repo_dir=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
dry_run=${DRY_RUN:-0}
nnodes=${NNODES:-1}
node_rank=${NODE_RANK:-0}
[[ $nnodes =~ ^[1-9][0-9]*$ ]] || die "NNODES must be a positive integer, got '$nnodes'"
[[ $node_rank =~ ^[0-9]+$ ]] && (( node_rank < nnodes )) || die "NODE_RANK must be in 0..$((nnodes - 1)), got '$node_rank'"
if (( nnodes > 1 )) && [[ -z ${MASTER_ADDR:-} ]]; then
  die "MASTER_ADDR (host of node 0) is required when NNODES=$nnodes"
fi
if [[ -z ${PYTHON:-} ]]; then
  if [[ -x $repo_dir/.venv/bin/python ]]; then PYTHON=$repo_dir/.venv/bin/python; else PYTHON=python3; fi
fi

source "$repo_dir/launch/common.sh"

# A fresh scratch folder per launch becomes TMPDIR: streaming keeps its file locks (<prefix>_barrier_filelock,
# ...) there, and locks left by a killed run make the next one wait or fail. Each launch has its own, so a
# second launch on this host never touches the first one's.
user=$(id -un)
host=$(hostname -s 2>/dev/null || hostname)
scratch_base=${NODE_TMPDIR:-${TMPDIR:-/tmp}}
job_tag=${SLURM_JOB_ID:-manual-$host-$$}  # $$: this shell, alive as long as the launch
node_tmpdir=$scratch_base/modernbert-$user-$job_tag-node$node_rank
[[ ! -L $node_tmpdir ]] || die "$node_tmpdir is a symbolic link; refusing to use it as scratch"
# Provably stale scratch only: this name (an earlier incarnation of this SLURM job, which SLURM ended before
# requeueing) and manual launches on this host whose launcher process is gone.
remove=()
for stale in "$scratch_base/modernbert-$user-manual-$host-"*-node*; do
  [[ -d $stale && ! -L $stale ]] || continue
  pid=${stale#"$scratch_base/modernbert-$user-manual-$host-"}
  pid=${pid%%-node*}
  [[ $pid =~ ^[0-9]+$ ]] || continue
  if [[ $pid != "$$" ]] && ! kill -0 "$pid" 2>/dev/null; then remove+=("$stale"); fi
done
if [[ -n ${SLURM_JOB_ID:-} ]]; then remove+=("$node_tmpdir"); fi
# Through the project's deletion guard (modernbert_train/common/safety.py): never /, a home or the current directory.
if (( ${#remove[@]} )); then run "$PYTHON" -m modernbert_train.common.safety --remove "${remove[@]}"; fi
run mkdir -p "$node_tmpdir"
if [[ $dry_run == 1 ]]; then echo "export TMPDIR=$(quote "$node_tmpdir")"; fi
export TMPDIR=$node_tmpdir

# Streaming shared memory (/dev/shm/000000_locals, 000001_barrier, ...) left by a crashed or preempted run
# makes the next StreamingDataset attach to dead state. Only segments that no live process maps are removed
# (streaming's own cleaner also unlinks those of runs still alive on this host).
if [[ ${CLEAN_SHM:-1} == 1 && -d /dev/shm ]]; then
  run "$PYTHON" -c 'from modernbert_train.data.dataset import clean_stale_streaming_shm; clean_stale_streaming_shm()'
fi

launch_args=(launch "$@" --nnodes "$nnodes" --node-rank "$node_rank")
if [[ -n ${MASTER_ADDR:-} ]]; then launch_args+=(--master-addr "$MASTER_ADDR"); fi
if [[ -n ${MASTER_PORT:-} ]]; then launch_args+=(--master-port "$MASTER_PORT"); fi
if [[ -n ${NPROC_PER_NODE:-} ]]; then launch_args+=(--nproc "$NPROC_PER_NODE"); fi
if [[ $dry_run == 1 ]]; then launch_args+=(--dry-run); fi
echo "# node $node_rank of $nnodes, TMPDIR=$node_tmpdir" >&2
if [[ $dry_run == 1 ]]; then exec "$PYTHON" -m modernbert_train.cli.main "${launch_args[@]}"; fi

# The launcher runs as a child so that this launch's scratch folder is removed when it ends: normally, by an
# error, or stopped by SIGTERM/SIGINT/SIGHUP (SLURM's requeue, scancel, preemption, Ctrl-C), which are passed on
# to it. Only a SIGKILL of this shell leaves the folder; the next run of the same SLURM job removes it.
remove_scratch() {
  "$PYTHON" -m modernbert_train.common.safety --remove "$node_tmpdir" >/dev/null 2>&1 \
    || echo "multinode.sh: could not remove the scratch folder $node_tmpdir" >&2
}
"$PYTHON" -m modernbert_train.cli.main "${launch_args[@]}" &
launcher_pid=$!
trap remove_scratch EXIT
for sig in TERM INT HUP; do trap "kill -$sig $launcher_pid 2>/dev/null || true" "$sig"; done
# `wait` returns when a trapped signal arrives: keep waiting until the launcher has really ended.
status=0
while true; do
  wait "$launcher_pid" && status=0 || status=$?
  kill -0 "$launcher_pid" 2>/dev/null || break
done
exit "$status"
