"""The tokenizer inside a GGUF file, rebuilt as the `tokenizer.json` that the tokenizers library reads.

llama.cpp stores a tokenizer as lists (tokens, merges, token types) plus the name of its model and
pre-tokenizer; transformers' own GGUF loader rebuilds the same lists into a fast tokenizer, and ours
must encode every text exactly as that one does.
"""

from __future__ import annotations

import json

from ..errors import HpcLlamaError
from .base import shown

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

# Pre-tokenizers of the byte-level model by tokenizer.ggml.pre, with the regex each splits text by first (as
# llama.cpp and transformers define them; None: GPT-2's own, inside the ByteLevel pre-tokenizer).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"default": None, "gpt2": None, "smollm": None, "llama-bpe": _LLAMA3_SPLIT}
PRE_TOKENIZERS = tuple(_SPLITS)


def tokenizer_json(tok: dict, path: str = "") -> str:
    """The tokenizer.json of a GGUF's byte-level BPE tokenizer (llama.cpp's 'gpt2' model)."""
    kind = tok.get("model")
    if kind != "gpt2":
        raise HpcLlamaError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                            f"convert the HF original instead")
    out = _byte_level(tok, path)
    _add_special_tokens(out, tok, byte_level=True)
    spec = json.loads(out.to_str())
    # transformers adds BOS and EOS to a byte-level vocabulary only where the file asks.
    spec["post_processor"] = _bos_eos(tok, tok["tokens"], default_bos=False, path=path)
    return json.dumps(spec, ensure_ascii=False)


def _byte_level(tok: dict, path: str):
    from tokenizers import Regex, decoders, pre_tokenizers

    pre = tok.get("pre") or "default"
    if pre not in _SPLITS:
        raise HpcLlamaError(f"{path}: GGUF pre-tokenizer {shown(pre)} is not supported ({', '.join(PRE_TOKENIZERS)})")
    out = _bpe(tok, path, _pairs(tok.get("merges") or [], path))
    split = _SPLITS[pre]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=split is None)
    if pre == "smollm":
        out.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif split is not None:
        out.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated", invert=False), byte_level])
    else:
        out.pre_tokenizer = byte_level
    out.decoder = decoders.ByteLevel()
    return out


def _bpe(tok: dict, path: str, merges: list, **options):
    from tokenizers import Tokenizer, models

    try:
        return Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tok["tokens"])}, merges=merges, **options))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise HpcLlamaError(f"{path}: GGUF tokenizer cannot be built: {shown(str(e), 200)}") from None


def _pairs(merges: list, path: str) -> list:
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    if any(len(m) != 2 for m in pairs):
        raise HpcLlamaError(f"{path}: GGUF tokenizer.ggml.merges has an entry that is not two tokens")
    return pairs


def _named(tok: dict, tokens: list, key: str) -> str | None:
    i = tok.get(key)
    return tokens[i] if isinstance(i, int) and not isinstance(i, bool) and 0 <= i < len(tokens) else None


def _byte_alphabet() -> set[str]:
    """The characters GPT-2's byte-level BPE spells bytes with: printable Latin-1 as itself, the other 68
    bytes as U+0100 onwards."""
    kept = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    return {chr(b) for b in kept} | {chr(256 + n) for n in range(256 - len(kept))}


def _add_special_tokens(out, tok: dict, byte_level: bool) -> None:
    """Control tokens and the named BOS/EOS/UNK/PAD tokens as special added tokens, user-defined ones as plain
    added tokens: matched whole in the text, as both llama.cpp and transformers do.

    In a byte-level vocabulary a token spelled outside the byte alphabet is a llama.cpp mislabel that no text
    can reach; transformers leaves it out (matching it whole would change how that text encodes), as we do.
    """
    from tokenizers import AddedToken

    tokens = tok["tokens"]
    types = tok.get("token_type") or [1] * len(tokens)
    named = {_named(tok, tokens, k) for k in ("bos_token_id", "eos_token_id", "unknown_token_id", "padding_token_id")}
    alphabet = _byte_alphabet() if byte_level else None

    def kept(t):
        return alphabet is None or set(t) <= alphabet

    out.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if (k == CONTROL or t in named) and kept(t)])
    out.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, k in zip(tokens, types) if k == USER_DEFINED and t not in named and kept(t)])


def _bos_eos(tok: dict, tokens: list, default_bos: bool, path: str) -> dict | None:
    """The post-processor that adds BOS and/or EOS where the file asks (tokenizer.ggml.add_bos_token,
    add_eos_token), as transformers builds it; None when it adds nothing."""
    ends = []
    for flag, key, default in (("add_bos_token", "bos_token_id", default_bos),
                               ("add_eos_token", "eos_token_id", False)):
        on = tok.get(flag, default)
        if not isinstance(on, bool):
            raise HpcLlamaError(f"{path}: GGUF metadata tokenizer.ggml.{flag} is not a bool")
        name = _named(tok, tokens, key)
        ends.append((name, int(tok[key])) if on and name is not None else None)
    bos, eos = ends
    if bos is None and eos is None:
        return None

    def template(seq, type_id):
        return ([{"SpecialToken": {"id": bos[0], "type_id": type_id}}] if bos else []) + [
            {"Sequence": {"id": seq, "type_id": type_id}}] + (
            [{"SpecialToken": {"id": eos[0], "type_id": type_id}}] if eos else [])

    return {"type": "TemplateProcessing", "single": template("A", 0), "pair": template("A", 0) + template("B", 1),
            "special_tokens": {name: {"id": name, "ids": [i], "tokens": [name]} for name, i in filter(None, ends)}}
