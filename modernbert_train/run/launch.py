"""The composer launcher command that starts training on one node of an N-GPU x M-node run.

composer's launcher (composer/cli/launcher.py, 0.32.1) starts `nproc` processes per node and sets RANK,
WORLD_SIZE, LOCAL_RANK, NODE_RANK, MASTER_ADDR and MASTER_PORT for each; every node runs the same command with
its own `--node_rank`. The flag spellings below (`-n`, `--world_size`, `--node_rank`, `--master_addr`,
`--master_port`, `-m`) are the ones that file's argparse declares.
"""
from __future__ import annotations

import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Sequence

from modernbert_train.common.errors import UserError

TRAIN_MODULE = "modernbert_train.train"
LAUNCHER = "composer"
# torch.distributed's customary rendezvous port; every node of a multi-node run must agree on it.
DEFAULT_MASTER_PORT = 29500


def visible_gpu_count() -> int:
    """GPUs this process can see (CUDA_VISIBLE_DEVICES respected); 0 without CUDA."""
    import torch

    return torch.cuda.device_count()


def default_nproc() -> int:
    """One process per visible GPU, or a single CPU process."""
    return max(1, visible_gpu_count())


def _check_override(override: str) -> None:
    key, sep, _ = override.partition("=")
    if not sep or not key or override.startswith("-"):
        raise UserError(f"override {override!r} is not KEY=VALUE (for example max_duration=200ba)")


def launcher_command(recipe: str | os.PathLike, overrides: Sequence[str] = (), *, nproc: int | None = None,
                     nnodes: int = 1, node_rank: int = 0, master_addr: str | None = None,
                     master_port: int | None = None) -> list[str]:
    """argv of `composer ... -m modernbert_train.train RECIPE overrides...` for this node.

    Single node: only `-n` (composer picks 127.0.0.1 and a free port) unless an address or port is given.
    Several nodes: the world size is nnodes * nproc (the same number of processes on every node), and the
    address of node 0 is required; the port defaults to DEFAULT_MASTER_PORT.
    """
    recipe_path = Path(recipe)
    if not recipe_path.is_file():
        raise UserError(f"{recipe}: recipe file not found")
    for override in overrides:
        _check_override(override)
    if nproc is None:
        nproc = default_nproc()
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if nnodes < 1:
        raise UserError(f"--nnodes must be at least 1, got {nnodes}")
    if not 0 <= node_rank < nnodes:
        raise UserError(f"--node-rank must be in 0..{nnodes - 1} for --nnodes {nnodes}, got {node_rank}")
    if master_port is not None and not 1 <= master_port <= 65535:
        raise UserError(f"--master-port must be in 1..65535, got {master_port}")

    command = [LAUNCHER, "-n", str(nproc)]
    if nnodes > 1:
        if not master_addr:
            raise UserError(f"--master-addr (the host name or IP of node 0) is required with --nnodes {nnodes}")
        command += ["--world_size", str(nnodes * nproc), "--node_rank", str(node_rank),
                    "--master_addr", master_addr, "--master_port", str(master_port or DEFAULT_MASTER_PORT)]
    else:
        if master_addr:
            command += ["--master_addr", master_addr]
        if master_port is not None:
            command += ["--master_port", str(master_port)]
    command += ["-m", TRAIN_MODULE, str(recipe), *overrides]
    return command


def format_command(command: Sequence[str]) -> str:
    """The command as one shell line, quoted so it can be pasted back into a shell."""
    return shlex.join(command)


def resolve_launcher() -> str:
    """Path of the `composer` executable: on PATH, else beside this interpreter (an unactivated venv)."""
    found = shutil.which(LAUNCHER)
    if found:
        return found
    beside = Path(sys.executable).with_name(LAUNCHER)
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise UserError(f"the {LAUNCHER!r} launcher is on neither PATH nor beside {sys.executable}; "
                    "install composer==0.32.1 into this environment")


def exec_launcher(command: Sequence[str]) -> None:
    """Replace this process with the launcher, so signals (SLURM preemption, Ctrl-C) reach it directly."""
    executable = resolve_launcher()
    # multinode.sh runs this as a background job, which a shell starts with SIGINT ignored, and an ignored signal
    # stays ignored across exec: composer's launcher would never stop its ranks on Ctrl-C.
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(executable, list(command))
