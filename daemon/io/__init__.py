"""Expert I/O: the fetcher, which asks the worker processes for byte ranges and maps their shared
memory."""
