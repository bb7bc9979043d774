"""The tokenizer inside a GGUF file, rebuilt as the `tokenizer.json` that the tokenizers library reads.

llama.cpp stores a tokenizer as lists (tokens, merges, token types) plus the name of its model and
pre-tokenizer; transformers' own GGUF loader rebuilds the same lists into a fast tokenizer, and ours
must encode every text exactly as that one does.
"""

from __future__ import annotations

from ..errors import HpcLlamaError
from .base import shown

CONTROL, USER_DEFINED = 3, 4  # llama.cpp's token types

# Pre-tokenizers by tokenizer.ggml.pre, as llama.cpp defines them.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZERS = ("default", "gpt2", "smollm", "llama-bpe")


def tokenizer_json(tok: dict, path: str = "") -> str:
    """The tokenizer.json of a GGUF's byte-level BPE tokenizer (llama.cpp's 'gpt2' model)."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    kind, pre = tok.get("model"), tok.get("pre") or "default"
    if kind != "gpt2":
        raise HpcLlamaError(f"{path}: GGUF tokenizer model {kind!r} is not supported (only byte-level BPE, 'gpt2'); "
                            f"convert the HF original instead")
    if pre not in PRE_TOKENIZERS:
        raise HpcLlamaError(f"{path}: GGUF pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)})")
    tokens = tok["tokens"]
    types = tok.get("token_type") or [1] * len(tokens)
    merges = [tuple(m.split(" ", 1)) for m in tok.get("merges") or []]
    if any(len(m) != 2 for m in merges):
        raise HpcLlamaError(f"{path}: GGUF tokenizer.ggml.merges has an entry that is not two tokens")
    try:
        bpe = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    except Exception as e:  # the tokenizers library raises its own exception types
        raise HpcLlamaError(f"{path}: GGUF tokenizer cannot be built: {shown(str(e), 200)}") from None
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=pre != "llama-bpe")
    if pre == "smollm":
        bpe.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "llama-bpe":
        bpe.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated", invert=False), byte_level])
    else:
        bpe.pre_tokenizer = byte_level
    bpe.decoder = decoders.ByteLevel()
    bpe.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, k in zip(tokens, types) if k == CONTROL])
    bpe.add_tokens([AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == USER_DEFINED])
    return bpe.to_str()
