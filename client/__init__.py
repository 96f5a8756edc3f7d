"""moed.client: attach to the running moed daemon (imports no MLX)."""

from moed.client.client import (AsyncClient, Client, DaemonDied, DaemonNotRunning, MoedError,
                                RequestRejected)

__all__ = ["AsyncClient", "Client", "DaemonDied", "DaemonNotRunning", "MoedError", "RequestRejected"]
