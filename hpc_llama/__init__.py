"""hpc_llama: Llama models on HPC clusters -- convert, train, score, generate, compress."""

__version__ = "0.1.0"
