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
#   NODE_TMPDIR     per-node scratch folder, emptied at start (default: $TMPDIR/modernbert-$USER-<job>-node<rank>)
#   CLEAN_SHM       1 (default): delete this user's stale mosaicml-streaming segments in /dev/shm; 0: leave them
#                   (set 0 when another streaming job of yours shares the node)
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

# A fresh per-node TMPDIR: streaming keeps its file locks (<prefix>_barrier_filelock, ...) there, and locks
# left by a killed run make the next one wait or fail.
job_tag=${SLURM_JOB_ID:-manual}
node_tmpdir=${NODE_TMPDIR:-${TMPDIR:-/tmp}/modernbert-$(id -un)-$job_tag-node$node_rank}
run rm -rf "$node_tmpdir"
run mkdir -p "$node_tmpdir"
if [[ $dry_run == 1 ]]; then echo "export TMPDIR=$(quote "$node_tmpdir")"; fi
export TMPDIR=$node_tmpdir

# Stale streaming shared memory (/dev/shm/000000_locals, 000001_barrier, ...) from a crashed or preempted
# run makes the next StreamingDataset attach to dead state; streaming's own cleaner stops at the first
# unused prefix, so remove every such segment this user owns.
if [[ ${CLEAN_SHM:-1} == 1 && -d /dev/shm ]]; then
  run find /dev/shm -maxdepth 1 -user "$(id -un)" -name '[0-9][0-9][0-9][0-9][0-9][0-9]_*' -delete
fi

launch_args=(launch "$@" --nnodes "$nnodes" --node-rank "$node_rank")
if [[ -n ${MASTER_ADDR:-} ]]; then launch_args+=(--master-addr "$MASTER_ADDR"); fi
if [[ -n ${MASTER_PORT:-} ]]; then launch_args+=(--master-port "$MASTER_PORT"); fi
if [[ -n ${NPROC_PER_NODE:-} ]]; then launch_args+=(--nproc "$NPROC_PER_NODE"); fi
if [[ $dry_run == 1 ]]; then launch_args+=(--dry-run); fi
echo "# node $node_rank of $nnodes, TMPDIR=$node_tmpdir" >&2
# exec: the launcher becomes this process, so SIGTERM from SLURM or Ctrl-C reaches it directly.
exec "$PYTHON" -m modernbert_train.cli.main "${launch_args[@]}"
