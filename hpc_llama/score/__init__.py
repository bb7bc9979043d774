"""`hpc-llama score` (job.py) and `hpc-llama merge` (merge.py): the scoring arithmetic (plan.py), one step
across all ranks (scorer.py), the records and shard names (records.py), scheduled runs (ledger.py)."""
