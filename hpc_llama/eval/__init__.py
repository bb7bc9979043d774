"""`hpc-llama eval`: lm-evaluation-harness task files read, turned into log-likelihood requests, and scored."""

# Here rather than in tasks.py, whose YAML, Jinja and numpy imports `hpc-llama eval --help` need not pay for.
DEFAULT_FEWSHOT_SEED = 1234
"""lm-eval's default fewshot seed (simple_evaluate's fewshot_random_seed, lm_eval.defaults.DEFAULT_OTHER_SEED)."""
