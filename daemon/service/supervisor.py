"""The supervisor daemon: owns the loaded model, the engine loop and the I/O workers.

`moed daemon` runs it in the foreground; `moed start` launches that in the background. The loop is
vLLM's EngineCoreProc shape: drain the inbox, step the core, ship the events; block only when
there is no work (then, a few times a second, it has the fetcher replace I/O workers that died).
Signals only set a flag and wake the loop. On the way out every stream ends with a reason, the
workers exit, shared memory is unlinked and the runtime files are removed.
"""

from __future__ import annotations

import logging
import os
import queue
import secrets
import signal
import sys
import threading
import time
from dataclasses import dataclass, field

from moed.daemon.engine.core import EngineCore, RequestRejected, context_length
from moed.daemon.io.fetcher import FetchError
from moed.daemon.service.frontend import ClientBounds, Disconnected, Frontend
from moed.daemon.service.status import PUBLISH_S, daemon_status
from moed.ipc import shm
from moed.ipc.config import PagingConfig, ServingConfig
from moed.ipc.connection import DaemonFiles, daemon_files, hold_lock, remove_files, write_connection
from moed.ipc.messages import Abort, DaemonStatus, Error, Finished, Generate, StopDaemon
from moed.ipc.runtime import process_alive

log = logging.getLogger(__name__)

IDLE_WAIT_S = 0.5  # the loop's wait for a message when it has no work
WORKER_CHECK_S = 0.25  # how often the loop has the fetcher reap and replace exited I/O workers
HEAT_SAVE_S = 300.0  # how often the expert use counts are saved for the next warm start (also at stop)


@dataclass
class DaemonConfig:
    model: str
    paging: PagingConfig = field(default_factory=PagingConfig)  # the expert cache and its reads
    serving: ServingConfig = field(default_factory=ServingConfig)  # batching, prompt cache, keep-alive
    http: str | None = None  # "HOST:PORT"
    api_key: str | None = None
    runtime_dir: str | None = None
    aliases: list[str] = field(default_factory=list)  # more names the HTTP API's model answers to
    cors_origins: list[str] = field(default_factory=list)  # browser origins the HTTP API answers (CORS)


class DaemonAlreadyRunning(RuntimeError):
    pass


class Stopped(Exception):
    """A stop (signal or `moed stop`) arrived while the model was loading: the load is abandoned."""


def clean_stale(files: DaemonFiles) -> list[str]:
    """Remove what a killed daemon left: pid/connection/socket files and its shm segments (called
    with the directory's lock held, so no daemon owns them). A segment named like ours whose creator
    lives (a zombie counts as gone), that belongs to another user or that cannot be removed is left."""
    removed = [str(p) for p in (files.connection, files.pid, files.socket) if p.exists()]
    remove_files(files)
    for name in shm.segments() or []:
        owner = name.split("-")[1] if name.count("-") >= 2 else ""
        try:
            if not owner.isdigit() or process_alive(int(owner)) or os.stat(f"/dev/shm/{name}").st_uid != os.getuid():
                continue
            shm.unlink_name(name)
        except (OSError, ValueError) as e:  # not ours after all (planted, or gone meanwhile)
            log.warning("leaving /dev/shm/%s: %s", name, e)
            continue
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
        self.heat = None  # the store's Heat observer, once loaded
        self._heat_saved = time.monotonic()
        self.core: EngineCore | None = None
        self.owner: dict[str, tuple[bytes, str]] = {}  # core request id -> (client, client's req_id)
        self._stopping = False  # a plain flag: the signal handler sets it (an Event's lock is not reentrant)
        self._next_tend = 0.0  # monotonic time of the next I/O worker check
        self._published = 0.0  # monotonic time of the last status
        self._status: DaemonStatus | None = None  # the latest status, swapped in by _publish
        self._keep_alive = cfg.serving.keep_alive  # seconds idle before the model is released
        self._idle_since = time.monotonic()
        if link is not None and cfg.serving.keep_alive != float("inf"):
            raise ValueError("--keep-alive is not supported for a model split across ranks")
        self.http = None
        self.failed = ""
        self._publish(force=True)

    # ------------------------------------------------------------------ lifecycle

    def run(self, stopped=None) -> int:
        """Serve until stopped; `stopped()` says whether a stop signal came before this took over."""
        on_main = threading.current_thread() is threading.main_thread()  # signals: the main thread's only
        if on_main:  # first: a stop signal from here on is a clean stop (exit 0)
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        if stopped is not None and stopped():
            self._stopping = True  # the load stops at its first step, and everything is cleaned up
        self._lock = hold_lock(self.files)  # held until this process ends (the kernel lets go of it)
        if self._lock is None:
            raise DaemonAlreadyRunning(f"a moed daemon already serves {self.files.dir} (it holds "
                                       f"{self.files.lock.name}); `moed stop` it first")
        for line in clean_stale(self.files):
            print(f"[moed] removed stale {line}", flush=True)
        token = secrets.token_urlsafe(32)
        self.frontend = Frontend(self.files.endpoint, token, os.path.basename(str(self.cfg.model)), self.status,
                                 on_stop=self.stop, bounds=ClientBounds(in_flight=self.cfg.serving.max_client_requests))
        self.frontend.start()
        write_connection(self.files, {"endpoint": self.files.endpoint, "token": token, "pid": os.getpid(),
                                      "model": str(self.cfg.model), "http": self.cfg.http,
                                      "log": str(self.files.log)})
        try:
            if self.cfg.http:  # up while loading: /health answers 503 until ready
                from moed.daemon.service.http import HttpServer

                self.http = HttpServer(self.cfg.http, self.cfg.api_key, self.files.dir, self.cfg.aliases,
                                       self.cfg.cors_origins).start()
            try:
                self._load()
            except Stopped:
                print("[moed] stopped while loading", flush=True)
                return 0
            print(f"[moed] ready: {self.cfg.model} on {self.files.endpoint}"
                  + (f" and http://{self.cfg.http}" if self.http else ""), flush=True)
            self._loop()
            return 1 if self.failed else 0
        finally:
            self._shutdown()
            if on_main:
                ignore_stop_signals()

    def stop(self) -> None:
        """Ask the loop to stop (from any thread, or a signal handler)."""
        self._stopping = True
        if (frontend := getattr(self, "frontend", None)) is not None:  # none yet early in run()
            frontend.inbox.put((b"", StopDaemon()))  # wakes the loop; SimpleQueue.put is reentrant

    def _on_signal(self, signum, frame) -> None:
        """SIGTERM/SIGINT: set the flag and wake the loop, nothing more. A handler runs between any
        two bytecodes of the main thread, which is the loop, and inside itself when signals come fast,
        so it takes no lock: a queue.Queue or an Event here can deadlock."""
        self.stop()

    def _load(self) -> None:
        self.state = "loading"
        self._publish(force=True)

        def progress(phase: str, done: float) -> None:
            new_phase, self.progress = phase != self.progress[0], (phase, done)
            self._publish(force=new_phase)
            if self._stopping:
                raise Stopped()

        c = self.cfg
        self.pm = load_model(c, self.link, progress)
        self.heat = self.pm.heat
        self.core = new_core(c, self.pm, self.link)
        if self.link is not None:
            from moed.daemon.dist.lockstep import LockstepCore

            progress("waiting for the other ranks", 0.99)
            self.core = LockstepCore(self.core, self.link, self.pm)
        self.state = "ready" if not self._stopping else "stopping"
        self._idle_since = time.monotonic()
        self._publish(force=True)

    def _sleep(self) -> None:
        """Keep-alive ran out: release the model (weights, expert cache, workers, prompt cache in
        memory, MLX's buffers) and stay up; the next request loads it again. Prefixes on disk stay."""
        import gc

        import mlx.core as mx

        print(f"[moed] idle for {self._keep_alive:g} s: releasing the model until the next request", flush=True)
        self.core = self.heat = None
        self.pm.close()
        self.pm = None
        gc.collect()
        mx.clear_cache()
        self.state, self.progress = "sleeping", ("sleeping", 0.0)
        self._publish(force=True)

    def _wake(self) -> None:
        print("[moed] a request arrived: loading the model again", flush=True)
        t0 = time.monotonic()
        self._load()
        print(f"[moed] ready again in {time.monotonic() - t0:.1f} s", flush=True)

    def _shutdown(self) -> None:
        self.state = "stopping"
        self._publish(force=True)
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

        while not self._stopping:
            busy = self.core is not None and self.core.has_work()
            self._drain(block=not busy)
            if self.core is not None:
                self._tend_workers()
            if self.core is not None and self.core.has_work() and not self._stopping:
                self._idle_since = time.monotonic()
                try:
                    self._ship(self.core.step())
                except RankFailed as e:  # a split model cannot go on: every rank stops
                    self._ship(e.events)
                    self.failed = str(e)
                    print(f"[moed] {e}; stopping every rank", flush=True)
                    return
            elif self.core is not None and time.monotonic() - self._idle_since > self._keep_alive \
                    and not self._stopping:
                self._sleep()
            if self.pm is not None and time.monotonic() - self._heat_saved > HEAT_SAVE_S:
                self._heat_saved = time.monotonic()
                self.pm.save_heat()
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
            if msg.keep_alive_s is not None and not (msg.keep_alive_s >= 0):
                self.frontend.send(client, Error(req_id, "bad_request", "keep_alive must be a duration >= 0"))
                return
            if self.core is None:
                try:
                    self._wake()
                except (KeyboardInterrupt, SystemExit):
                    raise
                except Stopped:  # stopped while loading it again
                    self.frontend.send(client, Error(req_id, "shutdown", "the daemon is stopping"))
                    return
                except Exception as e:  # the model cannot be loaded again: say so, stay up
                    log.exception("loading the model again failed")
                    self.state, self.progress = "sleeping", ("sleeping", 0.0)
                    self.frontend.send(client, Error(req_id, "internal", f"could not load the model: {e}"))
                    return
            self._keep_alive = self.cfg.serving.keep_alive if msg.keep_alive_s is None else msg.keep_alive_s
            self._idle_since = time.monotonic()
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
            if self.core is not None:
                self._ship(self.core.abort(f"{client.hex()}:{msg.req_id}"))
        elif isinstance(msg, Disconnected):
            prefix = f"{client.hex()}:"
            for rid in [r for r in self.owner if r.startswith(prefix)]:
                if self.core is not None:
                    self._ship(self.core.abort(rid))
        elif isinstance(msg, StopDaemon):
            self._stopping = True
        else:
            self.frontend.send(client, Error(getattr(msg, "req_id", None), "bad_request",
                                             f"{type(msg).__name__} is not a request"))

    def _tend_workers(self) -> None:
        """Have the fetcher reap and replace I/O workers that exited while nothing was read (every
        WORKER_CHECK_S; it runs on this thread, the one that reads)."""
        now = time.monotonic()
        if now < self._next_tend:
            return
        self._next_tend = now + WORKER_CHECK_S
        try:
            self.pm.fetcher.poll()
        except FetchError:  # a slot that keeps dying: the fetcher is down for a backoff (status "degraded")
            log.exception("[moed] the I/O workers cannot be kept alive")

    def _ship(self, events: list) -> None:
        """Route core events back to the client that owns each request. A request's end is in the
        status before its Finished/Error leaves, so a client that then asks sees it."""
        if any(isinstance(ev, (Finished, Error)) for ev in events):
            self._publish(force=True)
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

    def _publish(self, force: bool = False) -> None:
        """Build the status on this (the engine's) thread and swap it in for the frontend to serve:
        every PUBLISH_S, or now with `force` (a state change, a request's end)."""
        now = time.monotonic()
        if not force and now - self._published < PUBLISH_S:
            return
        frontend = getattr(self, "frontend", None)
        try:
            ranks = None
            if self.link is not None and self.pm is not None and hasattr(self.core, "ranks"):
                from moed.daemon.dist.ranks import rank_status

                ranks = [rank_status(self.pm, 0), *self.core.ranks[1:]]
            self._status = daemon_status(
                state=self.state, progress=self.progress, started=self.started, model=str(self.cfg.model),
                http=self.cfg.http, clients=len(frontend.clients) if frontend is not None else 0,
                max_queue=self.cfg.serving.max_queue, pm=self.pm, core=self.core, heat=self.heat, ranks=ranks)
        except Exception:  # a bug here must not stop the engine: the last status stays served
            if self._status is None:
                raise
            log.exception("building the status failed; serving the previous one")
        self._published = now

    def status(self) -> DaemonStatus:
        """The latest published status, as it is (the frontend's I/O thread calls this: it reads one
        reference and touches nothing of the engine)."""
        return self._status


def ignore_stop_signals() -> None:
    """Stopped: late SIGTERM/SIGINT must neither print nor kill the exiting process (its exit code
    stays 0). SIG_IGN at the C level survives Python's finalization (which restores the default
    action only where a Python handler was set); a signal that tripped just before the switch makes
    Python report "Signal N ignored due to race condition" as unraisable: that report is dropped."""
    default = sys.unraisablehook

    def hook(u) -> None:
        if not (isinstance(u.exc_value, OSError) and "ignored due to race condition" in str(u.exc_value)):
            default(u)

    sys.unraisablehook = hook
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, signal.SIG_IGN)


def load_model(c: DaemonConfig, link, progress=None):
    """The paged model as configured (this rank's layers when split)."""
    from moed.daemon.engine.loader import load_paged

    return load_paged(c.model, c.paging, progress=progress, group=link.group if link is not None else None)


def new_core(c: DaemonConfig, pm, link) -> EngineCore:
    s = c.serving
    text = pm.config.get("text_config", pm.config)
    prompt_cache = admission = None
    if link is None:  # a split model's ranks would have to cache and admit alike
        from moed.daemon.engine.admission import Admission

        prompt_cache = new_prompt_cache(c, pm)
        admission = Admission.for_loaded(pm, s.prefill_chunk, s.kv_budget_gb, workers=c.paging.workers,
                                         prompt_cache_bytes=prompt_cache.max_bytes if prompt_cache is not None else 0)
    core = EngineCore(pm.model, pm.tokenizer, max_batch=s.max_batch, max_queue=s.max_queue,
                      context=context_length(pm.config), prefill_chunk=s.prefill_chunk, prompt_cache=prompt_cache,
                      vocab_size=text.get("vocab_size"), prefill_budget=s.prefill_budget if link is None else 0.0,
                      admission=admission)
    if link is not None:
        link.share_seed()
    return core


def new_prompt_cache(c: DaemonConfig, pm):
    """The prompt cache as configured, or None when off. Not for a model split across ranks: each
    rank's cache holds its own layers, and their byte counts (so their evictions) would differ."""
    from moed.daemon.engine.prompt_cache import DiskPrefixes, PromptCache, default_bytes, model_fingerprint

    s = c.serving
    max_bytes = int(s.prompt_cache_gb * 1e9) if s.prompt_cache_gb is not None else default_bytes(
        pm.non_expert_bytes + pm.info["cache_bytes"])
    if max_bytes <= 0:
        return None
    fingerprint = model_fingerprint(pm.path, f"top_k={c.paging.top_k}", f"dtype={c.paging.dtype}")
    disk = DiskPrefixes(s.prompt_cache_dir, fingerprint, int(s.prompt_cache_disk_gb * 1e9)) \
        if s.prompt_cache_dir else None
    if disk is not None:
        print(f"[moed] prompt cache on disk: {disk.dir} ({len(disk.entries)} prefixes)", flush=True)
    return PromptCache(max_bytes, fingerprint, disk)


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


def main(cfg: DaemonConfig, link=None, stopped=None) -> int:
    """`stopped()`: whether a stop signal came before the supervisor took over the signals."""
    if link is not None and link.rank > 0:
        return follower(cfg, link)
    try:
        return Supervisor(cfg, link).run(stopped)
    except DaemonAlreadyRunning as e:
        print(f"moed: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # a bad checkpoint, or a configuration that does not fit
        print(f"moed: error: {e}", file=sys.stderr)
        return 2
