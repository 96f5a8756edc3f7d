"""The daemon for real: background start, CLI, many clients at once, the OpenAI API, faults."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import httpx
import psutil
import pytest
from daemon_util import CLI, assert_nothing_left, env_for, free_port, http_daemon, moed, status, wait_until

from moed.client.client import Client, DaemonDied, DaemonNotRunning, RequestRejected
from moed.daemon.service.status import PUBLISH_S
from moed.ipc.codec import decode, encode, from_plain
from moed.ipc.messages import DaemonStatus, Finished, Status

PROMPT_A = "The paged expert cache"
PROMPT_B = "Once upon a time, in a land of small memories and large models,"
CHAT = [{"role": "user", "content": "Tell me about caches."}]

CLIENT_SCRIPT = textwrap.dedent("""
    import json, os, sys, time
    from moed.client import Client
    prompt, go = sys.argv[1], sys.argv[2]
    with Client(name="test-proc") as c:
        print("ready", flush=True)
        while not os.path.exists(go):
            time.sleep(0.005)
        _, ids, fin = c.complete(prompt, max_tokens=48)
    print(json.dumps({"tokens": ids, "reason": fin.reason, "mlx": "mlx.core" in sys.modules}), flush=True)
""")


@pytest.fixture(scope="module")
def daemon(tiny_models, tmp_path_factory):
    """A daemon on tiny qwen3_moe with HTTP, started with `moed start`, stopped and checked after."""
    with http_daemon(tiny_models["qwen3_moe"], tmp_path_factory.mktemp("rt"), 0.25) as d:
        yield d


def openai_chat(port: int, max_tokens: int = 48) -> tuple[str, str]:
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    model = client.models.list().data[0].id
    text, finish = "", None
    for chunk in client.chat.completions.create(model=model, messages=CHAT, max_tokens=max_tokens,
                                                temperature=0, stream=True):
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.choices and chunk.choices[0].finish_reason:
            finish = chunk.choices[0].finish_reason
    return text, finish


def test_two_client_processes_and_openai_at_once_equal_alone(daemon, tmp_path, monkeypatch):
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(daemon["runtime"]))
    with Client() as c:
        alone = {p: c.complete(p, max_tokens=48)[1] for p in (PROMPT_A, PROMPT_B)}
    model_name = os.path.basename(daemon["model"])
    alone_chat = openai_chat(daemon["port"])
    assert alone_chat[1] == "length" and alone_chat[0]
    peak_before = status(daemon["env"])["totals"]["peak_active"]

    go = tmp_path / "go"
    procs = {p: subprocess.Popen([sys.executable, "-c", CLIENT_SCRIPT, p, str(go)], env=daemon["env"],
                                 stdout=subprocess.PIPE, text=True) for p in (PROMPT_A, PROMPT_B)}
    for proc in procs.values():
        assert proc.stdout.readline().strip() == "ready"
    chat_result = {}
    t = threading.Thread(target=lambda: chat_result.update(r=openai_chat(daemon["port"])))
    go.touch()
    t.start()
    outs = {p: json.loads(proc.communicate(timeout=120)[0]) for p, proc in procs.items()}
    t.join(timeout=120)

    for p, out in outs.items():
        assert out["tokens"] == alone[p], p
        assert out["reason"] == "length" and out["mlx"] is False  # clients never load the model
    assert chat_result["r"] == alone_chat
    snap = status(daemon["env"])
    assert snap["totals"]["peak_active"] >= 2 and peak_before == 1  # they really ran together
    # the model is loaded once: one daemon process serves everybody
    daemons = [p for p in psutil.process_iter(["cmdline"])
               if p.info["cmdline"] and "daemon" in p.info["cmdline"] and "moed.client.cli" in p.info["cmdline"]
               and p.environ().get("MOED_RUNTIME_DIR") == str(daemon["runtime"])]
    assert [p.pid for p in daemons] == [snap["pid"]]
    assert model_name


def test_http_api_errors_and_metrics(daemon):
    base = f"http://127.0.0.1:{daemon['port']}"
    assert httpx.get(f"{base}/health").json()["status"] == "ready"
    models = httpx.get(f"{base}/v1/models").json()
    assert models["data"][0]["id"] == os.path.basename(daemon["model"])
    r = httpx.post(f"{base}/v1/completions", json={"prompt": PROMPT_A, "max_tokens": 5, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 5
    cases = [
        (b"{not json", 400), (json.dumps({"prompt": 3}).encode(), 400),
        (json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400),
        (json.dumps({"prompt": "x", "max_tokens": 10**12}).encode(), 400),
        (json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400),
        (json.dumps({"prompt": "x", "model": "gpt-17"}).encode(), 404),
        (json.dumps({"prompt": "word " * 40000, "max_tokens": 4}).encode(), 400),
    ]
    for body, code in cases:
        r = httpx.post(f"{base}/v1/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == code, (body[:40], r.text)
        assert "message" in r.json()["error"]
    metrics = httpx.get(f"{base}/metrics").text
    for name in ("moed_requests_total", "moed_generated_tokens_total", "moed_cache_hits_total",
                 "moed_cache_misses_total", "moed_expert_bytes_read_total", "moed_resident_memory_bytes"):
        assert f"\n{name} " in metrics
    # the daemon still serves after all that
    assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200


def test_ps_json_is_the_typed_status(daemon):
    """`moed ps --json` prints the DaemonStatus the daemon sends, and it reads back into one, strictly."""
    snap = from_plain(DaemonStatus, status(daemon["env"]))
    assert snap.loaded and snap.pid == daemon["pid"] and snap.model == daemon["model"]
    assert snap.checkpoint.arch == "qwen3_moe" and snap.checkpoint.layer_range == (0, snap.checkpoint.layers)
    assert len(snap.workers) == 2 and all(w.alive and w.ready for w in snap.workers)
    assert snap.cache.budget_bytes < snap.checkpoint.expert_bytes and snap.memory.rss == snap.rss_bytes
    assert len(snap.heat.values) == len(snap.cache.slots_per_layer) == len(snap.heat.resident)
    assert snap.http == f"127.0.0.1:{daemon['port']}" and snap.ranks == []


def test_status_is_published_by_the_engine_loop_not_built_per_query(daemon):
    """The frontend serves the snapshot the engine loop last published, as it is: queries between
    two publishes get the same one, and an idle daemon still republishes every PUBLISH_S."""
    with Client(str(daemon["runtime"])) as c:
        t0, seen = time.monotonic(), []
        while time.monotonic() - t0 < 2.0:
            seen.append(c.status().uptime_s)
            time.sleep(0.003)  # under the frontend's message rate bound (ClientBounds.rate)
    assert len(seen) > 40
    assert 2 <= len(set(seen)) <= 2.0 / PUBLISH_S + 2, sorted(set(seen))


def test_a_status_loop_past_the_rate_bound_is_refused_not_left_waiting(daemon):
    """The finding: the rate bound's Error went unread and `status()` waited for good."""
    with Client(str(daemon["runtime"])) as c:
        t0 = time.monotonic()
        with pytest.raises(RequestRejected) as e:
            while time.monotonic() - t0 < 20:
                c.status()
        assert e.value.code == "rate_limited"
        time.sleep(0.5)  # the bucket refills
        assert c.status().state == "ready"


def test_status_answers_while_loading_and_is_built_on_the_engine_thread(tiny_models, tmp_path):
    """Supervisor.status(), what the frontend's I/O thread calls, returns the snapshot the loading
    (engine) thread last stored, as it is: state "loading" with its progress, then the loaded one."""
    from moed.daemon.service.supervisor import DaemonConfig, Supervisor

    sup = Supervisor(DaemonConfig(model=str(tiny_models["qwen3_moe"]), runtime_dir=str(tmp_path / "rt")))
    first = sup.status()
    assert first.state == "starting" and sup.status() is first  # stored once, not built per call
    seen, done = [], threading.Event()

    def poll():  # another thread, as the frontend's
        while not done.is_set():
            seen.append(sup.status())
            time.sleep(0.001)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        sup._load()  # this thread is the engine's: it publishes as the load goes
    finally:
        done.set()
        poller.join()
    try:
        loading = [s for s in seen if s.state == "loading"]
        assert loading and all(not s.loaded and s.cache is None and s.checkpoint is None for s in loading)
        assert len({s.progress.phase for s in loading}) >= 2, {s.progress.phase for s in loading}
        last = sup.status()
        assert sup.status() is last and last.state == "ready"  # the load's end published once, then kept
        snap = sup.status()
        assert snap.loaded and snap.checkpoint.arch == "qwen3_moe" and len(snap.workers) == 2
        assert decode(encode(Status(snap))).snapshot == snap
    finally:
        sup.pm.close()


def test_native_bad_input_and_abort(daemon, monkeypatch):
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(daemon["runtime"]))
    with Client() as c:
        with pytest.raises(RequestRejected, match="max_tokens") as e:
            c.complete(PROMPT_A, max_tokens=0)
        assert e.value.code == "bad_request"
        gen = c.generate(PROMPT_A, max_tokens=400)
        next(gen)
        gen.close()  # closing the stream aborts it
        wait_until(lambda: c.status().totals.aborted >= 1)
        assert c.complete(PROMPT_A, max_tokens=3)[2].completion_tokens == 3


def test_killed_client_has_its_request_aborted(daemon, monkeypatch):
    """A client killed mid-stream: its request is aborted, a concurrent stream goes on unchanged."""
    monkeypatch.setenv("MOED_RUNTIME_DIR", str(daemon["runtime"]))
    env = daemon["env"]
    with Client() as c:
        ref = c.complete(PROMPT_B, max_tokens=64)[1]
    before = status(env)["totals"]["aborted"]
    script = ("from moed.client import Client\nc = Client()\n"
              "for ev in c.generate('x', max_tokens=3000):\n    print('tok', flush=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True)
    proc.stdout.readline()
    with Client() as c:
        other = c.generate(PROMPT_B, max_tokens=64)
        ids = [next(other).token]
        proc.kill()
        proc.wait()
        ids += [ev.token for ev in other if not isinstance(ev, Finished)]
    assert ids == ref
    snap = wait_until(lambda: (s := status(env))["totals"]["aborted"] > before and not s["requests"] and s)
    assert snap["totals"]["aborted"] == before + 1


def test_cli_start_run_ps_stop_leaves_nothing(tmp_path):
    runtime, home = tmp_path / "rt", tmp_path / "home"
    env = env_for(runtime, home)
    port = free_port()
    moed(env, "start", "--demo", "--http", f"127.0.0.1:{port}", "--api-key", "sesame")
    try:
        out = moed(env, "run", "Hello", "--max-tokens", "8", "-v")
        assert out.stdout.strip() and "8 tokens" in out.stderr
        snap = status(env)
        assert snap["state"] == "ready" and snap["totals"]["completion_tokens"] == 8
        assert len(snap["workers"]) == 2 and all(w["alive"] for w in snap["workers"])
        assert "moed" in moed(env, "ps").stdout
        assert oct((runtime / "daemon.json").stat().st_mode)[-3:] == "600"
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models").status_code == 401
        ok = httpx.get(f"http://127.0.0.1:{port}/v1/models", headers={"Authorization": "Bearer sesame"})
        assert ok.status_code == 200
        assert moed(env, "start", "--demo", check=False).returncode == 1  # one daemon per runtime dir
    finally:
        moed(env, "stop")
    assert_nothing_left(runtime, [snap["pid"]] + [w["pid"] for w in snap["workers"]], snap["pid"])
    with pytest.raises(DaemonNotRunning):
        Client(str(runtime))


def test_sigkilled_daemon_raises_daemon_died_and_restart_cleans_up(tiny_models, tmp_path):
    runtime = tmp_path / "rt"
    env = env_for(runtime)
    daemon = subprocess.Popen([*CLI, "daemon", "--model", str(tiny_models["mixtral"])], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_until(lambda: (runtime / "daemon.json").exists(), timeout=60)
        client = Client(str(runtime))
        wait_until(lambda: client.status().state == "ready", timeout=60)
        workers = [w.pid for w in client.status().workers]
        gen = client.generate(PROMPT_B, max_tokens=5000)
        next(gen)
        daemon.send_signal(signal.SIGKILL)
        t0 = time.monotonic()
        with pytest.raises(DaemonDied):
            for ev in gen:
                assert not isinstance(ev, Finished)
        assert time.monotonic() - t0 < 2.0
        client.close()
        daemon.wait()
        psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=10)
        assert not any(psutil.pid_exists(p) for p in workers), "workers must die with their supervisor"
        # the next start finds the stale files and segments, removes them and starts
        assert (runtime / "daemon.json").exists()
        moed(env, "start", "--model", str(tiny_models["mixtral"]))
        snap = status(env)
        moed(env, "stop")
        assert_nothing_left(runtime, [snap["pid"]] + [w["pid"] for w in snap["workers"]], snap["pid"])
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"moed-{daemon.pid}-")] \
            if os.path.isdir("/dev/shm") else True
        assert "removed stale" in (runtime / "daemon.log").read_text()
    finally:
        if daemon.poll() is None:
            daemon.kill()


def test_chat_commands(daemon):
    """`moed chat`: a turn rendered, /stats, /system (resets), /reset, an unknown command, /exit."""
    script = "Hello there\n/stats\n/system You are terse.\nAnd now?\n/reset\n/nope\n/exit\n"
    p = subprocess.run([*CLI, "chat", "--max-tokens", "6"], input=script, env=daemon["env"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "moed chat" in out and out.count("6 tokens") == 2  # two answered turns
    assert "hit rate" in out  # /stats shows the daemon's figures
    assert "system prompt set" in out and "conversation reset" in out and "unknown command" in out
