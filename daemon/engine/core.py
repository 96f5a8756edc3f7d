"""The engine core: admit requests, step the model with continuous batching, emit events.

No sockets here (see frontend.py): the supervisor feeds `add`/`abort` and ships what `step`
returns, and tests can drive the same core in-process. Batching is mlx-lm's BatchGenerator over the
paged model, so every MoE layer of a step loads the union of the batch's experts once.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from mlx_lm.generate import BatchGenerator

from moed.daemon.engine import sampling
from moed.daemon.engine.admission import Admission
from moed.daemon.engine.pacer import PrefillPacer
from moed.daemon.engine.prompt_cache import PromptCache
from moed.ipc.messages import EngineStatus, Error, Finished, Generate, RequestStatus, Token, Totals

log = logging.getLogger(__name__)

THROUGHPUT_WINDOW_S = 60.0
ROLES = ("system", "user", "assistant", "tool")
MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "reasoning_content"}


class StepFailed(RuntimeError):
    """A model step raised: every request in it failed (`events`: their Error events) and the core
    started a fresh generator, so it can go on. The cause is chained and its traceback logged."""

    def __init__(self, message: str, events: list):
        super().__init__(message)
        self.events = events


class RequestRejected(Exception):
    """A request the core will not run; `code` is "rejected" (load), "bad_request" (input) or
    "context_length_exceeded" (prompt + max_tokens beyond the model's context, or beyond the memory
    budget for requests even with nothing else running: admission.py)."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


@dataclass
class Request:
    req_id: str
    client: str
    prompt_ids: list[int]
    max_tokens: int
    stop: list[str]
    logprobs: int = -1  # as Generate.logprobs
    cache_prompt: bool = True
    cached: int = 0  # prompt tokens taken from the prompt cache
    pending: tuple | None = None  # (sampler, processors, checkpoints) while it waits for memory (uid -1)
    kinds: list[str] = field(default_factory=list)  # the prompt cache kind of each checkpoint still ahead
    uid: int = -1
    detok: object = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    sent: int = 0  # characters of `text` already emitted
    stop_sequence: str | None = None  # the stop string that ended it
    t_arrival: float = field(default_factory=time.perf_counter)
    t_first: float = 0.0


def context_length(config: dict) -> int:
    for cfg in (config, config.get("text_config", {})):
        for key in ("max_position_embeddings", "max_seq_len", "n_positions"):
            if key in cfg:
                return int(cfg[key])
    return 4096


class EngineCore:
    """Continuous batching over one loaded model.

    Args:
        model: the (paged) mlx-lm model.
        tokenizer: mlx-lm's TokenizerWrapper.
        max_batch: sequences decoded together in one step.
        max_queue: admitted requests (running + waiting) beyond which new ones are rejected.
        context: the model's context length (prompt + completion must fit).
        prefill_chunk: prompt tokens prefilled per step with nothing decoding, and the most per step
            while streams decode (then the pacer sizes the chunk by time: daemon/engine/pacer.py).
        prefill_budget: a step's prefill while streams decode, in their decode steps (pacer.py); 0
            keeps every chunk at `prefill_chunk`, as must a model split across ranks (every rank
            must cut its prompts alike, and their timings differ).
        prompt_cache: reusable prefixes (None: every prompt is prefilled whole).
        vocab_size: the model's (logit_bias ids are checked against it).
        admission: memory for requests' KV cache and prefill (admission.py): one that does not fit
            waits, in order, until running ones finish; None: every request starts at once.
    """

    def __init__(self, model, tokenizer, *, max_batch: int = 8, max_queue: int = 32, context: int = 4096,
                 prefill_chunk: int = 2048, prompt_cache: PromptCache | None = None, vocab_size: int | None = None,
                 prefill_budget: float = 1.0, admission: Admission | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.max_queue, self.context = max_queue, context
        self.eos = set(tokenizer.eos_token_ids)
        self.max_batch, self.prefill_chunk = max_batch, prefill_chunk
        self.prompt_cache = prompt_cache
        self.pacer = PrefillPacer(prefill_chunk, prefill_budget) if prefill_budget > 0 else None
        self.vocab_size = vocab_size or len(tokenizer._tokenizer)
        self.gen = self._new_generator()
        self.requests: dict[str, Request] = {}
        self.by_uid: dict[int, Request] = {}
        self.admission = admission
        self.waiting: deque[Request] = deque()  # admitted, in self.requests, not yet in the generator
        self.decoded: deque[tuple[float, int]] = deque()  # (time, tokens) per step, for tok/s
        self.totals = {"requests": 0, "completed": 0, "rejected": 0, "aborted": 0,
                       "prompt_tokens": 0, "completion_tokens": 0, "generated_tokens": 0, "peak_active": 0}

    def _new_generator(self) -> BatchGenerator:
        return BatchGenerator(self.model, stop_tokens=[[t] for t in sorted(self.eos)],
                              completion_batch_size=self.max_batch, prefill_batch_size=self.max_batch,
                              prefill_step_size=self.prefill_chunk)

    # ---------------------------------------------------------------- admission

    def encode(self, g: Generate) -> list[int]:
        """Prompt ids: raw text as stream_generate tokenizes it, or the chat template (with the
        request's tools and template arguments)."""
        return self._encode(g)[0]

    def _encode(self, g: Generate) -> tuple[list[int], list[tuple[int, str]]]:
        """(prompt ids, checkpoints): where a prompt cache entry is worth keeping, as (position, kind),
        for chats the end of the system prompt and the start of the last message."""
        if g.messages is None:
            if g.prompt is None:
                raise RequestRejected("bad_request", "a request needs a prompt or messages")
            bos = self.tokenizer.bos_token
            return self.tokenizer.encode(g.prompt, add_special_tokens=bos is None or not g.prompt.startswith(bos)), []
        for m in g.messages:
            if not isinstance(m, dict) or set(m) - MESSAGE_KEYS or m.get("role") not in ROLES:
                raise RequestRejected("bad_request", f"bad chat message {m!r:.80}")
        kwargs = dict(g.chat_template_kwargs or {})
        if g.tools:
            kwargs["tools"] = g.tools
        render = self.tokenizer.apply_chat_template
        ids = list(render(g.messages, add_generation_prompt=True, **kwargs))
        if not g.cache_prompt or self.prompt_cache is None:
            return ids, []
        checkpoints = []
        n_system = next((i for i, m in enumerate(g.messages) if m["role"] != "system"), len(g.messages))
        cuts = [(n_system, "system")] if 0 < n_system < len(g.messages) else []
        if len(g.messages) > 1 and len(g.messages) - 1 > n_system:
            cuts.append((len(g.messages) - 1, "user"))
        for n, kind in cuts:  # as mlx_lm.server finds the system prompt's end: render the head, compare
            try:
                head = render(g.messages[:n] + [{"role": "user", "content": ""}], add_generation_prompt=False,
                              **kwargs) if kind == "system" else render(g.messages[:n], add_generation_prompt=False,
                                                                        **kwargs)
            except Exception:  # a template that refuses a partial conversation: no checkpoint there
                continue
            at = next((i for i, (a, b) in enumerate(zip(head, ids)) if a != b), min(len(head), len(ids)))
            if 0 < at < len(ids) - 1:
                checkpoints.append((at, kind))
        return ids, checkpoints

    def add(self, g: Generate, client: str = "") -> None:
        """Admit a request or raise RequestRejected with the reason."""
        try:
            self._admit(g, client)
        except RequestRejected:
            self.totals["rejected"] += 1
            raise

    def _admit(self, g: Generate, client: str) -> None:
        if g.req_id in self.requests:
            raise RequestRejected("bad_request", f"request id {g.req_id!r} is already running")
        if g.max_tokens < 1:
            raise RequestRejected("bad_request", f"max_tokens must be at least 1, got {g.max_tokens}")
        try:
            sampling.check(g, self.vocab_size)
        except sampling.BadSampling as e:
            raise RequestRejected("bad_request", str(e)) from None
        if len(self.requests) >= self.max_queue:
            raise RequestRejected("rejected", f"queue full: {len(self.requests)} requests running or waiting "
                                              f"(limit {self.max_queue}); retry later")
        ids, checkpoints = self._encode(g)
        if not ids:
            raise RequestRejected("bad_request", "the prompt is empty")
        if len(ids) >= self.context:
            raise RequestRejected("context_length_exceeded", f"prompt of {len(ids)} tokens does not fit the "
                                                             f"model's context of {self.context} tokens")
        if len(ids) + g.max_tokens > self.context:
            raise RequestRejected("context_length_exceeded",
                                  f"prompt of {len(ids)} tokens + max_tokens {g.max_tokens} exceeds the model's "
                                  f"context of {self.context} tokens (at most {self.context - len(ids)} new tokens)")
        if self.admission is not None and (why := self.admission.never_fits(len(ids), g.max_tokens)):
            raise RequestRejected("context_length_exceeded", why)
        try:
            sampler, processors = sampling.make(g), sampling.processors(g, self.tokenizer)
        except sampling.BadSampling as e:
            raise RequestRejected("bad_request", str(e)) from None
        req = Request(g.req_id, client, ids, g.max_tokens, list(g.stop or []), logprobs=g.logprobs,
                      cache_prompt=g.cache_prompt and self.prompt_cache is not None)
        req.detok = self.tokenizer.detokenizer
        if self.admission is not None and (self.waiting or not self.admission.fits(len(ids), req.max_tokens)):
            req.pending = (sampler, processors, checkpoints)  # behind the ones waiting: in order, none starves
            self.waiting.append(req)
        else:
            self._start(req, sampler, processors, checkpoints)
        self.requests[req.req_id] = req
        self.totals["requests"] += 1
        self.totals["prompt_tokens"] += len(ids)
        self.totals["peak_active"] = max(self.totals["peak_active"], len(self.requests))

    def _start(self, req: Request, sampler, processors, checkpoints: list[tuple[int, str]]) -> None:
        """Put an admitted request into the generator (its memory reserved)."""
        ids, cache = req.prompt_ids, None
        if req.cache_prompt:
            cache, req.cached = self.prompt_cache.fetch(ids)
        segments, req.kinds = _segments(ids, req.cached, checkpoints) if req.cache_prompt else ([ids], [])
        (req.uid,) = self.gen.insert_segments([segments], max_tokens=[req.max_tokens], caches=[cache],
                                              all_tokens=[ids[:req.cached]], samplers=[sampler],
                                              logits_processors=[processors])
        self.by_uid[req.uid] = req
        if self.admission is not None:
            self.admission.reserve(req.req_id, len(ids), req.max_tokens)

    def _start_waiting(self) -> None:
        """Start the waiting requests, in order, while the first fits the memory left."""
        while self.waiting and self.admission.fits(len(self.waiting[0].prompt_ids), self.waiting[0].max_tokens):
            req = self.waiting.popleft()
            pending, req.pending = req.pending, None
            self._start(req, *pending)

    def abort(self, req_id: str, reason: str = "abort") -> list:
        """Stop a request; returns its Finished event (nothing if unknown)."""
        req = self.requests.get(req_id)
        if req is None:
            return []
        if req.pending is not None:
            self.waiting.remove(req)
        else:
            self.gen.remove([req.uid])
        self.totals["aborted"] += reason == "abort"
        return [self._finish(req, reason)]

    def shutdown(self) -> list:
        """End every request with reason "shutdown"."""
        return [e for rid in list(self.requests) for e in self.abort(rid, "shutdown")]

    # ---------------------------------------------------------------- stepping

    def has_work(self) -> bool:
        return bool(self.requests)

    def step(self) -> list:
        """One model step for the whole batch; returns Token/Finished/Error events. A failed step
        (e.g. an unreadable shard) fails its requests with Error("internal"), not the daemon."""
        try:
            return self.try_step()
        except StepFailed as e:
            return e.events

    def try_step(self) -> list:
        """Like step(), but a failed step raises StepFailed (a split model's ranks must all stop).

        One step is one decode step of the running sequences and one chunk of the prompts being
        prefilled (sized by the pacer), so a long prompt never stalls the streams for long."""
        try:
            if self.waiting:
                self._start_waiting()
            if self.pacer is None:
                prompt_responses, responses = self.gen.next()
            else:
                self.gen.prefill_step_size = self.pacer.chunk(any(r.t_first for r in self.requests.values()))
                with self.gen.stats() as stats:
                    prompt_responses, responses = self.gen.next()
                self.pacer.observe(stats)
            self._checkpoint(prompt_responses)
        except Exception as e:
            # users get the short typed error; the log keeps the cause
            log.exception("moed engine: a step failed; failing its %d request(s)", len(self.requests))
            raise StepFailed(f"generation failed: {e}", self._fail_all(e)) from e
        now = time.perf_counter()
        if responses:
            self.decoded.append((now, len(responses)))
        self.totals["generated_tokens"] += len(responses)
        events = []
        for r in responses:
            req = self.by_uid.get(r.uid)
            if req is not None:
                events += self._on_token(req, r, now)
        return events

    def _checkpoint(self, prompt_responses: list) -> None:
        """Keep the prompt cache's entries at the checkpoints prefill just passed."""
        ends = [r.uid for r in prompt_responses if r.end_of_segment and not r.end_of_prompt
                and (req := self.by_uid.get(r.uid)) is not None and req.kinds]
        if not ends:
            return
        for uid, (cache, tokens) in self.gen.extract_cache(ends).items():
            self.prompt_cache.insert(list(tokens), cache, self.by_uid[uid].kinds.pop(0))

    def _on_token(self, req: Request, r, now: float) -> list:
        token, finish = r.token, r.finish_reason
        if not req.tokens:
            req.t_first = now
            if self.admission is not None:
                self.admission.prefilled(req.req_id)
        if finish and req.cache_prompt and r.prompt_cache is not None:
            self.prompt_cache.insert(list(r.all_tokens), r.prompt_cache, "assistant")
        if finish == "stop" and token in self.eos:
            return [self._finish(req, "stop")]
        req.tokens.append(token)
        req.detok.add_token(token)
        if finish:
            req.detok.finalize()
        req.text += req.detok.last_segment
        hit = self._stop_hit(req)
        if hit is not None:
            req.text, req.stop_sequence = req.text[:hit[0]], hit[1]
            finish = "stop"
            self._remove(req)
        # hold back a tail that may be the start of a stop string; flush it at the end
        upto = len(req.text) if finish else len(req.text) - self._held(req)
        ev = Token(req.req_id, req.text[req.sent:upto], token, len(req.tokens) - 1)
        if req.logprobs >= 0:
            ev.logprob = r.logprobs[token].item()
            if req.logprobs > 0:
                ev.top_logprobs = sampling.top_logprobs(r.logprobs, req.logprobs)
        events = [ev]
        req.sent = max(req.sent, upto)
        if finish:
            events.append(self._finish(req, finish))
        return events

    def _remove(self, req: Request) -> None:
        """Take a running request out of the generator (keeping its sequence in the prompt cache)."""
        caches = self.gen.remove([req.uid], return_prompt_caches=req.cache_prompt)
        if req.uid in caches:
            cache, tokens = caches[req.uid]
            if tokens:
                self.prompt_cache.insert(list(tokens), cache, "assistant")

    @staticmethod
    def _held(req: Request) -> int:
        """Length of the longest tail of the text that is a proper prefix of a stop string."""
        return max((n for s in req.stop for n in range(min(len(s) - 1, len(req.text)), 0, -1)
                    if req.text.endswith(s[:n])), default=0)

    def _stop_hit(self, req: Request) -> tuple[int, str] | None:
        """Where the earliest stop string starts in the unsent text, and which one."""
        hits = [(i, s) for s in req.stop if s and (i := req.text.find(s, max(0, req.sent - len(s)))) >= 0]
        return min(hits, key=lambda h: h[0]) if hits else None

    def _finish(self, req: Request, reason: str) -> Finished:
        del self.requests[req.req_id]
        self.by_uid.pop(req.uid, None)
        if self.admission is not None:
            self.admission.release(req.req_id)
        n = len(req.tokens)
        self.totals["completed"] += reason in ("stop", "length")
        self.totals["completion_tokens"] += n
        decode_s = time.perf_counter() - req.t_first if req.t_first else 0.0
        return Finished(req.req_id, reason, len(req.prompt_ids), n,
                        ttft_s=(req.t_first - req.t_arrival) if req.t_first else 0.0,
                        decode_tps=(n - 1) / decode_s if n > 1 and decode_s > 0 else 0.0, cached_tokens=req.cached,
                        stop_sequence=req.stop_sequence)

    def _fail_all(self, exc: Exception) -> list:
        """A step failed: fail the requests in it, start a fresh generator, keep serving (the ones
        waiting for memory were not in it: they wait on)."""
        failed = [req for req in self.requests.values() if req.pending is None]
        events = [Error(req.req_id, "internal", f"generation failed: {exc}") for req in failed]
        self.totals["failed"] = self.totals.get("failed", 0) + len(events)
        for req in failed:
            del self.requests[req.req_id]
        self.by_uid.clear()
        if self.admission is not None:
            self.admission.clear()
        self.gen = self._new_generator()
        return events

    # ---------------------------------------------------------------- status

    def decode_tps(self) -> float:
        """Tokens per second over the last minute of decoding (0 when idle)."""
        now = time.perf_counter()
        while self.decoded and now - self.decoded[0][0] > THROUGHPUT_WINDOW_S:
            self.decoded.popleft()
        if len(self.decoded) < 2 or not self.requests:
            return 0.0
        span = self.decoded[-1][0] - self.decoded[0][0]
        return sum(n for _, n in list(self.decoded)[1:]) / span if span > 0 else 0.0

    def prefill_tps(self) -> float:
        """Prompt tokens per second of prefill, over the generator's lifetime."""
        c = self.gen._counters
        return c.prompt_tokens / c.prompt_time if c.prompt_time > 0 else 0.0

    def snapshot(self) -> EngineStatus:
        """The requests, rates and counters for the status (call it from the loop's thread)."""
        now = time.perf_counter()
        reqs = []
        for r in self.requests.values():
            dt = now - r.t_first if r.t_first else 0.0
            reqs.append(RequestStatus(id=r.req_id, client=r.client, prompt_tokens=len(r.prompt_ids),
                                      tokens=len(r.tokens), max_tokens=r.max_tokens,
                                      state="decoding" if r.tokens else "waiting" if r.pending else "prefill",
                                      tps=(len(r.tokens) - 1) / dt if len(r.tokens) > 1 and dt > 0 else 0.0,
                                      age_s=now - r.t_arrival))
        return EngineStatus(requests=reqs, decode_tps=self.decode_tps(), prefill_tps=self.prefill_tps(),
                            kv_cache_bytes=self.gen.prompt_cache_nbytes, totals=Totals(**self.totals),
                            max_queue=self.max_queue, context=self.context,
                            prompt_cache=self.prompt_cache.status() if self.prompt_cache is not None else None)


def _segments(ids: list[int], cached: int, checkpoints: list[tuple[int, str]]) -> tuple[list[list[int]], list[str]]:
    """The prompt past its cached prefix, cut where the prompt cache keeps an entry: each checkpoint
    ahead of the prefix, then the prompt less its last token ("user": what the next turn of a chat
    or a retried prompt shares), then the last token alone (it gives the first logits). Returns
    (segments, the kind of each entry in order)."""
    cuts = [(at, kind) for at, kind in sorted(checkpoints) if cached < at < len(ids) - 1]
    cuts.append((len(ids) - 1, "user"))
    segments, kinds, start = [], [], cached
    for at, kind in cuts:
        if at > start:
            segments.append(ids[start:at])
            kinds.append(kind)
            start = at
    segments.append(ids[start:])
    return segments, kinds
