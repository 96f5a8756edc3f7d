"""Pure functions: a daemon status snapshot -> rich renderables (for `moed ps`)."""

from __future__ import annotations

from rich.console import Group
from rich.table import Table


def mb(n: float | None) -> str:
    """Bytes, human-readable (decimal units)."""
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n:.0f} B"


def _read_mode(io: dict) -> str:
    if "packed" not in io:
        return ""
    mode = ["packed" if io["packed"] else "stacked", "direct" if io["direct"] else "buffered"]
    return f" ({', '.join(mode + (['lookahead'] if io['lookahead'] else []))})"


def overview_table(s: dict) -> Table:
    cache = s.get("cache", {})
    t = Table(title="moed", show_header=False, title_justify="left")
    t.add_column("", style="bold")
    t.add_column("")
    used = sum(cache.get("used_slots", [])) / max(1, sum(cache.get("slots_per_layer", []) or [1]))
    rows = [
        ("model", f"{s.get('model')} ({s.get('arch', '?')}, {s.get('quantization', '?')}-bit)"),
        ("state", f"{s.get('state')}" + ("" if s.get("state") == "ready" else f" - {s['progress']['phase']}")),
        ("daemon", f"pid {s.get('pid')}, up {s.get('uptime_s', 0):.0f} s, RSS {mb(s.get('rss_bytes'))}"),
        ("cache", f"{mb(cache.get('budget_bytes'))} of {mb(s.get('expert_bytes'))} experts, "
                  f"{used:.0%} of slots filled, hit rate {cache.get('hit_rate', 0):.1%}"),
        ("disk", f"{mb(cache.get('bytes_read'))} read" + _read_mode(s.get("io", {}))),
        ("decode", f"{s.get('decode_tps', 0):.2f} tok/s"),
        ("workers", ", ".join(f"{w['pid']}{'' if w['alive'] else ' (dead)'}" for w in s.get("workers", [])) or "-"),
        ("requests", f"{len(s.get('requests', []))} active, {s.get('totals', {}).get('requests', 0)} total"),
        ("http", s.get("http") or "-"),
    ]
    for k, v in rows:
        t.add_row(k, str(v))
    return t


def requests_table(s: dict) -> Table:
    t = Table(title="active requests", title_justify="left")
    for c in ("id", "client", "state", "prompt", "tokens", "tok/s"):
        t.add_column(c)
    for r in s.get("requests", []):
        t.add_row(r["id"].split(":", 1)[-1], r["client"], r["state"], str(r["prompt_tokens"]),
                  f"{r['tokens']}/{r['max_tokens']}", f"{r['tps']:.2f}")
    return t


def ranks_table(s: dict) -> Table:
    """One row per rank of a model split across processes or hosts."""
    t = Table(title="ranks", title_justify="left")
    for c in ("rank", "host", "pid", "layers", "weights", "cache", "hit rate", "read", "RSS (peak)"):
        t.add_column(c)
    for r in s.get("ranks", []):
        lo, hi = r["layers"]
        t.add_row(str(r["rank"]), r["host"], str(r["pid"]), f"{lo}-{hi - 1}", mb(r["non_expert_bytes"]),
                  mb(r["cache_bytes"]), f"{r['hits'] / max(1, r['hits'] + r['misses']):.1%}", mb(r["bytes_read"]),
                  f"{mb(r['rss_bytes'])} ({mb(r['peak_rss_bytes'])})")
    return t


def ps_view(s: dict) -> Group:
    parts = [overview_table(s)]
    if s.get("ranks"):
        parts.append(ranks_table(s))
    if s.get("requests"):
        parts.append(requests_table(s))
    return Group(*parts)
