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

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


def tokenize_documents(docs, tokenizer, bos: int | None, comm, rank: int = 0, size: int = 1) -> list:
    """Token sequences (int32 arrays) of documents, BOS first for text; `input_ids` are kept as given.

    Ranks tokenize a share each (document j on rank j mod size) and exchange
    the ids with Allgatherv, so every rank ends with all of them.
    """
    import numpy as np

    from .parallel.collectives import allgather_array

    mine = [j for j in range(len(docs)) if j % size == rank]
    texts = [docs[j].text for j in mine if docs[j].text is not None]
    encoded = iter(tokenizer.encode_batch(texts)) if texts else iter(())
    seqs = []
    for j in mine:
        d = docs[j]
        ids = list(d.input_ids) if d.text is None else ([bos] if bos is not None else []) + next(encoded)
        seqs.append(np.asarray(ids, dtype=np.int32))
    lengths = allgather_array(comm, np.array([len(s) for s in seqs], dtype=np.int64))
    flat = allgather_array(comm, np.concatenate(seqs) if seqs else np.zeros(0, np.int32))
    out: list = [None] * len(docs)
    for r in range(size):
        parts = np.split(flat[r], np.cumsum(lengths[r])[:-1]) if len(lengths[r]) else []
        for j, part in zip(range(r, len(docs), size), parts):
            out[j] = part
    return out
