"""A stream cut for want of room: what becomes of the rest of a request whose consumer stopped reading.

Both places that hold a consumer's events bound them: the daemon's frontend per client socket
(daemon/service/frontend.py), the AsyncClient per stream (client/client.py). A Token that finds its
queue full is dropped and the request aborted; from then on its Tokens are dropped too (they would
leave a hole in the middle) and its end becomes Error("too_slow"), after the tokens already queued.
"""
from __future__ import annotations

from moed.ipc.messages import Error, Finished, Token


class CutStreams:
    """The requests cut so far. Args: bound: the full queue's size, in words, for the error."""

    def __init__(self, bound: str):
        self.bound = bound
        self.dropped: dict[str, int] = {}  # req_id -> tokens dropped since it was cut

    def cut(self, rid: str) -> None:
        """`rid`'s Token found the queue full: it is the first one dropped."""
        self.dropped[rid] = 1

    def settle(self, msg):
        """`msg` as its consumer gets it: itself, None (dropped) or the cut stream's too_slow end."""
        rid = getattr(msg, "req_id", None)
        if rid not in self.dropped:
            return msg
        if isinstance(msg, Token):
            self.dropped[rid] += 1
            return None
        if isinstance(msg, (Finished, Error)):
            n = self.dropped.pop(rid)
            if isinstance(msg, Finished):
                return Error(rid, "too_slow", f"the stream was not read: {n} token(s) found its queue full "
                                              f"({self.bound}); the request was aborted")
        return msg

    def forget(self, rid: str) -> None:
        self.dropped.pop(rid, None)

    def __contains__(self, rid) -> bool:
        return rid in self.dropped

    def __bool__(self) -> bool:
        return bool(self.dropped)
