"""Daemon control for the CLI: start in the background, stop, status, logs.

`start` launches `moed daemon ...` in its own session with output to the log file, then polls the
daemon's status until the model is loaded, showing load progress (ollama's pattern).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from moed.client import launch
from moed.client.client import Client, DaemonNotRunning, MoedError
from moed.ipc.connection import daemon_files, read_pid
from moed.ipc.messages import DaemonStatus

START_TIMEOUT_S = 600.0


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start(daemon_args: list[str], runtime_dir: str | None = None, quiet: bool = False,
          ranks: int | None = None, hosts: str | None = None) -> int:
    """Launch the daemon in the background; return once it serves (0) or failed (1).

    With `ranks`/`hosts` the daemon runs on every rank under mlx.launch (rank 0 serves).
    """
    files = daemon_files(runtime_dir)
    if (pid := read_pid(files)) is not None:
        print(f"moed is already running (pid {pid}); `moed stop` first", file=sys.stderr)
        return 1
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if runtime_dir:
        env["MOED_RUNTIME_DIR"] = str(runtime_dir)
    fd = os.open(files.log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    with os.fdopen(fd, "ab") as log:
        out = {"stdout": log, "stderr": subprocess.STDOUT, "start_new_session": True, "env": env}
        if ranks is not None or hosts is not None:
            proc = launch.spawn(["daemon", *daemon_args], ranks, hosts, **out)
        else:
            proc = subprocess.Popen([sys.executable, "-m", "moed.client.cli", "daemon", *daemon_args],
                                    stdin=subprocess.DEVNULL, **out)
    console = Console(stderr=True, quiet=quiet)
    deadline = time.monotonic() + START_TIMEOUT_S
    with Progress(TextColumn("[bold]moed[/] {task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("starting", total=1.0)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                console.print(f"[red]moed daemon exited with code {proc.returncode}[/]\n{log_tail(files.log)}")
                return 1
            snap = _try_status(runtime_dir)
            if snap is not None:
                bar.update(task, description=snap.progress.phase, completed=snap.progress.done)
                if snap.state == "ready":
                    break
            time.sleep(0.1)
        else:
            console.print(f"[red]moed did not become ready in {START_TIMEOUT_S:.0f} s[/]; see {files.log}")
            return 1
    ranks_note = f", {len(snap.ranks)} ranks" if snap.ranks else ""
    console.print(f"moed ready (pid {snap.pid}{ranks_note}): {snap.model}  log: {files.log}")
    return 0


def _try_status(runtime_dir) -> DaemonStatus | None:
    try:
        with Client(runtime_dir, name="moed start") as c:
            return c.status()
    except (MoedError, TimeoutError):
        return None


def stop(runtime_dir: str | None = None, timeout: float = 30.0) -> int:
    """Ask the daemon to stop; SIGTERM, then SIGKILL, if it does not exit in time."""
    files = daemon_files(runtime_dir)
    pid = read_pid(files)
    if pid is None:
        print("moed is not running", file=sys.stderr)
        return 0
    others = []  # the other ranks on this host, when the model is split
    try:
        with Client(runtime_dir, name="moed stop") as c:
            others = [r.pid for r in c.status().ranks[1:] if r.host == socket.gethostname()]
            c.stop_daemon()
    except MoedError:
        os.kill(pid, signal.SIGTERM)
    for p in [pid, *others]:
        try:
            psutil.Process(p).wait(timeout)
        except psutil.TimeoutExpired:
            os.kill(p, signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    print(f"moed stopped (pid {pid}{f' and ranks {others}' if others else ''})", file=sys.stderr)
    return 0


def status(runtime_dir: str | None = None) -> DaemonStatus:
    with Client(runtime_dir, name="moed ps") as c:
        return c.status()


def logs(runtime_dir: str | None = None, follow: bool = False, lines: int = 50) -> int:
    path = daemon_files(runtime_dir).log
    if not path.exists():
        raise DaemonNotRunning(f"no log at {path}")
    print(log_tail(path, lines))
    if follow:
        with open(path) as f:
            f.seek(0, os.SEEK_END)
            try:
                while True:
                    line = f.readline()
                    if line:
                        print(line, end="", flush=True)
                    else:
                        time.sleep(0.2)
            except KeyboardInterrupt:
                pass
    return 0
