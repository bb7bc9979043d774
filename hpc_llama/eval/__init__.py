"""`hpc-llama eval`: lm-evaluation-harness task files read, turned into log-likelihood requests, and scored."""
