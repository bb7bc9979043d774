"""`hpc-llama prepare` (prepare.py) and `hpc-llama train` (job.py): token shards and the split rule
(data.py), the DeepSpeed engines and export (trainer.py), metrics for people (metrics.py)."""
