"""`hpc-llama compress` (job.py): the per-method arithmetic (methods.py) and the chain applied to a rank's
own layers, with calibration and evaluation (chain.py)."""

# Here rather than in chain.py, whose torch import `hpc-llama compress --help` need not pay for.
PROJECTIONS = ("wq", "wk", "wv", "wo", "w1", "w2", "w3")
"""The projections of a layer the methods apply to, by their Llama names."""
