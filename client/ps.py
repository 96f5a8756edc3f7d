"""Pure functions: a daemon status snapshot -> rich renderables (for `moed ps`)."""

from __future__ import annotations

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from moed.ipc.messages import DaemonStatus, IoStatus


def mb(n: float | None) -> str:
    """Bytes, human-readable (decimal units)."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} B"


def _read_mode(io: IoStatus | None) -> str:
    if io is None:
        return ""
    mode = ["packed" if io.packed else "stacked", "direct" if io.direct else "buffered"]
    return f" ({', '.join(mode + (['lookahead'] if io.lookahead else []))})"


def prompt_cache_row(s: DaemonStatus) -> str:
    """Entries, bytes of the bound, prompt tokens reused (and the disk's share when kept there)."""
    p = s.prompt_cache
    if p is None:
        return "off"
    row = (f"{p.entries} entries, {mb(p.bytes)} of {mb(p.max_bytes)}, {p.hit_tokens:,} of {p.looked_up_tokens:,} "
           f"prompt tokens reused ({p.hits}/{p.lookups} requests)")
    if p.disk_dir:
        row += f"; disk {p.disk_entries} entries, {mb(p.disk_bytes)}, {p.disk_hits} hits ({p.disk_dir})"
    return row


def state_row(s: DaemonStatus) -> str:
    """The state and, unless ready, its phase; degraded (loaded, cannot serve now) in red with its reason."""
    if s.state == "ready":
        return "ready"
    if s.state == "degraded":
        return f"[bold red]degraded[/] - {escape(s.progress.phase)}"
    return escape(f"{s.state} - {s.progress.phase}")


def overview_table(s: DaemonStatus) -> Table:
    t = Table(title="moed", show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    ck, cache = s.checkpoint, s.cache
    model = f"{s.model} ({ck.arch}, {f'{ck.quantization}-bit' if ck.quantization else 'unquantized'})" if ck else s.model
    if cache is not None:
        used = sum(cache.used_slots) / max(1, sum(cache.slots_per_layer))
        cache_row = (f"{mb(cache.budget_bytes)} of {mb(ck.expert_bytes if ck else None)} experts, "
                     f"{used:.0%} of slots filled, hit rate {cache.hit_rate:.1%}")
    rows = [
        ("model", model),
        ("state", state_row(s)),
        ("daemon", f"pid {s.pid}, up {s.uptime_s:.0f} s, RSS {mb(s.rss_bytes)}"),
        ("cache", cache_row if cache is not None else "-"),
        ("disk", f"{mb(cache.bytes_read if cache else None)} read" + _read_mode(s.io)),
        ("decode", f"{s.decode_tps:.2f} tok/s"),
        ("prompt cache", prompt_cache_row(s)),
        ("workers", ", ".join(f"{w.pid}{'' if w.alive else ' (dead)'}" for w in s.workers) or "-"),
        ("requests", f"{len(s.requests)} active, {s.totals.requests} total"),
        ("http", s.http or "-"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def requests_table(s: DaemonStatus) -> Table:
    t = Table(title="active requests", title_justify="left")
    for c in ("id", "client", "state", "prompt", "tokens", "tok/s"):
        t.add_column(c)
    for r in s.requests:
        t.add_row(r.id.split(":", 1)[-1], r.client, r.state, str(r.prompt_tokens), f"{r.tokens}/{r.max_tokens}",
                  f"{r.tps:.2f}")
    return t


def ranks_table(s: DaemonStatus) -> Table:
    """One row per rank of a model split across processes or hosts."""
    t = Table(title="ranks", title_justify="left")
    for c in ("rank", "host", "pid", "layers", "weights", "cache", "hit rate", "read", "RSS (peak)"):
        t.add_column(c)
    for r in s.ranks:
        lo, hi = r.layers
        t.add_row(str(r.rank), r.host, str(r.pid), f"{lo}-{hi - 1}", mb(r.non_expert_bytes), mb(r.cache_bytes),
                  f"{r.hits / max(1, r.hits + r.misses):.1%}", mb(r.bytes_read),
                  f"{mb(r.rss_bytes)} ({mb(r.peak_rss_bytes)})")
    return t


def ps_view(s: DaemonStatus) -> Group:
    parts = [overview_table(s)]
    if s.ranks:
        parts.append(ranks_table(s))
    if s.requests:
        parts.append(requests_table(s))
    return Group(*parts)
