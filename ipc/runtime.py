"""The per-user runtime directory and `ipc://` endpoints in it.

`$XDG_RUNTIME_DIR/moed` when set (Linux desktops), else `$XDG_CACHE_HOME/moed/run` or
`~/.cache/moed/run` (macOS too). Owner-only (0700). Unix socket paths are short (104 bytes on
macOS, 108 on Linux), so an endpoint whose path would be too long falls back to `/tmp/moed-<uid>`.
"""
from __future__ import annotations

import os
import secrets
import stat
from pathlib import Path

MAX_SOCKET_PATH = 100  # bytes; sun_path is 104 on macOS including the NUL, 108 on Linux
_FALLBACK = Path("/tmp")


def runtime_dir() -> Path:
    """The runtime directory, created owner-only if missing."""
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg:
        path = Path(xdg) / "moed"
    else:
        cache = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
        path = Path(cache) / "moed" / "run"
    return private_dir(path)


def private_dir(path: Path) -> Path:
    """mkdir -p with mode 0700. A directory that exists already must be ours and private (no access
    for group or others): else it is refused, never chmod'ed (it may be shared, e.g. a
    MOED_RUNTIME_DIR set to /tmp)."""
    try:
        path.mkdir(mode=0o700, parents=True)
        os.chmod(path, 0o700)  # new and ours: 0700 whatever the umask
    except FileExistsError:
        pass
    st = path.stat()
    if st.st_uid != os.getuid():
        raise PermissionError(f"runtime directory {path} is owned by uid {st.st_uid}, not {os.getuid()}: "
                              "choose another (MOED_RUNTIME_DIR)")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise PermissionError(f"runtime directory {path} is mode {stat.S_IMODE(st.st_mode):o}, open to other users: "
                              "make it private (chmod 700) or choose another (MOED_RUNTIME_DIR)")
    return path


def ipc_endpoint(name: str | None = None, directory: str | os.PathLike | None = None) -> str:
    """`ipc://<dir>/<name>.sock`; the name defaults to `<pid>-<hex>`, unique per call."""
    name = name or f"{os.getpid()}-{secrets.token_hex(3)}"
    path = (private_dir(Path(directory)) if directory else runtime_dir()) / f"{name}.sock"
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        path = private_dir(_FALLBACK / f"moed-{os.getuid()}") / f"{name}.sock"
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            raise ValueError(f"socket name {name!r} is too long for a unix socket path")
    return f"ipc://{path}"


def remove_stale_endpoints(directory: str | os.PathLike) -> None:
    """Delete `<pid>-<hex>.sock` files (ipc_endpoint's default names) of processes that are gone
    (zombies included: a SIGKILLed supervisor not yet reaped)."""
    for path in Path(directory).glob("*-*.sock"):
        pid = path.name.split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            path.unlink(missing_ok=True)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def process_alive(pid: int) -> bool:
    """True while `pid` runs (a zombie, exited but not yet reaped, counts as gone)."""
    import psutil  # lazily: workers import this module and never need it

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def endpoint_path(endpoint: str) -> Path | None:
    """The socket file behind an `ipc://` endpoint (None for other transports)."""
    return Path(endpoint[len("ipc://"):]) if endpoint.startswith("ipc://") else None


def remove_endpoint(endpoint: str) -> None:
    """Delete an ipc endpoint's socket file if it is still there."""
    path = endpoint_path(endpoint)
    if path is not None:
        path.unlink(missing_ok=True)


def restrict_socket(endpoint: str) -> None:
    """Make an ipc endpoint's socket file owner-only (0600) once bound."""
    path = endpoint_path(endpoint)
    if path is not None and path.exists():
        os.chmod(path, 0o600)
