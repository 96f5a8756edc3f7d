"""Parts the HTTP API's rooms share: OpenAI-shaped errors, the native error codes' HTTP statuses, body checks,
and the guard that keeps web pages off a loopback API (Host and Origin)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse

from moed.client.client import DaemonDied, RequestRejected

# native Error codes (RequestRejected.code) -> HTTP status
HTTP_STATUS = {"bad_request": 400, "context_length_exceeded": 400, "rejected": 429, "unauthorized": 401,
               "shutdown": 503, "internal": 500}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
               415: "invalid_request_error",
               429: "rate_limit_error", 500: "server_error", 503: "server_error"}


class ApiError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind or ERROR_TYPES.get(status, "invalid_request_error"), code


def error_response(e: ApiError) -> JSONResponse:
    return JSONResponse({"error": {"message": str(e), "type": e.kind, "code": e.code}}, status_code=e.status)


def native_error(e: RequestRejected | DaemonDied) -> ApiError:
    """A native rejection (or the daemon's death) as the HTTP error it stands for."""
    if isinstance(e, DaemonDied):
        return ApiError(503, str(e), "server_error", "daemon_died")
    status = HTTP_STATUS.get(e.code, 400)
    message = e.reason
    context = re.search(r"context of (\d+) tokens", message) if e.code == "context_length_exceeded" else None
    if context:  # OpenAI's own words first: clients (litellm, LangChain fallbacks) recognise overflow by them
        message = f"This model's maximum context length is {context.group(1)} tokens; {message}"
    return ApiError(status, message, None, e.code)


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


def is_json_type(content_type: str) -> bool:
    """application/json or a +json type (parameters such as charset aside)."""
    kind = content_type.split(";", 1)[0].strip().lower()
    return kind == "application/json" or (kind.startswith("application/") and kind.endswith("+json"))


async def read_json_body(request: Request, limit: int) -> bytes:
    """The raw body of a JSON request: 415 unless its Content-Type is JSON (a web page's `text/plain` form
    post is not an API call), 413 as soon as it passes `limit` bytes (by its Content-Length, or while it
    streams in: never read whole first)."""
    if not is_json_type(request.headers.get("content-type", "")):
        raise ApiError(415, f"Content-Type must be application/json, not {request.headers.get('content-type')!r}",
                       code="unsupported_media_type")
    too_large = ApiError(413, f"request body too large (the limit is {limit} bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def host_of(netloc: str) -> str | None:
    """"127.0.0.1:8000", "[::1]:8000", "localhost" -> the host name, lower case, no brackets."""
    try:
        return urlsplit(f"//{netloc}").hostname
    except ValueError:
        return None


class LocalGuard:
    """ASGI middleware that keeps web pages off the API (DNS rebinding, cross-site requests). Bound to a
    loopback address, the Host header must name a loopback address or the bound host; a request with
    an Origin must come from such a host (any port), from the Host itself, or be one of `cors_origins`
    (`--cors-origin`). Otherwise 403 in OpenAI's shape. Bound elsewhere (`--http 0.0.0.0:...`, which
    needs an API key) any Host is taken; the Origin rule is the same."""

    def __init__(self, app, bound_host: str, cors_origins=()):
        self.app, self.bound = app, bound_host.strip("[]").lower()
        self.cors = {o.rstrip("/") for o in cors_origins}

    def _local(self, host: str | None) -> bool:
        return host is not None and (host == self.bound or is_loopback(host))

    def refusal(self, headers: Headers) -> str | None:
        host_header = headers.get("host", "")
        host = host_of(host_header)
        if is_loopback(self.bound) and host_header and not self._local(host):  # (browsers always send one)
            return f"Host {host_header!r} is not this loopback server (a web page's DNS rebinding?)"
        origin = headers.get("origin")
        if origin is None or origin.rstrip("/") in self.cors:
            return None
        parts = urlsplit(origin) if origin != "null" else None
        if parts is not None and parts.scheme in ("http", "https") and (
                self._local(parts.hostname) or parts.netloc.lower() == host_header.lower()):
            return None
        return f"Origin {origin!r} may not call this API (allow a web page's origin with --cors-origin)"

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and (why := self.refusal(Headers(scope=scope))) is not None:
            await error_response(ApiError(403, why, code="forbidden"))(scope, receive, send)
            return
        await self.app(scope, receive, send)


def parse_json_object(raw: bytes) -> dict:
    """The request body as a JSON object whose strings all encode as UTF-8 (a lone surrogate, which JSON's
    \\uD800 escapes allow, is a 400 naming where it is)."""
    try:
        body = json.loads(raw)
    except ValueError:  # also bytes that are not UTF-8
        raise ApiError(400, "body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    bad = _bad_unicode(body, "")
    if bad is not None:
        raise ApiError(400, f"'{bad}' is not valid Unicode (a lone surrogate)")
    return body


def _bad_unicode(v, path: str) -> str | None:
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
        return None
    if isinstance(v, dict):
        for k, x in v.items():
            if isinstance(k, str) and _bad_unicode(k, path) is not None:
                return path or "body"
            found = _bad_unicode(x, f"{path}.{k}" if path else str(k))
            if found is not None:
                return found
    elif isinstance(v, list):
        for i, x in enumerate(v):
            found = _bad_unicode(x, f"{path}[{i}]")
            if found is not None:
                return found
    return None


async def ticking(gen, interval: float, first: asyncio.Future | None = None):
    """`gen`'s events, and None each time `interval` passes without one (for keep-alive comments). Closing
    this closes `gen` (which aborts its request)."""
    nxt = first
    try:
        while True:
            if nxt is None:
                nxt = asyncio.ensure_future(gen.__anext__())
            done, _ = await asyncio.wait({nxt}, timeout=interval)
            if not done:
                yield None
                continue
            try:
                ev = nxt.result()
            except StopAsyncIteration:
                return
            nxt = None
            yield ev
    finally:
        if nxt is not None and not nxt.done():
            nxt.cancel()
            await asyncio.gather(nxt, return_exceptions=True)
        await gen.aclose()
