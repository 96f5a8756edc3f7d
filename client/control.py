"""Daemon control for the CLI: start in the background, stop, status, logs.

`start` launches `moed daemon ...` in its own session with output to the log file, then polls the
daemon's status until the model is loaded, showing load progress (ollama's pattern). Secrets (the
HTTP API key) go to the daemon in its environment, never on its command line. The pid that `start`
and `stop` act on is the one holding the runtime directory's lock (ipc/connection.running_daemon):
a pid file naming any other process is stale and that process is never signalled.
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
from moed.ipc.connection import daemon_files, read_pid, running_daemon
from moed.ipc.messages import DaemonStatus

START_TIMEOUT_S = 600.0


def log_tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def start(daemon_args: list[str], runtime_dir: str | None = None, quiet: bool = False,
          ranks: int | None = None, hosts: str | None = None, secrets: dict[str, str] | None = None) -> int:
    """Launch the daemon in the background; return once it serves (0) or failed (1).

    With `ranks`/`hosts` the daemon runs on every rank under mlx.launch (rank 0 serves). `secrets`
    are environment variables for the daemon only (e.g. MOED_API_KEY), kept off its argv.
    """
    files = daemon_files(runtime_dir)
    if (pid := running_daemon(files)) is not None:
        print(f"moed is already running (pid {pid}); `moed stop` first", file=sys.stderr)
        return 1
    env = dict(os.environ, PYTHONUNBUFFERED="1", **(secrets or {}))
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
    """Ask the daemon to stop (also while it loads); SIGTERM, then SIGKILL, if it does not exit in
    time. Only the process holding the runtime directory's lock is signalled (psutil.Process checks
    the pid's start time again before each signal, so a pid reused meanwhile is left alone too)."""
    files = daemon_files(runtime_dir)
    pid = running_daemon(files)
    if pid is None:
        stale = read_pid(files)
        note = (f" (daemon.pid names pid {stale}, which does not hold {files.lock.name}: not moed's daemon, "
                "left alone)") if stale is not None else ""
        print(f"moed is not running{note}", file=sys.stderr)
        return 0
    try:
        procs = [psutil.Process(pid)]
    except psutil.NoSuchProcess:
        print("moed is not running", file=sys.stderr)
        return 0
    others = []  # the other ranks on this host, when the model is split
    try:
        with Client(runtime_dir, name="moed stop") as c:
            others = [r.pid for r in c.status().ranks[1:] if r.host == socket.gethostname()]
            c.stop_daemon()
    except MoedError:
        procs[0].send_signal(signal.SIGTERM)
    for p in others:
        try:
            procs.append(psutil.Process(p))
        except psutil.NoSuchProcess:
            pass
    deadline = time.monotonic() + timeout
    for p in procs:
        while not _gone(p) and time.monotonic() < deadline:
            time.sleep(0.05)
        if not _gone(p):
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
    print(f"moed stopped (pid {pid}{f' and ranks {others}' if others else ''})", file=sys.stderr)
    return 0


def _gone(p: psutil.Process) -> bool:
    """Exited (a zombie, not yet reaped by its parent, counts), or its pid now names another process."""
    try:
        return not p.is_running() or p.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


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
