"""The tokenizer inside a GGUF file, rebuilt as the `tokenizer.json` that the tokenizers library reads.

llama.cpp stores a tokenizer as lists (tokens, merges or scores, token types) plus the name of its model
and pre-tokenizer; transformers' own GGUF loader rebuilds the same lists into a fast tokenizer, and ours
must encode every text exactly as that one does. Two models are read: byte-level BPE ('gpt2': GPT-2,
SmolLM, Llama 3, Qwen2/2.5/3) and SentencePiece BPE ('llama': Llama 2, Mistral, TinyLlama).
"""

from __future__ import annotations

import json
import math

from ..errors import HpcLlamaError
from .base import shown

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

MODELS = ("gpt2", "llama")

# Pre-tokenizers of the byte-level model by tokenizer.ggml.pre, with the regex each splits text by first (as
# llama.cpp and transformers define them; None: GPT-2's own, inside the ByteLevel pre-tokenizer).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's: Llama 3's but one digit at a time. llama.cpp spells the (?i:...) group out as character classes
# because its regex engine lacks the flag; transformers keeps the original from Qwen2's tokenizer.json.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_SPLITS = {"default": None, "gpt2": None, "smollm": None, "llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT,
           "deepseek-r1-qwen": _QWEN2_SPLIT}
PRE_TOKENIZERS = tuple(_SPLITS)

SPIECE_SPACE = "\u2581"  # '▁', SentencePiece's spelling of a space


def tokenizer_json(tok: dict, path: str = "") -> str:
    """The tokenizer.json of a GGUF's tokenizer: byte-level BPE ('gpt2') or SentencePiece BPE ('llama')."""
    kind = tok.get("model")
    if kind not in MODELS:
        raise HpcLlamaError(f"{path}: GGUF tokenizer model {shown(kind)} is not supported (byte-level BPE 'gpt2', "
                            f"SentencePiece 'llama'); convert the HF original instead")
    tokens = tok["tokens"]
    if kind == "gpt2":
        out = _byte_level(tok, path)
    else:
        out = _sentencepiece(tok, path)
    _add_special_tokens(out, tok, byte_level=kind == "gpt2")
    spec = json.loads(out.to_str())
    # transformers adds BOS by default to a SentencePiece vocabulary, as llama.cpp does, and not to a byte-level one.
    spec["post_processor"] = _bos_eos(tok, tokens, default_bos=kind == "llama", path=path)
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


def _sentencepiece(tok: dict, path: str):
    """A SentencePiece BPE vocabulary as transformers' LlamaTokenizer holds it: a space becomes '▁' and one is
    put before the text (not after a special token inside it), pieces missing from the vocabulary fall back
    to their UTF-8 bytes (<0xNN> tokens), and decoding undoes both."""
    from tokenizers import decoders, pre_tokenizers

    pre = tok.get("pre") or "default"
    if pre != "default":
        # llama.cpp ignores it here, while transformers would swap in that byte-level regex: they disagree.
        raise HpcLlamaError(f"{path}: GGUF pre-tokenizer {shown(pre)} is not supported with the SentencePiece "
                            f"model 'llama' (default)")
    tokens = tok["tokens"]
    if tok.get("merges") is not None:
        merges = _pairs(tok["merges"], path)
    else:
        merges = _merges_by_score(tokens, _scores(tok, len(tokens), path))
    unk = _named(tok, tokens, "unknown_token_id")
    # tokenizer.ggml.add_space_prefix is not read: transformers always puts the space in front, and so do we.
    out = _bpe(tok, path, merges, unk_token=unk, fuse_unk=True, byte_fallback=True)
    out.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPIECE_SPACE, prepend_scheme="first", split=False)
    out.decoder = decoders.Sequence([decoders.Replace(SPIECE_SPACE, " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
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


def _scores(tok: dict, n: int, path: str) -> list:
    scores = tok.get("scores")
    if scores is None:
        raise HpcLlamaError(f"{path}: GGUF SentencePiece tokenizer has neither tokenizer.ggml.merges nor "
                            f"tokenizer.ggml.scores")
    if (not isinstance(scores, list) or len(scores) != n
            or not all(isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) for s in scores)):
        raise HpcLlamaError(f"{path}: GGUF metadata tokenizer.ggml.scores is not a list of {n} finite numbers "
                            f"(one per token)")
    return scores


def _merges_by_score(tokens: list, scores: list) -> list:
    """The merges a SentencePiece BPE vocabulary implies, in the order transformers derives them.

    Every token that is the concatenation of two tokens is a merge of those two (all its splits, the
    pair of lower ids first); merges are ranked by the score of the token they make, best first, ties
    going to the longer left piece, then the longer right piece, then vocabulary order.
    """
    ids = {t: i for i, t in enumerate(tokens)}
    score_of = dict(zip(tokens, scores))  # a repeated token keeps its first place and its last score
    ranked = []
    for token, score in score_of.items():
        splits = [(token[:k], token[k:]) for k in range(1, len(token))
                  if token[:k] in ids and token[k:] in ids]
        splits.sort(key=lambda lr: (ids[lr[0]], ids[lr[1]]))
        ranked.extend((score, len(left), len(right), left, right) for left, right in splits)
    # A stable sort on the key alone, descending: equal keys keep the order they were found in.
    ranked.sort(key=lambda m: m[:3], reverse=True)
    return [(left, right) for _, _, _, left, right in ranked]


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
