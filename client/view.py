"""`moed top`'s data: status samples, derived rates, the immutable `View` the dashboard renders, and
the `Tracker` that keeps the history rates and sparklines need. No I/O, no rendering (nvitop's api/).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field, replace

from moed.ipc.messages import DaemonStatus

HISTORY_S = 300.0  # how far back the sparklines reach
RATE_WINDOW_S = 2.0  # derived rates compare the newest sample with one about this old


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
    def of(cls, snap: DaemonStatus, t: float) -> "Sample":
        cache, io = snap.cache, snap.io
        return cls(t=t, pid=snap.pid, generated=snap.totals.completion_tokens + sum(r.tokens for r in snap.requests),
                   prompt=snap.totals.prompt_tokens, bytes_read=cache.bytes_read if cache else 0,
                   read_s=io.read_seconds if io else 0.0, wait_s=cache.read_seconds if cache else 0.0,
                   hits=cache.hits if cache else 0, misses=cache.misses if cache else 0,
                   layer_hits=tuple(cache.layer_hits) if cache else (),
                   layer_misses=tuple(cache.layer_misses) if cache else ())


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

    `snapshot` is the daemon's DaemonStatus as received (None before the first answer); `history`
    maps a series name ("decode", "prefill", "output", "read") to its recent points; `error` is set
    once the daemon is gone, and the dashboard then shows it and `moed top` exits non-zero.
    """

    snapshot: DaemonStatus | None = None
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
        return self.snapshot is None or not self.snapshot.loaded


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

    def update(self, snap: DaemonStatus, now: float | None = None) -> View:
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
        decoding = any(r.state == "decoding" for r in snap.requests)
        points = {"decode": snap.decode_tps if decoding else 0.0, "prefill": snap.prefill_tps,
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
