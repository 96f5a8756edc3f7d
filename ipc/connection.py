"""Where a running daemon is found: pid file, connection file and log in the runtime directory.

The connection file (owner-only, 0600, written atomically) holds the endpoint, the auth token, the
daemon's pid and its HTTP address; clients read it to attach (jupyter_client's pattern).
"""

from __future__ import annotations

import json
import os
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


def remove_files(files: DaemonFiles) -> None:
    for p in (files.connection, files.pid, files.socket):
        p.unlink(missing_ok=True)
