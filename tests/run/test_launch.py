"""`modernbert-train launch` and the scripts in launch/: exact composer commands, real exec, fake SLURM."""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from modernbert_train.cli.main import main as cli_main
from modernbert_train.common.errors import UserError
from modernbert_train.run.launch import launcher_command

REPO = Path(__file__).resolve().parents[2]
LAUNCH_DIR = REPO / "launch"
SBATCH = LAUNCH_DIR / "slurm_phase.sbatch"
MULTINODE = LAUNCH_DIR / "multinode.sh"
NODES = ("gpu-a17", "gpu-a18", "gpu-b02", "gpu-b03")
OVERRIDES = ("run_name=phase1", "save_folder=/shared/runs/phase1")
CLEANER = "from modernbert_train.data.dataset import clean_stale_streaming_shm; clean_stale_streaming_shm()"


@pytest.fixture
def recipe_cwd(tmp_path, monkeypatch) -> Path:
    """A working directory holding yamls/phase1.yaml, so commands carry the short relative path."""
    (tmp_path / "yamls").mkdir()
    (tmp_path / "yamls" / "phase1.yaml").write_text("run_name: phase1\n")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _write_executable(path: Path, body: str) -> Path:
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.fixture
def fake_bin(tmp_path) -> Path:
    """scontrol answering `show hostnames` and logging `requeue`; srun starting the node task locally as node 0;
    composer logging its argv and TMPDIR, then running until SIGTERM."""
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    _write_executable(bin_dir / "scontrol", f"""\
        if [[ "$1 $2" == "show hostnames" ]]; then printf '%s\\n' {' '.join(NODES)}; exit 0; fi
        if [[ $1 == requeue ]]; then echo "requeue $2" >> "$FAKE_LOG"; exit 0; fi
        exit 1
        """)
    _write_executable(bin_dir / "srun", """\
        echo "srun $*" >> "$FAKE_LOG"
        while [[ $1 == --* ]]; do shift; done
        SLURM_NODEID=0 SLURM_PROCID=0 exec "$@"
        """)
    _write_executable(bin_dir / "composer", """\
        echo "composer $*" >> "$FAKE_LOG"
        echo "tmpdir $TMPDIR $(ls -A "$TMPDIR" | wc -l)" >> "$FAKE_LOG"
        trap 'echo "composer got TERM" >> "$FAKE_LOG"; exit 143' TERM
        while true; do sleep 0.05; done
        """)
    return bin_dir


def _slurm_env(tmp_path: Path, node_id: int, fake_bin: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update({
        "PATH": f"{fake_bin}:{env['PATH']}", "MODERNBERT_REPO": str(REPO), "PYTHON": sys.executable,
        "SLURM_JOB_ID": "4242", "SLURM_JOB_NODELIST": "gpu-a[17-18],gpu-b[02-03]", "SLURM_NNODES": "4",
        "SLURM_NODEID": str(node_id), "SLURM_PROCID": str(node_id), "SLURM_GPUS_ON_NODE": "8",
        "SLURM_CPUS_PER_TASK": "64", "SLURM_SUBMIT_DIR": str(tmp_path), "TMPDIR": str(tmp_path / "tmp"),
        "FAKE_LOG": str(tmp_path / "fake.log"),
        # Never touch the shared /dev/shm of this machine from a test; DRY_RUN tests keep the default.
        "CLEAN_SHM": "0",
    })
    env.pop("DRY_RUN", None)
    return env


# ------------------------------------------------------------------------------------ launch --dry-run

def test_dry_run_one_node_eight_gpus(recipe_cwd, capsys):
    assert cli_main(["launch", "yamls/phase1.yaml", "--nproc", "8", "--dry-run", *OVERRIDES]) == 0
    assert capsys.readouterr().out == (
        "composer -n 8 -m modernbert_train.train yamls/phase1.yaml "
        "run_name=phase1 save_folder=/shared/runs/phase1\n")


@pytest.mark.parametrize("node_rank", [0, 3])
def test_dry_run_four_nodes_eight_gpus(recipe_cwd, capsys, node_rank):
    # Overrides before and after the options: both orders must work.
    argv = ["launch", "yamls/phase1.yaml", OVERRIDES[0], "--nproc", "8", "--nnodes", "4", "--node-rank",
            str(node_rank), "--master-addr", "gpu-a17", "--master-port", "29400", "--dry-run", OVERRIDES[1]]
    assert cli_main(argv) == 0
    assert capsys.readouterr().out == (
        f"composer -n 8 --world_size 32 --node_rank {node_rank} --master_addr gpu-a17 --master_port 29400 "
        "-m modernbert_train.train yamls/phase1.yaml run_name=phase1 save_folder=/shared/runs/phase1\n")


def test_commands_parse_with_the_installed_composer_launcher(recipe_cwd):
    from composer.cli.launcher import _get_parser

    multi = launcher_command("yamls/phase1.yaml", OVERRIDES, nproc=8, nnodes=4, node_rank=3, master_addr="gpu-a17")
    args = _get_parser().parse_args(multi[1:])
    assert (args.nproc, args.world_size, args.node_rank, args.master_addr, args.master_port) == \
        (8, 32, 3, "gpu-a17", 29500)
    assert args.module_mode and not args.command_mode
    assert args.training_script == "modernbert_train.train"
    assert args.training_script_args == ["yamls/phase1.yaml", *OVERRIDES]

    single = launcher_command("yamls/phase1.yaml", ["max_duration=200ba"], nproc=2)
    args = _get_parser().parse_args(single[1:])
    assert (args.nproc, args.world_size, args.node_rank, args.master_addr) == (2, None, None, None)
    assert args.training_script_args == ["yamls/phase1.yaml", "max_duration=200ba"]


def test_nproc_defaults_to_one_without_gpus(recipe_cwd):
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    result = subprocess.run([sys.executable, "-m", "modernbert_train.cli.main", "launch", "yamls/phase1.yaml",
                             "--dry-run"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "composer -n 1 -m modernbert_train.train yamls/phase1.yaml\n"


@pytest.mark.parametrize("kwargs, message", [
    (dict(recipe="yamls/nope.yaml"), r"yamls/nope\.yaml: recipe file not found"),
    (dict(nproc=0), r"--nproc must be at least 1, got 0"),
    (dict(nproc=8, nnodes=4, node_rank=4, master_addr="h"), r"--node-rank must be in 0\.\.3 for --nnodes 4, got 4"),
    (dict(nproc=8, nnodes=4, node_rank=1), r"--master-addr .* is required with --nnodes 4"),
    (dict(nproc=8, master_port=70000), r"--master-port must be in 1\.\.65535"),
    (dict(nproc=8, overrides=["phase2.yaml"]), r"override 'phase2\.yaml' is not KEY=VALUE"),
])
def test_bad_launch_arguments_are_user_errors(recipe_cwd, kwargs, message):
    recipe = kwargs.pop("recipe", "yamls/phase1.yaml")
    overrides = kwargs.pop("overrides", ())
    with pytest.raises(UserError, match=message):
        launcher_command(recipe, overrides, **kwargs)


def test_cli_bad_input_exits_2_with_one_line(recipe_cwd, capsys):
    assert cli_main(["launch", "yamls/phase1.yaml", "--nproc", "8", "--nnodes", "2", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err == "error: --master-addr (the host name or IP of node 0) is required with --nnodes 2\n"


def test_launch_execs_composer_with_the_printed_argv(recipe_cwd, tmp_path, fake_bin):
    """Without --dry-run the CLI replaces itself with `composer` from PATH, argv exactly as printed."""
    _write_executable(fake_bin / "composer", 'echo "argv: $*"; echo "ppid-check: $$"\n')
    env = dict(os.environ, PATH=f"{fake_bin}:{os.environ['PATH']}")
    proc = subprocess.Popen([sys.executable, "-m", "modernbert_train.cli.main", "launch", "yamls/phase1.yaml",
                             "--nproc", "8", *OVERRIDES], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    printed, argv_line, pid_line = out.splitlines()
    assert printed == "composer -n 8 -m modernbert_train.train yamls/phase1.yaml " + " ".join(OVERRIDES)
    assert argv_line == "argv: " + printed.removeprefix("composer ")
    assert pid_line == f"ppid-check: {proc.pid}"  # exec, not a child process: signals reach the launcher


@pytest.mark.slow
def test_real_composer_launcher_starts_every_rank_with_recipe_args(recipe_cwd, tmp_path):
    """The installed composer runs our command shape: 2 processes, each given the recipe and overrides."""
    probe_dir = tmp_path / "probe"
    probe_dir.mkdir()
    (probe_dir / "rank_probe.py").write_text(textwrap.dedent("""\
        import json, os, sys
        with open(f"rank{os.environ['RANK']}.json", "w") as f:
            json.dump({"argv": sys.argv[1:], "world": os.environ["WORLD_SIZE"],
                       "local_rank": os.environ["LOCAL_RANK"]}, f)
        """))
    command = launcher_command("yamls/phase1.yaml", ["max_duration=20ba"], nproc=2)
    command[command.index("modernbert_train.train")] = "rank_probe"
    code = f"from modernbert_train.run.launch import exec_launcher; exec_launcher({command!r})"
    env = dict(os.environ, PYTHONPATH=f"{probe_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    import json
    for rank in (0, 1):
        seen = json.loads((recipe_cwd / f"rank{rank}.json").read_text())
        assert seen == {"argv": ["yamls/phase1.yaml", "max_duration=20ba"], "world": "2", "local_rank": str(rank)}


# ------------------------------------------------------------------------------------ scripts

@pytest.mark.parametrize("script", sorted(p.name for p in LAUNCH_DIR.iterdir() if p.suffix in (".sh", ".sbatch")))
def test_scripts_are_valid_bash(script):
    result = subprocess.run(["bash", "-n", str(LAUNCH_DIR / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_script_is_checked():
    names = {p.name for p in LAUNCH_DIR.iterdir() if p.is_file()}
    assert {"slurm_phase.sbatch", "multinode.sh", "common.sh", "README.md"} <= names
    assert names - {"README.md"} == {p.name for p in LAUNCH_DIR.iterdir() if p.suffix in (".sh", ".sbatch")}


@pytest.mark.parametrize("node_id", [0, 3])
def test_sbatch_dry_run_prints_node_commands(tmp_path, fake_bin, node_id):
    env = _slurm_env(tmp_path, node_id, fake_bin)
    env.update(DRY_RUN="1")
    env.pop("CLEAN_SHM")
    (tmp_path / "yamls").mkdir()
    (tmp_path / "yamls" / "phase1.yaml").write_text("run_name: phase1\n")
    result = subprocess.run(["bash", str(SBATCH), "yamls/phase1.yaml", *OVERRIDES], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    node_tmp = tmp_path / "tmp" / f"modernbert-{_user()}-4242-node{node_id}"
    assert result.stdout.splitlines() == [
        f"srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64 bash {SBATCH} --node-task "
        "yamls/phase1.yaml run_name=phase1 save_folder=/shared/runs/phase1",
        f"{sys.executable} -m modernbert_train.common.safety --remove {node_tmp}",
        f"mkdir -p {node_tmp}",
        f"export TMPDIR={node_tmp}",
        f"{sys.executable} -c {shlex.quote(CLEANER)}",
        f"composer -n 8 --world_size 32 --node_rank {node_id} --master_addr gpu-a17 --master_port 24242 "
        "-m modernbert_train.train yamls/phase1.yaml run_name=phase1 save_folder=/shared/runs/phase1",
    ]
    assert not (tmp_path / "fake.log").exists()  # nothing ran: no srun, no composer
    assert not node_tmp.exists()


def _host() -> str:
    return subprocess.run(["bash", "-c", "hostname -s 2>/dev/null || hostname"], capture_output=True, text=True,
                          check=True).stdout.strip()


def _user() -> str:
    return subprocess.run(["id", "-un"], capture_output=True, text=True, check=True).stdout.strip()


def test_sbatch_node_task_refuses_several_tasks_per_node(tmp_path, fake_bin):
    env = _slurm_env(tmp_path, 1, fake_bin)
    env.update(DRY_RUN="1", SLURM_PROCID="5")
    result = subprocess.run(["bash", str(SBATCH), "--node-task", "r.yaml"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert "task 5 runs on node 1: expected one task per node" in result.stderr


def test_multinode_dry_run_and_missing_master_addr(tmp_path):
    recipe = tmp_path / "phase1.yaml"
    recipe.write_text("run_name: phase1\n")
    env = dict(os.environ, DRY_RUN="1", NNODES="4", NODE_RANK="1", MASTER_ADDR="10.0.0.1", MASTER_PORT="29511",
               NPROC_PER_NODE="8", NODE_TMPDIR=str(tmp_path / "node tmp"), PYTHON=sys.executable)
    result = subprocess.run(["bash", str(MULTINODE), str(recipe), "max_duration=1000000000tok"], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    # A manual launch gets its own scratch folder inside NODE_TMPDIR (named by host and launcher pid): nothing
    # is deleted, and NODE_TMPDIR itself is never emptied.
    scratch = re.fullmatch(rf"mkdir -p '{re.escape(str(tmp_path))}/node tmp/modernbert-{_user()}-manual-"
                           rf"{re.escape(_host())}-(\d+)-node1'", lines[0])
    assert scratch, lines[0]
    assert lines[1] == f"export TMPDIR={lines[0][len('mkdir -p '):]}"
    assert not any(line.startswith("rm ") or "--remove" in line for line in lines)
    assert lines[-1] == (f"composer -n 8 --world_size 32 --node_rank 1 --master_addr 10.0.0.1 --master_port 29511 "
                         f"-m modernbert_train.train {shlex.quote(str(recipe))} max_duration=1000000000tok")

    env.pop("MASTER_ADDR")
    result = subprocess.run(["bash", str(MULTINODE), str(recipe)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2
    assert "MASTER_ADDR (host of node 0) is required when NNODES=4" in result.stderr


def _wait_for(path: Path, needle: str, timeout: float = 60.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = path.read_text() if path.exists() else ""
        if needle in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"{needle!r} never appeared in {path}: {text!r}")


def test_sbatch_runs_node_task_requeues_on_usr1_and_forwards_term(tmp_path, fake_bin):
    """The real (non-dry) path under fake srun/scontrol/composer: per-node TMPDIR emptied, composer started
    with node 0's command, USR1 (time limit near) requeues the job, TERM reaches the launcher."""
    env = _slurm_env(tmp_path, 0, fake_bin)
    stale_tmp = tmp_path / "tmp" / f"modernbert-{_user()}-4242-node0"
    stale_tmp.mkdir(parents=True)
    (stale_tmp / "000000_barrier_filelock").write_text("left by a killed run")
    recipe = tmp_path / "phase1.yaml"
    recipe.write_text("run_name: phase1\n")
    log = tmp_path / "fake.log"
    # Own session: whatever happens, the finally clause can stop the whole chain (bash, srun, composer).
    proc = subprocess.Popen(["bash", str(SBATCH), str(recipe), *OVERRIDES], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        text = _wait_for(log, "tmpdir ")
        assert f"composer -n 8 --world_size 32 --node_rank 0 --master_addr gpu-a17 --master_port 24242 -m " \
               f"modernbert_train.train {recipe} {' '.join(OVERRIDES)}" in text
        assert f"tmpdir {stale_tmp} 0" in text  # fresh and empty
        assert "srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=64 bash" in text

        proc.send_signal(signal.SIGUSR1)
        _wait_for(log, "requeue 4242")
        assert proc.poll() is None  # training goes on until SLURM stops the requeued job

        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "composer got TERM" in log.read_text()
    assert proc.returncode == 143, err
    assert "time limit near: requeueing job 4242" in err
    assert not stale_tmp.exists()  # the launch removed its scratch folder when it ended


def test_sbatch_on_a_cpu_cluster_never_asks_for_zero_processes(tmp_path, fake_bin):
    """SBATCH_GPUS_PER_NODE=0 makes SLURM report 0 GPUs per node: that must not become `--nproc 0`; the CPUs
    each launcher gets come from the allocation (the smallest node), not from a fixed --cpus-per-task."""
    env = _slurm_env(tmp_path, 0, fake_bin)
    env.update(DRY_RUN="1", SLURM_GPUS_PER_NODE="0", SLURM_JOB_CPUS_PER_NODE="4(x3),2")
    for key in ("SLURM_GPUS_ON_NODE", "SLURM_CPUS_PER_TASK", "NPROC_PER_NODE", "CLEAN_SHM"):
        env.pop(key, None)
    (tmp_path / "r.yaml").write_text("run_name: r\n")
    result = subprocess.run(["bash", str(SBATCH), "r.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("srun --nodes=4 --ntasks-per-node=1 --kill-on-bad-exit=1 --cpus-per-task=2 bash")
    assert lines[-1].startswith("composer -n 1 --world_size 4 --node_rank 0 ")  # no GPU visible here: 1 each
    assert "auto process(es) per node" in result.stderr

    env["NPROC_PER_NODE"] = "0"
    refused = subprocess.run(["bash", str(SBATCH), "r.yaml"], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=60)
    assert refused.returncode == 2
    assert "NPROC_PER_NODE must be a positive integer, got '0'" in refused.stderr


def _multinode_dry_run(tmp_path: Path, **env_values: str) -> list[str]:
    recipe = tmp_path / "phase1.yaml"
    recipe.write_text("run_name: phase1\n")
    env = dict(os.environ, DRY_RUN="1", NPROC_PER_NODE="2", PYTHON=sys.executable, **env_values)
    env.pop("SLURM_JOB_ID", None)
    result = subprocess.run(["bash", str(MULTINODE), str(recipe)], env=env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def test_manual_launches_get_their_own_scratch_and_only_dead_launchers_scratch_is_removed(tmp_path):
    """Finding 4: a second manual launch on one host used the first one's fixed scratch folder and emptied it;
    NODE_TMPDIR went to rm -rf as given."""
    base = tmp_path / "scratch"
    user, host = _user(), _host()
    keep = base / "my notes.txt"  # anything of the user's in NODE_TMPDIR
    base.mkdir()
    keep.write_text("mine")
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        live = base / f"modernbert-{user}-manual-{host}-{sleeper.pid}-node0"
        live.mkdir()
        dead_pid = _ended_pid()
        dead = base / f"modernbert-{user}-manual-{host}-{dead_pid}-node0"
        dead.mkdir()
        other_host = base / f"modernbert-{user}-manual-otherhost-{dead_pid}-node0"
        other_host.mkdir()
        first = _multinode_dry_run(tmp_path, NODE_TMPDIR=str(base))
        second = _multinode_dry_run(tmp_path, NODE_TMPDIR=str(base))
    finally:
        sleeper.kill()
        sleeper.wait()
    scratch_of = [next(line for line in lines if line.startswith("mkdir -p ")) for lines in (first, second)]
    assert scratch_of[0] != scratch_of[1]  # each launch its own folder
    removed = [line for line in first if "--remove" in line]
    # Not the live launcher's, not another host's; through the project's deletion guard.
    assert removed == [f"{sys.executable} -m modernbert_train.common.safety --remove {shlex.quote(str(dead))}"]
    assert f"{sys.executable} -c {shlex.quote(CLEANER)}" in first  # the project's shm cleaner, not streaming's


def _ended_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def test_node_tmpdir_folder_itself_is_never_deleted(tmp_path):
    """The real (non-dry) script: NODE_TMPDIR=$HOME-like folder with user files keeps them all."""
    base = tmp_path / "home-like"
    base.mkdir()
    (base / "thesis.tex").write_text("irreplaceable")
    recipe = tmp_path / "phase1.yaml"
    recipe.write_text("run_name: phase1\n")
    fake = tmp_path / "fakepy"
    _write_executable(fake, 'echo "ran $*"; echo "TMPDIR=$TMPDIR"\n')
    env = dict(os.environ, NODE_TMPDIR=str(base), CLEAN_SHM="0", PYTHON=str(fake), NPROC_PER_NODE="1")
    env.pop("SLURM_JOB_ID", None)
    env.pop("DRY_RUN", None)
    result = subprocess.run(["bash", str(MULTINODE), str(recipe)], env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (base / "thesis.tex").read_text() == "irreplaceable"
    tmpdir = Path(result.stdout.split("TMPDIR=")[1].strip())
    assert tmpdir.parent == base and tmpdir.is_dir() and not any(tmpdir.iterdir())


def test_scratch_removal_goes_through_the_deletion_guard(tmp_path, monkeypatch):
    """The launch scripts delete only through `python -m modernbert_train.common.safety --remove` (one guard)."""
    from modernbert_train.common.safety import main as safety_main

    scratch = tmp_path / "modernbert-me-4242-node0"
    (scratch / "lock").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert safety_main(["--remove", str(scratch), str(tmp_path / "never-existed")]) == 0
    assert not scratch.exists()
    assert safety_main(["--remove", "."]) == 2
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    assert safety_main(["--remove", str(tmp_path / "home")]) == 2
    assert (tmp_path / "home").is_dir() and tmp_path.is_dir()
