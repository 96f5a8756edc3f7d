"""moed.ipc: codec strictness, message registry, shared memory, runtime dir."""
from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import dataclass

import msgpack
import pytest

from moed.ipc import runtime, shm
from moed.ipc.codec import MAX_PAYLOAD, ProtocolError, decode, encode, from_plain
from moed.ipc.messages import (REGISTRY, Abort, CacheStatus, CheckpointStatus, Configure, DaemonStatus, Error,
                               Finished, Generate, Heartbeat, HeatStatus, Hello, IoStatus, LoadProgress, MemoryStatus,
                               Ping, Pong, PromptCacheStatus, RankPlan, RankStatus, Read, ReadDone, Ready, RequestStatus, Shutdown,
                               Status, StatusQuery, StopDaemon, Token, Totals, Welcome, WorkerStatus, message)

def loading_status() -> DaemonStatus:
    """A daemon still loading: no checkpoint, cache, io, heat or memory yet."""
    return DaemonStatus(requests=[], decode_tps=0.0, prefill_tps=0.0, kv_cache_bytes=0, totals=Totals(), max_queue=32,
                        context=None, prompt_cache=None, state="loading", progress=LoadProgress("mapping experts", 0.42), pid=4242,
                        uptime_s=3.2, model="/models/med", rss_bytes=52_000_000, http=None, clients=1,
                        checkpoint=None, cache=None, workers=[], io=None, heat=None, memory=None, ranks=[])


def full_status() -> DaemonStatus:
    """A ready daemon split over two ranks, every nested struct filled."""
    ranks = [RankStatus(rank=r, host=f"mac{r}", pid=100 + r, layers=(2 * (1 - r), 2 * (2 - r)), rss_bytes=1 << 30,
                        peak_rss_bytes=1 << 31, non_expert_bytes=5, cache_bytes=6, hits=7, misses=8, bytes_read=9,
                        workers=2) for r in (0, 1)]
    return DaemonStatus(
        requests=[RequestStatus("ab:r1", "moed run:12", 4, 37, 300, "decoding", 51.25, 1.2),
                  RequestStatus("cd:r2", "python:7", 812, 0, 64, "prefill", 0.0, 0.3)],
        decode_tps=171.2, prefill_tps=97.3, kv_cache_bytes=3_500_000,
        totals=Totals(requests=9, completed=6, rejected=1, aborted=1, failed=0, prompt_tokens=850,
                      completion_tokens=1200, generated_tokens=1300, peak_active=2),
        max_queue=32, context=32768, prompt_cache=PromptCacheStatus(
            entries=3, bytes=1 << 20, max_bytes=1 << 30, lookups=5, hits=4, hit_tokens=4000, looked_up_tokens=5000,
            disk_dir="/tmp/pc/abc", disk_entries=2, disk_bytes=1 << 21, disk_hits=1, disk_refused=0),
        state="ready", progress=LoadProgress("ready", 1.0), pid=100, uptime_s=754.3,
        model="/models/tiny-qwen3_5_moe", rss_bytes=96_669_696, http="127.0.0.1:8000", clients=3,
        checkpoint=CheckpointStatus(arch="qwen3_5_moe", quantization=4, layers=4, top_k=4, non_expert_bytes=479_904,
                                    expert_bytes=1_966_080, layer_range=(2, 4)),
        cache=CacheStatus(budget_bytes=1_474_560, slots_per_layer=[12, 12], experts_per_layer=[16, 16],
                          used_slots=[12, 11], hits=2920, misses=810, hit_rate=2920 / 3730, bytes_read=24_883_200,
                          read_seconds=0.255, prefetched=30, prefetch_used=20, layer_hits=[1460, 1460],
                          layer_misses=[400, 410]),
        workers=[WorkerStatus(pid=201, alive=True, ready=True, queued_bytes=65_536, restarts=0),
                 WorkerStatus(pid=202, alive=False, ready=True, queued_bytes=0, restarts=1)],
        io=IoStatus(read_calls=420, reads=7290, bytes_read=24_883_200, read_seconds=0.227, respawns=1, in_flight=1,
                    packed=True, direct=False, lookahead=True),
        heat=HeatStatus(values=[[0.0, 1.5, 9.25], [2.0, 0.0, 0.5]], resident=[[0, 2], [1]]),
        memory=MemoryStatus(rss=96_669_696, resident_weights=479_904, expert_cache=1_474_560, kv_cache=3_500_000,
                            other=91_235_232),
        ranks=ranks)


SAMPLES = [
    Ready(worker_id=3, pid=12345),
    Configure(files=["/a/b.safetensors", "/c/ünïcode.bin"], shm_name="moed-1-ab", shm_size=1 << 26),
    Configure(files=[], shm_name="moed-2-ef01", shm_size=4096, direct=True),
    Read(req_id=7, items=[(0, 0, 10, 0), (1, 1 << 40, 1 << 20, 64)]),
    Read(req_id=8, items=[]),
    ReadDone(req_id=7, nbytes=1 << 20),
    ReadDone(req_id=9, nbytes=0, error="/x: unexpected end of file at offset 5"),
    Heartbeat(),
    Shutdown(),
    Hello(token="t0k", client="moed run", pid=42),
    Welcome(model="tiny", daemon_pid=7),
    Generate(req_id="r1", prompt="hi", max_tokens=5, temperature=0.7, top_p=0.9, seed=1, stop=["\n"]),
    Generate(req_id="r2", messages=[{"role": "user", "content": "hé"}]),
    Token(req_id="r1", text="ab", token=17, index=0),
    Finished(req_id="r1", reason="length", prompt_tokens=3, completion_tokens=5, ttft_s=0.1, decode_tps=9.5),
    Abort(req_id="r1"),
    StatusQuery(),
    Status(snapshot=full_status()),
    Status(snapshot=loading_status()),
    Error(req_id=None, code="protocol", message="bad frame"),
    Ping(seq=1),
    Pong(seq=1),
    StopDaemon(),
    RankPlan(ops=[["add", ["r1", "hi", None, 5, 0.0, 0.0, None, None], "c"], ["abort", "r1", "abort"]], step=True),
    RankPlan(ops=[], stop=True),
    RankStatus(rank=1, host="mac2", pid=9, layers=(0, 30), rss_bytes=1 << 30, peak_rss_bytes=1 << 31,
               non_expert_bytes=5, cache_bytes=6, hits=7, misses=8, bytes_read=9, workers=2),
]


@pytest.mark.parametrize("msg", SAMPLES, ids=lambda m: type(m).__name__)
def test_round_trip(msg):
    frames = encode(msg)
    assert len(frames) == 2 and frames[0] == bytes([type(msg).CODE])
    assert decode(frames) == msg
    assert decode([memoryview(f) for f in frames]) == msg  # zmq frames may be buffers


def test_every_registered_type_has_a_sample():
    assert {type(m) for m in SAMPLES} >= set(REGISTRY.values())


def test_read_items_decode_as_tuples():
    msg = decode(encode(Read(1, [(0, 1, 2, 3)])))
    assert msg.items == [(0, 1, 2, 3)] and type(msg.items[0]) is tuple


def test_status_snapshot_round_trips_typed_through_msgpack_and_json():
    import json
    from dataclasses import asdict

    snap = full_status()
    got = decode(encode(Status(snap))).snapshot
    assert got == snap and type(got.checkpoint.layer_range) is tuple and type(got.ranks[1]) is RankStatus
    assert got.workers[1].alive is False and got.cache.used_slots == [12, 11] and got.loaded
    # what `moed ps --json` prints reads back into the same struct
    assert from_plain(DaemonStatus, json.loads(json.dumps(asdict(snap)))) == snap
    assert from_plain(DaemonStatus, json.loads(json.dumps(asdict(loading_status())))) == loading_status()
    assert not loading_status().loaded


def _status_frames(edit) -> list[bytes]:
    """A full status's frames, with its msgpack tree changed by `edit`."""
    head, payload = encode(Status(full_status()))
    tree = msgpack.unpackb(payload)
    edit(tree[0])
    return [head, msgpack.packb(tree, use_bin_type=True)]


@pytest.mark.parametrize("edit, error", [
    (lambda s: s["workers"][1].update(alive=1), r"Status\.snapshot\.workers\[1\]\.alive: expected bool, got int 1"),
    (lambda s: s["cache"].update(hits="many"), r"Status\.snapshot\.cache\.hits: expected int"),
    (lambda s: s["totals"].pop("aborted"), r"Status\.snapshot\.totals: missing field 'aborted'"),
    (lambda s: s["memory"].update(swap=0), r"Status\.snapshot\.memory: unknown field 'swap'"),
    (lambda s: s.update(progress=[0.5]), r"Status\.snapshot\.progress: expected a map of LoadProgress's fields"),
    (lambda s: s["ranks"][0].update(layers=[0]), r"Status\.snapshot\.ranks\[0\]\.layers: expected 2 ints"),
    (lambda s: s["heat"]["values"][1].__setitem__(0, "hot"), r"Status\.snapshot\.heat\.values\[1\]\[0\]: expected float"),
    (lambda s: s.pop("state"), r"Status\.snapshot: missing field 'state'"),
    (lambda s: s.update(checkpoint=None, cache=[]), r"Status\.snapshot\.cache: expected a map"),
])
def test_status_snapshot_rejects_malformed_naming_the_field(edit, error):
    with pytest.raises(ProtocolError, match=error):
        decode(_status_frames(edit))


def test_status_from_json_rejects_malformed_naming_the_field():
    import json
    from dataclasses import asdict

    plain = json.loads(json.dumps(asdict(full_status())))
    plain["requests"][0]["tokens"] = 3.5
    with pytest.raises(ProtocolError, match=r"^DaemonStatus\.requests\[0\]\.tokens: expected int, got float 3.5"):
        from_plain(DaemonStatus, plain)
    del plain["requests"]
    with pytest.raises(ProtocolError, match=r"^DaemonStatus: missing field 'requests'"):
        from_plain(DaemonStatus, plain)


def test_top_level_field_errors_name_the_field():
    with pytest.raises(ProtocolError, match=r"^ReadDone\.nbytes: expected int, got str"):
        decode(_frames(0x04, [1, "2", None]))
    with pytest.raises(ProtocolError, match=r"^Read\.items\[1\]: expected 4 ints"):
        decode(_frames(0x03, [1, [(0, 0, 10, 0), (0, 0, 10)]]))


def _frames(code: int, fields) -> list[bytes]:
    return [bytes([code]), msgpack.packb(fields, use_bin_type=True)]


@pytest.mark.parametrize("frames", [
    [b"\x05"],  # missing payload
    [b"\x05", msgpack.packb([]), b""],  # extra frame
    [b"", msgpack.packb([])],  # empty type frame
    [b"\x05\x05", msgpack.packb([])],  # 2-byte type frame
    [b"\xee", msgpack.packb([])],  # unknown type
    [b"\x00", msgpack.packb([])],
    [b"\x04", b"\xc1"],  # invalid msgpack byte
    [b"\x04", msgpack.packb([1, 2, None])[:-1]],  # truncated
    [b"\x04", msgpack.packb([1, 2, None]) + b"\x00"],  # trailing data
    [b"\x04", b""],
    [b"\x04", b"\x91" * 5000 + b"\x90"],  # absurdly deep nesting
    _frames(0x04, [1, 2]),  # too few fields
    _frames(0x04, [1, 2, None, 4]),  # too many fields
    _frames(0x04, {"req_id": 1, "nbytes": 2, "error": None}),  # map, not array
    _frames(0x04, ["1", 2, None]),  # str for int
    _frames(0x04, [True, 2, None]),  # bool is not an int
    _frames(0x04, [1.0, 2, None]),  # float is not an int
    _frames(0x04, [1, 2, b"bytes"]),  # bytes for str | None
    _frames(0x03, [1, [(0, 0, 10)]]),  # item of 3, not 4
    _frames(0x03, [1, [(0, 0, 10, "0")]]),
    _frames(0x03, [1, (0, 0, 10, 0)]),  # items not a list of tuples
    _frames(0x02, [["a", 1], "moed-x", 10, False]),  # non-str path
    _frames(0x02, [["a"], "moed-x", 10, 0]),  # int for bool
    [b"\x04", msgpack.packb([1, 2, msgpack.ExtType(1, b"x")])],  # ext types
    [b"\x04", msgpack.packb([1, 2, b"\xff\xfe"], use_bin_type=False)],  # invalid utf-8 str
])
def test_rejects_malformed(frames):
    with pytest.raises(ProtocolError):
        decode(frames)


def test_rejects_oversized_payload():
    big = encode(ReadDone(1, 2, "x" * (MAX_PAYLOAD + 1)))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(big)
    small = encode(ReadDone(1, 2, "x" * 100))
    with pytest.raises(ProtocolError, match="exceeds"):
        decode(small, max_payload=50)


def test_encode_rejects_unencodable():
    with pytest.raises(ProtocolError):
        encode(ReadDone(1, 2, object()))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="not a registered message"):
        encode(object())


def test_garbage_never_escapes_as_another_exception():
    rng = __import__("random").Random(1)
    for _ in range(2000):
        payload = bytes(rng.randrange(256) for _ in range(rng.randrange(40)))
        try:
            decode([bytes([rng.choice(list(REGISTRY))]), payload])
        except ProtocolError:
            pass


def test_registry_rejects_duplicate_code_and_non_dataclass():
    with pytest.raises(ValueError, match="taken"):
        @message(Ready.CODE)
        @dataclass
        class Clash:
            x: int
    with pytest.raises(TypeError):
        @message(0xFD)
        class NotADataclass:
            pass
    assert 0xFD not in REGISTRY


# --- shared memory ------------------------------------------------------------------------------


def test_shm_names_are_short_and_prefixed():
    name = shm.new_name()
    assert name.startswith(f"moed-{os.getpid()}-") and len(name) <= shm.MAX_NAME


def test_shm_attach_in_child_does_not_unlink_at_child_exit():
    """bpo-39959: the attaching process's resource tracker used to unlink the segment."""
    seg = shm.create(1 << 16)
    try:
        seg.buf[:5] = b"hello"
        code = ("import sys; from moed.ipc import shm; s = shm.attach(sys.argv[1]); "
                "assert bytes(s.buf[:5]) == b'hello'; s.buf[5:10] = b'world'; shm.close(s)")
        subprocess.run([sys.executable, "-c", code, seg.name], check=True, timeout=30)
        again = shm.attach(seg.name)  # still there
        assert bytes(again.buf[:10]) == b"helloworld"
        shm.close(again)
    finally:
        shm.unlink(seg)
        shm.close(seg)
    if shm.segments() is not None:
        assert seg.name not in shm.segments()


def test_shm_close_with_live_views_is_deferred():
    seg = shm.create(4096)
    view = seg.buf[:16]
    shm.unlink(seg)
    assert shm.close(seg) is False  # a view is still exported: kept, no BufferError
    del view
    other = shm.create(4096)
    shm.unlink(other)
    assert shm.close(other) is True  # ...and retried by the next close()
    assert seg not in shm._lingering


# --- runtime dir --------------------------------------------------------------------------------


def test_runtime_dir_is_private(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(tmp_path))
    d = runtime.runtime_dir()
    assert d == tmp_path / "moed"
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert runtime.runtime_dir() == tmp_path / "cache" / "moed" / "run"


def test_ipc_endpoint_paths_stay_short(tmp_path):
    ep = runtime.ipc_endpoint("sup", tmp_path)
    assert ep == f"ipc://{tmp_path}/sup.sock"
    deep = tmp_path / ("d" * 120)
    ep = runtime.ipc_endpoint("sup", deep)
    assert len(ep) - len("ipc://") <= runtime.MAX_SOCKET_PATH
    assert runtime.endpoint_path(ep).parent.name == f"moed-{os.getuid()}"
    assert runtime.endpoint_path("tcp://127.0.0.1:5555") is None


# --- protocol version ---------------------------------------------------------------------------


def test_a_changed_message_needs_a_new_protocol_version():
    from moed.ipc.messages import PROTOCOL_VERSION, SCHEMA, schema_fingerprint

    assert schema_fingerprint() == SCHEMA, (
        f"a message or status dataclass changed: bump PROTOCOL_VERSION (now {PROTOCOL_VERSION}) and set "
        f"SCHEMA = {schema_fingerprint()!r} in ipc/messages.py")


def test_a_client_refuses_a_daemon_of_another_protocol_version(tmp_path, monkeypatch):
    """A real Frontend that answers as a daemon of the previous version would: the client says so at
    connect instead of waiting forever for answers it cannot read."""
    from moed.client.client import Client, ProtocolMismatch
    from moed.daemon.service import frontend as fe
    from moed.ipc.connection import daemon_files, write_connection
    from moed.ipc.messages import PROTOCOL_VERSION, Welcome

    monkeypatch.setattr(fe, "Welcome", lambda model, pid: Welcome(model, pid, version=PROTOCOL_VERSION - 1))
    files = daemon_files(tmp_path / "rt")
    front = fe.Frontend(files.endpoint, "tok", "m", lambda: None).start()
    try:
        write_connection(files, {"endpoint": files.endpoint, "token": "tok", "pid": os.getpid()})
        with pytest.raises(ProtocolMismatch, match=f"protocol {PROTOCOL_VERSION - 1}, this client {PROTOCOL_VERSION}"):
            Client(str(tmp_path / "rt"))
    finally:
        front.close()
