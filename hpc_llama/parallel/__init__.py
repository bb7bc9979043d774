"""Everything about ranks: the launcher's environment and this rank's place (ranks.py), the pure layout
arithmetic (layout.py), numeric collectives and the tensor stream to rank 0 (collectives.py), and
DeepSpeed's pipeline engine around a rank's slice (pipeline.py)."""
