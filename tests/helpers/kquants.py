"""The K-quant fixtures llama.cpp made (tests/data/gguf): their generating script, imported as a module
(`kq`: the tiny models, file names, source tensors) without putting tests/data on sys.path."""

import importlib.util
import json
import os
import sys

DATA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "gguf")
_spec = importlib.util.spec_from_file_location("make_kquants", os.path.join(DATA, "make_kquants.py"))
kq = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = kq  # its dataclass looks its own module up there
_spec.loader.exec_module(kq)
with open(os.path.join(DATA, kq.MANIFEST)) as _f:
    MANIFEST = json.load(_f)
