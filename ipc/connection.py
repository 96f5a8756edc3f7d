"""Where a running daemon is found: pid file, connection file, lock and log in the runtime directory.

The connection file (owner-only, 0600, written atomically) holds the endpoint, the auth token, the
daemon's pid and its HTTP address; clients read it to attach (jupyter_client's pattern).

One daemon per runtime directory: the daemon holds an advisory lock (flock, Linux and macOS) on
`daemon.lock` for its whole life, the kernel releases it when the process ends however it ends, and
the file says which process holds it (pid and start time). `running_daemon` is the only way the
CLI finds the pid it may signal: a pid file that names a process not holding the lock (a killed
daemon's, or a reused pid) is stale, never signalled.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

from .runtime import _pid_alive, private_dir, runtime_dir


@dataclass(frozen=True)
class DaemonFiles:
    dir: Path

    @property
    def connection(self) -> Path:
        return self.dir / "daemon.json"

    @property
    def pid(self) -> Path:
        return self.dir / "daemon.pid"

    @property
    def log(self) -> Path:
        return self.dir / "daemon.log"

    @property
    def socket(self) -> Path:
        return self.dir / "daemon.sock"

    @property
    def lock(self) -> Path:
        return self.dir / "daemon.lock"  # never removed: removing a lock file races with its next taker

    @property
    def endpoint(self) -> str:
        return f"ipc://{self.socket}"


def daemon_files(directory: str | os.PathLike | None = None) -> DaemonFiles:
    """The daemon's files, in `directory` or the per-user runtime directory."""
    if directory is None and os.environ.get("MOED_RUNTIME_DIR"):
        directory = os.environ["MOED_RUNTIME_DIR"]
    return DaemonFiles(private_dir(Path(directory)) if directory else runtime_dir())


def secure_write(path: Path, text: str) -> None:
    """Write owner-only (0600), atomically."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def write_connection(files: DaemonFiles, info: dict) -> None:
    secure_write(files.connection, json.dumps(info, indent=2))
    secure_write(files.pid, f"{os.getpid()}\n")


def read_connection(files: DaemonFiles) -> dict | None:
    """The connection info of a live daemon, or None."""
    try:
        info = json.loads(files.connection.read_text())
    except (OSError, ValueError):
        return None
    return info if _pid_alive(int(info.get("pid", -1))) else None


def read_pid(files: DaemonFiles) -> int | None:
    """The pid in the pid file if that process is alive."""
    try:
        pid = int(files.pid.read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _pid_alive(pid) else None


def _started(pid: int) -> float | None:
    import psutil  # lazily: workers import ipc/ and never need it

    try:
        return psutil.Process(pid).create_time()
    except psutil.Error:
        return None


def hold_lock(files: DaemonFiles, wait: float = 2.0) -> int | None:
    """Take the runtime directory's lock for this process's life (the fd stays open; it is not
    inherited by children) and write this process's pid and start time into it. None if another
    process holds it after `wait` s (one that is dying releases it within that)."""
    fd = os.open(files.lock, os.O_RDWR | os.O_CREAT, 0o600)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except BlockingIOError:
            if time.monotonic() > deadline:
                os.close(fd)
                return None
            time.sleep(0.05)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()} {_started(os.getpid())!r}\n".encode(), 0)
    return fd


def running_daemon(files: DaemonFiles) -> int | None:
    """The pid of the daemon holding this directory's lock, or None when no process holds it. The
    holder is the pid written in the lock file if that process's start time is the one written
    there too (so a reused pid is never taken for the daemon)."""
    try:
        fd = os.open(files.lock, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        for _ in range(50):  # a daemon writes its pid right after taking the lock
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                fcntl.flock(fd, fcntl.LOCK_UN)
                return None  # nobody holds it
            try:
                pid_text, started_text = os.pread(fd, 100, 0).decode().split()
                pid, started = int(pid_text), float(started_text)
            except ValueError:
                time.sleep(0.01)
                continue
            now = _started(pid)
            return pid if now is not None and abs(now - started) < 0.01 else None
        return None
    finally:
        os.close(fd)


def remove_files(files: DaemonFiles) -> None:
    for p in (files.connection, files.pid, files.socket):
        p.unlink(missing_ok=True)
