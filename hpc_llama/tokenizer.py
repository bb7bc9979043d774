"""The checkpoint's own tokenizer (tokenizer.json carried inside it), via the `tokenizers` library."""

from __future__ import annotations

from .errors import HpcLlamaError


class Tokenizer:
    """Encodes text without special tokens; BOS/EOS are added by the caller where its definition says."""

    def __init__(self, tokenizer_json: bytes, vocab_size: int):
        from tokenizers import Tokenizer as HFTokenizer

        try:
            self.tok = HFTokenizer.from_str(tokenizer_json.decode("utf-8"))
        except Exception as e:  # the library raises its own exception types
            raise HpcLlamaError(f"tokenizer.json cannot be read: {e}") from None
        self.vocab_size = vocab_size
        if self.tok.get_vocab_size(with_added_tokens=True) > vocab_size:
            raise HpcLlamaError(f"the tokenizer has {self.tok.get_vocab_size(with_added_tokens=True)} tokens "
                                f"but the model only {vocab_size}")

    @classmethod
    def from_checkpoint(cls, reader) -> Tokenizer | None:
        raw = reader.asset("tokenizer.json")
        return None if raw is None else cls(raw, reader.config.vocab_size)

    def encode_batch(self, texts: list[str], special: bool = False) -> list[list[int]]:
        """`special`: add what the tokenizer's own post-processor adds (a BOS for some, nothing for others)."""
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=special)]

    def encode(self, text: str, special: bool = False) -> list[int]:
        return self.tok.encode(text, add_special_tokens=special).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


def json_asset(reader, filename: str) -> dict | None:
    """A JSON object the checkpoint carries beside its tokenizer (tokenizer_config.json, ...); None if absent."""
    import json

    raw = reader.asset(filename)
    if raw is None:
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise HpcLlamaError(f"the checkpoint's {filename} is not JSON") from None
    if not isinstance(value, dict):
        raise HpcLlamaError(f"the checkpoint's {filename} is not a JSON object")
    return value


def _token_text(value):
    # tokenizer_config.json writes a special token as its text, or as an AddedToken object ({"content": ...}).
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def declared_specials(reader, tokenizer: Tokenizer | None) -> dict | None:
    """The BOS and EOS the checkpoint's tokenizer declares, as transformers reads them:
    {"bos": id or None, "eos": id or None, "add_bos": True/False/None (not said)}; None when the
    checkpoint has no tokenizer_config.json (the model config's ids then stand).

    This, not the model config, is what lm-evaluation-harness takes its prefix token from and what
    transformers puts before a prompt: Qwen's config names a BOS its tokenizer never uses
    (tokenizer_config.json says `"bos_token": null`), and a GGUF says `add_bos_token` itself.
    """
    config = json_asset(reader, "tokenizer_config.json")
    if config is None or tokenizer is None:
        return None
    extra = json_asset(reader, "special_tokens_map.json") or {}
    out = {}
    for role in ("bos", "eos"):
        key = f"{role}_token"
        text = _token_text(extra[key]) if extra.get(key) is not None else _token_text(config.get(key))
        out[role] = None if text is None else tokenizer.token_id(text)
    add = config.get("add_bos_token")
    out["add_bos"] = add if isinstance(add, bool) else None
    return out


def prefix_and_bos(reader, tokenizer: Tokenizer | None) -> tuple[int, int | None]:
    """(prefix, bos): the token a scored text starts from -- lm-eval's prefix token: the tokenizer's BOS,
    else its EOS -- and the BOS a text prompt gets as transformers' tokenizer would add it (None: none)."""
    cfg = reader.config
    spec = declared_specials(reader, tokenizer)
    if spec is None:
        bos = cfg.bos_id
        return (bos if bos is not None else cfg.eos_ids[0]), bos
    bos = spec["bos"] if spec["add_bos"] is not False else None
    prefix = next((t for t in (spec["bos"], spec["eos"], cfg.bos_id) if t is not None), None)
    return (prefix if prefix is not None else cfg.eos_ids[0]), bos


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str, prefix: int) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) of a conditional request, by lm-evaluation-harness's rule for its HF backend.

    Trailing whitespace of the context moves to the continuation; both are
    encoded with the tokenizer's own special tokens (as lm-eval leaves
    add_special_tokens to the tokenizer), except a string that starts with the
    text of the prefix token; the continuation's ids are those of
    encode(context + continuation) after the ids of encode(context). An empty
    context becomes the prefix token (BOS, else EOS) and the continuation is
    encoded alone, without special tokens. docs/scoring.md has the rule.
    """
    if context == "":
        cont = tokenizer.encode(continuation)
        # lm-eval: a continuation that itself starts with the prefix token lends it as the context.
        return ([prefix], cont) if not cont or cont[0] != prefix else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    prefix_text = tokenizer.decode([prefix])
    whole_text = context + continuation
    whole = tokenizer.encode(whole_text, special=not (prefix_text and whole_text.startswith(prefix_text)))
    ctx = tokenizer.encode(context, special=not (prefix_text and context.startswith(prefix_text)))
    return ctx, whole[len(ctx):]


def tokenize_documents(docs, tokenizer, bos: int | None, comm, rank: int = 0, size: int = 1) -> list:
    """Token sequences (int32 arrays) of documents, BOS first for text; `input_ids` are kept as given.

    Ranks tokenize a share each (document j on rank j mod size) and exchange
    the ids with Allgatherv, so every rank ends with all of them.
    """
    return tokenize_requests(docs, tokenizer, bos, None, comm, rank, size)[0]


def tokenize_requests(docs, tokenizer, bos: int | None, prefix: int | None, comm, rank: int = 0, size: int = 1):
    """(sequences, context lengths): as tokenize_documents, and a conditional request (a document with a
    context) becomes context ids + continuation ids (encode_pair, `prefix` its empty-context token) with
    the number of context ids beside it; -1 for every other document."""
    import numpy as np

    from .parallel.collectives import allgather_array

    mine = [j for j in range(len(docs)) if j % size == rank]
    texts = [docs[j].text for j in mine if docs[j].text is not None and docs[j].context is None]
    encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    seqs, splits = [], []
    for j in mine:
        d = docs[j]
        split = -1
        if d.context is not None:
            ctx, cont = encode_pair(tokenizer, d.context, d.text, prefix)
            ids, split = ctx + cont, len(ctx)
        elif d.text is None:
            ids = list(d.input_ids)
        else:
            ids = ([bos] if bos is not None else []) + next(encoded)
        seqs.append(np.asarray(ids, dtype=np.int32))
        splits.append(split)
    lengths = allgather_array(comm, np.array([len(s) for s in seqs], dtype=np.int64))
    flat = allgather_array(comm, np.concatenate(seqs) if seqs else np.zeros(0, np.int32))
    all_splits = allgather_array(comm, np.array(splits, dtype=np.int64))
    out: list = [None] * len(docs)
    contexts = np.full(len(docs), -1, dtype=np.int64)
    for r in range(size):
        parts = np.split(flat[r], np.cumsum(lengths[r])[:-1]) if len(lengths[r]) else []
        for j, part, split in zip(range(r, len(docs), size), parts, all_splits[r]):
            out[j] = part
            contexts[j] = split
    return out, contexts
