"""`hpc-llama compress` (job.py): the per-method arithmetic (methods.py) and the chain applied to a rank's
own layers, with calibration and evaluation (chain.py)."""
