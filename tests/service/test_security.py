"""Security (issue 17), each a test that failed before its fix: the API key never on a command line,
web pages kept off the loopback HTTP API (Host and Origin), JSON bodies only with a JSON content type,
bodies capped while they stream in, shared-memory names that are not ours skipped, and a runtime
directory that is not private refused, never chmod'ed."""

from __future__ import annotations

import argparse
import os
import select
import socket
import stat

import httpx
import psutil
import pytest
from daemon_util import env_for, free_port, http_daemon, moed, status

from moed.ipc.config import api_key_of

KEY = "s3cret-key-for-tests"
USER = [{"role": "user", "content": "Hello"}]


@pytest.fixture(scope="module")
def daemon(tiny_models, tmp_path_factory):
    """`moed start` with the HTTP API and the key in a file."""
    key_file = tmp_path_factory.mktemp("key") / "key"
    key_file.write_text(KEY + "\n")
    with http_daemon(tiny_models["qwen3_moe"], tmp_path_factory.mktemp("rt"), 0.5, "--api-key-file",
                     str(key_file)) as d:
        d["base"] = f"http://127.0.0.1:{d['port']}"
        d["auth"] = {"Authorization": f"Bearer {KEY}"}
        yield d


def processes(d) -> list[psutil.Process]:
    """The daemon and its I/O workers."""
    return [psutil.Process(d["pid"]), *(psutil.Process(w["pid"]) for w in status(d["env"])["workers"])]


def test_the_api_key_is_on_no_command_line(daemon):
    for p in processes(daemon):
        assert not any(KEY in arg for arg in p.cmdline()), p.cmdline()
        if p.pid != daemon["pid"]:
            assert "MOED_API_KEY" not in p.environ(), "the workers do not need the key"
    assert httpx.get(f"{daemon['base']}/v1/models").status_code == 401
    assert httpx.get(f"{daemon['base']}/v1/models", headers=daemon["auth"]).status_code == 200


def test_api_key_given_on_the_command_line_warns_and_stays_off_the_daemons(tiny_models, tmp_path):
    runtime = tmp_path / "rt"
    env, port = env_for(runtime), free_port()
    p = moed(env, "start", "--model", str(tiny_models["qwen3_moe"]), "--http", f"127.0.0.1:{port}", "--api-key", KEY)
    try:
        assert "--api-key puts the key on the command line" in p.stderr
        d = {"env": env, "pid": status(env)["pid"]}
        assert all(KEY not in " ".join(q.cmdline()) for q in processes(d))
        assert httpx.get(f"http://127.0.0.1:{port}/v1/models",
                         headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    finally:
        moed(env, "stop")


def test_api_key_sources(tmp_path, monkeypatch, capsys):
    ns = lambda **kw: argparse.Namespace(**{"api_key": None, "api_key_file": None, **kw})  # noqa: E731
    monkeypatch.delenv("MOED_API_KEY", raising=False)
    assert api_key_of(ns()) is None
    monkeypatch.setenv("MOED_API_KEY", "from-env")
    assert api_key_of(ns()) == "from-env"
    (tmp_path / "k").write_text("from-file\n")
    assert api_key_of(ns(api_key_file=str(tmp_path / "k"))) == "from-file"
    assert capsys.readouterr().err == ""
    assert api_key_of(ns(api_key="argv")) == "argv"
    assert "--api-key puts the key on the command line" in capsys.readouterr().err
    (tmp_path / "empty").write_text("\n")
    for bad in (ns(api_key_file=str(tmp_path / "empty")), ns(api_key_file=str(tmp_path / "nope")),
                ns(api_key="a", api_key_file=str(tmp_path / "k"))):
        with pytest.raises(ValueError, match="api-key"):
            api_key_of(bad)


def chat(d, headers: dict, content: bytes | None = None) -> httpx.Response:
    body = content if content is not None else b'{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}'
    return httpx.post(f"{d['base']}/v1/chat/completions", content=body, headers={**d["auth"], **headers}, timeout=60)


def openai_error(r: httpx.Response, status_code: int) -> str:
    assert r.status_code == status_code, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "code"}, err
    return err["message"]


def test_cross_site_requests_are_refused(daemon):
    port, json_type = daemon["port"], {"Content-Type": "application/json"}
    # a web page's form post: text/plain, its own Origin (a "simple" request, no CORS preflight)
    assert "Origin" in openai_error(chat(daemon, {"Content-Type": "text/plain", "Origin": "http://evil.example"}), 403)
    assert "Origin" in openai_error(chat(daemon, {**json_type, "Origin": "http://evil.example"}), 403)
    assert "Origin" in openai_error(chat(daemon, {**json_type, "Origin": "null"}), 403)
    # DNS rebinding: the page's own name resolved to 127.0.0.1
    assert "Host" in openai_error(chat(daemon, {**json_type, "Host": f"evil.example:{port}"}), 403)
    assert openai_error(httpx.get(f"{daemon['base']}/health", headers={"Host": "evil.example"}), 403)
    # not JSON: 415, also without an Origin
    assert "Content-Type" in openai_error(chat(daemon, {"Content-Type": "text/plain"}), 415)
    assert openai_error(chat(daemon, {}), 415)
    r = httpx.post(f"{daemon['base']}/v1/messages", content=b'{}', headers={"x-api-key": KEY,
                                                                           "Content-Type": "text/plain"})
    assert r.status_code == 415 and r.json()["type"] == "error"
    # loopback names and origins are served
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
        assert chat(daemon, {**json_type, "Host": host}).status_code == 200, host
    for origin in ("http://localhost:3000", "http://127.0.0.1:5173", "http://[::1]:8080"):
        assert chat(daemon, {**json_type, "Origin": origin}).status_code == 200, origin
    assert chat(daemon, {"Content-Type": "application/json; charset=utf-8"}).status_code == 200


def rss(pid: int) -> int:
    return psutil.Process(pid).memory_info().rss


def raw_post(port: int, head: str, chunks, limit_s: float = 60) -> tuple[bytes, int]:
    """Send `head` then each chunk until the server answers; (the answer, bytes of body sent)."""
    sent = 0
    with socket.create_connection(("127.0.0.1", port), timeout=limit_s) as s:
        s.sendall(head.encode())
        try:
            for chunk in chunks:
                if select.select([s], [], [], 0)[0]:
                    break
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        try:
            while not answer.endswith(b"}") and (part := s.recv(65536)):
                answer += part
        except ConnectionResetError:
            pass
    return answer, sent


def test_a_huge_body_is_refused_while_it_streams_in(daemon):
    port, pid = daemon["port"], daemon["pid"]
    before = rss(pid)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    mb = b"x" * (1 << 20)
    answer, sent = raw_post(port, head, (f"{len(mb):x}\r\n".encode() + mb + b"\r\n" for _ in range(512)))
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 64 << 20, f"{sent >> 20} MB sent before the 413: the body was read whole"
    assert rss(pid) - before < 200 << 20
    # a declared length past the cap is refused before any of it is read
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {512 << 20}\r\n\r\n")
    answer, _ = raw_post(port, head, [], limit_s=10)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert chat(daemon, {"Content-Type": "application/json"}).status_code == 200  # serves on


def free_pid() -> int:
    pid = 4_000_000
    while psutil.pid_exists(pid):
        pid -= 1
    return pid


def test_shared_memory_names_that_are_not_ours_are_skipped(tiny_models, tmp_path):
    if not os.path.isdir("/dev/shm"):
        pytest.skip("no /dev/shm to list")
    dead = free_pid()
    planted_dir = f"/dev/shm/moed-{dead}-plant"  # a name like ours that cannot be opened as a segment
    planted_other = f"/dev/shm/moed-{dead}-other"  # another user's segment named like a dead daemon's
    os.mkdir(planted_dir)
    with open(planted_other, "wb") as f:
        f.write(b"theirs")
    other_uid = os.getuid() + 4242
    try:
        if os.getuid() == 0:
            os.chown(planted_other, other_uid, other_uid)
        with http_daemon(tiny_models["qwen3_moe"], tmp_path / "rt", 0.5) as d:
            assert status(d["env"])["state"] == "ready"
        assert os.path.isdir(planted_dir)
        if os.getuid() == 0:
            assert os.path.exists(planted_other), "another user's segment was removed"
    finally:
        os.rmdir(planted_dir)
        if os.path.exists(planted_other):
            os.unlink(planted_other)


def test_a_runtime_dir_that_is_not_private_is_refused_not_chmoded(tiny_models, tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o755)
    env = env_for(shared)
    p = moed(env, "start", "--model", str(tiny_models["qwen3_moe"]), check=False)
    if p.returncode == 0:  # (before the fix: chmod'ed and started)
        moed(env, "stop")
    assert p.returncode == 2 and "open to other users" in p.stderr, p.stderr
    assert stat.S_IMODE(shared.stat().st_mode) == 0o755 and not list(shared.iterdir())
    if os.getuid() == 0:  # owned by someone else
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, os.getuid() + 4242, -1)
        p = moed(env_for(theirs), "ps", check=False)
        assert p.returncode == 2 and "owned by uid" in p.stderr, p.stderr
