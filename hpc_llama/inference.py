"""A loaded slice readied for forward passes only: what score, eval and generate do after loading.

Each layer's q/k/v and gate/up projections become one matmul each (`fuse_projections`:
the parameters and the checkpoint stay as they are). For generation on the CPU the
weights are also held prepacked for oneDNN (`pack_weights`): a decode step of a few rows
multiplies 1.6x faster that way (8 rows, bench-100m's shapes), at the price of a second
copy of the weights, so only where the machine has that memory to spare. Scoring's long
calls measured no faster prepacked (within 2%), so they keep the one copy.
"""

from __future__ import annotations

import torch

from .procstats import available_memory

PACK_HEADROOM = 2
"""Pack only when the machine has this many times the packed copy's size available."""


def ready_for_inference(model, pack: bool) -> dict:
    """Fuse the slice's projections, and with `pack` on the CPU prepack its weights where memory allows.

    Returns what was done: {"fused": groups, "packed": weights, "packed_bytes": bytes}.
    """
    done = {"fused": model.fuse_projections(), "packed": 0, "packed_bytes": 0}
    weights = [m.weight for m in model.modules() if isinstance(m, torch.nn.Linear)]
    if not pack or not weights or weights[0].device.type != "cpu":
        return done
    size = sum(w.numel() * w.element_size() for w in weights)
    available = available_memory()
    if available is not None and size * PACK_HEADROOM > available:
        return done  # the second copy would crowd the machine: the plain layout serves
    done["packed"] = model.pack_weights()
    done["packed_bytes"] = size if done["packed"] else 0
    return done
