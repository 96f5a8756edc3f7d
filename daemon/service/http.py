"""The OpenAI-compatible HTTP API: a translation layer in front of the native protocol.

Starlette + uvicorn in a thread of the daemon. Each HTTP request becomes a native Generate sent
through an AsyncClient to the daemon's own socket, so HTTP and native clients share one engine
path (batching, limits, aborts on disconnect). Also /health (503 while loading) and /metrics.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import threading
import time
import uuid
from dataclasses import asdict

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from moed.client.client import AsyncClient, DaemonDied, RequestRejected
from moed.ipc.messages import DaemonStatus, Finished, Token

MAX_BODY_BYTES = 4 << 20
HTTP_STATUS = {"bad_request": 400, "context_length_exceeded": 400, "rejected": 429, "unauthorized": 401, "shutdown": 503, "internal": 500}


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": str(e), "type": e.kind, "code": e.code}}, status_code=e.status)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_hostport(spec: str) -> tuple[str, int]:
    host, _, port = spec.rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port)


# ---------------------------------------------------------------- request translation


def _number(body: dict, key: str, default, lo, hi, kind=float):
    v = body.get(key, default)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and not isinstance(v, int)):
        raise ApiError(400, f"'{key}' must be a {'integer' if kind is int else 'number'}")
    if not lo <= v <= hi:
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {v}")
    return kind(v)


def sampling(body: dict, default_max: int) -> dict:
    """OpenAI sampling fields -> Generate fields, validated."""
    max_key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and (not isinstance(stop, list) or not all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or a list of strings")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ApiError(400, "'seed' must be an integer")
    return {"max_tokens": _number(body, max_key, default_max, 1, 1 << 20, int),
            "temperature": _number(body, "temperature", 1.0, 0.0, 2.0),
            "top_p": _number(body, "top_p", 1.0, 0.0, 1.0), "seed": seed, "stop": stop}


def chat_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise ApiError(400, "'messages' must be a non-empty list")
    out = []
    for m in msgs:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, "each message needs a 'role' and 'content'")
        content = m.get("content", "")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str):
            raise ApiError(400, "message 'content' must be a string")
        out.append({"role": m["role"], "content": content})
    return out


# ---------------------------------------------------------------- the app


class Api:
    def __init__(self, runtime_dir, api_key: str | None):
        self.runtime_dir, self.api_key = runtime_dir, api_key
        # one native connection per event loop (a zmq.asyncio socket belongs to one loop), made once
        # even when the first requests come together; its calls each have their own future
        self._clients: dict[asyncio.AbstractEventLoop, asyncio.Task] = {}
        self.model = "moed"

    async def native(self) -> AsyncClient:
        loop = asyncio.get_running_loop()
        task = self._clients.get(loop)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = self._clients[loop] = loop.create_task(AsyncClient(self.runtime_dir, name="http").connect())
        client = await asyncio.shield(task)  # a cancelled request does not cancel the connection
        self.model = client.model
        return client

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        got = request.headers.get("authorization", "")
        if not hmac.compare_digest(got.encode(), f"Bearer {self.api_key}".encode()):
            raise ApiError(401, "invalid or missing API key", "authentication_error", "invalid_api_key")

    async def body(self, request: Request) -> dict:
        raw = await request.body()
        if len(raw) > MAX_BODY_BYTES:
            raise ApiError(413, "request body too large")
        try:
            body = json.loads(raw)
        except ValueError:
            raise ApiError(400, "body is not valid JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "body must be a JSON object")
        model = body.get("model")
        if model not in (None, "", self.model, "default"):
            raise ApiError(404, f"model {model!r} is not served here (this daemon serves {self.model!r})",
                           code="model_not_found")
        return body

    # -------------------------------------------------------------- routes

    async def health(self, request: Request) -> Response:
        try:
            snap = await (await self.native()).status()
        except Exception as e:
            return JSONResponse({"status": "unavailable", "error": str(e)}, status_code=503)
        return JSONResponse({"status": snap.state, "progress": asdict(snap.progress)},
                            status_code=200 if snap.state == "ready" else 503)

    async def models(self, request: Request) -> Response:
        self.check_auth(request)
        await self.native()
        return JSONResponse({"object": "list", "data": [{"id": self.model, "object": "model",
                                                         "created": 0, "owned_by": "moed"}]})

    async def metrics(self, request: Request) -> Response:
        self.check_auth(request)
        return PlainTextResponse(prometheus(await (await self.native()).status()),
                                 media_type="text/plain; version=0.0.4")

    async def completions(self, request: Request) -> Response:
        self.check_auth(request)
        client = await self.native()
        body = await self.body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise ApiError(400, "'prompt' must be a string")
        gen = client.generate(prompt, **sampling(body, 16))
        return await self.respond(gen, body, chat=False)

    async def chat(self, request: Request) -> Response:
        self.check_auth(request)
        client = await self.native()
        body = await self.body(request)
        gen = client.generate(messages=chat_messages(body), **sampling(body, 256))
        return await self.respond(gen, body, chat=True)

    async def respond(self, gen, body: dict, chat: bool) -> Response:
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        kind = "chat.completion" if chat else "text_completion"
        first = await self._first(gen)  # errors before streaming become HTTP errors

        def choice(text: str | None, finish: str | None, delta: bool) -> dict:
            if not chat:
                return {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
            if delta:
                d = {"role": "assistant", "content": text} if text is not None else {}
                return {"index": 0, "delta": d, "finish_reason": finish}
            return {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish}

        def usage(fin: Finished) -> dict:
            return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens,
                    "total_tokens": fin.prompt_tokens + fin.completion_tokens,
                    "prompt_tokens_details": {"cached_tokens": fin.cached_tokens}}

        def finish_reason(fin: Finished) -> str:
            return "length" if fin.reason == "length" else "stop"

        if body.get("stream"):
            async def events():
                obj = {"id": rid, "object": kind + (".chunk" if chat else ""), "created": created, "model": self.model}
                try:
                    async for ev in _chain(first, gen):
                        if isinstance(ev, Token):
                            if ev.text:
                                yield f"data: {json.dumps({**obj, 'choices': [choice(ev.text, None, True)]})}\n\n"
                        else:
                            last = {**obj, "choices": [choice(None if chat else "", finish_reason(ev), True)],
                                    "usage": usage(ev)}
                            yield f"data: {json.dumps(last)}\n\n"
                except (RequestRejected, DaemonDied) as e:
                    yield f"data: {json.dumps({'error': {'message': str(e), 'type': 'server_error'}})}\n\n"
                yield "data: [DONE]\n\n"

            return StreamingResponse(events(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, fin = "", None
        async for ev in _chain(first, gen):
            if isinstance(ev, Token):
                text += ev.text
            else:
                fin = ev
        return JSONResponse({"id": rid, "object": kind, "created": created, "model": self.model,
                             "choices": [choice(text, finish_reason(fin), False)], "usage": usage(fin)})

    @staticmethod
    async def _first(gen):
        try:
            return await gen.__anext__()
        except RequestRejected as e:
            raise ApiError(HTTP_STATUS.get(e.code, 400), e.reason, code=e.code) from None
        except DaemonDied as e:
            raise ApiError(503, str(e), "server_error") from None


async def _chain(first, gen):
    yield first
    if not isinstance(first, Finished):
        async for ev in gen:
            yield ev


def prometheus(s: DaemonStatus) -> str:
    """The status snapshot in Prometheus text format (the cache's figures are 0 while loading)."""
    c, totals = s.cache, s.totals
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
    ]
    out = []
    for name, kind, help_, value in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(out) + "\n"


def make_app(api: Api) -> Starlette:
    def wrap(fn):
        async def handler(request: Request) -> Response:
            try:
                return await fn(request)
            except ApiError as e:
                return error_response(e)
        return handler

    return Starlette(routes=[
        Route("/health", wrap(api.health)),
        Route("/metrics", wrap(api.metrics)),
        Route("/v1/models", wrap(api.models)),
        Route("/v1/completions", wrap(api.completions), methods=["POST"]),
        Route("/v1/chat/completions", wrap(api.chat), methods=["POST"]),
    ])


class HttpServer:
    """uvicorn serving the API from a thread of the daemon."""

    def __init__(self, hostport: str, api_key: str | None, runtime_dir):
        host, port = parse_hostport(hostport)
        if not is_loopback(host) and not api_key:
            raise ValueError(f"binding HTTP to {host} (not loopback) requires --api-key")
        self.api = Api(runtime_dir, api_key)
        config = uvicorn.Config(make_app(self.api), host=host, port=port, log_level="warning", lifespan="off")
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
