"""Token shards for training: the split rule, the on-disk format, and the sequences a step trains on.

A prepared data directory (`hpc-llama prepare`, spec in docs/training.md) holds
`manifest.json`, the `tokenizer.json` the tokens came from, and shards
`shard-NNNNNN.h5`, each the tokens of one fixed-size chunk of the corpus in
input order, with groups `train`, `val` and `test`. A shard's content depends
only on the corpus and the options, never on how many ranks prepared it.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from dataclasses import dataclass

import numpy as np
import xxhash

from ..errors import HpcLlamaError

FORMAT = "hpc_llama.tokens"
FORMAT_VERSION = 1
SPLITS = ("train", "val", "test")


# --- the split rule ----------------------------------------------------------


def split_of(content: bytes, seed: int, fractions: tuple[float, float, float]) -> str:
    """train, val or test for a document, from its content alone.

    u = XXH3-64(content, seed) / 2^64 is uniform in [0, 1); the document goes
    to train if u < f_train, to val if u < f_train + f_val, else to test. A
    document keeps its split when the corpus grows or is reordered, and
    identical documents always land together (no leakage between splits).
    """
    u = xxhash.xxh3_64_intdigest(content, seed=seed) / 2.0 ** 64
    if u < fractions[0]:
        return "train"
    if u < fractions[0] + fractions[1]:
        return "val"
    return "test"


def parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise HpcLlamaError(f"--split {text!r}: expected three fractions like 0.98,0.01,0.01") from None
    if len(parts) != 3 or any(p < 0 for p in parts):
        raise HpcLlamaError(f"--split {text!r}: expected three non-negative fractions for train, val, test")
    if abs(sum(parts) - 1) > 1e-6:
        raise HpcLlamaError(f"--split {text!r}: the fractions sum to {sum(parts):g}, not 1")
    if parts[0] == 0:
        raise HpcLlamaError(f"--split {text!r}: the train fraction must be positive")
    return parts


# --- writing -------------------------------------------------------------------


def token_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 1 << 16 else np.uint32


def write_shard(path: str, parts: dict[str, list[tuple[np.ndarray, np.ndarray | None]]], vocab_size: int) -> dict:
    """Write one shard: per split, documents' tokens (and loss masks for task data) back to back.

    Returns the shard's manifest entry.
    """
    import h5py

    entry = {"file": os.path.basename(path), "splits": {}}
    with h5py.File(path, "w") as f:
        f.attrs["format"] = FORMAT
        f.attrs["format_version"] = FORMAT_VERSION
        for split in SPLITS:
            docs = parts.get(split, [])
            g = f.create_group(split)
            lengths = np.array([len(t) for t, _ in docs], dtype=np.int64)
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
            tokens = np.concatenate([t for t, _ in docs]).astype(token_dtype(vocab_size)) if docs else \
                np.zeros(0, token_dtype(vocab_size))
            arrays = {"tokens": tokens, "offsets": offsets}
            if docs and docs[0][1] is not None:
                arrays["loss_mask"] = np.concatenate([m for _, m in docs]).astype(np.uint8)
            for name, arr in arrays.items():
                d = g.create_dataset(name, data=arr)
                d.attrs["xxh3"] = xxhash.xxh3_64_hexdigest(arr)
            entry["splits"][split] = {"documents": len(docs), "tokens": int(len(tokens))}
    return entry


def unigram_entropy(counts: np.ndarray) -> float:
    """Entropy in nats/token of the unigram distribution: the loss of the best context-free model."""
    total = counts.sum()
    if total == 0:
        return 0.0
    p = counts[counts > 0] / total
    return float(-(p * np.log(p)).sum())


# --- reading -------------------------------------------------------------------


def load_manifest(data_dir: str) -> dict:
    path = os.path.join(data_dir, "manifest.json")
    try:
        with open(path) as f:
            m = json.load(f)
    except FileNotFoundError:
        raise HpcLlamaError(f"{data_dir}: not a prepared data directory (no manifest.json; run hpc-llama prepare)") from None
    except ValueError:
        raise HpcLlamaError(f"{path}: corrupt manifest (not JSON)") from None
    if m.get("format") != FORMAT:
        raise HpcLlamaError(f"{path}: not an hpc_llama token manifest")
    if int(m.get("format_version", 0)) > FORMAT_VERSION:
        raise HpcLlamaError(f"{path}: data format is newer than this hpc_llama reads")
    return m


class SplitData:
    """One split of a prepared directory: its documents, read shard by shard on demand.

    Every shard array is checked against its xxh3 the first time it is read.
    """

    def __init__(self, data_dir: str, manifest: dict, split: str, cache_shards: int = 8):
        self.dir, self.split = data_dir, split
        self.shards = [s["file"] for s in manifest["shards"] if s["splits"][split]["documents"]]
        counts = [s["splits"][split] for s in manifest["shards"] if s["splits"][split]["documents"]]
        self.doc_counts = np.array([c["documents"] for c in counts], dtype=np.int64)
        self.token_counts = np.array([c["tokens"] for c in counts], dtype=np.int64)
        self.doc_starts = np.concatenate([[0], np.cumsum(self.doc_counts)])
        self.token_starts = np.concatenate([[0], np.cumsum(self.token_counts)])
        self.task = manifest["kind"] == "task"
        self._cache: OrderedDict = OrderedDict()
        self._cache_size = cache_shards

    @property
    def documents(self) -> int:
        return int(self.doc_starts[-1])

    @property
    def tokens(self) -> int:
        return int(self.token_starts[-1])

    def _shard(self, i: int) -> dict[str, np.ndarray]:
        if i in self._cache:
            self._cache.move_to_end(i)
            return self._cache[i]
        import h5py

        path = os.path.join(self.dir, self.shards[i])
        try:
            with h5py.File(path, "r") as f:
                g = f[self.split]
                arrays = {}
                for name in g:
                    arr = g[name][()]
                    if xxhash.xxh3_64_hexdigest(arr) != g[name].attrs.get("xxh3"):
                        raise HpcLlamaError(f"{path}: checksum mismatch in {self.split}/{name}: the shard is corrupt")
                    arrays[name] = arr
        except OSError as e:
            raise HpcLlamaError(f"{path}: unreadable token shard ({str(e).split('(')[0].strip()})") from None
        self._cache[i] = arrays
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return arrays

    def verify(self) -> None:
        for i in range(len(self.shards)):
            self._shard(i)

    def stream(self, start: int, length: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Tokens [start, start + length) of the split's documents laid end to end (and their loss mask)."""
        out_t, out_m, pos = [], [], start
        end = start + length
        while pos < end:
            i = int(np.searchsorted(self.token_starts, pos, side="right")) - 1
            base = int(self.token_starts[i])
            take = min(end, int(self.token_starts[i + 1])) - pos
            arrays = self._shard(i)
            out_t.append(arrays["tokens"][pos - base:pos - base + take])
            if "loss_mask" in arrays:
                out_m.append(arrays["loss_mask"][pos - base:pos - base + take])
            pos += take
        tokens = np.concatenate(out_t).astype(np.int64)
        return tokens, (np.concatenate(out_m).astype(bool) if out_m else None)

    def document(self, k: int) -> tuple[np.ndarray, np.ndarray | None]:
        """Document k (in split order): its tokens and loss mask."""
        i = int(np.searchsorted(self.doc_starts, k, side="right")) - 1
        arrays = self._shard(i)
        j = k - int(self.doc_starts[i])
        a, b = int(arrays["offsets"][j]), int(arrays["offsets"][j + 1])
        mask = arrays["loss_mask"][a:b].astype(bool) if "loss_mask" in arrays else None
        return arrays["tokens"][a:b].astype(np.int64), mask


# --- sequences and steps (pure) -----------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """Sequences of one micro-batch: inputs, targets and per-token loss weights, each (B, T)."""

    tokens: np.ndarray
    targets: np.ndarray
    weights: np.ndarray


def sequence_count(data: SplitData, seq_len: int) -> int:
    """Sequences in a split: packed windows of the token stream for text, one per example for task data."""
    if data.task:
        return data.documents
    return max(0, (data.tokens - 1) // seq_len)


def read_sequence(data: SplitData, i: int, seq_len: int, pad_id: int = 0):
    """(inputs, targets, mask) of sequence i, each of length seq_len.

    Text: tokens [i*L, i*L + L + 1) of the stream, every target counts.
    Task: example i, cut or padded to L + 1, only response targets count.
    """
    if not data.task:
        tokens, _ = data.stream(i * seq_len, seq_len + 1)
        return tokens[:-1], tokens[1:], np.ones(seq_len, dtype=bool)
    tokens, mask = data.document(i)
    tokens, mask = tokens[:seq_len + 1], mask[:seq_len + 1]
    n = len(tokens)
    inp = np.full(seq_len, pad_id, dtype=np.int64)
    tgt = np.full(seq_len, pad_id, dtype=np.int64)
    w = np.zeros(seq_len, dtype=bool)
    inp[:n - 1], tgt[:n - 1], w[:n - 1] = tokens[:-1], tokens[1:], mask[1:]
    return inp, tgt, w


def step_sequences(step: int, global_batch: int, n_sequences: int, seed: int) -> np.ndarray:
    """The sequence ids of optimizer step `step`: a seeded permutation per epoch, read in order.

    A pure function of (step, sizes, seed): a resumed run, or any layout,
    trains on exactly the same sequences in the same steps.
    """
    if n_sequences <= 0:
        raise HpcLlamaError("the training split has no complete sequence (more data, or a shorter seq_len)")
    out = np.empty(global_batch, dtype=np.int64)
    for j, pos in enumerate(range(step * global_batch, (step + 1) * global_batch)):
        epoch, k = divmod(pos, n_sequences)
        out[j] = _permutation(seed, epoch, n_sequences)[k]
    return out


_PERMS: dict = {}


def _permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    key = (seed, epoch, n)
    if key not in _PERMS:
        if len(_PERMS) > 4:
            _PERMS.clear()
        _PERMS[key] = np.random.default_rng([seed, epoch]).permutation(n)
    return _PERMS[key]


def replica_micro_batches(ids: np.ndarray, dp: int, replica: int, micro: int) -> list[np.ndarray]:
    """A replica's micro-batches of a step: its contiguous share of the global batch, cut into pieces of `micro`."""
    per = len(ids) // dp
    mine = ids[replica * per:(replica + 1) * per]
    return [mine[k:k + micro] for k in range(0, per, micro)]


def make_batches(data: SplitData, ids_per_micro: list[np.ndarray], seq_len: int, scale: float) -> list[Batch]:
    """Micro-batches of sequences; each target's weight is mask x scale.

    With scale = accumulation steps x replicas / (counted targets in the whole
    global batch), DeepSpeed's averaging over micro-batches and replicas turns
    the weighted sums into the exact mean loss over every counted target of
    the step -- the same number whatever the layout.
    """
    out = []
    for ids in ids_per_micro:
        rows = [read_sequence(data, int(i), seq_len) for i in ids]
        tokens = np.stack([r[0] for r in rows])
        targets = np.stack([r[1] for r in rows])
        weights = np.stack([r[2] for r in rows]).astype(np.float32) * scale
        out.append(Batch(tokens, targets, weights))
    return out


def counted_targets(data: SplitData, ids: np.ndarray, seq_len: int) -> int:
    if not data.task:
        return len(ids) * seq_len
    return int(sum(read_sequence(data, int(i), seq_len)[2].sum() for i in ids))

