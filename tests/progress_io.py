"""Run a CLI with its output in a file or on a pseudo-terminal, as a cluster job or a person at a terminal sees it."""
from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# One progress line: what it counts, then the ETA (or 'done' on the last one).
ETA = re.compile(r"ETA (\d+:\d\d(:\d\d)?|\?)$")


def cli_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MODERNBERT_PROGRESS", "RANK")}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


def run_to_file(args: list[str], log: Path, env: dict[str, str] | None = None, timeout: float = 300
                ) -> tuple[int, str, float]:
    """(exit code, the log's text, seconds) of `python ARGS` with stdout and stderr sent to `log`."""
    start = time.monotonic()
    with log.open("w") as out:
        code = subprocess.run([sys.executable, *args], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL, env=env or cli_env(), timeout=timeout).returncode
    with log.open(newline="") as written:  # newline="": a '\r' in the file stays a '\r' here
        return code, written.read(), time.monotonic() - start


def run_in_pty(args: list[str], env: dict[str, str] | None = None, timeout: float = 300) -> tuple[int, str]:
    """(exit code, everything written) of `python ARGS` on a 120-column pseudo-terminal.

    The terminal turns each '\\n' into '\\r\\n'; those pairs are turned back, so a remaining '\\r' is a refresh.
    """
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    proc = subprocess.Popen([sys.executable, *args], cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
                            env=env or cli_env(), close_fds=True)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + timeout
    poller = select.poll()  # not select.select: it fails on descriptors past 1024, which a long session reaches
    poller.register(master, select.POLLIN)
    try:
        while True:
            ready = poller.poll(max(0.0, deadline - time.monotonic()) * 1000)
            if not ready:
                raise TimeoutError(f"{args} still running after {timeout}s")
            try:
                data = os.read(master, 1 << 16)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        if proc.poll() is None and time.monotonic() > deadline:
            proc.kill()
        code = proc.wait()
        os.close(master)
    return code, b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")


def progress_lines(text: str, prefix: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith(prefix)]
