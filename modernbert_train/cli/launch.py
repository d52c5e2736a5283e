"""`modernbert-train launch RECIPE.yaml [--nproc N] [--nnodes M ...] [--dry-run] [KEY=VALUE ...]`."""
from __future__ import annotations

import argparse

EPILOG = """Prints the composer launcher command for this node, then replaces itself with it (unless --dry-run).
Multi-node: run the same command on every node, changing only --node-rank (launch/multinode.sh does that;
launch/slurm_phase.sbatch does it under SLURM).

examples:
  modernbert-train launch yamls/phase1.yaml --nproc 8 run_name=phase1 save_folder=runs/phase1
    -> composer -n 8 -m modernbert_train.train yamls/phase1.yaml run_name=phase1 save_folder=runs/phase1
  modernbert-train launch yamls/phase1.yaml --nproc 8 --nnodes 4 --node-rank 0 --master-addr node001 --dry-run"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("recipe", metavar="RECIPE.yaml", help="training recipe")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="recipe overrides (omegaconf dotlist)")
    parser.add_argument("--nproc", type=int, default=None, metavar="N",
                        help="processes on this node (default: visible GPUs, or 1 without CUDA)")
    parser.add_argument("--nnodes", type=int, default=1, metavar="M", help="number of nodes (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, metavar="R", help="this node's rank, 0..M-1")
    parser.add_argument("--master-addr", default=None, metavar="A",
                        help="host name or IP of node 0 (required with --nnodes > 1)")
    parser.add_argument("--master-port", type=int, default=None, metavar="P",
                        help="rendezvous port on node 0 (default: 29500 multi-node, a free port single-node)")
    parser.add_argument("--dry-run", action="store_true", help="print the command, do not run it")


def run(args: argparse.Namespace) -> int:
    from modernbert_train.run.launch import exec_launcher, format_command, launcher_command

    command = launcher_command(args.recipe, args.overrides, nproc=args.nproc, nnodes=args.nnodes,
                               node_rank=args.node_rank, master_addr=args.master_addr,
                               master_port=args.master_port)
    print(format_command(command), flush=True)
    if args.dry_run:
        return 0
    exec_launcher(command)
    return 0  # not reached: exec replaced this process
