"""POSIX shared-memory segments named `moed-<pid>-<hex>`.

The creator owns a segment: it unlinks it when done, and Python's resource tracker unlinks it if
the creator dies first. Attachers (worker processes) only map it. On Python < 3.13 attaching
registers the segment with the attacher's resource tracker, which then unlinks it when the
attacher exits (bpo-39959); attach() suppresses that registration (3.13+: track=False), which also
spares each worker a resource-tracker process of its own.
"""
from __future__ import annotations

import os
import secrets
import sys
import threading
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory

PREFIX = "moed-"
MAX_NAME = 30  # macOS: PSHMNAMLEN is 31 including the leading slash
_SHM_DIR = "/dev/shm"  # Linux only; macOS cannot list segments

_attach_lock = threading.Lock()
_lingering: list[SharedMemory] = []  # closed while views were still exported; retried later


def new_name() -> str:
    """A fresh segment name; carries the creator's pid so leaks can be traced."""
    name = f"{PREFIX}{os.getpid()}-{secrets.token_hex(4)}"
    assert len(name) <= MAX_NAME, name
    return name


def create(size: int, name: str | None = None) -> SharedMemory:
    """Create a segment of `size` bytes; on Linux its memory is reserved up front, so a full
    /dev/shm fails here instead of SIGBUS-ing the first writer."""
    shm = SharedMemory(name or new_name(), create=True, size=size)
    fd = getattr(shm, "_fd", -1)
    if fd >= 0 and hasattr(os, "posix_fallocate"):
        try:
            os.posix_fallocate(fd, 0, size)
        except OSError as e:
            unlink(shm)
            close(shm)
            raise OSError(e.errno, f"cannot reserve {size} bytes of shared memory: {e.strerror}")
    return shm


def attach(name: str) -> SharedMemory:
    """Map an existing segment without letting this process's resource tracker own it."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    with _attach_lock:
        register = resource_tracker.register
        resource_tracker.register = _skip_shared_memory(register)
        try:
            return SharedMemory(name)
        finally:
            resource_tracker.register = register


def _skip_shared_memory(register):
    def skip(name: str, rtype: str) -> None:
        if rtype != "shared_memory":
            register(name, rtype)
    return skip


def close(shm: SharedMemory) -> bool:
    """Unmap; if views into the segment are still alive, keep it and retry on later calls."""
    for old in list(_lingering):
        if _try_close(old):
            _lingering.remove(old)
    if _try_close(shm):
        return True
    _lingering.append(shm)
    return False


def _try_close(shm: SharedMemory) -> bool:
    try:
        shm.close()
        return True
    except BufferError:
        return False


def unlink(shm: SharedMemory) -> None:
    """Remove the segment's name (the creator's job); mappings stay valid until closed."""
    try:
        shm.unlink()
    except FileNotFoundError:
        pass


def segments(prefix: str = PREFIX) -> list[str] | None:
    """Names of existing segments starting with `prefix`; None where the OS cannot list them."""
    if not os.path.isdir(_SHM_DIR):
        return None
    return sorted(n for n in os.listdir(_SHM_DIR) if n.startswith(prefix))


def unlink_name(name: str) -> None:
    """Remove a segment by name (e.g. one left by a killed process)."""
    try:
        seg = attach(name)
    except FileNotFoundError:
        return
    unlink(seg)
    close(seg)
