"""The model, in plain torch with no distributed import: the Llama (llama.py), layers that keep their
weights packed (quantized.py), and LoRA adapters (lora.py). Parallelism wraps it from outside."""
