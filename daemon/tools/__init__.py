"""Tools around the engine: bench, I/O bench, lookahead recall, plan, pack, routing traces and the
policy simulator, synthetic checkpoints (and their tokenizer) and the architecture zoo."""
