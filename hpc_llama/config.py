"""Frozen configuration dataclasses loaded from YAML presets, with CLI overrides.

A preset (configs/*.yaml) has one section per concern; each part of the code
receives only its own section. Unknown keys are errors naming the key, so a
typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import types
import typing
from dataclasses import dataclass

import yaml

from .errors import HpcLlamaError
from .model.llama import ModelConfig

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


@dataclass(frozen=True)
class ParallelConfig:
    """How ranks are laid out over the model."""

    pp: int = 1
    """Pipeline stages; the data-parallel degree is the number of ranks divided by this."""
    partition: str = "compute"
    """How layers are split over stages: compute (same forward work: layers and head), balanced (same parameter count, embedding and head included: memory), or uniform (same layer count)."""
    dtype: str = "auto"
    """Compute dtype: fp32, bf16, or auto (bf16 on GPUs that support it, fp32 otherwise)."""
    timeout_s: float = 600.0
    """Longest wait on a collective before the job fails instead of hanging."""

    def __post_init__(self):
        if self.pp < 1:
            raise ValueError(f"pp must be at least 1, got {self.pp}")
        if self.partition not in ("compute", "balanced", "uniform"):
            raise ValueError(f"partition must be compute, balanced or uniform, got {self.partition!r}")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"dtype must be auto, fp32 or bf16, got {self.dtype!r}")
        if self.timeout_s <= 0:
            raise ValueError("timeout_s must be positive")


@dataclass(frozen=True)
class ScoreConfig:
    """How `hpc-llama score` reads documents and batches them."""

    text_field: str = "text"
    """JSONL field holding a document's text."""
    id_field: str = "id"
    """JSONL field holding a document's id (optional in each record)."""
    context: int = 0
    """Most tokens one window sees; 0 means the model's own context length."""
    stride: int = 0
    """New targets per window after a document's first; 0 means the context (disjoint windows, as lm-eval)."""
    add_bos: bool = True
    """Put the model's BOS token before each text document (input_ids are used as given)."""
    tokens_per_batch: int = 0
    """Padded tokens per micro-batch: rows = tokens_per_batch // window length. 0 means 1024 on a CPU, where
    small micro-batches keep activations in cache and pad less (bench-100m 1,064 tokens/s at 1024 against 870-915
    at 8192, SmolLM2 773 against 652-668), and 8192 on a GPU, where large ones fill the device."""
    max_batch: int = 64
    """Most rows in one micro-batch."""
    micro_batches: int = 0
    """Micro-batches per pipeline call; 0 means 16 per stage, so stages overlap and the pipeline bubble stays
    small. Only how micro-batches are grouped into calls: their shapes, and so every number, do not depend on
    it or on the layout."""
    chunk_docs: int = 2048
    """Documents read, scored and written per step; a resumed job restarts at a step boundary."""
    chunk_chars: int = 8_000_000
    """A step also ends once its documents hold this many characters."""
    token_logprobs: bool = False
    """Write each document's per-token log-probabilities too."""
    max_document_bytes: int = 8 << 20
    """A larger document (a JSONL line or a text file, in bytes) is an error naming its file and line."""
    share_context: bool = True
    """Conditional requests of one step with the same context are scored from one copy of it."""

    def __post_init__(self):
        for name in ("context", "stride", "micro_batches", "tokens_per_batch"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        for name in ("max_batch", "chunk_docs", "chunk_chars", "max_document_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.context and self.stride > self.context:
            raise ValueError(f"stride {self.stride} is larger than the context {self.context}")


@dataclass(frozen=True)
class TrainConfig:
    """What `hpc-llama train` does: data, batch, optimiser, schedule, evaluation, checkpoints."""

    seq_len: int = 256
    """Tokens per training sequence (text is packed into windows of this length; task examples are cut or padded)."""
    micro_batch: int = 4
    """Sequences per micro-batch on each replica."""
    global_batch: int = 32
    """Sequences per optimiser step, over all replicas: micro_batch x accumulation steps x data-parallel replicas."""
    steps: int = 300
    """Optimiser steps."""
    lr: float = 3.0e-3
    """Peak learning rate, reached after the warm-up."""
    min_lr: float = 3.0e-4
    """Learning rate at the end of the cosine decay."""
    warmup_steps: int = 30
    """Linear warm-up from 0 to lr."""
    weight_decay: float = 0.1
    """AdamW weight decay (not applied to norms, biases or LoRA adapters)."""
    betas: tuple[float, ...] = (0.9, 0.95)
    """AdamW betas."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this (0: no clipping)."""
    eval_every: int = 50
    """Validation loss every this many steps (0: only at the end)."""
    eval_sequences: int = 64
    """Validation sequences per evaluation (the first ones of the split, the same each time; 0: all)."""
    checkpoint_every: int = 100
    """A DeepSpeed checkpoint every this many steps (0: only on a signal and at the end)."""
    keep_checkpoints: int = 2
    """Newest complete checkpoints kept (0: all); torn ones older than the newest complete one are deleted."""
    seed: int = 0
    """Seed of the initial weights (pretraining), the LoRA adapters and the data order."""
    zero: int | None = None
    """ZeRO stage: 0-3 without a pipeline, 0-1 with one. Unset: 0 where one process holds the whole model in
    fp32 (one stage, one replica: nothing to partition, and ZeRO-1's flat copy of the weights cost 4% of a
    step), else 1 (bf16's fp32 master weights; optimiser state split across replicas)."""
    lora_rank: int = 0
    """LoRA rank (0: train every weight)."""
    lora_alpha: float = 16.0
    """LoRA scale numerator: adapters are scaled by alpha / rank."""
    lora_targets: tuple[str, ...] = ("wq", "wk", "wv", "wo")
    """Projections that get adapters: any of wq wk wv wo (attention) and w1 w2 w3 (MLP)."""
    export: str = "merged"
    """What the run exports at the end: merged (adapters folded into the weights) or adapters (LoRA only)."""

    def __post_init__(self):
        for name in ("seq_len", "micro_batch", "global_batch", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch {self.global_batch} is not a multiple of micro_batch {self.micro_batch}")
        if not 0 < self.min_lr <= self.lr:
            raise ValueError("need 0 < min_lr <= lr")
        for name in ("eval_every", "eval_sequences", "checkpoint_every", "keep_checkpoints", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative")
        if self.zero not in (None, 0, 1, 2, 3):
            raise ValueError(f"zero must be 0, 1, 2 or 3, got {self.zero}")
        if len(self.betas) != 2:
            raise ValueError("betas needs two values")
        bad = set(self.lora_targets) - {"wq", "wk", "wv", "wo", "w1", "w2", "w3"}
        if bad:
            raise ValueError(f"unknown LoRA target {sorted(bad)[0]!r} (wq wk wv wo w1 w2 w3)")
        if self.export not in ("merged", "adapters"):
            raise ValueError(f"export must be merged or adapters, got {self.export!r}")


@dataclass(frozen=True)
class GenerateConfig:
    """How `hpc-llama generate` reads prompts, batches them and decides when to stop."""

    prompt_field: str = "prompt"
    """JSONL field holding a prompt's text (a record may give input_ids instead)."""
    id_field: str = "id"
    """JSONL field holding a prompt's id."""
    max_new_tokens: int = 128
    """Most tokens generated per prompt."""
    temperature: float = 0.0
    """0: greedy; otherwise sample from softmax(logits / temperature)."""
    top_k: int = 0
    """Sample among the k most likely tokens only (0: all)."""
    top_p: float = 1.0
    """Sample among the smallest set of tokens whose probability reaches p."""
    seed: int = 0
    """Seed of every prompt's own sampler (mixed with the prompt's index), so layouts agree."""
    stops: tuple[str, ...] = ()
    """Strings that end a completion; the completion is cut before them."""
    batch_size: int = 8
    """Sequence slots per data-parallel replica (continuous batching refills them)."""
    groups: int = 0
    """Micro-batches of slots in flight around the pipeline; 0 means one per stage. More splits a decode step into smaller matmuls that each re-read every weight: 4 groups on 2 stages measured 0.52x of one rank's tokens/s, 2 groups 0.91x (benchmarks/generate.py)."""
    context: int = 0
    """Longest prompt + completion; 0 means the model's context."""
    add_bos: bool = True
    """Put the model's BOS token before each text prompt (not with `chat`: the template decides)."""
    chat: bool = False
    """Wrap each text prompt in the checkpoint's chat template as one user turn, ready for the answer."""
    chunk_docs: int = 1024
    """Prompts finished, gathered and written per step; a resumed job restarts at a step boundary."""
    max_document_bytes: int = 8 << 20
    """A larger prompt (a JSONL line or a line of a text file, in bytes) is an error naming its file and line."""

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must not be negative, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must not be negative, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        for name in ("batch_size", "chunk_docs", "max_document_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if self.groups < 0 or self.context < 0:
            raise ValueError("groups and context must not be negative")


# Top-level YAML sections and the dataclass each is read into. Jobs add theirs here.
SECTIONS: dict[str, type] = {"model": ModelConfig, "parallel": ParallelConfig, "score": ScoreConfig,
                             "train": TrainConfig, "generate": GenerateConfig}


def from_dict(cls, data: dict | None, where: str):
    """Build dataclass `cls` from a mapping; unknown keys and bad values are errors naming them."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise HpcLlamaError(f"{where}: expected a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in data:
        if key not in fields:
            raise HpcLlamaError(f"{where}: unknown key {key!r} (known: {', '.join(fields)})")
    values = {}
    for key, value in data.items():
        values[key] = _coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise HpcLlamaError(f"{where}: {e}") from None


def _coerce(value, hint, where):
    """Check a YAML value against a field's type; ints are accepted where floats are expected."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except HpcLlamaError as e:
                errors.append(str(e))
        raise HpcLlamaError(errors[0])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(_coerce(v, args[0], where) for v in value)
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise HpcLlamaError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        # YAML 1.1 reads 1e-5 (no dot) as a string; it is meant as a number.
        try:
            value = float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise HpcLlamaError(f"{where}: expected a finite number, got {value!r}")
    if hint in (int, float, str, bool):
        if type(value) is not hint:
            raise HpcLlamaError(f"{where}: expected {hint.__name__}, got {value!r}")
        return value
    return value


def flag_overrides(args, flags: dict[str, str]) -> list[str]:
    """`section.key=value` overrides for the CLI flags that were given (flag attribute -> config key)."""
    import json

    return [f"{key}={json.dumps(getattr(args, flag))}" for flag, key in flags.items() if getattr(args, flag) is not None]


def parse_override(text: str) -> tuple[list[str], object]:
    """`section.key=value` (value in YAML syntax) -> (["section", "key"], value)."""
    if "=" not in text:
        raise HpcLlamaError(f"override {text!r} is not of the form section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw else None
    except yaml.YAMLError:
        raise HpcLlamaError(f"override {text!r}: value is not valid YAML") from None
    return key.strip().split("."), value


def resolve_preset(name: str) -> str:
    """A preset path, or a bare name looked up in configs/ (`tiny` -> configs/tiny.yaml)."""
    if os.path.isfile(name):
        return name
    candidate = os.path.join(CONFIG_DIR, name if name.endswith(".yaml") else f"{name}.yaml")
    if os.path.isfile(candidate):
        return candidate
    raise HpcLlamaError(f"config {name!r}: no such file or preset in {CONFIG_DIR}")


def load_sections(path: str | None = None, overrides: list[str] = (), sections: dict[str, type] = None) -> dict:
    """Read a YAML preset, apply `section.key=value` overrides, and build each section's dataclass.

    Returns {section name: frozen dataclass or None when the section is absent
    and has required fields}.
    """
    sections = SECTIONS if sections is None else sections
    raw: dict = {}
    where = "config"
    if path is not None:
        path = resolve_preset(path)
        where = path
        try:
            with open(path) as f:
                raw = yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise HpcLlamaError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        if not isinstance(raw, dict):
            raise HpcLlamaError(f"{path}: expected sections (a mapping) at the top level")
    for text in overrides:
        keys, value = parse_override(text)
        node = raw
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise HpcLlamaError(f"override {text!r}: {k} is not a section")
        node[keys[-1]] = value
    for key in raw:
        if key not in sections:
            raise HpcLlamaError(f"{where}: unknown section {key!r} (known: {', '.join(sections)})")
    return {name: (from_dict(cls, raw[name], f"{where}: {name}") if name in raw else None)
            for name, cls in sections.items()}


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "kib": 2**10, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str) -> int:
    """'500MB', '2GiB', '1000' -> bytes."""
    m = _SIZE.match(text)
    unit = (m.group(2) or "").lower() if m else None
    if not m or unit not in _UNITS:
        raise HpcLlamaError(f"size {text!r} is not a number of bytes like 500MB or 2GiB")
    size = int(float(m.group(1)) * _UNITS[unit])
    if size <= 0:
        raise HpcLlamaError(f"size {text!r} must be positive")
    return size
