"""The supervisor daemon: owns the loaded model, the engine loop and the I/O workers.

`moed daemon` runs it in the foreground; `moed start` launches that in the background. The loop is
vLLM's EngineCoreProc shape: drain the inbox, step the core, ship the events; block only when
there is no work. Signals only set a flag. On the way out every stream ends with a reason, the
workers exit, shared memory is unlinked and the runtime files are removed.
"""

from __future__ import annotations

import os
import queue
import secrets
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass

import numpy as np
import psutil

from moed.daemon.engine.core import EngineCore, RequestRejected, context_length
from moed.daemon.service.frontend import Disconnected, Frontend
from moed.ipc import shm
from moed.ipc.connection import DaemonFiles, daemon_files, read_pid, remove_files, write_connection
from moed.ipc.messages import Abort, Error, Finished, Generate, StopDaemon

IDLE_WAIT_S = 0.5


@dataclass
class DaemonConfig:
    model: str
    cache_fraction: float | None = None
    cache_gb: float | None = None
    workers: int = 2
    dtype: str | None = None
    warm: bool = True
    top_k: int | None = None
    packed: bool = True
    direct: bool = False
    lookahead: bool | None = None  # None: moed.daemon.engine.budget.LOOKAHEAD_BELOW decides
    max_batch: int = 8
    max_queue: int = 32
    http: str | None = None  # "HOST:PORT"
    api_key: str | None = None
    runtime_dir: str | None = None


class DaemonAlreadyRunning(RuntimeError):
    pass


def clean_stale(files: DaemonFiles) -> list[str]:
    """Remove what a killed daemon left: pid/connection/socket files and its shm segments."""
    if (pid := read_pid(files)) is not None:
        raise DaemonAlreadyRunning(f"a moed daemon is already running (pid {pid}); `moed stop` it first")
    removed = [str(p) for p in (files.connection, files.pid, files.socket) if p.exists()]
    remove_files(files)
    for name in shm.segments() or []:
        owner = name.split("-")[1] if name.count("-") >= 2 else ""
        if owner.isdigit() and not psutil.pid_exists(int(owner)):
            shm.unlink_name(name)
            removed.append(f"/dev/shm/{name}")
    return removed


class Supervisor:
    """Loads the model, serves clients until stopped."""

    def __init__(self, cfg: DaemonConfig, link=None):
        self.cfg = cfg
        self.link = link  # RankLink when the model is split across ranks (this is rank 0)
        self.files = daemon_files(cfg.runtime_dir)
        self.state = "starting"
        self.progress = (self.state, 0.0)
        self.started = time.time()
        self.pm = None
        self.core: EngineCore | None = None
        self.owner: dict[str, tuple[bytes, str]] = {}  # core request id -> (client, client's req_id)
        self._stopping = threading.Event()
        self._snapshot_lock = threading.Lock()
        self._core_snapshot: dict = {}
        self.http = None
        self.failed = ""

    # ------------------------------------------------------------------ lifecycle

    def run(self) -> int:
        for line in clean_stale(self.files):
            print(f"[moed] removed stale {line}", flush=True)
        token = secrets.token_urlsafe(32)
        self.frontend = Frontend(self.files.endpoint, token, os.path.basename(str(self.cfg.model)), self.status)
        self.frontend.start()
        signal.signal(signal.SIGTERM, lambda *_: self.stop())
        signal.signal(signal.SIGINT, lambda *_: self.stop())
        write_connection(self.files, {"endpoint": self.files.endpoint, "token": token, "pid": os.getpid(),
                                      "model": str(self.cfg.model), "http": self.cfg.http,
                                      "log": str(self.files.log)})
        try:
            if self.cfg.http:  # up while loading: /health answers 503 until ready
                from moed.daemon.service.http import HttpServer

                self.http = HttpServer(self.cfg.http, self.cfg.api_key, self.files.dir).start()
            self._load()
            self.state = "ready" if not self._stopping.is_set() else "stopping"
            print(f"[moed] ready: {self.cfg.model} on {self.files.endpoint}"
                  + (f" and http://{self.cfg.http}" if self.http else ""), flush=True)
            self._loop()
            return 1 if self.failed else 0
        finally:
            self._shutdown()

    def stop(self) -> None:
        self._stopping.set()
        self.frontend.inbox.put((b"", StopDaemon()))  # wakes the loop

    def _load(self) -> None:
        self.state = "loading"

        def progress(phase: str, done: float) -> None:
            self.progress = (phase, done)
            if self._stopping.is_set():
                raise KeyboardInterrupt("stopped while loading")

        c = self.cfg
        self.pm = load_model(c, self.link, progress)
        self.core = new_core(c, self.pm, self.link)
        if self.link is not None:
            from moed.daemon.dist.lockstep import LockstepCore

            progress("waiting for the other ranks", 0.99)
            self.core = LockstepCore(self.core, self.link, self.pm)

    def _shutdown(self) -> None:
        self.state = "stopping"
        if self.core is not None:
            self._ship(self.core.shutdown())
            if self.link is not None and not self.failed:
                try:
                    self.core.close()
                except RuntimeError as e:  # another rank is gone already
                    print(f"[moed] could not stop the other ranks: {e}", flush=True)
        if self.http is not None:
            self.http.stop()
        self.frontend.close()
        if self.pm is not None:
            self.pm.close()
        remove_files(self.files)
        print("[moed] stopped", flush=True)

    # ------------------------------------------------------------------ the loop

    def _loop(self) -> None:
        from moed.daemon.dist.lockstep import RankFailed

        while not self._stopping.is_set():
            self._drain(block=not self.core.has_work())
            if self.core.has_work() and not self._stopping.is_set():
                try:
                    self._ship(self.core.step())
                except RankFailed as e:  # a split model cannot go on: every rank stops
                    self._ship(e.events)
                    self.failed = str(e)
                    print(f"[moed] {e}; stopping every rank", flush=True)
                    return
            self._publish()

    def _drain(self, block: bool) -> None:
        try:
            item = self.frontend.inbox.get(timeout=IDLE_WAIT_S) if block else self.frontend.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(*item)
            try:
                item = self.frontend.inbox.get_nowait()
            except queue.Empty:
                return

    def _handle(self, client: bytes, msg) -> None:
        if isinstance(msg, Generate):
            req_id, rid = msg.req_id, f"{client.hex()}:{msg.req_id}"
            if rid in self.owner:
                self.frontend.send(client, Error(req_id, "bad_request", f"request id {req_id!r} is in use"))
                return
            msg.req_id = rid
            try:
                self.core.add(msg, client=self.frontend.clients.get(client, "?"))
            except RequestRejected as e:
                self.frontend.send(client, Error(req_id, e.code, str(e)))
            except Exception as e:  # e.g. a chat template that cannot render these messages
                self.frontend.send(client, Error(req_id, "bad_request", f"{type(e).__name__}: {e}"))
            else:
                self.owner[rid] = (client, req_id)
        elif isinstance(msg, Abort):
            self._ship(self.core.abort(f"{client.hex()}:{msg.req_id}"))
        elif isinstance(msg, Disconnected):
            prefix = f"{client.hex()}:"
            for rid in [r for r in self.owner if r.startswith(prefix)]:
                self._ship(self.core.abort(rid))
        elif isinstance(msg, StopDaemon):
            self._stopping.set()
        else:
            self.frontend.send(client, Error(getattr(msg, "req_id", None), "bad_request",
                                             f"{type(msg).__name__} is not a request"))

    def _ship(self, events: list) -> None:
        """Route core events back to the client that owns each request."""
        for ev in events:
            owner = self.owner.get(ev.req_id)
            if owner is None:
                continue
            client, req_id = owner
            if isinstance(ev, (Finished, Error)):
                del self.owner[ev.req_id]
            ev.req_id = req_id
            self.frontend.send(client, ev)

    # ------------------------------------------------------------------ status

    def _publish(self) -> None:
        snap = self.core.snapshot()
        with self._snapshot_lock:
            self._core_snapshot = snap

    def status(self) -> dict:
        """The status snapshot (called from the frontend's I/O thread)."""
        with self._snapshot_lock:
            core = dict(self._core_snapshot)
        proc = psutil.Process()
        snap = {"state": self.state, "progress": {"phase": self.progress[0], "done": self.progress[1]},
                "pid": os.getpid(), "uptime_s": time.time() - self.started, "model": str(self.cfg.model),
                "rss_bytes": proc.memory_info().rss, "http": self.cfg.http,
                "clients": len(self.frontend.clients), **core}
        pm = self.pm
        if pm is not None and self.state != "loading":
            snap_workers = pm.fetcher.worker_states()
            st = pm.store.stats
            cfg = pm.config.get("text_config", pm.config)
            snap.update({
                "arch": pm.config.get("model_type"),
                "quantization": pm.config.get("quantization", {}).get("bits"),
                "layers": cfg.get("num_hidden_layers"), "top_k": pm.top_k,
                "non_expert_bytes": pm.non_expert_bytes, "expert_bytes": pm.expert_bytes,
                "cache": {"budget_bytes": pm.info["cache_bytes"], "slots_per_layer": pm.info["slots_per_layer"],
                          "experts_per_layer": pm.info["experts_per_layer"],
                          "used_slots": [s.used for s in pm.store.slots],
                          **st.as_dict()},
                "workers": snap_workers,
                "io": {"read_calls": pm.fetcher.stats.read_calls, "reads": pm.fetcher.stats.reads,
                       "bytes_read": pm.fetcher.stats.bytes_read, "read_seconds": pm.fetcher.stats.read_seconds,
                       "respawns": pm.fetcher.stats.respawns, "packed": pm.info["packed"],
                       "direct": pm.fetcher.direct, "lookahead": pm.info["lookahead"],
                       "in_flight": sum(1 for w in snap_workers if w["queued_bytes"])},
                "heat": {"values": [[round(float(v), 2) for v in row] for row in pm.store.heat],
                         "resident": [[int(e) for e in np.nonzero(s.lut >= 0)[0]] for s in pm.store.slots]},
                "memory": self._memory(snap["rss_bytes"]),
                "layer_range": list(pm.info["layer_range"]),
            })
            if self.link is not None and hasattr(self.core, "ranks"):
                from moed.daemon.dist.ranks import rank_status

                snap["ranks"] = [asdict(s) for s in [rank_status(pm, 0), *self.core.ranks[1:]]]
        return snap


    def _memory(self, rss: int) -> dict:
        """RSS split into resident weights, expert cache, KV cache and the rest."""
        pm = self.pm
        kv = self._core_snapshot.get("kv_cache_bytes", 0)
        parts = {"resident_weights": pm.non_expert_bytes, "expert_cache": pm.info["cache_bytes"],
                 "kv_cache": kv}
        return {"rss": rss, **parts, "other": max(0, rss - sum(parts.values()))}


def load_model(c: DaemonConfig, link, progress=None):
    """The paged model as configured (this rank's layers when split)."""
    from moed.daemon.engine.loader import load_paged

    return load_paged(c.model, cache_fraction=c.cache_fraction, cache_gb=c.cache_gb, workers=c.workers,
                      dtype=c.dtype, warm=c.warm, top_k=c.top_k, packed=c.packed, direct=c.direct,
                      lookahead=c.lookahead, progress=progress,
                      group=link.group if link is not None else None)


def new_core(c: DaemonConfig, pm, link) -> EngineCore:
    core = EngineCore(pm.model, pm.tokenizer, max_batch=c.max_batch, max_queue=c.max_queue,
                      context=context_length(pm.config))
    if link is not None:
        link.share_seed()
    return core


def follower(cfg: DaemonConfig, link) -> int:
    """Ranks > 0: load this rank's layers, then replay rank 0's engine steps until it stops."""
    from moed.daemon.dist.lockstep import follow

    pm = load_model(cfg, link)
    try:
        lo, hi = pm.info["layer_range"]
        print(f"[moed rank {link.rank}] ready: layers {lo}-{hi - 1}", flush=True)
        follow(new_core(cfg, pm, link), link, pm)
    finally:
        pm.close()
    print(f"[moed rank {link.rank}] stopped", flush=True)
    return 0


def main(cfg: DaemonConfig, link=None) -> int:
    if link is not None and link.rank > 0:
        return follower(cfg, link)
    try:
        return Supervisor(cfg, link).run()
    except DaemonAlreadyRunning as e:
        print(f"moed: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad checkpoint, or a configuration that does not fit
        print(f"moed: error: {e}", file=sys.stderr)
        return 2
