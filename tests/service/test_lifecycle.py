"""Lifecycle (issue 17), each a test that failed before its fix: one daemon per runtime directory (an
advisory lock held for the daemon's life), `stop`/`start` signal only the process holding that lock
(never an unrelated process a stale pid file names), `stop` and stop signals interrupt a load and exit
0, and `start` right after a SIGKILL does not refuse while the dying daemon's pid still exists."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import psutil
import pytest
from daemon_util import CLI, assert_nothing_left, env_for, moed, shm_of, status, wait_until

from moed.client.client import Client
from moed.ipc.connection import daemon_files, running_daemon

# `moed daemon` whose expert-cache warm-up takes a minute (a slow disk), reporting progress as it goes
SLOW_LOAD = textwrap.dedent("""
    import sys, time
    from moed.daemon.engine import experts
    def slow_warm(self, order=None, progress=None):
        for i in range(600):
            time.sleep(0.1)
            if progress:
                progress(i / 600)
        return 0
    experts.ExpertStore.warm = slow_warm
    from moed.client.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def daemon_proc(model, runtime, script: str | None = None) -> subprocess.Popen:
    argv = [sys.executable, "-c", script] if script else CLI
    return subprocess.Popen([*argv, "daemon", "--model", str(model)], env=env_for(runtime), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def state(runtime, phase: bool = False) -> str | None:
    """The daemon's state (or its load phase), None while it does not answer."""
    try:
        with Client(str(runtime)) as c:
            s = c.status()
            return s.progress.phase if phase else s.state
    except Exception:
        return None


def reap(*procs: subprocess.Popen) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait()


# `moed daemon` that pauses 8 s once it has bound its socket, before it writes its pid file: another
# daemon started meanwhile finds no pid file (the window two `moed start` at once fall into)
SLOW_START = textwrap.dedent("""
    import sys, time
    from moed.daemon.service import frontend
    start = frontend.Frontend.start
    def slow_start(self):
        print("bound", flush=True)
        time.sleep(8)
        return start(self)
    frontend.Frontend.start = slow_start
    from moed.client.cli import main
    sys.exit(main(sys.argv[1:]))
""")


def test_two_daemons_started_at_once_one_serves_the_other_refuses(tiny_models, tmp_path):
    runtime = tmp_path / "rt"
    first = daemon_proc(tiny_models["qwen3_moe"], runtime, SLOW_START)
    second = None
    try:
        assert first.stdout.readline().strip() == "bound"
        second = daemon_proc(tiny_models["qwen3_moe"], runtime)
        rc = second.wait(timeout=30)  # was: it started too, stealing the socket path
        out = second.stdout.read()
        assert rc == 1 and "already serves" in out, out
        wait_until(lambda: first.poll() is not None or state(runtime) == "ready", timeout=60)
        snap = status(env_for(runtime))
        assert snap["pid"] == first.pid == running_daemon(daemon_files(runtime))
        assert moed(env_for(runtime), "stop").returncode == 0
        assert first.wait(timeout=30) == 0
        assert_nothing_left(runtime, [first.pid] + [w["pid"] for w in snap["workers"]], first.pid)
    finally:
        reap(first, *([second] if second is not None else []))


def test_stop_and_start_never_signal_a_process_a_stale_pid_file_names(tiny_models, tmp_path):
    runtime = tmp_path / "rt"
    env = env_for(runtime)
    runtime.mkdir(mode=0o700)
    bystander = subprocess.Popen(["sleep", "120"])  # a live process that reused the dead daemon's pid
    try:
        (runtime / "daemon.pid").write_text(f"{bystander.pid}\n")
        p = moed(env, "stop")
        assert "not moed's daemon" in p.stderr and bystander.poll() is None
        moed(env, "start", "--model", str(tiny_models["qwen3_moe"]))  # was refused: "already running"
        snap = status(env)
        assert snap["pid"] != bystander.pid
        moed(env, "stop")
        assert bystander.poll() is None, "an unrelated process was signalled"
        assert_nothing_left(runtime, [snap["pid"]] + [w["pid"] for w in snap["workers"]], snap["pid"])
    finally:
        reap(bystander)


@pytest.mark.parametrize("how", ["moed stop", "SIGTERM", "SIGINT"])
def test_a_stop_during_load_interrupts_it_and_exits_0(tiny_models, tmp_path, how):
    runtime = tmp_path / "rt"
    proc = daemon_proc(tiny_models["qwen3_moe"], runtime, SLOW_LOAD)
    try:
        wait_until(lambda: proc.poll() is not None or state(runtime) == "loading", timeout=60)
        wait_until(lambda: "warming" in (state(runtime, phase=True) or ""), timeout=30)
        t0 = time.monotonic()
        if how == "moed stop":
            p = moed(env_for(runtime), "stop", timeout=60)
            assert "moed stopped" in p.stderr
        else:
            proc.send_signal(signal.SIGTERM if how == "SIGTERM" else signal.SIGINT)
        rc = proc.wait(timeout=20)  # the warm-up alone would take a minute
        out = proc.stdout.read()
        assert rc == 0 and time.monotonic() - t0 < 10, (rc, out[-2000:])
        assert "stopped while loading" in out and "Traceback" not in out
        assert not (runtime / "daemon.json").exists() and not shm_of(proc.pid)
    finally:
        reap(proc)


def test_start_right_after_a_sigkill_does_not_refuse_while_the_pid_lingers(tiny_models, tmp_path):
    runtime = tmp_path / "rt"
    env = env_for(runtime)
    dead = daemon_proc(tiny_models["qwen3_moe"], runtime)
    try:
        wait_until(lambda: dead.poll() is not None or state(runtime) == "ready", timeout=60)
        old_workers = [w["pid"] for w in status(env)["workers"]]
        dead.send_signal(signal.SIGKILL)
        wait_until(lambda: psutil.Process(dead.pid).status() == psutil.STATUS_ZOMBIE, timeout=10)
        assert psutil.pid_exists(dead.pid)  # not reaped yet: the pid file still names a process
        moed(env, "start", "--model", str(tiny_models["qwen3_moe"]))  # was: "already running (pid ...)"
        snap = status(env)
        assert snap["pid"] != dead.pid and not shm_of(dead.pid)  # the dead daemon's segments were removed
        moed(env, "stop")
        assert_nothing_left(runtime, [snap["pid"]] + [w["pid"] for w in snap["workers"]] + old_workers, snap["pid"])
    finally:
        reap(dead)


def imports_mlx(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/maps") as f:
            return "mlx" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads /proc/PID/maps")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_while_the_daemon_still_imports_exits_0(tiny_models, tmp_path, sig):
    runtime = tmp_path / "rt"
    proc = daemon_proc(tiny_models["qwen3_moe"], runtime)
    try:
        wait_until(lambda: proc.poll() is not None or imports_mlx(proc.pid), timeout=30, every=0.005)
        proc.send_signal(sig)  # inside `moed daemon`, before (or as) the supervisor takes over its signals
        rc = proc.wait(timeout=30)
        out = proc.stdout.read()
        assert rc == 0, (rc, out[-2000:])  # was: -15 (SIGTERM's default action) or 130 (KeyboardInterrupt)
        assert "Traceback" not in out and not (runtime / "daemon.json").exists()
    finally:
        reap(proc)
