"""moed.ipc."""
