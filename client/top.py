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
from collections import deque
from dataclasses import dataclass, field, replace

from rich.console import Console
from rich.live import Live

from moed.client.client import Client, MoedError

try:  # POSIX (Linux and macOS alike)
    import termios
    import tty
except ImportError:  # Windows
    termios = tty = None
try:
    import msvcrt
except ImportError:
    msvcrt = None

HISTORY_S = 300.0  # how far back the sparklines reach
RATE_WINDOW_S = 2.0  # derived rates compare the newest sample with one about this old
QUIT_KEYS = (b"q", b"Q", b"\x03")  # \x03: Ctrl-C arriving as a byte (raw terminals)


# ---------------------------------------------------------------------- data


@dataclass(frozen=True)
class Sample:
    """The cumulative counters of one snapshot, at one (monotonic) time."""

    t: float
    pid: int | None
    generated: int  # completion tokens of finished requests + tokens of active ones
    prompt: int  # prompt tokens admitted
    bytes_read: int  # expert bytes read from disk (cache.bytes_read)
    read_s: float  # time the workers spent reading (io.read_seconds)
    wait_s: float  # time the engine waited for reads (cache.read_seconds)
    hits: int
    misses: int
    layer_hits: tuple[int, ...] = ()
    layer_misses: tuple[int, ...] = ()

    @classmethod
    def of(cls, snap: dict, t: float) -> "Sample":
        cache, io, totals = snap.get("cache") or {}, snap.get("io") or {}, snap.get("totals") or {}
        active = sum(int(r.get("tokens", 0)) for r in snap.get("requests") or [])
        return cls(t=t, pid=snap.get("pid"), generated=int(totals.get("completion_tokens", 0)) + active,
                   prompt=int(totals.get("prompt_tokens", 0)), bytes_read=int(cache.get("bytes_read", 0)),
                   read_s=float(io.get("read_seconds", 0.0)), wait_s=float(cache.get("read_seconds", 0.0)),
                   hits=int(cache.get("hits", 0)), misses=int(cache.get("misses", 0)),
                   layer_hits=tuple(cache.get("layer_hits") or ()),
                   layer_misses=tuple(cache.get("layer_misses") or ()))


def _ratio(num: float, den: float) -> float | None:
    return num / den if den > 0 else None


@dataclass(frozen=True)
class Rates:
    """Rates derived from two samples `span_s` apart; None where there is nothing to divide by."""

    span_s: float = 0.0
    output_tps: float | None = None  # tokens streamed per second, all requests together
    prompt_tps: float | None = None  # prompt tokens admitted per second
    read_bps: float | None = None  # disk bytes read per wall-clock second
    read_bandwidth: float | None = None  # bytes per second of worker read time (the disk's speed)
    bytes_per_token: float | None = None  # disk bytes read per generated token
    wait_fraction: float | None = None  # share of wall time the engine waited on reads
    hit_rate: float | None = None  # cache hit rate over the span
    layer_hit_rate: tuple[float | None, ...] = ()

    @classmethod
    def between(cls, a: Sample, b: Sample) -> "Rates":
        dt = b.t - a.t
        if dt <= 0:
            return cls()
        # tokens of requests that failed leave the count without joining the totals: never below 0
        dtok, dbytes = max(0, b.generated - a.generated), b.bytes_read - a.bytes_read
        dh, dm = b.hits - a.hits, b.misses - a.misses
        layers = tuple(_ratio(h1 - h0, (h1 - h0) + (m1 - m0))
                       for h0, h1, m0, m1 in zip(a.layer_hits, b.layer_hits, a.layer_misses, b.layer_misses))
        return cls(span_s=dt, output_tps=dtok / dt, prompt_tps=(b.prompt - a.prompt) / dt, read_bps=dbytes / dt,
                   read_bandwidth=_ratio(dbytes, b.read_s - a.read_s), bytes_per_token=_ratio(dbytes, dtok),
                   wait_fraction=max(0.0, b.wait_s - a.wait_s) / dt, hit_rate=_ratio(dh, dh + dm),
                   layer_hit_rate=layers)


Series = tuple[tuple[float, float], ...]  # (monotonic time, value), oldest first


@dataclass(frozen=True)
class View:
    """Everything the dashboard shows: the latest snapshot, derived rates, and history.

    `snapshot` is the daemon's status dict as received ({} before the first answer); `history`
    maps a series name ("decode", "prefill", "output", "read") to its recent points; `error` is set
    once the daemon is gone, and the dashboard then shows it and `moed top` exits non-zero.
    """

    snapshot: dict = field(default_factory=dict)
    rates: Rates = field(default_factory=Rates)
    history: dict[str, Series] = field(default_factory=dict)
    now: float = 0.0
    interval: float = 0.5
    history_s: float = HISTORY_S
    polls: int = 0
    generated: int = 0  # tokens generated since the daemon started (finished + in flight)
    error: str | None = None

    @property
    def loading(self) -> bool:
        return self.snapshot.get("state") != "ready" or "cache" not in self.snapshot


class Tracker:
    """Turns successive snapshots into Views (no threads, no I/O: tests feed it directly).

    Args:
        interval: the polling interval, shown by the dashboard and used to size sparklines.
        history_s: how long a history the sparklines get.
        rate_window_s: derived rates span about this much time (at least one poll).
    """

    SERIES = ("decode", "prefill", "output", "read")

    def __init__(self, interval: float = 0.5, history_s: float = HISTORY_S, rate_window_s: float = RATE_WINDOW_S):
        self.interval, self.history_s = interval, history_s
        self.rate_window_s = max(rate_window_s, interval)
        self.samples: deque[Sample] = deque()
        self.history: dict[str, deque] = {k: deque() for k in self.SERIES}
        self.polls = 0
        self.last = View(interval=interval, history_s=history_s)

    def update(self, snap: dict, now: float | None = None) -> View:
        now = time.monotonic() if now is None else now
        s = Sample.of(snap, now)
        if self.samples and s.pid != self.samples[-1].pid:
            self.samples.clear()  # another daemon: start over
            for h in self.history.values():
                h.clear()
        self.samples.append(s)
        while len(self.samples) > 2 and now - self.samples[1].t >= self.rate_window_s:
            self.samples.popleft()
        rates = Rates.between(self.samples[0], s) if len(self.samples) > 1 else Rates()
        decoding = any(r.get("state") == "decoding" for r in snap.get("requests") or [])
        points = {"decode": float(snap.get("decode_tps") or 0.0) if decoding else 0.0,
                  "prefill": float(snap.get("prefill_tps") or 0.0),
                  "output": rates.output_tps or 0.0, "read": rates.read_bps or 0.0}
        for k, v in points.items():
            h = self.history[k]
            h.append((now, v))
            while h and now - h[0][0] > self.history_s:
                h.popleft()
        self.polls += 1
        self.last = View(snapshot=snap, rates=rates, history={k: tuple(v) for k, v in self.history.items()},
                         now=now, interval=self.interval, history_s=self.history_s, polls=self.polls,
                         generated=s.generated)
        return self.last

    def failed(self, error: str, now: float | None = None) -> View:
        """The last View, marked with why no more will come."""
        now = time.monotonic() if now is None else now
        self.last = replace(self.last, now=now, error=error)
        return self.last


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
    from moed.client.dashboard import dashboard, waiting

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
        model = view.snapshot.get("model", "")
        print(f"moed top: the daemon went away ({view.error})" + (f"; it was serving {model}" if model else ""),
              file=sys.stderr)
        return 1
    return 0
