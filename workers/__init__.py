"""moed.workers."""
