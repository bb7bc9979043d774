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
