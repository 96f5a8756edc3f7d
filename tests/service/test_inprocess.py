"""The daemon's service pieces in the test process: a real Supervisor (and the I/O workers it spawns)
run in a thread, its native socket driven by raw DEALER sockets and Client, its HTTP app through
httpx's ASGI transport (no port). Auth on both fronts, and the OpenAI translation."""

import asyncio
import json
import os
import threading
from contextlib import asynccontextmanager

import httpx
import psutil
import pytest
import zmq
from daemon_util import shm_of, wait_until

from moed.client.client import Client, RequestRejected
from moed.daemon.service.http import Api, HttpServer, make_app
from moed.daemon.service.supervisor import DaemonConfig, Supervisor
from moed.ipc.codec import decode, encode
from moed.ipc.config import PagingConfig
from moed.ipc.connection import daemon_files, read_connection
from moed.ipc.messages import Error, Generate, Hello, Ping, Pong, Welcome

PROMPT = "The paged expert cache"
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def daemon(tiny_models, tmp_path_factory):
    """A Supervisor on tiny qwen3_moe, serving from a thread of this process; stopped and checked after:
    the thread returned 0, its workers exited, no runtime file and no /dev/shm/moed-<pid>-* is left."""
    runtime = tmp_path_factory.mktemp("rt")
    sup = Supervisor(DaemonConfig(model=str(tiny_models["qwen3_moe"]), runtime_dir=str(runtime),
                                  paging=PagingConfig(cache_fraction=0.25)))
    result = {}

    def serve():
        try:
            result["rc"] = sup.run()
        except BaseException as e:  # noqa: BLE001 (reported by the fixture)
            result["error"] = e

    thread = threading.Thread(target=serve, name="test-supervisor", daemon=True)
    thread.start()
    workers = []
    try:
        wait_until(lambda: sup.status().state == "ready" or not thread.is_alive(), timeout=60)
        assert thread.is_alive(), result
        workers = [w.pid for w in sup.status().workers]
        assert workers and all(psutil.pid_exists(p) for p in workers)
        info = read_connection(daemon_files(runtime))
        yield {"sup": sup, "runtime": runtime, "info": info, "model": os.path.basename(info["model"])}
    finally:
        if getattr(sup, "frontend", None) is not None:
            sup.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the supervisor did not stop"
        assert result == {"rc": 0}, result
        _, alive = psutil.wait_procs([psutil.Process(p) for p in workers if psutil.pid_exists(p)], timeout=10)
        assert not [p for p in alive if p.status() != psutil.STATUS_ZOMBIE], alive
        assert not [p.name for p in runtime.iterdir() if p.suffix in (".sock", ".json", ".pid")]
        assert not shm_of(os.getpid()), shm_of(os.getpid())


def dealer(endpoint: str) -> zmq.Socket:
    s = zmq.Context.instance().socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(endpoint)
    return s


def ask(sock: zmq.Socket, msg):
    sock.send_multipart(encode(msg))
    return decode(sock.recv_multipart())


# ---------------------------------------------------------------- native socket: auth


def test_native_wrong_or_missing_token_is_unauthorized_and_the_daemon_serves_on(daemon):
    info = daemon["info"]
    s = dealer(info["endpoint"])
    try:
        # a request before any Hello: refused, typed, with its own id
        e = ask(s, Generate("r1", prompt=PROMPT, max_tokens=2))
        assert isinstance(e, Error) and (e.code, e.req_id) == ("unauthorized", "r1")
        assert isinstance(ask(s, Ping(7)), Error)  # not even pings before Hello
        # a Hello with the wrong token, then an empty one: refused, and still not let in
        for token in ("not-the-token", ""):
            e = ask(s, Hello(token, "intruder", os.getpid()))
            assert isinstance(e, Error) and e.code == "unauthorized" and e.req_id is None
        e = ask(s, Generate("r2", prompt=PROMPT, max_tokens=2))
        assert isinstance(e, Error) and e.code == "unauthorized"
        # the same socket with the right token is let in
        w = ask(s, Hello(info["token"], "test", os.getpid()))
        assert isinstance(w, Welcome) and w.model == daemon["model"] and w.daemon_pid == os.getpid()
        assert ask(s, Ping(8)) == Pong(8)
    finally:
        s.close()
    assert daemon["sup"].status().state == "ready"
    with Client(str(daemon["runtime"])) as c:  # and others are served as before
        _, ids, fin = c.complete(PROMPT, max_tokens=3)
        assert len(ids) == 3 and fin.completion_tokens == 3


def test_native_client_with_a_stale_token_gets_unauthorized(daemon, tmp_path):
    """Client(runtime_dir) reading a connection file whose token is wrong raises RequestRejected."""
    files = daemon_files(daemon["runtime"])
    good = files.connection.read_text()
    try:
        files.connection.write_text(json.dumps({**json.loads(good), "token": "stale"}))
        with pytest.raises(RequestRejected) as e:
            Client(str(daemon["runtime"]))
        assert e.value.code == "unauthorized"
    finally:
        files.connection.write_text(good)
    with Client(str(daemon["runtime"])) as c:
        assert c.status().state == "ready"


# ---------------------------------------------------------------- HTTP through ASGI


@asynccontextmanager
async def http(daemon, api_key=None):
    api = Api(daemon["runtime"], api_key)
    try:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=make_app(api)),
                                     base_url="http://127.0.0.1", timeout=30) as client:
            yield client
    finally:
        for task in api._clients.values():  # the native connection this loop made
            if task.done() and not task.cancelled() and task.exception() is None:
                await task.result().close()


def run(coro):
    return asyncio.run(coro)


def assert_openai_error(r: httpx.Response, status: int, kind: str | None = None, code: str | None = None) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"} and isinstance(err["message"], str) and err["message"]
    if kind is not None:
        assert err["type"] == kind, err
    if code is not None:
        assert err["code"] == code, err
    return err


def test_http_api_key(daemon):
    async def go():
        body = {"prompt": PROMPT, "max_tokens": 2, "temperature": 0}
        async with http(daemon, KEY) as c:
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY},
                            {"Authorization": f"Basic {KEY}"}):
                for method, path, kw in (("GET", "/v1/models", {}), ("GET", "/metrics", {}),
                                         ("POST", "/v1/completions", {"json": body}),
                                         ("POST", "/v1/chat/completions", {"json": {"messages": [
                                             {"role": "user", "content": "hi"}], "max_tokens": 2}})):
                    r = await c.request(method, path, headers=headers, **kw)
                    assert_openai_error(r, 401, "authentication_error", "invalid_api_key")
            ok = {"Authorization": f"Bearer {KEY}"}
            r = await c.get("/v1/models", headers=ok)
            assert r.status_code == 200 and r.json()["data"][0]["id"] == daemon["model"]
            r = await c.post("/v1/completions", headers=ok, json=body)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
            assert (await c.get("/metrics", headers=ok)).status_code == 200
            assert (await c.get("/health")).status_code == 200  # /health needs no key (a probe)
        async with http(daemon) as c:  # no key configured: open
            assert (await c.get("/v1/models")).status_code == 200

    run(go())


def test_http_without_a_key_is_loopback_only(daemon):
    rt = daemon["runtime"]
    for host in ("0.0.0.0:0", "192.168.1.10:8000", "[::]:8000"):
        with pytest.raises(ValueError, match="api-key"):
            HttpServer(host, None, rt)
        HttpServer(host, KEY, rt)  # with a key it may bind there (built, not started)
    for host in ("127.0.0.1:0", "localhost:8000", "[::1]:8000"):
        HttpServer(host, None, rt)


def test_http_completions_and_chat(daemon):
    async def go():
        async with http(daemon) as c:
            r = await c.post("/v1/completions", json={"model": daemon["model"], "prompt": PROMPT, "max_tokens": 5,
                                                      "temperature": 0})
            assert r.status_code == 200, r.text
            j = r.json()
            assert j["object"] == "text_completion" and j["id"].startswith("cmpl-") and j["model"] == daemon["model"]
            (ch,) = j["choices"]
            assert ch["index"] == 0 and isinstance(ch["text"], str) and ch["finish_reason"] == "length"
            u = j["usage"]
            assert u["completion_tokens"] == 5 and u["prompt_tokens"] > 0
            assert u["total_tokens"] == u["prompt_tokens"] + 5
            # the same as the native path gives (greedy): HTTP is a translation, one engine path
            with Client(str(daemon["runtime"])) as n:
                text, _, fin = n.complete(PROMPT, max_tokens=5)
            assert ch["text"] == text and fin.prompt_tokens == u["prompt_tokens"]
            # a one-string list prompt, "default" as the model
            r = await c.post("/v1/completions", json={"model": "default", "prompt": [PROMPT], "max_tokens": 5,
                                                      "temperature": 0})  # (OpenAI's default is 1)
            assert r.status_code == 200 and r.json()["choices"][0]["text"] == text

            r = await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": [{"type": "text", "text": "Tell me about caches."}]}],
                "max_completion_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            j = r.json()
            assert j["object"] == "chat.completion" and j["id"].startswith("chatcmpl-")
            (ch,) = j["choices"]
            assert ch["message"]["role"] == "assistant" and isinstance(ch["message"]["content"], str)
            assert ch["finish_reason"] == "length" and j["usage"]["completion_tokens"] == 4

    run(go())


def sse(r: httpx.Response) -> list:
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream"), r.text
    events = [line[len("data: "):] for line in r.text.split("\n\n") if line]
    assert all(line.startswith("data: ") for line in r.text.split("\n\n") if line)
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_http_streams(daemon):
    async def go():
        async with http(daemon) as c:
            ref = (await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0})).json()
            chunks = sse(await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0,
                                                                 "stream": True}))
            assert all(k["object"] == "text_completion" and k["id"] == chunks[0]["id"] for k in chunks)
            *body, last = chunks
            assert all(k["choices"][0]["finish_reason"] is None and "usage" not in k for k in body)
            assert "".join(k["choices"][0]["text"] for k in body) == ref["choices"][0]["text"]
            assert last["choices"][0]["finish_reason"] == "length" and last["usage"] == ref["usage"]

            chunks = sse(await c.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "stream": True,
                "stop": "never-appears", "temperature": 0}))
            assert all(k["object"] == "chat.completion.chunk" and k["id"].startswith("chatcmpl-") for k in chunks)
            *body, last = chunks
            assert body and all(k["choices"][0]["delta"]["role"] == "assistant" for k in body)
            assert last["choices"][0] == {"index": 0, "delta": {}, "finish_reason": "length"}
            assert last["usage"]["completion_tokens"] == 4

    run(go())


def test_http_bad_requests_are_typed(daemon):
    chat_ok = [{"role": "user", "content": "hi"}]
    bad = [
        ("/v1/completions", b"{not json", 400, None),
        ("/v1/completions", b"[1, 2]", 400, None),
        ("/v1/completions", json.dumps({"max_tokens": 2}).encode(), 400, None),  # no prompt
        ("/v1/completions", json.dumps({"prompt": 5}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": -1}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 0}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": 2.5}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": "many"}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "max_tokens": True}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "temperature": 3}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "top_p": "1"}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "stop": [1]}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "seed": "s"}).encode(), 400, None),
        ("/v1/completions", json.dumps({"prompt": "x", "model": "gpt-4"}).encode(), 404, "model_not_found"),
        ("/v1/chat/completions", json.dumps({"messages": []}).encode(), 400, None),
        ("/v1/chat/completions", json.dumps({"messages": "hi"}).encode(), 400, None),
        ("/v1/chat/completions", json.dumps({"messages": [{"content": "hi"}]}).encode(), 400, None),
        ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": 5}]}).encode(), 400, None),
        ("/v1/chat/completions", json.dumps({"messages": chat_ok, "model": "x"}).encode(), 404, "model_not_found"),
        ("/v1/completions", json.dumps({"prompt": "word " * 40000, "max_tokens": 4}).encode(), 400,
         "context_length_exceeded"),  # refused by the engine (past the context): a native Error -> 400
    ]

    async def go():
        async with http(daemon) as c:
            for path, raw, status, code in bad:
                r = await c.post(path, content=raw, headers={"Content-Type": "application/json"})
                assert_openai_error(r, status, "invalid_request_error", code)
            err = assert_openai_error(await c.post("/v1/completions", json={"prompt": "x", "max_tokens": -1}), 400)
            assert "'max_tokens'" in err["message"], err  # names the field the client sent
            err = assert_openai_error(await c.post("/v1/chat/completions", json={
                "messages": chat_ok, "max_completion_tokens": "4"}), 400)
            assert "'max_completion_tokens'" in err["message"], err
            r = await c.get("/v1/completions")
            assert r.status_code == 405
            # the daemon serves on
            r = await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2, "temperature": 0})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2

    run(go())


def test_health_and_metrics(daemon):
    async def go():
        async with http(daemon) as c:
            r = await c.get("/health")
            assert r.status_code == 200 and r.json()["status"] == "ready"
            assert set(r.json()["progress"]) >= {"phase"}
            with Client(str(daemon["runtime"])) as n:
                before = n.status().totals
            done = await c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0})
            assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 3
            r = await c.get("/metrics")
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
            rows = dict(line.split(" ", 1) for line in r.text.splitlines() if not line.startswith("#"))
            assert rows["moed_up"] == "1"
            assert int(rows["moed_requests_total"]) >= before.requests + 1
            assert int(rows["moed_generated_tokens_total"]) >= before.completion_tokens + 3
            assert int(rows["moed_cache_budget_bytes"]) > 0 and int(rows["moed_resident_memory_bytes"]) > 0
            # the prompt cache keeps that prompt's prefix (entries, bytes within the bound)
            assert int(rows["moed_prompt_cache_entries"]) >= 1
            assert 0 < int(rows["moed_prompt_cache_bytes"]) <= int(rows["moed_prompt_cache_max_bytes"])
            assert int(rows["moed_prompt_cache_hit_tokens_total"]) >= 0
            assert all(f"# TYPE {name} " in r.text for name in rows)

    run(go())


def test_health_without_a_daemon_is_503(tmp_path):
    async def go():
        async with http({"runtime": tmp_path / "none"}) as c:
            r = await c.get("/health")
            assert r.status_code == 503 and r.json()["status"] == "unavailable"

    run(go())


def test_http_usage_reports_cached_prompt_tokens(daemon):
    async def go():
        async with http(daemon) as c:
            body = {"prompt": "The paged expert cache keeps the hot experts. " * 8, "max_tokens": 4, "temperature": 0}
            first = (await c.post("/v1/completions", json=body)).json()
            second = (await c.post("/v1/completions", json=body)).json()
            assert first["choices"][0]["text"] == second["choices"][0]["text"]
            cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
            assert 0 < cached < second["usage"]["prompt_tokens"]
            assert first["usage"]["prompt_tokens_details"]["cached_tokens"] < cached

    run(go())
