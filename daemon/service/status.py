"""The daemon's status snapshot (a typed DaemonStatus, ipc/messages.py), built from the engine's state.

Only the engine loop's thread calls `daemon_status`: the core, the expert store and the fetcher are
not thread-safe. The supervisor publishes the result every PUBLISH_S (and on state changes) and
the frontend's I/O thread serves the latest one as it is.
"""

from __future__ import annotations

import os
import time

import psutil

from moed.ipc.messages import (CacheStatus, CheckpointStatus, DaemonStatus, EngineStatus, HeatStatus, IoStatus,
                               LoadProgress, MemoryStatus, RankStatus, Totals, WorkerStatus)

PUBLISH_S = 0.5  # how stale a status may be (the engine loop also publishes on state changes)


def daemon_status(*, state: str, progress: tuple[str, float], started: float, model: str, http: str | None,
                  clients: int, max_queue: int, pm=None, core=None, heat=None,
                  ranks: list[RankStatus] | None = None) -> DaemonStatus:
    """The status now.

    Args:
        state: "starting", "loading", "ready" or "stopping"; a loaded daemon whose I/O workers cannot
            serve (they kept failing; the fetcher respawns them after a backoff) reports "degraded",
            with the reason as the progress phase.
        progress: the load's (phase, fraction done).
        started: the daemon's start, in time.time() seconds.
        pm: the PagedModel once loaded; core: the EngineCore (or LockstepCore) once built.
        heat: the store's Heat observer (recent use per layer and expert).
        ranks: every rank's RankStatus when the model is split, rank 0 first.
    """
    rss = psutil.Process().memory_info().rss
    loaded = pm is not None and core is not None and heat is not None and state not in ("starting", "loading")
    eng = core.snapshot() if core is not None else EngineStatus(
        requests=[], decode_tps=0.0, prefill_tps=0.0, kv_cache_bytes=0, totals=Totals(), max_queue=max_queue,
        context=None, prompt_cache=None)
    parts = _loaded(pm, heat, eng, rss) if loaded else {
        "checkpoint": None, "cache": None, "workers": [], "io": None, "heat": None, "memory": None}
    if state == "ready" and pm is not None and (why := getattr(pm.fetcher, "failure", None)):
        state, progress = "degraded", (why, 0.0)
    return DaemonStatus(
        requests=eng.requests, decode_tps=eng.decode_tps, prefill_tps=eng.prefill_tps,
        kv_cache_bytes=eng.kv_cache_bytes, totals=eng.totals, max_queue=eng.max_queue, context=eng.context,
        prompt_cache=eng.prompt_cache, state=state, progress=LoadProgress(*progress), pid=os.getpid(), uptime_s=time.time() - started,
        model=model, rss_bytes=rss, http=http, clients=clients, ranks=list(ranks or []), **parts)


def _loaded(pm, heat, eng: EngineStatus, rss: int) -> dict:
    """The parts that exist once the model is loaded: checkpoint, cache, workers, io, heat, memory."""
    fetch, info = pm.fetcher, pm.info
    text = pm.config.get("text_config", pm.config)
    workers = [WorkerStatus(pid=w["pid"], alive=w["alive"], ready=w["ready"], queued_bytes=w["queued_bytes"],
                            restarts=w["restarts"]) for w in fetch.worker_states()]
    st = pm.store.stats
    return {
        "checkpoint": CheckpointStatus(
            arch=str(pm.config.get("model_type")), quantization=(pm.config.get("quantization") or {}).get("bits"),
            layers=int(text.get("num_hidden_layers") or 0), top_k=pm.top_k, non_expert_bytes=pm.non_expert_bytes,
            expert_bytes=pm.expert_bytes, layer_range=tuple(info["layer_range"])),
        "cache": CacheStatus(
            budget_bytes=info["cache_bytes"], slots_per_layer=list(info["slots_per_layer"]),
            experts_per_layer=list(info["experts_per_layer"]), used_slots=pm.store.used_slots(),
            hits=st.hits, misses=st.misses, hit_rate=st.hit_rate, bytes_read=st.bytes_read,
            read_seconds=st.read_seconds, prefetched=st.prefetched, prefetch_used=st.prefetch_used,
            layer_hits=list(st.layer_hits), layer_misses=list(st.layer_misses)),
        "workers": workers,
        "io": IoStatus(read_calls=fetch.stats.read_calls, reads=fetch.stats.reads, bytes_read=fetch.stats.bytes_read,
                       read_seconds=fetch.stats.read_seconds, respawns=fetch.stats.respawns,
                       in_flight=sum(1 for w in workers if w.queued_bytes), packed=bool(info["packed"]),
                       direct=bool(fetch.direct), lookahead=bool(info["lookahead"])),
        "heat": HeatStatus(values=[[round(float(v), 2) for v in row] for row in heat.values],
                           resident=[pm.store.resident(i).tolist() for i in range(len(pm.store.layers))]),
        "memory": memory(rss, pm.non_expert_bytes, info["cache_bytes"], eng.kv_cache_bytes),
    }


def memory(rss: int, resident_weights: int, expert_cache: int, kv_cache: int) -> MemoryStatus:
    """RSS split into resident weights, expert cache, KV cache and the rest."""
    return MemoryStatus(rss=rss, resident_weights=resident_weights, expert_cache=expert_cache, kv_cache=kv_cache,
                        other=max(0, rss - resident_weights - expert_cache - kv_cache))
