"""Pure functions: a `moed top` View -> rich renderables, one per panel, and `dashboard` composing them.

Nothing here does I/O or keeps state: `moed.client.top` collects, these render. Widths are passed
in (the terminal's), so each panel sizes its sparklines, bars and heat map to fit 80-120 columns.
"""

from __future__ import annotations

import io
import math
import os
from typing import TYPE_CHECKING

from rich.console import Console, Group, RenderableType
from rich.panel import Panel
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

if TYPE_CHECKING:
    from moed.client.view import Series, View
    from moed.ipc.messages import DaemonStatus

SPARKS = "▁▂▃▄▅▆▇█"
RESIDENT = "▫░▒▓█"  # resident experts, cold -> hot
EVICTED_WARM, COLD = "○", "·"  # used recently but not resident; not resident and cold
HEAT_STYLES = ("grey42", "cyan", "green", "yellow", "bold red")
MAX_HEAT_COLS = 64
HEAT_OVERHEAD = 4 + 7 + 7 + 9  # heat map columns taken by: panel border+padding, layer label, hit rate, slots
WIDE = 100  # from this width up, some panels sit side by side
MAX_REQUEST_ROWS = 8
MEMORY_PARTS = (("weights", "█", "blue"), ("expert cache", "▓", "magenta"), ("KV cache", "▒", "green"),
                ("other", "░", "grey50"))  # MemoryStatus's resident_weights, expert_cache, kv_cache, other


# ---------------------------------------------------------------------- formatting


def fmt_bytes(n: float | None) -> str:
    """Decimal units, three significant digits: 950 B, 1.97 MB, 12.4 GB."""
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 999.5 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:.3g} TB"  # pragma: no cover


def fmt_rate(n: float | None) -> str:
    return "-" if n is None else fmt_bytes(n) + "/s"


def fmt_tps(x: float | None) -> str:
    return "-" if x is None else f"{x:,.1f} tok/s"


def fmt_pct(x: float | None) -> str:
    return "-" if x is None else f"{x:.1%}"


def fmt_duration(s: float) -> str:
    s = int(max(0, s))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def sparkline(points: "Series", now: float, width: int, span: float) -> str:
    """`points` binned into `width` columns over the last `span` s, scaled to their maximum.

    Columns before the first point are blank; an empty bin holds the previous value.
    """
    width = max(1, width)
    if not points:
        return " " * width
    t0, step = now - span, span / width
    bins: list[list[float]] = [[] for _ in range(width)]
    last = None  # the value carried in from before the window
    for t, v in points:
        if t < t0:
            last = v
        else:
            bins[min(width - 1, int((t - t0) / step))].append(v)
    vals: list[float | None] = []
    for b in bins:
        if b:
            last = sum(b) / len(b)
        vals.append(last)
    top = max((v for v in vals if v is not None), default=0.0)
    n = len(SPARKS) - 1
    return "".join(" " if v is None else SPARKS[min(n, round(v / top * n)) if top > 0 else 0] for v in vals)


def history_span(view: "View", width: int) -> float:
    """Seconds a sparkline of `width` columns covers: one poll a column, up to the whole history."""
    pts = next(iter(view.history.values()), ())
    have = view.now - pts[0][0] if pts else 0.0
    return min(view.history_s, max(width * view.interval, have))


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" if n == 1 else f"{n} {what}s"


def _kv(rows: list[tuple[str, RenderableType | str]]) -> Table:
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold", no_wrap=True)
    t.add_column(overflow="fold")
    for k, v in rows:
        t.add_row(k, v)
    return t


# ---------------------------------------------------------------------- panels


def model_name(s: DaemonStatus | None) -> str:
    if s is None:
        return "?"
    return os.path.basename(s.model.rstrip("/\\")) or s.model


def workers_text(s: DaemonStatus) -> Text:
    out = Text()
    alive = sum(1 for w in s.workers if w.alive)
    out.append(f"{alive}/{len(s.workers)} alive ", style="bold" if alive == len(s.workers) else "bold red")
    for w in s.workers:
        if w.alive:
            out.append(" ● ", style="green")
            out.append(str(w.pid))
        else:
            out.append(" ✗ ", style="bold red")
            out.append(f"{w.pid} dead", style="bold red")
        if w.restarts:
            out.append(f" ↻{w.restarts}", style="yellow")
    if s.io is not None and s.io.respawns:
        out.append(f"  ({s.io.respawns} respawned)", style="yellow")
    return out


def header_panel(view: "View") -> Panel:
    """Model, architecture, quantization, daemon state, cache budget and use, workers."""
    s = view.snapshot
    rows: list[tuple[str, RenderableType | str]] = []
    if s is None:
        rows.append(("daemon", "no status yet"))
    else:
        ck, cache = s.checkpoint, s.cache
        experts = cache.experts_per_layer if cache is not None else []
        shape = f"{len(experts)} layers × {max(experts)} experts, top-{ck.top_k if ck else '?'}" if experts else ""
        bits = "" if ck is None else f"{ck.quantization}-bit" if ck.quantization else "unquantized"
        model = Text.assemble((model_name(s), "bold"), "  ",
                              (" · ".join(x for x in (ck.arch if ck else "", bits, shape) if x), "cyan"))
        daemon = (f"{s.state} · pid {s.pid} · up {fmt_duration(s.uptime_s)} · RSS {fmt_bytes(s.rss_bytes)} · "
                  f"{_plural(s.clients, 'client')}" + (f" · http {s.http}" if s.http else ""))
        rows += [("model", model), ("daemon", daemon)]
        if cache is not None:
            slots, used = sum(cache.slots_per_layer), sum(cache.used_slots)
            total = ck.expert_bytes if ck else 0
            fits = f" ({cache.budget_bytes / total:.0%})" if total else ""
            rows.append(("cache", f"{fmt_bytes(cache.budget_bytes)} budget of {fmt_bytes(total)} experts{fits}"
                                  f" · {used}/{slots} slots used · non-expert "
                                  f"{fmt_bytes(ck.non_expert_bytes if ck else None)}"))
        if s.workers:
            rows.append(("workers", workers_text(s)))
    title = Text.assemble(("moed top", "bold"), f" · every {view.interval:g}s · q quits")
    return Panel(_kv(rows), title=title, title_align="left", border_style="blue")


def loading_panel(view: "View", width: int = 100) -> Panel:
    """The model is still loading: its phase and progress."""
    s = view.snapshot
    phase, done = (s.progress.phase, s.progress.done) if s is not None else ("waiting for the daemon", 0.0)
    bar = ProgressBar(total=1.0, completed=done, width=max(10, min(60, width - 30)))
    body = Group(Text.assemble(("loading ", "bold yellow"), f"{phase}  ", (f"{done:.0%}", "bold")), bar)
    return Panel(body, title="loading", title_align="left", border_style="yellow")


def throughput_panel(view: "View", width: int = 100) -> Panel:
    """Decode and prefill tok/s, tokens streamed per second, each with a sparkline."""
    s, r = view.snapshot, view.rates
    spark_w = max(8, width - 4 - 9 - 14)
    span = history_span(view, spark_w)
    decoding = any(q.state == "decoding" for q in s.requests)
    lines = [("decode", s.decode_tps if decoding else 0.0, "decode", "green"),
             ("prefill", s.prefill_tps, "prefill", "cyan"),
             ("output", r.output_tps, "output", "magenta")]
    t = Table.grid(padding=(0, 1))
    t.add_column(style="bold", no_wrap=True, width=8)
    t.add_column(justify="right", no_wrap=True, width=13)
    t.add_column(no_wrap=True)
    for label, value, key, style in lines:
        t.add_row(label, fmt_tps(value), Text(sparkline(view.history.get(key, ()), view.now, spark_w, span),
                                              style=style))
    tot = s.totals
    foot = _kv([("tokens", f"{view.generated:,} tokens generated · {tot.prompt_tokens:,} prompt"),
                ("requests", f"{tot.requests:,} ({tot.completed:,} done, "
                             f"{tot.rejected:,} rejected, {tot.aborted:,} aborted)")])
    return Panel(Group(t, foot), title=f"throughput · last {fmt_duration(span)}", title_align="left",
                 border_style="green")


def disk_panel(view: "View", width: int = 100) -> Panel:
    """Bytes read per token, read rate and speed, reads in flight, worker queue depths."""
    s, r = view.snapshot, view.rates
    cache, io = s.cache, s.io
    overall = cache.bytes_read / view.generated if view.generated else None
    spark_w = max(8, width - 4 - 10 - 12)
    span = history_span(view, spark_w)
    queues = Text()
    for w in s.workers:
        queues.append(f"{w.pid}: ", style="bold" if w.alive else "bold red")
        queues.append(f"{fmt_bytes(w.queued_bytes)}  ", style="" if w.alive else "red")
    read = Text(f"{fmt_rate(r.read_bps):>11} ")
    read.append(sparkline(view.history.get("read", ()), view.now, spark_w, span), style="yellow")
    busy = io.in_flight
    rows = [("per token", f"{fmt_bytes(r.bytes_per_token)} now · {fmt_bytes(overall)} overall"),
            ("read", read),
            ("speed", f"{fmt_rate(r.read_bandwidth)} while reading"),
            ("disk wait", f"{fmt_pct(r.wait_fraction)} of the time"),
            ("in flight", f"{busy} {'read' if busy == 1 else 'reads'} · {fmt_bytes(io.bytes_read)} "
                          f"in {io.reads:,} reads"),
            ("queues", queues)]
    return Panel(_kv(rows), title="disk", title_align="left", border_style="yellow")


def memory_panel(view: "View", width: int = 100) -> Panel:
    """RSS split into resident weights, expert cache, KV cache and the rest, as one bar."""
    mem = view.snapshot.memory
    rss = mem.rss
    bar_w = max(10, width - 4 - 16)
    sizes = (mem.resident_weights, mem.expert_cache, mem.kv_cache, mem.other)
    parts = [(n, label, ch, style) for n, (label, ch, style) in zip(sizes, MEMORY_PARTS)]
    total = sum(p[0] for p in parts) or 1
    cells = [max(1, round(n / total * bar_w)) if n > 0 else 0 for n, *_ in parts]
    while sum(cells) > bar_w:  # the minimum of one cell a part may overshoot: take from the largest
        cells[cells.index(max(cells))] -= 1
    bar = Text(f"RSS {fmt_bytes(rss):>9}  ", style="bold")
    for (_, _, ch, style), c in zip(parts, cells):
        bar.append(ch * c, style=style)
    legend = Text()
    for n, label, ch, style in parts:
        legend.append(f"{ch} ", style=style)
        legend.append(f"{label} {fmt_bytes(n)}  ")
    rows = [bar, legend]
    if (pc := view.snapshot.prompt_cache) is not None:  # reusable prompt prefixes
        entries = f"{pc.entries} {'entry' if pc.entries == 1 else 'entries'}"
        rows.append(Text.assemble(("prompt cache ", "bold"), f"{entries}, {fmt_bytes(pc.bytes)} of "
                                  f"{fmt_bytes(pc.max_bytes)}, {pc.hit_tokens:,} tokens reused"
                                  + (f"; disk {fmt_bytes(pc.disk_bytes)}" if pc.disk_dir else "")))
    return Panel(Group(*rows), title="memory", title_align="left", border_style="magenta")


def requests_panel(view: "View", max_rows: int = MAX_REQUEST_ROWS) -> Panel:
    """Active requests: id, client, state, prompt and generated tokens, tok/s, age."""
    reqs = view.snapshot.requests if view.snapshot is not None else []
    title = f"requests · {len(reqs)} active of {view.snapshot.max_queue if view.snapshot is not None else '?'}"
    if not reqs:
        return Panel(Text("idle: no active requests", style="dim"), title=title, title_align="left")
    t = Table(box=None, expand=True, header_style="bold", padding=(0, 1), pad_edge=False)
    for c, j in (("id", "left"), ("client", "left"), ("state", "left"), ("prompt", "right"),
                 ("tokens", "right"), ("tok/s", "right"), ("age", "right")):
        t.add_column(c, justify=j, no_wrap=True, overflow="ellipsis")
    for r in reqs[:max_rows]:
        t.add_row(r.id.split(":", 1)[-1], r.client, Text(r.state, style="green" if r.state == "decoding" else "cyan"),
                  str(r.prompt_tokens), f"{r.tokens}/{r.max_tokens}", f"{r.tps:.1f}", fmt_duration(r.age_s))
    parts: list[RenderableType] = [t]
    if len(reqs) > max_rows:
        parts.append(Text(f"… and {len(reqs) - max_rows} more", style="dim"))
    return Panel(Group(*parts), title=title, title_align="left")


def _groups(n: int, k: int) -> list[range]:
    return [range(i, min(n, i + k)) for i in range(0, n, k)]


def heat_cell(heat: float, top: float, resident: bool) -> tuple[str, str]:
    """(glyph, style) of one heat map cell: shade by recent use, a block glyph if resident."""
    frac = heat / top if top > 0 else 0.0
    level = 0 if frac < 0.05 else min(4, math.ceil(frac * 4))
    if resident:
        return RESIDENT[level], HEAT_STYLES[level]
    return (EVICTED_WARM, HEAT_STYLES[level]) if level else (COLD, "grey30")


def heat_rows(view: "View", width: int = 100,
              max_rows: int | None = None) -> tuple[list[tuple[str, Text]], int, int, int]:
    """The heat map's rows as (label, cells); experts per column, layers per row, characters per column.

    Experts are bucketed so the grid has at most MAX_HEAT_COLS columns and fits `width`; layers are
    bucketed when there are more than `max_rows`. A bucket shows its hottest expert: that one's heat,
    and whether that one is resident (a cold bucket is drawn resident if any of its experts is).
    Few experts get a space after each cell, so the grid is easier to read.
    """
    heat = view.snapshot.heat
    values, resident = (heat.values, heat.resident) if heat is not None else ([], [])
    n_layers = len(values)
    n_exp = max((len(r) for r in values), default=0)
    cols = max(8, min(MAX_HEAT_COLS, width - HEAT_OVERHEAD))
    k = max(1, math.ceil(n_exp / cols))
    cw = 2 if 2 * math.ceil(n_exp / k) <= cols else 1
    lk = max(1, math.ceil(n_layers / max_rows)) if max_rows else 1
    top = max((v for row in values for v in row), default=0.0)
    out = []
    for lg in _groups(n_layers, lk):
        res = [set(resident[i]) if i < len(resident) else set() for i in lg]
        cells = Text()
        for eg in _groups(n_exp, k):
            members = [(values[i][e], e in res[j]) for j, i in enumerate(lg) for e in eg if e < len(values[i])]
            h, is_res = max(members, default=(0.0, False))
            if heat_cell(h, top, False)[0] == COLD:
                is_res = any(r for _, r in members)
            cells.append(*heat_cell(h, top, is_res))
            if cw == 2:
                cells.append(" ")
        label = f"L{lg[0]}" if len(lg) == 1 else f"L{lg[0]}-{lg[-1]}"
        out.append((label, cells))
    return out, k, lk, cw


def experts_panel(view: "View", width: int = 100, max_rows: int | None = None) -> Panel:
    """Cache hit rate overall and per layer, and the layer x expert heat map with residents marked."""
    cache, r = view.snapshot.cache, view.rates
    rows, k, lk, cw = heat_rows(view, width, max_rows)
    lh, lm = cache.layer_hits, cache.layer_misses
    slots, used = cache.slots_per_layer, cache.used_slots
    recent = r.layer_hit_rate
    summary = Text.assemble(("hit rate ", "bold"), (fmt_pct(cache.hit_rate), "bold green"), " overall · ",
                            (fmt_pct(r.hit_rate), "bold"), f" last {r.span_s:.0f}s · hits {cache.hits:,}"
                            f" · misses {cache.misses:,}")
    grid = Table.grid(padding=(0, 1))
    grid.add_column(justify="right", no_wrap=True, style="bold")
    grid.add_column(justify="right", no_wrap=True)
    grid.add_column(no_wrap=True)
    grid.add_column(justify="right", no_wrap=True, style="dim")
    n_cols = len(rows[0][1]) // cw if rows else 0
    ruler = [" "] * (n_cols * cw)
    step = 16 if n_cols * cw > 32 else 8
    for c in range(0, n_cols, step // cw):
        label = str(c * k)
        if c * cw + len(label) <= len(ruler):
            ruler[c * cw:c * cw + len(label)] = label
    grid.add_row("layer", "hit%", Text("".join(ruler), style="dim"), "slots")
    for i, (label, cells) in enumerate(rows):
        layers = range(i * lk, min(len(lh), (i + 1) * lk)) if lh else range(0)
        rec = [recent[j] for j in layers if j < len(recent) and recent[j] is not None]
        if rec:  # recent traffic: the hit rate over the last few seconds
            hit = sum(rec) / len(rec)
        else:
            h, m = sum(lh[j] for j in layers), sum(lm[j] for j in layers if j < len(lm))
            hit = h / (h + m) if h + m else None
        su = sum(used[j] for j in layers if j < len(used))
        sl = sum(slots[j] for j in layers if j < len(slots))
        grid.add_row(label, "-" if hit is None else f"{hit:.0%}", cells, f"{su}/{sl}" if sl else "")
    legend = Text()
    legend.append(RESIDENT[::-1], style="bold")
    legend.append(" resident, hot→cold   ")
    legend.append(EVICTED_WARM, style="bold")
    legend.append(" used, not resident   ")
    legend.append(COLD, style="bold")
    legend.append(" cold")
    scale = [f"{k} experts a column"] if k > 1 else []
    if lk > 1:
        scale.append(f"{lk} layers a row")
    title = " · ".join(["experts · recent use per layer", *scale])
    body = Group(summary, grid, legend) if rows else Group(summary, Text("no heat map in the snapshot", style="dim"))
    return Panel(body, title=title, title_align="left", border_style="cyan")


def error_panel(view: "View") -> Panel:
    return Panel(Text(f"the daemon went away: {view.error}", style="bold red"), title="daemon died",
                 title_align="left", border_style="red")


def waiting(interval: float = 0.5) -> Text:
    """The frame shown before the first snapshot arrives."""
    return Text(f"moed top: asking the daemon for its status (every {interval:g}s; q quits)", style="dim")


# ---------------------------------------------------------------------- layout


def _side_by_side(left: RenderableType, right: RenderableType) -> Table:
    t = Table.grid(expand=True)
    t.add_column(ratio=1)
    t.add_column(ratio=1)
    t.add_row(left, right)
    return t


def dashboard(view: "View", width: int = 100, height: int | None = None) -> Group:
    """The whole screen: header, throughput and disk, memory, requests, then the expert heat map.

    From WIDE columns up, throughput and disk sit side by side. With `height`, the heat map's
    layers are bucketed so the frame fits.
    """
    parts: list[RenderableType] = []
    if view.error:
        parts.append(error_panel(view))
    parts.append(header_panel(view))
    if view.loading:
        parts.append(loading_panel(view, width))
        if view.snapshot is not None and view.snapshot.requests:
            parts.append(requests_panel(view))
        return Group(*parts)
    wide = width >= WIDE
    half = width // 2 if wide else width
    tp, dk = throughput_panel(view, half), disk_panel(view, half)
    parts.append(_side_by_side(tp, dk) if wide else Group(tp, dk))
    parts.append(memory_panel(view, width))
    parts.append(requests_panel(view, MAX_REQUEST_ROWS))
    experts = experts_panel(view, width)
    if height:  # bucket layers until the heat map fits under the rest
        room = height - 1 - lines(Group(*parts), width)
        n_layers = len(view.snapshot.heat.values)
        max_rows = n_layers
        while max_rows > 2 and lines(experts, width) > room:
            max_rows = min(max_rows - 1, math.ceil(n_layers / (math.ceil(n_layers / max_rows) + 1)))
            experts = experts_panel(view, width, max_rows)
    parts.append(experts)
    return Group(*parts)


def lines(renderable: RenderableType, width: int) -> int:
    """How many lines `renderable` takes at `width` columns."""
    con = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    return len(con.render_lines(renderable, con.options, pad=False))
