"""`moed top`: a live dashboard of the running daemon.

Collection and rendering apart (rich's top_lite_simulator, nvitop): a `Poller` thread asks the
daemon for its status snapshot every `interval` seconds and hands it to a `Tracker`, which keeps the
history that rates and sparklines need and returns an immutable `View`; the poller stores the latest
View under a lock. The main thread only reads it and renders it with the pure functions of
`moed.client.dashboard`, updating a `Live` explicitly. A `KeyReader` thread puts the terminal in
cbreak mode (termios; msvcrt on Windows) and sets an event on `q`; the terminal is restored on every
way out (q, Ctrl-C, SIGTERM, a dead daemon, an error).

Only the status snapshot is read, never the daemon's internals.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import sys
import threading
import time

from rich.console import Console
from rich.live import Live

from moed.client.client import Client, MoedError
from moed.client.dashboard import dashboard, waiting
from moed.client.view import Tracker, View

try:  # POSIX (Linux and macOS alike)
    import termios
    import tty
except ImportError:  # Windows
    termios = tty = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

QUIT_KEYS = (b"q", b"Q", b"\x03")  # \x03: Ctrl-C arriving as a byte (raw terminals)


# ---------------------------------------------------------------------- collection


class Poller(threading.Thread):
    """Polls `client.status()` every `interval` s; the latest View is read with `latest()`.

    The thread owns the client from `start()` on (a Client is used from one thread) and closes it
    when it ends. It ends on `stop()`, or after publishing a View with `error` set when the daemon
    dies or cannot be reached.
    """

    def __init__(self, client: Client, interval: float = 0.5, tracker: Tracker | None = None):
        super().__init__(name="moed-top-poller", daemon=True)
        self.client, self.interval = client, interval
        self.tracker = tracker or Tracker(interval)
        self.updated = threading.Event()
        self._lock = threading.Lock()
        self._view: View | None = None
        self._stop_event = threading.Event()

    def latest(self) -> View | None:
        with self._lock:
            return self._view

    def stop(self) -> None:
        self._stop_event.set()

    def _publish(self, view: View) -> None:
        with self._lock:
            self._view = view
        self.updated.set()

    def run(self) -> None:
        try:
            while not self._stop_event.is_set():
                t0 = time.monotonic()
                try:
                    snap = self.client.status()
                except (MoedError, TimeoutError) as e:
                    self._publish(self.tracker.failed(f"{type(e).__name__}: {e}"))
                    return
                except Exception as e:  # a bug here must not leave the dashboard frozen
                    self._publish(self.tracker.failed(f"status poll failed: {type(e).__name__}: {e}"))
                    return
                try:
                    self._publish(self.tracker.update(snap))
                except Exception as e:
                    self._publish(self.tracker.failed(f"bad status snapshot: {type(e).__name__}: {e}"))
                    return
                self._stop_event.wait(max(0.0, self.interval - (time.monotonic() - t0)))
        finally:
            self.client.close()


# ---------------------------------------------------------------------- keyboard


class KeyReader:
    """A context manager: while inside, a thread reads single keys and sets `quit` on `q`.

    POSIX: the terminal goes to cbreak mode (no echo, no line buffering; Ctrl-C still raises
    SIGINT) and its settings are restored on exit. Windows: msvcrt polling, nothing to restore.
    Without a terminal on stdin it does nothing (Ctrl-C still quits).
    """

    def __init__(self, quit_event: threading.Event, stream=None):
        self.quit = quit_event
        self.stream = stream if stream is not None else sys.stdin
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._fd: int | None = None
        self._saved = None

    def __enter__(self) -> "KeyReader":
        try:
            tty_in = self.stream is not None and self.stream.isatty()
        except (AttributeError, ValueError, OSError):
            tty_in = False
        if not tty_in:
            return self
        if termios is not None:
            self._fd = self.stream.fileno()
            self._saved = termios.tcgetattr(self._fd)
            tty.setcbreak(self._fd, termios.TCSANOW)
            target = self._posix_loop
        elif msvcrt is not None:
            target = self._windows_loop
        else:
            return self
        self._thread = threading.Thread(target=target, name="moed-top-keys", daemon=True)
        self._thread.start()
        return self

    def _key(self, ch: bytes) -> None:
        if ch in QUIT_KEYS:
            self.quit.set()

    def _posix_loop(self) -> None:
        while not self._stop.is_set():
            try:
                ready, _, _ = select.select([self._fd], [], [], 0.1)
                if ready:
                    ch = os.read(self._fd, 1)
                    if not ch:  # the terminal went away
                        return
                    self._key(ch)
            except (OSError, ValueError):
                return

    def _windows_loop(self) -> None:
        while not self._stop.is_set():
            if msvcrt.kbhit():
                self._key(msvcrt.getwch().encode(errors="replace"))
            else:
                time.sleep(0.05)

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
        if self._saved is not None:
            with contextlib.suppress(termios.error, OSError):
                termios.tcsetattr(self._fd, termios.TCSADRAIN, self._saved)
            self._saved = None


@contextlib.contextmanager
def _sigterm_exits():
    """SIGTERM raises SystemExit in the main thread, so `finally` blocks restore the terminal."""
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "SIGTERM"):
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


# ---------------------------------------------------------------------- main


def main(interval: float = 0.5, runtime_dir: str | None = None, console: Console | None = None) -> int:
    """Run the dashboard until `q`, Ctrl-C (0) or the daemon's death (1).

    Raises DaemonNotRunning (before touching the terminal) if there is no daemon to attach to.
    """

    interval = max(0.05, float(interval))
    console = console or Console()
    poller = Poller(Client(runtime_dir, name="moed top"), interval)
    poller.start()
    quit_event = threading.Event()
    view: View | None = None
    try:
        with _sigterm_exits(), KeyReader(quit_event), \
                Live(waiting(interval), console=console, screen=True, auto_refresh=False,
                     redirect_stdout=False, redirect_stderr=False) as live:
            size = None
            while not quit_event.is_set():
                fresh = poller.updated.wait(0.1)
                if fresh:
                    poller.updated.clear()
                    view = poller.latest()
                if view is not None and (fresh or console.size != size):
                    size = console.size
                    live.update(dashboard(view, width=size.width, height=size.height), refresh=True)
                if view is not None and view.error:
                    break
    except KeyboardInterrupt:
        pass
    finally:
        poller.stop()
        poller.join(3.0)
    if view is not None and view.error:
        model = view.snapshot.model if view.snapshot is not None else ""
        print(f"moed top: the daemon went away ({view.error})" + (f"; it was serving {model}" if model else ""),
              file=sys.stderr)
        return 1
    return 0
