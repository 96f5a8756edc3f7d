"""Parts the HTTP API's rooms share: OpenAI-shaped errors, the native error codes' HTTP statuses, body checks."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import re

from starlette.responses import JSONResponse

from moed.client.client import DaemonDied, RequestRejected

# native Error codes (RequestRejected.code) -> HTTP status
HTTP_STATUS = {"bad_request": 400, "context_length_exceeded": 400, "rejected": 429, "unauthorized": 401,
               "shutdown": 503, "internal": 500}
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 405: "invalid_request_error", 413: "invalid_request_error",
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
