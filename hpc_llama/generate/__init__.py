"""`hpc-llama generate` (job.py): the ring of pipeline stages with a KV cache each (engine.py) and the
choice of each next token (sampling.py)."""
