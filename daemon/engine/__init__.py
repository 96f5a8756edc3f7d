"""The paged engine: checkpoint and expert index, memory budget, loader, the paged switch and its
expert store and slot tables, lookahead, generation, and the engine core. MLX, no sockets."""
