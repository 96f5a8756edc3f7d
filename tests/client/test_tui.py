"""`moed top`: the pure panels rendered from fixed snapshots, the tracker's rates, the key reader,
and the real dashboard driven in tmux against a daemon on the tiny model."""

from __future__ import annotations

import copy
import io
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import pytest
from rich.console import Console

from moed.client import dashboard as dash
from moed.client.client import DaemonDied
from moed.client.top import KeyReader, Poller
from moed.client.view import Rates, Sample, Tracker, View
from moed.ipc.codec import from_plain
from moed.ipc.messages import DaemonStatus

# ---------------------------------------------------------------------- fixed snapshots

TOTALS = {"requests": 0, "completed": 0, "rejected": 0, "aborted": 0, "failed": 0, "prompt_tokens": 0,
          "completion_tokens": 0, "generated_tokens": 0, "peak_active": 0}
LOADING = {"state": "loading", "progress": {"phase": "mapping experts", "done": 0.42}, "pid": 4242,
           "uptime_s": 3.2, "model": "/models/med-qwen3_moe", "rss_bytes": 52_000_000, "http": None,
           "clients": 1, "requests": [], "decode_tps": 0.0, "prefill_tps": 0.0, "kv_cache_bytes": 0,
           "totals": TOTALS, "max_queue": 32, "context": None, "prompt_cache": None, "checkpoint": None, "cache": None, "workers": [],
           "io": None, "heat": None, "memory": None, "ranks": []}


def typed(snap: dict) -> DaemonStatus:
    """A fixture written as `moed ps --json` prints it -> the DaemonStatus the daemon sends."""
    return from_plain(DaemonStatus, snap)


def _busy() -> dict:
    """4 layers x 16 experts, two requests decoding, one worker dead."""
    heat = [[round(0.5 * ((layer + 3 * e) % 11), 2) for e in range(16)] for layer in range(4)]
    heat[2][6] = 9.5  # hottest, resident
    heat[3][0] = 8.0  # hot but not resident: shown as evicted-warm
    resident = [[e for e in range(16) if e % 4 != 3] for _ in range(4)]
    resident[3] = [e for e in resident[3] if e != 0]
    return {
        "state": "ready", "progress": {"phase": "ready", "done": 1.0}, "pid": 12466, "uptime_s": 754.3,
        "model": "/home/u/.cache/moed/models/tiny-qwen3_5_moe", "rss_bytes": 96_669_696, "http": "127.0.0.1:8000",
        "clients": 3,
        "requests": [
            {"id": "a1b2:req-one", "client": "moed run:1234", "prompt_tokens": 4, "tokens": 37, "max_tokens": 300,
             "state": "decoding", "tps": 51.25, "age_s": 1.2},
            {"id": "c3d4:req-two", "client": "python:777", "prompt_tokens": 812, "tokens": 0, "max_tokens": 64,
             "state": "prefill", "tps": 0.0, "age_s": 0.3},
        ],
        "decode_tps": 171.18, "prefill_tps": 97.26, "kv_cache_bytes": 3_500_000,
        "totals": dict(TOTALS, requests=9, completed=6, rejected=1, prompt_tokens=850, completion_tokens=1200),
        "max_queue": 32, "context": 32768, "prompt_cache": None,
        "checkpoint": {"arch": "qwen3_5_moe", "quantization": 4, "layers": 4, "top_k": 4,
                       "non_expert_bytes": 479_904, "expert_bytes": 1_966_080, "layer_range": [0, 4]},
        "cache": {"budget_bytes": 1_474_560, "slots_per_layer": [12] * 4, "experts_per_layer": [16] * 4,
                  "used_slots": [12, 12, 12, 11], "hits": 2920, "misses": 810, "hit_rate": 2920 / 3730,
                  "bytes_read": 24_883_200, "read_seconds": 0.255, "prefetched": 0, "prefetch_used": 0,
                  "layer_hits": [730, 720, 730, 740], "layer_misses": [190, 210, 220, 190]},
        "workers": [{"pid": 12475, "alive": True, "ready": True, "queued_bytes": 65_536, "restarts": 0},
                    {"pid": 12476, "alive": False, "ready": True, "queued_bytes": 0, "restarts": 1}],
        "io": {"read_calls": 420, "reads": 7290, "bytes_read": 24_883_200, "read_seconds": 0.227, "respawns": 1,
               "in_flight": 1, "packed": True, "direct": False, "lookahead": True},
        "heat": {"values": heat, "resident": resident},
        "memory": {"rss": 96_669_696, "resident_weights": 479_904, "expert_cache": 1_474_560,
                   "kv_cache": 3_500_000, "other": 91_235_232},
        "ranks": [],
    }


def _med() -> dict:
    """12 layers x 128 experts (the med preset), idle."""
    s = _busy()
    heat = [[round(((i * 7 + e * 13) % 29) / 3, 2) if e % 5 else 0.0 for e in range(128)] for i in range(12)]
    resident = [[e for e in range(128) if (e + i) % 3 == 0] for i in range(12)]
    s.update(model="/models/med-qwen3_moe", requests=[], decode_tps=12.5, heat={"values": heat, "resident": resident},
             workers=[{"pid": 100 + i, "alive": True, "ready": True, "queued_bytes": 0, "restarts": 0}
                      for i in range(2)])
    s["checkpoint"] = dict(s["checkpoint"], arch="qwen3_moe", layers=12, top_k=8, non_expert_bytes=90_000_000,
                           expert_bytes=3_200_000_000, layer_range=[0, 12])
    s["cache"] = {"budget_bytes": 800_000_000, "slots_per_layer": [43] * 12, "experts_per_layer": [128] * 12,
                  "used_slots": [43] * 12, "hits": 50_000, "misses": 20_000, "hit_rate": 5 / 7,
                  "bytes_read": 9_000_000_000, "read_seconds": 4.5, "prefetched": 0, "prefetch_used": 0,
                  "layer_hits": [4000 + 100 * i for i in range(12)], "layer_misses": [1700] * 12}
    s["io"] = dict(s["io"], respawns=0, in_flight=0)
    return s


def _advance(snap: dict, dt_tokens: int, dt_bytes: int, dt_hits: int, dt_misses: int) -> dict:
    """The same daemon a little later: counters moved on."""
    s = copy.deepcopy(snap)
    s["uptime_s"] += 1.0
    s["totals"]["completion_tokens"] += dt_tokens
    c, io = s["cache"], s["io"]
    c["bytes_read"] += dt_bytes
    io["bytes_read"] += dt_bytes
    io["read_seconds"] += dt_bytes / 2e9
    c["read_seconds"] += 0.05
    c["hits"] += dt_hits
    c["misses"] += dt_misses
    c["layer_hits"] = [h + dt_hits // len(c["layer_hits"]) for h in c["layer_hits"]]
    c["layer_misses"] = [m + dt_misses // len(c["layer_misses"]) for m in c["layer_misses"]]
    return s


def _view(*snaps: dict, dt: float = 1.0) -> View:
    tr = Tracker(interval=0.5)
    v = None
    for i, s in enumerate(snaps):
        v = tr.update(typed(s), now=100.0 + i * dt)
    return v


def _text(renderable, width: int = 100) -> str:
    con = Console(record=True, width=width, color_system=None, file=io.StringIO())
    con.print(renderable)
    return con.export_text()


# ---------------------------------------------------------------------- pure rendering


def test_loading_view():
    v = _view(LOADING)
    assert v.loading
    out = _text(dash.dashboard(v, width=100))
    assert "med-qwen3_moe" in out and "loading" in out and "mapping experts" in out and "42%" in out
    assert "pid 4242" in out
    assert "heat" not in out and "disk" not in out  # nothing the snapshot does not hold yet


def test_busy_panels():
    a = _busy()
    b = _advance(a, dt_tokens=100, dt_bytes=5_000_000, dt_hits=300, dt_misses=100)
    b["requests"][0]["tokens"] += 20  # in-flight tokens count as generated too
    v = _view(a, b)
    r = v.rates
    assert r.output_tps == pytest.approx(120.0) and r.bytes_per_token == pytest.approx(5e6 / 120)
    assert r.read_bps == pytest.approx(5e6) and r.read_bandwidth == pytest.approx(2e9)
    assert r.hit_rate == pytest.approx(0.75) and r.wait_fraction == pytest.approx(0.05)
    assert v.generated == 1200 + 57 + 100

    header = _text(dash.header_panel(v))
    assert "tiny-qwen3_5_moe" in header and "qwen3_5_moe" in header and "4-bit" in header
    assert "4 layers × 16 experts, top-4" in header
    assert "1.47 MB budget of 1.97 MB experts (75%)" in header and "47/48 slots used" in header
    assert "12475" in header and "12476 dead" in header and "1/2 alive" in header and "http 127.0.0.1:8000" in header
    assert "up 12m 35s" in header  # 754.3 s, a second later

    tp = _text(dash.throughput_panel(v, 100))
    assert "171.2 tok/s" in tp and "97.3 tok/s" in tp and "120.0 tok/s" in tp
    assert "1,357 tokens generated" in tp and "9 (6 done, 1 rejected, 0 aborted)" in tp
    assert any(ch in tp for ch in dash.SPARKS[1:])  # the sparkline rose

    disk = _text(dash.disk_panel(v, 100))
    assert "41.7 KB now" in disk and "5 MB/s" in disk and "2 GB/s while reading" in disk
    assert "1 read ·" in disk and "12475: 65.5 KB" in disk and "12476: 0 B" in disk and "disk wait 5.0%" in disk

    mem = _text(dash.memory_panel(v, 100))
    assert "RSS" in mem and "96.7 MB" in mem
    for label in ("weights 480 KB", "expert cache 1.47 MB", "KV cache 3.5 MB", "other 91.2 MB"):
        assert label in mem
    bar = next(line for line in mem.splitlines() if "RSS" in line)
    assert all(ch in bar for ch in "█▓▒░")  # every part visible, even the small ones

    req = _text(dash.requests_panel(v))
    assert "2 active of 32" in req
    row = next(line for line in req.splitlines() if "req-one" in line)
    assert "moed run:1234" in row and "decoding" in row and "37" not in row and "57/300" in row and "51.2" in row
    assert "prefill" in next(line for line in req.splitlines() if "req-two" in line)

    ex = _text(dash.experts_panel(v, 100))
    assert "hit rate 78.3% overall" in ex and "75.0% last 1s" in ex and "hits 3,220" in ex
    rows = {m.group(1): line for line in ex.splitlines() if (m := re.search(r"\b(L\d+)\s+\d+%", line))}
    assert set(rows) == {"L0", "L1", "L2", "L3"}
    assert "12/12" in rows["L0"] and "11/12" in rows["L3"]
    assert "█" in rows["L2"]  # the hottest expert, resident
    assert dash.EVICTED_WARM in rows["L3"]  # hot, not resident
    assert dash.COLD in rows["L0"]  # experts 3, 7, 11, 15: not resident
    assert "resident, hot→cold" in ex and "used, not resident" in ex


def test_heat_cells_mark_residents():
    assert dash.heat_cell(10, 10, True) == ("█", dash.HEAT_STYLES[4])
    assert dash.heat_cell(0, 10, True)[0] == "▫"
    assert dash.heat_cell(10, 10, False)[0] == dash.EVICTED_WARM
    assert dash.heat_cell(0, 10, False)[0] == dash.COLD


def test_dead_daemon_and_full_dashboard():
    tr = Tracker()
    v = tr.update(typed(_busy()), now=1.0)
    dead = tr.failed("DaemonDied: the moed daemon (pid 12466) died", now=2.0)
    out = _text(dash.dashboard(dead, width=100))
    assert "daemon died" in out and "pid 12466" in out and "tiny-qwen3_5_moe" in out
    assert dead.snapshot == v.snapshot  # the last figures stay on screen


@pytest.mark.parametrize("width", [80, 100, 120])
def test_med_heat_map_fits(width):
    a = _med()
    v = _view(a, _advance(a, 40, 80_000_000, 600, 200))
    out = _text(dash.dashboard(v, width=width), width=width)
    lines = out.splitlines()
    assert max(len(line) for line in lines) <= width
    rows = [line for line in lines if re.search(r"\bL\d+\s+\d+%", line)]
    assert [re.search(r"\bL(\d+)\b", line).group(1) for line in rows] == [str(i) for i in range(12)]  # one line each
    cells = [len(re.sub(r"[^" + dash.RESIDENT + dash.EVICTED_WARM + dash.COLD + "]", "", line)) for line in rows]
    assert all(c == cells[0] for c in cells) and cells[0] <= dash.MAX_HEAT_COLS
    assert cells[0] == (64 if width >= 100 else 43)  # 128 experts, 2 (or 3) to a column
    assert ("2 experts a column" if width >= 100 else "3 experts a column") in out
    assert "43/43" in rows[0] and "idle: no active requests" in out and "med-qwen3_moe" in out
    assert "12 layers × 128 experts, top-8" in out
    # with a short terminal the layers are bucketed too, so the frame still fits
    height = 40 if width < 100 else 32  # at 80 columns the panels above stack and take more lines
    short = _text(dash.dashboard(v, width=width, height=height), width=width)
    assert "layers a row" in short and len(short.splitlines()) <= height


def test_sparkline_and_tracker_history():
    pts = tuple((float(t), float(t)) for t in range(10))
    line = dash.sparkline(pts, now=9.0, width=10, span=10.0)
    assert line[-1] == "█" and line[1] == "▁" and len(line) == 10
    assert dash.sparkline((), 0.0, 5, 5.0) == "     "
    tr = Tracker(interval=1.0, history_s=5.0)
    for i in range(10):
        v = tr.update(typed(_busy()), now=float(i))
    assert len(v.history["decode"]) == 6 and v.history["decode"][0][0] == 4.0  # last 5 s only
    other = typed(dict(_busy(), pid=1))  # a new daemon: the history starts over
    assert len(tr.update(other, now=10.0).history["decode"]) == 1
    assert Rates.between(Sample.of(typed(_busy()), 1.0), Sample.of(typed(_busy()), 1.0)) == Rates()


def test_poller_reports_a_dead_daemon():
    class Flaky:
        def __init__(self):
            self.calls, self.closed = 0, False

        def status(self):
            self.calls += 1
            if self.calls > 2:
                raise DaemonDied("the moed daemon (pid 12466) died")
            return typed(_busy())

        def close(self):
            self.closed = True

    client = Flaky()
    p = Poller(client, interval=0.01)
    p.start()
    p.join(5)
    assert not p.is_alive() and client.closed
    v = p.latest()
    assert v.error and "DaemonDied" in v.error and v.polls == 2 and v.snapshot.pid == 12466


@pytest.mark.skipif(sys.platform == "win32", reason="termios/pty are POSIX")
def test_key_reader_quits_on_q_and_restores_the_terminal():
    import pty
    import termios

    master, slave = pty.openpty()
    try:
        before = termios.tcgetattr(slave)
        quit_event = threading.Event()
        with open(slave, "rb", buffering=0, closefd=False) as stream:
            with KeyReader(quit_event, stream=stream):
                mode = termios.tcgetattr(slave)
                assert not mode[3] & termios.ICANON and not mode[3] & termios.ECHO  # cbreak
                assert mode[3] & termios.ISIG  # Ctrl-C still interrupts
                os.write(master, b"x")
                time.sleep(0.2)
                assert not quit_event.is_set()
                os.write(master, b"q")
                assert quit_event.wait(2)
            assert termios.tcgetattr(slave) == before
    finally:
        os.close(master)
        os.close(slave)


def test_top_without_a_daemon_fails_fast(tmp_path):
    env = dict(os.environ, MOED_RUNTIME_DIR=str(tmp_path))
    t0 = time.monotonic()
    p = subprocess.run([sys.executable, "-m", "moed.client.cli", "top"], env=env, capture_output=True, text=True,
                       timeout=30, stdin=subprocess.DEVNULL)
    assert p.returncode == 1 and "DaemonNotRunning" in p.stderr and time.monotonic() - t0 < 15


# ---------------------------------------------------------------------- the real thing, in tmux


class Tmux:
    """A private tmux server (its own socket), so the test never touches the user's sessions."""

    def __init__(self):
        self.sock = f"moed-test-{os.getpid()}"

    def __call__(self, *args, check=True) -> subprocess.CompletedProcess:
        # an explicit env: a C-level setenv under pytest can leave COLUMNS=80/LINES=24 in the inherited
        # environment (not in os.environ), and rich would believe them over the pane's real size
        env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
        return subprocess.run(["tmux", "-L", self.sock, *args], capture_output=True, text=True, check=check,
                              timeout=20, env=env)

    def capture(self, target: str) -> str:
        return self("capture-pane", "-p", "-t", target, check=False).stdout

    def wait_for(self, target: str, pattern: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while True:
            text = self.capture(target)
            if re.search(pattern, text):
                return text
            if time.monotonic() > deadline:
                raise AssertionError(f"{pattern!r} not on the screen after {timeout} s:\n{text}")
            time.sleep(0.1)

    def kill(self) -> None:
        self("kill-server", check=False)


def _figures(screen: str) -> dict:
    def num(pattern):
        m = re.search(pattern, screen)
        return None if m is None else float(m.group(1).replace(",", ""))

    return {"generated": num(r"([\d,]+) tokens generated"), "hits": num(r"hits ([\d,]+)"),
            "output": num(r"output\s+([\d,.]+) tok/s")}


def _wait_gone(pids: list[int], timeout: float) -> list[int]:
    """The pids among `pids` still running after up to `timeout` s."""
    import psutil

    deadline = time.monotonic() + timeout
    while True:
        alive = []
        for p in pids:
            try:
                if psutil.Process(p).status() != psutil.STATUS_ZOMBIE:
                    alive.append(p)
            except psutil.NoSuchProcess:
                pass
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.1)


def test_top_live_in_tmux():
    if shutil.which("tmux") is None:
        pytest.skip("tmux is not installed (apt-get install -y tmux): the live `moed top` test drives it")
    from moed.client.client import Client

    runtime, home = tempfile.mkdtemp(prefix="moed-rt-"), tempfile.mkdtemp(prefix="moed-home-")
    env = dict(os.environ, MOED_RUNTIME_DIR=runtime, MOED_HOME=home)
    moed = [sys.executable, "-m", "moed.client.cli"]
    tmux, stop_load = Tmux(), threading.Event()
    load, pids = None, []
    try:
        start = subprocess.run([*moed, "start", "--demo", "--cache-fraction", "0.5"], env=env, capture_output=True,
                               text=True, timeout=180)
        assert start.returncode == 0, start.stderr
        with Client(runtime, name="tui-test") as c:
            pids = [int(c.info["pid"])] + [w.pid for w in c.status().workers]

        def top_cmd(tag: str) -> str:
            inner = " ".join(shlex.quote(x) for x in ["env", "-u", "COLUMNS", "-u", "LINES",
                                                         f"MOED_RUNTIME_DIR={runtime}", f"MOED_HOME={home}",
                                                         *moed, "top", "--interval", "0.3"])
            return f"{inner}; echo {tag}=$?; stty -a; sleep 60"  # stty: is the terminal back in cooked mode?

        tmux("new-session", "-d", "-s", "top", "-x", "120", "-y", "45", top_cmd("TOP_EXIT"))
        tmux.wait_for("top", r"tokens generated", 30)

        errors: list[BaseException] = []

        def generate():  # keeps the daemon busy until told to stop
            try:
                with Client(runtime, name="tui-test") as c:
                    while not stop_load.is_set():
                        for _ in c.generate("The paged expert cache", max_tokens=300, temperature=1.0, seed=1):
                            if stop_load.is_set():
                                break
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        load = threading.Thread(target=generate, daemon=True)
        load.start()
        first = tmux.wait_for("top", r"tui-test", 20)  # the request row shows up
        f1 = _figures(first)
        time.sleep(1.5)
        # a full frame while a request decodes (between two requests it shows none)
        second = tmux.wait_for("top", r"(?s)tokens generated.*decoding", 10)
        f2 = _figures(second)
        assert f1["generated"] is not None and f2["generated"] > f1["generated"], (first, second)
        assert f2["hits"] > f1["hits"], (first, second)
        assert f2["output"] > 0, second
        assert "decoding" in second and "qwen3_5_moe" in second and "2/2 alive" in second
        assert re.search(r"L3\s+\d+%", second)  # the heat map's last layer
        lines = second.splitlines()
        assert len(lines) <= 45 and max(map(len, lines)) <= 120
        stop_load.set()
        load.join(10)
        assert not errors, errors

        tmux("send-keys", "-t", "top", "q")
        after = tmux.wait_for("top", r"TOP_EXIT=\d+", 10)
        assert "TOP_EXIT=0" in after, after
        assert "tokens generated" not in after  # the alternate screen is gone
        after = tmux.wait_for("top", r"icanon", 5)
        assert not re.search(r"(?<![-\w])-(icanon|echo)\b", after), after  # cbreak undone: line mode, echo

        # Ctrl-C quits cleanly too
        tmux("new-session", "-d", "-s", "intr", "-x", "100", "-y", "40", top_cmd("INTR_EXIT"))
        tmux.wait_for("intr", r"tokens generated", 30)
        tmux("send-keys", "-t", "intr", "C-c")
        after = tmux.wait_for("intr", r"INTR_EXIT=\d+", 10)
        assert "INTR_EXIT=0" in after and "Traceback" not in after, after

        # the daemon goes away under a second dashboard: it says so and exits non-zero
        tmux("new-session", "-d", "-s", "dies", "-x", "100", "-y", "40", top_cmd("DIED_EXIT"))
        tmux.wait_for("dies", r"tokens generated", 30)
        subprocess.run([*moed, "stop"], env=env, capture_output=True, timeout=60)
        after = tmux.wait_for("dies", r"DIED_EXIT=\d+", 15)
        assert "DIED_EXIT=1" in after and "went away" in after, after
        assert not _wait_gone(pids, 15), "daemon or workers still running after `moed stop`"
    finally:
        stop_load.set()
        tmux.kill()
        subprocess.run([*moed, "stop"], env=env, capture_output=True, timeout=60)
        if load is not None:
            load.join(5)
        _wait_gone(pids, 15)
        shutil.rmtree(runtime, ignore_errors=True)
        shutil.rmtree(home, ignore_errors=True)


PROMPT_CACHE = {"entries": 3, "bytes": 12_500_000, "max_bytes": 256_000_000, "lookups": 7, "hits": 5,
                "hit_tokens": 4_096, "looked_up_tokens": 6_000, "disk_dir": "/tmp/pc", "disk_entries": 2,
                "disk_bytes": 8_000_000, "disk_hits": 1, "disk_refused": 0}


def test_prompt_cache_shown_in_top_and_ps():
    from moed.client.ps import ps_view

    s = dict(_busy(), prompt_cache=PROMPT_CACHE)
    mem = _text(dash.memory_panel(_view(s), 120), width=120)
    assert "prompt cache 3 entries, 12.5 MB of 256 MB, 4,096 tokens reused; disk 8 MB" in mem
    ps = _text(ps_view(typed(s)), width=200)
    row = next(line for line in ps.splitlines() if "prompt cache" in line)
    assert "3 entries, 12.5 MB of 256.0 MB, 4,096 of 6,000 prompt tokens reused (5/7 requests)" in row
    assert "disk 2 entries, 8.0 MB, 1 hits (/tmp/pc)" in row
    assert "prompt cache" not in _text(dash.memory_panel(_view(_busy()), 120), width=120)  # off: nothing
    assert "off" in next(line for line in _text(ps_view(typed(_busy())), width=200).splitlines()
                         if "prompt cache" in line)
