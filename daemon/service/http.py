"""The OpenAI-compatible HTTP API: a translation layer in front of the native protocol.

Starlette + uvicorn in a thread of the daemon. Each HTTP request becomes a native Generate sent
through an AsyncClient to the daemon's own socket, so HTTP and native clients share one engine
path (batching, limits, aborts on disconnect). Also /health (503 while loading) and /metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import threading
import time
import uuid
from dataclasses import asdict
from pathlib import Path

import uvicorn
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from moed.client.client import AsyncClient, DaemonDied, RequestRejected
from moed.daemon.service import anthropic, openai
from moed.daemon.service import tools as tool_calls
from moed.daemon.service.api import (HTTP_STATUS, ApiError, LocalGuard, error_response, is_loopback,  # noqa: F401
                                     native_error, parse_hostport, parse_json_object, read_json_body, ticking)
from moed.ipc.messages import DaemonStatus, Token

MAX_BODY_BYTES = 4 << 20
KEEPALIVE_S = 5.0  # an SSE comment this often while a stream waits (long prefill, slow tokens)


def hf_ids(model: str) -> list[str]:
    """The Hugging Face ids a checkpoint is known by: the id it was started with, the HF cache folder it lies
    in, its config's/tokenizer config's name_or_path and the id mlx-lm's README names (those that look
    like "org/name")."""
    looks = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
    found = []
    path = Path(model).expanduser()
    if not path.is_dir() and looks.match(model):
        found.append(model)
    try:
        from moed.daemon.engine.checkpoint import resolve_model

        path = resolve_model(model)
    except Exception:
        return found
    for part in path.parts:
        if part.startswith("models--"):
            found.append(part[len("models--"):].replace("--", "/", 1))
    for name, key in (("config.json", "_name_or_path"), ("tokenizer_config.json", "name_or_path")):
        try:
            v = json.loads((path / name).read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            continue
        if isinstance(v, str) and looks.match(v) and not Path(v).exists():
            found.append(v)
    try:
        m = re.search(r"The Model \[([\w.-]+/[\w.-]+)\]", (path / "README.md").read_text(errors="replace"))
        if m:
            found.append(m.group(1))
    except OSError:
        pass
    return list(dict.fromkeys(found))


# ---------------------------------------------------------------- the app


class Api:
    """The HTTP API's state: one native connection per event loop, the model's names, its tokenizer.

    Args:
        runtime_dir: the daemon's runtime folder (its native socket).
        api_key: the bearer token required on every route but /health (None: open, loopback only).
        aliases: more names the model answers to (`--alias`).
    """

    def __init__(self, runtime_dir, api_key: str | None, aliases=()):
        self.runtime_dir, self.api_key = runtime_dir, api_key
        # one native connection per event loop (a zmq.asyncio socket belongs to one loop), made once
        # even when the first requests come together; its calls each have their own future
        self._clients: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
        self.model = "moed"
        self.aliases = list(aliases)
        self.keepalive_s = KEEPALIVE_S
        self._names: list[str] | None = None
        self._model_arg: str | None = None
        self._tokenizer: asyncio.Future | None = None

    async def native(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        task = self._clients.get(loop)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._clients[loop] = loop.create_task(AsyncClient(self.runtime_dir, name="http").connect())
        client = await asyncio.shield(task)  # a cancelled request does not cancel the connection
        self.model = client.model
        return client

    async def names(self) -> list[str]:
        """Every name the served model answers to: its folder's name first, its HF ids, the aliases."""
        client = await self.native()
        if self._names is None:
            self._model_arg = (await client.status()).model
            ids = await asyncio.to_thread(hf_ids, self._model_arg)
            self._names = list(dict.fromkeys([client.model, *ids, *self.aliases]))
        return self._names

    async def tokenizer(self):
        """mlx-lm's tokenizer of the served checkpoint (daemon/service/tools.py), loaded once, in a thread."""
        if self._tokenizer is None or (self._tokenizer.done() and self._tokenizer.exception() is not None):
            async def load():
                await self.names()
                return await asyncio.to_thread(tool_calls.load_tokenizer, self._model_arg)
            self._tokenizer = asyncio.ensure_future(load())
        return await asyncio.shield(self._tokenizer)

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key", "authentication_error", "invalid_api_key")

    async def body(self, request: Request) -> dict:
        body = parse_json_object(await read_json_body(request, MAX_BODY_BYTES))
        await self.check_model(body.get("model"))
        return body

    async def check_model(self, model) -> None:
        if model in (None, "", "default"):
            return
        names = await self.names()
        if model not in names:
            served = ", ".join(map(repr, names))
            raise ApiError(404, f"model {model!r} is not served here (this daemon serves {served})",
                           code="model_not_found")

    # -------------------------------------------------------------- routes

    async def health(self, request: Request) -> Response:
        try:
            snap = await (await self.native()).status()
        except Exception as e:
            return JSONResponse({"status": "unavailable", "error": str(e)}, status_code=503)
        body = {"status": snap.state, "progress": asdict(snap.progress)}
        if snap.state == "degraded":  # loaded, but cannot serve now: say why
            body["reason"] = snap.progress.phase
        return JSONResponse(body, status_code=200 if snap.state == "ready" else 503)

    @staticmethod
    def _model_card(name: str) -> dict:
        return {"id": name, "object": "model", "created": 0, "owned_by": "moed"}

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        return JSONResponse({"object": "list", "data": [self._model_card(n) for n in await self.names()]})

    async def model_card(self, request: Request) -> Response:
        self.check_auth(request)
        name = request.path_params["name"]
        await self.check_model(name or None)
        return JSONResponse(self._model_card(name))

    async def metrics(self, request: Request) -> Response:
        self.check_auth(request)
        return PlainTextResponse(prometheus(await (await self.native()).status()),
                                 media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request) -> Response:
        self.check_auth(request)
        client = await self.native()
        body = await self.body(request)
        plan = openai.completions_plan(body, await self.tokenizer())
        return await self.respond(request, client, plan)

    async def chat(self, request: Request) -> Response:
        self.check_auth(request)
        client = await self.native()
        body = await self.body(request)
        tok = await self.tokenizer()
        plan = openai.chat_plan(body, tok)
        if tok.has_thinking or tok.response_initial_state:
            plan.initial = tool_calls.initial_state(tok, await self._render(tok, plan.kw))
        return await self.respond(request, client, plan)

    @staticmethod
    async def _render(tok, kw: dict) -> str:
        """The prompt text as the engine renders it (the chat template's refusal is a 400)."""
        args = dict(kw.get("chat_template_kwargs") or {})
        if kw.get("tools"):
            args["tools"] = kw["tools"]
        try:
            return await asyncio.to_thread(tok.apply_chat_template, kw["messages"], tokenize=False,
                                           add_generation_prompt=True, **args)
        except Exception as e:  # a template's own check (e.g. roles must alternate)
            raise ApiError(400, f"'messages': the chat template refused them: {e}") from None

    # -------------------------------------------------------------- answers

    def _gens(self, client: AsyncClient, plan: openai.Plan) -> list:
        """One native Generate per choice: n per prompt, seeds seed + i (distinct, reproducible)."""
        gens = []
        for prompt in (plan.prompts or [None]):
            for i in range(plan.n):
                kw = dict(plan.kw)
                seed = kw.pop("seed", None)
                if prompt is not None:
                    kw["prompt"] = prompt
                gens.append(client.generate(seed=None if seed is None else seed + i, **kw))
        return gens

    async def respond(self, request: Request, client: AsyncClient, plan: openai.Plan) -> Response:
        tok = await self.tokenizer()
        text_of = openai.TokenText(tok)
        if plan.stream:
            return await self._stream(client, plan, tok, text_of)
        gens = self._gens(client, plan)

        async def one(i: int, gen) -> openai.Choice:
            splitter = tool_calls.ToolCallStream(tok, plan.tools, plan.initial, plan.parse_tools, plan.parallel) \
                if plan.chat else None
            return await openai.collect(gen, openai.Choice(i), splitter)

        work = asyncio.ensure_future(openai.gather_cancelling(one(i, g) for i, g in enumerate(gens)))
        gone = asyncio.ensure_future(until_disconnected(request))
        try:
            await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
        if not work.done():  # the client went away: abort its generations (closing them sends Abort)
            work.cancel()
            await asyncio.gather(work, return_exceptions=True)
            return Response(status_code=499)
        try:
            choices = work.result()
        except (RequestRejected, DaemonDied) as e:
            raise native_error(e) from None
        return JSONResponse(self._whole(plan, choices, text_of))

    def _whole(self, plan: openai.Plan, choices: list, text_of) -> dict:
        fins = [c.finished for c in choices]
        out = {"id": ("chatcmpl-" if plan.chat else "cmpl-") + uuid.uuid4().hex[:24],
               "object": "chat.completion" if plan.chat else "text_completion", "created": int(time.time()),
               "model": self.model, "choices": [], "usage": openai.usage(fins, plan.n)}
        for c in choices:
            if plan.chat:
                ch = {"index": c.index, "message": openai.chat_message(c), "finish_reason": c.finish_reason(),
                      "logprobs": openai.chat_logprobs(c.tokens, text_of) if plan.logprobs >= 0 else None}
            else:
                prompt = plan.prompts[c.index // plan.n] if plan.echo else ""
                ch = {"index": c.index, "text": prompt + c.content, "finish_reason": c.finish_reason(),
                      "logprobs": openai.legacy_logprobs(c.tokens, text_of) if plan.logprobs >= 0 else None}
            out["choices"].append(ch)
        return out

    async def _stream(self, client: AsyncClient, plan: openai.Plan, tok, text_of) -> Response:
        (gen,) = self._gens(client, plan)
        first = asyncio.ensure_future(gen.__anext__())
        await asyncio.wait({first}, timeout=self.keepalive_s)
        if first.done():  # errors before the first token are HTTP errors; after a long wait they are events
            try:
                first.result()
            except StopAsyncIteration:
                pass
            except (RequestRejected, DaemonDied) as e:
                raise native_error(e) from None
        rid = ("chatcmpl-" if plan.chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = {"id": rid, "object": "chat.completion.chunk" if plan.chat else "text_completion",
               "created": int(time.time()), "model": self.model}
        splitter = tool_calls.ToolCallStream(tok, plan.tools, plan.initial, plan.parse_tools, plan.parallel) \
            if plan.chat else None
        chunk = Chunker(plan, text_of)

        def data(choices: list, **extra) -> str:
            return f"data: {json.dumps({**obj, 'choices': choices, **extra})}\n\n"

        async def events():
            if plan.echo:
                yield data([chunk.text(plan.prompts[0], [])])
            pending: list[Token] = []  # tokens whose text has not gone out yet (for their logprobs)
            try:
                async for ev in ticking(gen, self.keepalive_s, first):
                    if ev is None:
                        yield ": keep-alive\n\n"
                    elif isinstance(ev, Token):
                        pending.append(ev)
                        parts = splitter.feed(ev.text) if splitter else ([tool_calls.Segment("content", ev.text)]
                                                                          if ev.text else [])
                        for c in chunk.parts(parts, pending):
                            yield data([c])
                    else:
                        parts = splitter.finish() if splitter else []
                        for c in chunk.parts(parts, pending, final=True):
                            yield data([c])
                        reason = ("length" if ev.reason == "length" else
                                  "tool_calls" if chunk.calls else "stop")
                        last = chunk.end(reason, pending)
                        u = openai.usage([ev])
                        if plan.include_usage:
                            yield data([last])
                            yield data([], usage=u)
                        else:
                            yield data([last], usage=u)
            except (RequestRejected, DaemonDied) as e:
                err = native_error(e)
                yield f"data: {json.dumps({'error': {'message': str(err), 'type': err.kind, 'code': err.code}})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


class Chunker:
    """Stream chunks' choices: content / reasoning / tool-call deltas (chat) or text (completions), each
    carrying the logprobs of the tokens that went out with it."""

    def __init__(self, plan: openai.Plan, text_of):
        self.plan, self.text_of, self.calls = plan, text_of, 0

    def _logprobs(self, tokens: list[Token]):
        if self.plan.logprobs < 0:
            return {}
        lp = openai.chat_logprobs(tokens, self.text_of) if self.plan.chat else openai.legacy_logprobs(tokens,
                                                                                                      self.text_of)
        tokens.clear()
        return {"logprobs": lp}

    def text(self, text: str, tokens: list[Token]) -> dict:
        return {"index": 0, "text": text, "finish_reason": None, **self._logprobs(tokens)}

    def parts(self, parts, pending: list[Token], final: bool = False) -> list[dict]:
        out = []
        for p in parts:
            if not self.plan.chat:
                out.append(self.text(p.text, pending))
            elif isinstance(p, tool_calls.ToolCall):
                self.calls += 1
                out.append({"index": 0, "delta": {"role": "assistant", "content": None,
                                                  "tool_calls": [p.openai(streaming=True)]},
                            "finish_reason": None, **self._logprobs(pending)})
            else:
                key = "reasoning_content" if p.kind == "reasoning" else "content"
                out.append({"index": 0, "delta": {"role": "assistant", key: p.text}, "finish_reason": None,
                            **self._logprobs(pending)})
        return out

    def end(self, reason: str, pending: list[Token]) -> dict:
        last = {"index": 0, "finish_reason": reason}
        last["text" if not self.plan.chat else "delta"] = "" if not self.plan.chat else {}
        if pending:
            last.update(self._logprobs(pending))
        return last


async def until_disconnected(request: Request) -> None:
    """Returns when the client has gone (the ASGI receive channel says http.disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def prometheus(s: DaemonStatus) -> str:
    """The status snapshot in Prometheus text format (the cache's figures are 0 while loading)."""
    c, totals, p = s.cache, s.totals, s.prompt_cache
    rows = [
        ("moed_up", "gauge", "1 when the model is loaded and serving", 1 if s.state == "ready" else 0),
        ("moed_requests_total", "counter", "requests admitted", totals.requests),
        ("moed_requests_rejected_total", "counter", "requests rejected", totals.rejected),
        ("moed_requests_active", "gauge", "requests running or waiting", len(s.requests)),
        ("moed_prompt_tokens_total", "counter", "prompt tokens processed", totals.prompt_tokens),
        ("moed_generated_tokens_total", "counter", "tokens generated", totals.completion_tokens),
        ("moed_decode_tokens_per_second", "gauge", "decode throughput over the last minute", s.decode_tps),
        ("moed_cache_hits_total", "counter", "expert cache hits", c.hits if c else 0),
        ("moed_cache_misses_total", "counter", "expert cache misses", c.misses if c else 0),
        ("moed_cache_budget_bytes", "gauge", "expert cache size", c.budget_bytes if c else 0),
        ("moed_expert_bytes_read_total", "counter", "expert bytes read from disk", c.bytes_read if c else 0),
        ("moed_resident_memory_bytes", "gauge", "daemon RSS", s.rss_bytes),
        ("moed_prompt_cache_entries", "gauge", "prompt prefixes cached in memory", p.entries if p else 0),
        ("moed_prompt_cache_bytes", "gauge", "bytes of the cached prompt prefixes", p.bytes if p else 0),
        ("moed_prompt_cache_max_bytes", "gauge", "the prompt cache's bound", p.max_bytes if p else 0),
        ("moed_prompt_cache_hit_tokens_total", "counter", "prompt tokens reused, not prefilled",
         p.hit_tokens if p else 0),
        ("moed_prompt_cache_disk_bytes", "gauge", "bytes of the prompt prefixes on disk", p.disk_bytes if p else 0),
    ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(out) + "\n"


def make_app(api: Api, cors_origins=(), bound_host: str = "127.0.0.1") -> Starlette:
    """The app: OpenAI's routes, Anthropic's (daemon/service/anthropic.py), /health and /metrics; every
    error in OpenAI's JSON shape (unknown routes and methods, and crashes, too); Host and Origin checked
    first (api.LocalGuard: web pages are kept off a loopback API); CORS headers and preflight answers
    for exactly `cors_origins` (`--cors-origin`)."""
    def wrap(fn):
        async def handler(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as e:
                return error_response(e)
            except (RequestRejected, DaemonDied) as e:
                return error_response(native_error(e))
        return handler

    async def http_error(request: Request, exc: HTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        message = {404: f"no route {request.url.path}",
                   405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, exc.detail)
        resp = error_response(ApiError(exc.status_code, message, code=code))
        if exc.headers:
            resp.headers.update(exc.headers)
        return resp

    async def crash(request: Request, exc: Exception) -> Response:
        return error_response(ApiError(500, f"internal error: {type(exc).__name__}: {exc}", "server_error",
                                       "internal_error"))

    middleware = [Middleware(LocalGuard, bound_host=bound_host, cors_origins=cors_origins)]
    if cors_origins:
        middleware.append(Middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                                     allow_headers=["*"], expose_headers=["*"]))
    return Starlette(routes=[
        Route("/health", wrap(api.health)),
        Route("/metrics", wrap(api.metrics)),
        Route("/v1/models", wrap(api.models)),
        Route("/v1/models/{name:path}", wrap(api.model_card)),
        Route("/v1/completions", wrap(api.completions), methods=["POST"]),
        Route("/v1/chat/completions", wrap(api.chat), methods=["POST"]),
        *anthropic.routes(api),  # /v1/messages, /v1/messages/count_tokens (daemon/service/anthropic.py)
    ], middleware=middleware, exception_handlers={HTTPException: http_error, Exception: crash})


class HttpServer:
    """uvicorn serving the API from a thread of the daemon.

    Args:
        hostport: "HOST:PORT"; a non-loopback host needs `api_key`.
        api_key: bearer token required on the API (None: open).
        runtime_dir: the daemon's runtime folder.
        aliases: more names the model answers to (`--alias`).
        cors_origins: browser origins allowed to call the API (`--cors-origin`).
    """

    def __init__(self, hostport: str, api_key: str | None, runtime_dir, aliases=(), cors_origins=()):
        host, port = parse_hostport(hostport)
        if not is_loopback(host) and not api_key:
            raise ValueError(f"binding HTTP to {host} (not loopback) requires --api-key-file (or --api-key)")
        self.api = Api(runtime_dir, api_key, aliases)
        config = uvicorn.Config(make_app(self.api, cors_origins, host), host=host, port=port, log_level="warning",
                                lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, name="moed-http", daemon=True)

    def start(self) -> HttpServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started and self.thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.02)
        if not self.server.started:
            raise RuntimeError("the HTTP server did not start (port in use?)")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
