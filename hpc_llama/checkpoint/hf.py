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
from ..model.llama import InvalidModelConfig, ModelConfig
from ..parallel.layout import plan_shards
from .base import CheckpointReader, TableReader, file_inside, group_by_unit, shown
from .tensors import DTYPES, TensorInfo, numpy_view, read_exact

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
    "attention.q_norm": "self_attn.q_norm",
    "attention.k_norm": "self_attn.k_norm",
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
    raise HpcLlamaError(f"unexpected tensor {shown(name)} in the checkpoint")


# Our ModelConfig fields -> the config.json keys they come from, so an error names the key in the file.
_HF_KEYS = {"dim": "hidden_size", "n_layers": "num_hidden_layers", "n_heads": "num_attention_heads",
            "n_kv_heads": "num_key_value_heads", "ffn_dim": "intermediate_size", "norm_eps": "rms_norm_eps",
            "max_seq_len": "max_position_embeddings", "bos_id": "bos_token_id", "eos_ids": "eos_token_id",
            "layer_shapes": "hpc_llama.layer_shapes", "lowrank": "hpc_llama.lowrank", "sliding_layers": "layer_types"}


def config_error(source: str, e: InvalidModelConfig, keys: dict) -> HpcLlamaError:
    """A one-line error for a config field out of range, naming the file and its own key for the field."""
    head, _, rest = e.field.partition(".")
    key = keys.get(head, head) + (f".{rest}" if rest else "")
    return HpcLlamaError(f"{source}: {key} {e.problem}")


# Each family: the class an export names, and the HF defaults for keys its config.json may leave out
# (HF's own config classes fill them in; reading them otherwise would build a different model).
FAMILIES = {
    "llama": {"architecture": "LlamaForCausalLM", "max_position_embeddings": 2048},
    "mistral": {"architecture": "MistralForCausalLM", "max_position_embeddings": 4096 * 32, "sliding_window": 4096},
    "qwen2": {"architecture": "Qwen2ForCausalLM", "max_position_embeddings": 32768, "sliding_window": 4096,
              "max_window_layers": 28},
    "qwen3": {"architecture": "Qwen3ForCausalLM", "max_position_embeddings": 32768, "sliding_window": 4096,
              "max_window_layers": 28, "head_dim": 128},
}

# Options of neighbouring architectures that these families' configs may carry: each changes what
# the model computes, so one that is set is refused by name rather than ignored.
_UNSUPPORTED = {"num_experts": "mixture of experts", "num_local_experts": "mixture of experts",
                "n_routed_experts": "mixture of experts", "attn_logit_softcapping": "attention softcapping",
                "final_logit_softcapping": "logit softcapping", "attention_chunk_size": "chunked attention",
                "no_rope_layers": "layers without rotary embeddings"}


def _refuse_unsupported(hf: dict, source: str) -> None:
    for key, what in _UNSUPPORTED.items():
        if hf.get(key) not in (None, 0, False, []):
            raise HpcLlamaError(f"{source}: {key} {shown(hf[key])}: {what} is not supported")
    factor = hf.get("partial_rotary_factor", (hf.get("rope_parameters") or {}).get("partial_rotary_factor"))
    if factor not in (None, 1, 1.0):
        raise HpcLlamaError(f"{source}: partial_rotary_factor {shown(factor)}: rotary embeddings over part of "
                            f"each head are not supported")
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise HpcLlamaError(f"{source}: hidden_act {shown(act)} is not supported (only 'silu')")


def _sliding(hf: dict, kind: str, n_layers, source: str) -> tuple[int | None, tuple[int, ...] | None]:
    """(window, sliding layers or None for all), as HF's config class of the family derives them."""
    family = FAMILIES[kind]
    if kind == "llama":
        return None, None
    window = hf.get("sliding_window", family["sliding_window"])
    if kind in ("qwen2", "qwen3") and not hf.get("use_sliding_window", False):
        window = None
    if window is None:
        return None, None
    types = hf.get("layer_types")
    if kind == "mistral":  # HF's Mistral slides on every layer, whatever layer_types says
        return window, None
    if types is None:
        first = hf.get("max_window_layers", family["max_window_layers"])
        if not isinstance(first, int) or isinstance(first, bool) or not isinstance(n_layers, int):
            raise HpcLlamaError(f"{source}: max_window_layers must be an integer, got {shown(first)}")
        layers = tuple(range(max(first, 0), n_layers))
        return (window, layers) if layers else (None, None)  # Qwen2.5's configs: every layer below max_window_layers
    if (not isinstance(types, list) or len(types) != n_layers
            or not all(t in ("full_attention", "sliding_attention") for t in types)):
        raise HpcLlamaError(f"{source}: layer_types {shown(types)} is not one of full_attention or "
                            f"sliding_attention per layer (only these are supported)")
    layers = tuple(i for i, t in enumerate(types) if t == "sliding_attention")
    return (window, layers) if layers else (None, None)


def model_config_from_hf(hf: dict, source: str = "model config") -> ModelConfig:
    """ModelConfig from an HF config.json dict, in both the 4.x and the 5.x rope spellings.

    `source` names where the dict came from (a config.json, an index) in every error.
    """
    if not isinstance(hf, dict):
        raise HpcLlamaError(f"{source}: the model config is not a JSON object")
    kind = hf.get("model_type")
    if kind not in FAMILIES:
        raise HpcLlamaError(f"{source}: model_type {shown(kind)} is not supported ({', '.join(FAMILIES)})")
    family = FAMILIES[kind]
    _refuse_unsupported(hf, source)
    rope = hf.get("rope_parameters") or {}
    ours = hf.get("hpc_llama") or {}
    scaling = hf.get("rope_scaling")
    for key, value in (("rope_parameters", rope), ("hpc_llama", ours), ("rope_scaling", scaling or {})):
        if not isinstance(value, dict):
            raise HpcLlamaError(f"{source}: {key} must be a mapping, got {shown(value)}")
    theta = hf.get("rope_theta", rope.get("rope_theta", 10000.0))
    keys = dict(_HF_KEYS, rope_theta="rope_theta" if "rope_theta" in hf else "rope_parameters.rope_theta",
                rope_scaling="rope_scaling" if scaling is not None else "rope_parameters")
    if scaling is None and rope.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor")}
    if scaling is not None and scaling.get("rope_type", scaling.get("type")) == "default":
        scaling = None
    eos = hf.get("eos_token_id", 2)
    # Biases: Llama and Qwen3 name them in the config; Qwen2 always has them on q/k/v; Mistral never.
    bias = kind in ("llama", "qwen3") and bool(hf.get("attention_bias", False))
    # Shapes that structured pruning and factorisation change (docs/checkpoint.md, format 2).
    try:
        window, sliding_layers = _sliding(hf, kind, hf.get("num_hidden_layers"), source)
        return ModelConfig(
            vocab_size=hf["vocab_size"], dim=hf["hidden_size"], n_layers=hf["num_hidden_layers"],
            n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads"),
            head_dim=hf.get("head_dim", family.get("head_dim")), ffn_dim=hf["intermediate_size"],
            norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", family["max_position_embeddings"]),
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bias, mlp_bias=kind == "llama" and bool(hf.get("mlp_bias", False)),
            bos_id=hf.get("bos_token_id"), eos_ids=() if eos is None else eos,
            layer_shapes=ours.get("layer_shapes") or None, lowrank=ours.get("lowrank") or None,
            model_type=kind, qkv_bias=kind == "qwen2", qk_norm=kind == "qwen3",
            sliding_window=window, sliding_layers=sliding_layers)
    except KeyError as e:
        raise HpcLlamaError(f"{source}: the model config lacks the field {e.args[0]!r}") from None
    except InvalidModelConfig as e:
        raise config_error(source, e, keys) from None
    except (TypeError, ValueError) as e:
        raise HpcLlamaError(f"{source}: invalid model config: {e}") from None


def _expressible(cfg: ModelConfig) -> None:
    """Refuse a config its family's HF class cannot state (it would load as a different model)."""
    kind = cfg.model_type
    problems = []
    if cfg.qk_norm != (kind == "qwen3"):
        problems.append("per-head q/k norms" if cfg.qk_norm else "no per-head q/k norms")
    if cfg.qkv_bias and kind != "qwen2" or kind == "qwen2" and not cfg.qkv_bias:
        problems.append("q/k/v biases alone" if cfg.qkv_bias else "no q/k/v biases")
    if cfg.attention_bias and kind not in ("llama", "qwen3"):
        problems.append("attention biases")
    if cfg.mlp_bias and kind != "llama":
        problems.append("feed-forward biases")
    if cfg.sliding_window is not None and kind == "llama":
        problems.append("a sliding window")
    if cfg.sliding_layers is not None and kind == "mistral":
        problems.append("a sliding window on some layers only")
    if problems:
        raise HpcLlamaError(f"a {kind} model cannot have {' or '.join(problems)} in an HF config")


def hf_config_from_model(cfg: ModelConfig, dtype: str = "float32") -> dict:
    """An HF config.json dict for a model we made ourselves (top-level rope fields, read by 4.x and 5.x),
    under its own family's model_type and architecture."""
    _expressible(cfg)
    kind = cfg.model_type
    hf = {
        "architectures": [FAMILIES[kind]["architecture"]], "model_type": kind,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.dim, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim, "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": cfg.rope_scaling,
        "tie_word_embeddings": cfg.tie_embeddings, "bos_token_id": cfg.bos_id,
        "eos_token_id": cfg.eos_ids[0] if len(cfg.eos_ids) == 1 else list(cfg.eos_ids),
        "torch_dtype": dtype,
    }
    if kind == "llama":
        hf.update(attention_bias=cfg.attention_bias, mlp_bias=cfg.mlp_bias)
    elif kind == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    else:
        if kind == "qwen3":
            hf["attention_bias"] = cfg.attention_bias
        slides = [cfg.slides(i) for i in range(cfg.n_layers)]
        hf.update(use_sliding_window=any(slides), sliding_window=cfg.sliding_window if any(slides) else None,
                  max_window_layers=slides.index(True) if any(slides) else cfg.n_layers,
                  layer_types=["sliding_attention" if s else "full_attention" for s in slides])
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


MAX_HEADER = 100_000_000
"""Largest safetensors header read (the safetensors library's own limit): it is JSON, parsed whole."""


def read_safetensors_header(path: str) -> tuple[dict[str, TensorInfo], dict]:
    """Tensor table (our TensorInfo with absolute offsets) and metadata of one .safetensors file.

    Every entry is checked against the file before anything is read at its offsets: a known dtype, a
    shape whose size is exactly its byte range, and a range inside the file's data that overlaps no
    other entry's. So `nbytes` of each TensorInfo is backed by bytes the file really has.
    """
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            head = f.read(8)
            if len(head) != 8:
                raise HpcLlamaError(f"{path}: truncated safetensors file (no header length)")
            (n,) = struct.unpack("<Q", head)
            # The length is the file's first 8 bytes: it is never printed (the file may not be a safetensors one).
            if n > MAX_HEADER:
                raise HpcLlamaError(f"{path}: not a safetensors file (its header length is over {MAX_HEADER} bytes)")
            if n > size - 8:
                raise HpcLlamaError(f"{path}: truncated safetensors file (the header runs past the end of the file)")
            raw = f.read(n)
    except OSError as e:
        raise HpcLlamaError(f"{path}: {e.strerror}") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        raise HpcLlamaError(f"{path}: corrupt safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise HpcLlamaError(f"{path}: corrupt safetensors header (not a JSON object)")
    meta = header.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise HpcLlamaError(f"{path}: corrupt safetensors header (__metadata__ is not a JSON object)")
    data_size = size - 8 - n
    table = {}
    for name, t in header.items():
        table[name] = _safetensors_entry(path, name, t, 8 + n, data_size)
    ranges = sorted((i.offset, i.offset + i.nbytes, name) for name, i in table.items() if i.nbytes)
    for (_, end, a), (start, _, b) in zip(ranges, ranges[1:]):
        if start < end:
            raise HpcLlamaError(f"{path}: corrupt safetensors header (tensors {shown(a)} and {shown(b)} overlap)")
    return table, meta


def _safetensors_entry(path: str, name: str, t, data_start: int, data_size: int) -> TensorInfo:
    where = f"{path}: tensor {shown(name)}"
    if not isinstance(t, dict):
        raise HpcLlamaError(f"{where}: corrupt entry (not a JSON object)")
    dtype = _ST_DTYPES.get(t.get("dtype")) if isinstance(t.get("dtype"), str) else None
    if dtype is None:
        raise HpcLlamaError(f"{where} has unsupported dtype {shown(t.get('dtype'))}")
    shape, offsets = t.get("shape"), t.get("data_offsets")
    if not isinstance(shape, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise HpcLlamaError(f"{where}: corrupt entry (shape {shown(shape)} is not a list of sizes)")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
        raise HpcLlamaError(f"{where}: corrupt entry (data_offsets {shown(offsets)} is not [begin, end])")
    begin, end = offsets
    if not 0 <= begin <= end:
        raise HpcLlamaError(f"{where}: corrupt entry (data_offsets [{begin}, {end}] are reversed or negative)")
    if end > data_size:
        raise HpcLlamaError(f"{where}: truncated (data_offsets end at byte {end} of a data section of "
                            f"{data_size} bytes)")
    count = 1
    for d in shape:
        count *= d
    nbytes = count * DTYPES[dtype][1].itemsize
    if nbytes != end - begin:
        raise HpcLlamaError(f"{where}: corrupt entry (shape {shape} of {dtype} takes {nbytes} bytes, but its "
                            f"data_offsets hold {end - begin})")
    return TensorInfo(name, tuple(shape), dtype, nbytes, path=path, offset=data_start + begin)


def _read_json(path: str, what: str):
    try:
        with open(path, "rb") as f:
            return json.loads(f.read())
    except OSError as e:
        raise HpcLlamaError(f"{path}: {e.strerror}") from None
    except (ValueError, RecursionError):
        raise HpcLlamaError(f"{path}: corrupt {what} (not JSON)") from None


class HFCheckpoint(TableReader):
    """An HF model directory read in place: config.json plus one or several .safetensors files.

    Every file it reads is named by us or by the directory's index, and each must be a plain file
    name that stays inside the directory (`base.file_inside`); nothing outside it is opened.
    """

    def __init__(self, path: str):
        self.path, self.format = path, "hf"
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise HpcLlamaError(f"{path}: not an HF model directory (no config.json)")
        cfg_path = file_inside(path, "config.json", path, "the model")
        self.hf_config = _read_json(cfg_path, "config")
        self.config = model_config_from_hf(self.hf_config, cfg_path)
        index_path = os.path.join(path, "model.safetensors.index.json")
        if os.path.lexists(index_path):
            index_path = file_inside(path, "model.safetensors.index.json", path, "the model")
            index = _read_json(index_path, "index")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict):
                raise HpcLlamaError(f"{index_path}: corrupt index (no weight_map object)")
            files = {}
            for hf_name, fname in weight_map.items():
                if fname not in files:
                    files[fname] = file_inside(path, fname, index_path, f"weight_map entry {shown(hf_name)}")
        elif os.path.lexists(os.path.join(path, "model.safetensors")):
            weight_map = None
            files = {"model.safetensors": file_inside(path, "model.safetensors", path, "the model")}
        else:
            raise HpcLlamaError(f"{path}: no model.safetensors or model.safetensors.index.json "
                                f"(only safetensors weights are read, never pickles)")
        infos: dict[str, TensorInfo] = {}
        held: dict[str, str] = {}
        for fname, fpath in sorted(files.items()):
            table, _ = read_safetensors_header(fpath)
            for hf_name, info in table.items():
                if hf_name in held:
                    raise HpcLlamaError(f"{fpath}: tensor {shown(hf_name)} is also in {held[hf_name]}")
                held[hf_name] = fname
                try:
                    ours = from_hf_name(hf_name)
                except HpcLlamaError as e:
                    raise HpcLlamaError(f"{fpath}: {e}") from None
                if ours is not None:
                    infos[ours] = TensorInfo(ours, info.shape, info.dtype, info.nbytes, info.path, info.offset)
        for hf_name, fname in (weight_map or {}).items():
            if held.get(hf_name) != fname:
                raise HpcLlamaError(f"{index_path}: weight_map puts {shown(hf_name)} in {shown(fname)}, "
                                    f"which does not hold it")
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
            if os.path.lexists(p):
                with open(file_inside(self.path, fname, self.path, "the model"), "rb") as f:
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
