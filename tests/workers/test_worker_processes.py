"""The engine's real moving parts: worker processes, ZeroMQ, shared memory, RSS, the CLI."""

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from moed.daemon.engine.generate import SamplingParams, run
from moed.daemon.engine.loader import load_paged


def shm_segments():
    return {p.name for p in Path("/dev/shm").glob("moed-*")} if Path("/dev/shm").exists() else set()


def test_workers_are_processes_on_zeromq_and_leave_nothing(tiny_models):
    before = shm_segments()
    me = psutil.Process()
    pm = load_paged(tiny_models["qwen3_5_moe"], cache_fraction=0.25, workers=2)
    try:
        pids = list(pm.fetcher.pids)
        assert len(pids) == 2 and os.getpid() not in pids
        children = {c.pid for c in me.children(recursive=True)}
        assert set(pids) <= children
        sockets = [Path(e.removeprefix("ipc://")) for e in pm.fetcher.endpoints]
        assert sockets and all(s.exists() and s.is_socket() for s in sockets)
        for pid in pids:  # each worker holds a unix socket: its ZeroMQ connection
            assert any(c.family.name == "AF_UNIX" for c in psutil.Process(pid).net_connections(kind="unix"))
        run(pm.model, pm.tokenizer, "hello there", SamplingParams(max_tokens=8))
        assert pm.store.stats.bytes_read > 0
        assert shm_segments() - before, "the staging buffer is a moed-* shared-memory segment"
    finally:
        pm.close()
    gone, alive = psutil.wait_procs([psutil.Process(p) for p in pids if psutil.pid_exists(p)], timeout=5)
    assert not alive
    assert not any(s.exists() for s in sockets)
    assert shm_segments() == before


def test_generate_cli_json(tiny_models):
    out = subprocess.run(
        [sys.executable, "-m", "moed.client.cli", "generate", "--model", str(tiny_models["mixtral"]),
         "--prompt", "Tell me about caches", "--max-tokens", "12", "--cache-fraction", "0.5", "--json"],
        capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    d = json.loads(out.stdout)
    for key in ("tokens", "text", "decode_tps", "prefill_tps", "hit_rate", "bytes_read", "peak_rss_bytes"):
        assert key in d
    assert len(d["tokens"]) == 12 and d["decode_tps"] > 0 and 0 <= d["hit_rate"] <= 1 and d["bytes_read"] > 0


def test_cli_rejects_bad_model(tmp_path):
    out = subprocess.run([sys.executable, "-m", "moed.client.cli", "generate", "--model", str(tmp_path / "x"),
                          "--prompt", "hi"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "not found" in out.stderr


def watch_peak_rss(proc: subprocess.Popen, peak: list) -> None:
    p = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak[0] = max(peak[0], p.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.02)


def test_peak_rss_tracks_the_cache_budget(big_model):
    """Experts >= 4x the cache: peak RSS stays within non-expert + cache budget + 300 MB."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "moed.client.cli", "generate", "--model", str(big_model), "--prompt",
         "A long walk through every expert", "--max-tokens", "24", "--temp", "1", "--cache-fraction", "0.2",
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak = [0]
    watcher = threading.Thread(target=watch_peak_rss, args=(proc, peak))
    watcher.start()
    stdout, stderr = proc.communicate(timeout=300)
    watcher.join()
    assert proc.returncode == 0, stderr
    d = json.loads(stdout)
    assert d["expert_bytes"] >= 4 * d["cache_bytes"]
    assert d["bytes_read"] > d["cache_bytes"], "the run must page experts in and out"
    bound = d["non_expert_bytes"] + d["cache_bytes"] + 300e6
    assert max(peak[0], d["peak_rss_bytes"]) <= bound, (peak[0], d["peak_rss_bytes"], bound)
