"""Hugging Face adapter: config fields, parameter names, safetensors read and write.

The rest of hpc_llama speaks only our own names (`layers.3.attention.wq.weight`);
this module is the one place that knows HF's (`model.layers.3.self_attn.q_proj.weight`).
Tensors are never permuted: our rotary layout is HF's.
"""

from __future__ import annotations

import json
import os
import re
import struct

import torch

from ..errors import HpcLlamaError
from ..model.llama import ModelConfig
from ..parallel.layout import plan_shards
from .base import CheckpointReader, TableReader, group_by_unit
from .tensors import TensorInfo, numpy_view, read_exact

# Our names <-> HF names. Layer-local parts are templated on the layer number.
_LAYER_PARTS = {
    "attention.wq": "self_attn.q_proj",
    "attention.wk": "self_attn.k_proj",
    "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj",
    "feed_forward.w1": "mlp.gate_proj",
    "feed_forward.w2": "mlp.down_proj",
    "feed_forward.w3": "mlp.up_proj",
    "attention_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP = {"tok_embeddings": "model.embed_tokens", "norm": "model.norm", "output": "lm_head"}
_HF_LAYER_PARTS = {v: k for k, v in _LAYER_PARTS.items()}
_HF_TOP = {v: k for k, v in _TOP.items()}
# Buffers some old exports carry; they are recomputed, never loaded.
_HF_IGNORED = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")
_OUR = re.compile(r"^layers\.(\d+)\.(.+)\.(weight|bias)$")
_HF = re.compile(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$")

# Small files carried inside a checkpoint and written back beside an export.
ASSET_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")


def to_hf_name(name: str) -> str:
    m = _OUR.match(name)
    if m and m.group(2) in _LAYER_PARTS:
        return f"model.layers.{m.group(1)}.{_LAYER_PARTS[m.group(2)]}.{m.group(3)}"
    base, _, kind = name.rpartition(".")
    if base in _TOP:
        return f"{_TOP[base]}.{kind}"
    raise KeyError(f"no HF name for parameter {name!r}")


def from_hf_name(name: str) -> str | None:
    """Our name for an HF tensor, or None for a buffer we recompute."""
    if _HF_IGNORED.match(name):
        return None
    m = _HF.match(name)
    if m and m.group(2) in _HF_LAYER_PARTS:
        return f"layers.{m.group(1)}.{_HF_LAYER_PARTS[m.group(2)]}.{m.group(3)}"
    base, _, kind = name.rpartition(".")
    if base in _HF_TOP:
        return f"{_HF_TOP[base]}.{kind}"
    raise HpcLlamaError(f"unexpected tensor {name!r} in a Llama checkpoint")


def model_config_from_hf(hf: dict) -> ModelConfig:
    """ModelConfig from an HF config.json dict, in both the 4.x and the 5.x rope spellings."""
    kind = hf.get("model_type")
    if kind != "llama":
        raise HpcLlamaError(f"model_type {kind!r} is not supported (only 'llama')")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HpcLlamaError(f"hidden_act {act!r} is not supported (only 'silu')")
    rope = hf.get("rope_parameters") or {}
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    scaling = hf.get("rope_scaling")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k != "rope_theta"}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    eos = hf.get("eos_token_id", 2)
    # Shapes that structured pruning and factorisation change (docs/checkpoint.md, format 2).
    ours = hf.get("hpc_llama") or {}
    try:
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim"), ffn_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_id=hf.get("bos_token_id"), eos_ids=() if eos is None else eos,
            layer_shapes=ours.get("layer_shapes") or None, lowrank=ours.get("lowrank") or None)
    except KeyError as e:
        raise HpcLlamaError(f"model config lacks the field {e.args[0]!r}") from None
    except (TypeError, ValueError) as e:
        raise HpcLlamaError(f"invalid model config: {e}") from None


def hf_config_from_model(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """An HF config.json dict for a model we made ourselves (top-level rope fields, read by 4.x and 5.x)."""
    hf = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "attention_bias": cfg.attention_bias,
        "mlp_bias": cfg.mlp_bias, "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_ids[0] if len(cfg.eos_ids) == 1 else list(cfg.eos_ids),
        "torch_dtype": dtype,
    }
    if cfg.layer_shapes or cfg.lowrank:
        hf["hpc_llama"] = {"layer_shapes": {str(k): v for k, v in sorted((cfg.layer_shapes or {}).items())},
                           "lowrank": dict(sorted((cfg.lowrank or {}).items()))}
    return hf


# --- safetensors -------------------------------------------------------------
# Read with pread at each tensor's own offsets rather than mmap, so a slice
# reads only its own bytes and the reads can be counted.

_ST_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
              "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8"}
_ST_CODES = {v: k for k, v in _ST_DTYPES.items()}


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor table (our TensorInfo with absolute offsets) and metadata of one .safetensors file."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise HpcLlamaError(f"{path}: truncated safetensors file")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise HpcLlamaError(f"{path}: not a safetensors file (header of {n} bytes)")
            raw = f.read(n)
            size = os.fstat(f.fileno()).st_size
    except OSError as e:
        raise HpcLlamaError(f"{path}: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except ValueError:
        raise HpcLlamaError(f"{path}: corrupt safetensors header") from None
    meta = header.pop("__metadata__", {}) or {}
    table = {}
    for name, t in header.items():
        dtype = _ST_DTYPES.get(t["dtype"])
        if dtype is None:
            raise HpcLlamaError(f"{path}: tensor {name} has unsupported dtype {t['dtype']}")
        start, end = t["data_offsets"]
        offset = 8 + n + start
        if offset + (end - start) > size:
            raise HpcLlamaError(f"{path}: truncated (tensor {name} runs past the end of the file)")
        table[name] = TensorInfo(name, tuple(t["shape"]), dtype, end - start, path=path, offset=offset)
    return table, meta


class HFCheckpoint(TableReader):
    """An HF model directory read in place: config.json plus one or several .safetensors files."""

    def __init__(self, path: str):
        self.path, self.format = path, "hf"
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isfile(cfg_path):
            raise HpcLlamaError(f"{path}: not an HF model directory (no config.json)")
        try:
            with open(cfg_path) as f:
                self.hf_config = json.load(f)
        except ValueError:
            raise HpcLlamaError(f"{cfg_path}: not valid JSON") from None
        self.config = model_config_from_hf(self.hf_config)
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.isfile(index_path):
            try:
                with open(index_path) as f:
                    files = sorted(set(json.load(f)["weight_map"].values()))
            except (ValueError, KeyError):
                raise HpcLlamaError(f"{index_path}: corrupt index") from None
        elif os.path.isfile(os.path.join(path, "model.safetensors")):
            files = ["model.safetensors"]
        else:
            raise HpcLlamaError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                f"(only safetensors weights are read, never pickles)")
        infos: dict[str, TensorInfo] = {}
        for fname in files:
            table, _ = read_safetensors_header(os.path.join(path, fname))
            for hf_name, info in table.items():
                ours = from_hf_name(hf_name)
                if ours is not None:
                    infos[ours] = TensorInfo(ours, info.shape, info.dtype, info.nbytes, info.path, info.offset)
        self._set_table(infos)
        self._fds: dict[str, int] = {}

    def info(self, name: str) -> TensorInfo:
        if name not in self._infos:
            raise HpcLlamaError(f"{self.path}: tensor {name} ({to_hf_name(name)}) is missing")
        return self._infos[name]

    def read_into(self, name: str, out: torch.Tensor, verify: bool = True) -> None:
        info = self._check_out(name, out)
        if info.path not in self._fds:
            self._fds[info.path] = os.open(info.path, os.O_RDONLY)
        read_exact(self._fds[info.path], info.offset, numpy_view(out))

    def assets(self) -> dict[str, bytes]:
        out = {}
        for fname in ASSET_FILES:
            p = os.path.join(self.path, fname)
            if os.path.isfile(p):
                with open(p, "rb") as f:
                    out[fname] = f.read()
        return out

    def close(self):
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def write_safetensors(path: str, reader: CheckpointReader, names: list[str]) -> None:
    """Write the named tensors under their HF names, streamed one at a time."""
    header, offset = {}, 0
    for n in names:
        info = reader.info(n)
        header[to_hf_name(n)] = {"dtype": _ST_CODES[info.dtype], "shape": list(info.shape),
                                 "data_offsets": [offset, offset + info.nbytes]}
        offset += info.nbytes
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for n in names:
            f.write(numpy_view(reader.read(n)).data)


def write_hf(dst: str, reader: CheckpointReader, shard_bytes: int | None = None, hf_config: dict | None = None) -> None:
    """Export as an HF model directory (config.json, safetensors, tokenizer files) that
    `LlamaForCausalLM.from_pretrained` loads. `dst` must not exist."""
    os.makedirs(dst)
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(hf_config or reader.hf_config, f, indent=2, sort_keys=True)
    for fname, data in reader.assets().items():
        with open(os.path.join(dst, fname), "wb") as f:
            f.write(data)
    names = reader.names()
    groups = group_by_unit(names)
    plan = plan_shards([sum(reader.info(n).nbytes for n in g) for g in groups], shard_bytes)
    if len(plan) <= 1:
        write_safetensors(os.path.join(dst, "model.safetensors"), reader, names)
        return
    weight_map = {}
    for s, unit_ids in enumerate(plan):
        fname = f"model-{s + 1:05d}-of-{len(plan):05d}.safetensors"
        part = [n for u in unit_ids for n in groups[u]]
        write_safetensors(os.path.join(dst, fname), reader, part)
        weight_map.update({to_hf_name(n): fname for n in part})
    total = sum(reader.info(n).nbytes for n in names)
    with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2, sort_keys=True)
