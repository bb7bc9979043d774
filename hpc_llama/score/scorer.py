"""Scoring one step of documents across all ranks: tokenize, plan, run, gather to rank 0.

Every rank sees the same documents and computes the same plan (windows,
calls, rounds) from them, so no plan travels over the network: each replica
runs its own calls, and only token ids (after tokenizing in parallel) and
results (gathered to rank 0) are exchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..config import ParallelConfig, ScoreConfig
from ..errors import HpcLlamaError
from ..parallel.collectives import gather_array
from ..parallel.layout import stage_and_replica
from ..procstats import peak_rss, seconds_since_start
from ..tokenizer import prefix_and_bos, tokenize_requests
from .plan import (
    ContinuationTooLong,
    call_tensors,
    default_tokens_per_batch,
    dummy_call,
    plan_calls,
    replica_rounds,
    request_rows,
    score_head,
)


@dataclass
class StepResult:
    """Rank 0's view of one step: per-document totals in step order, plus bookkeeping."""

    loglik: np.ndarray
    n_tokens: np.ndarray
    is_greedy: np.ndarray
    """Every scored token the model's first choice (reported for conditional requests)."""
    conditional: np.ndarray
    token_logprobs: list[np.ndarray] | None
    positions: int
    """Padded token positions the model computed (real + padding)."""
    real_positions: int

    def totals(self) -> dict:
        """What the journal adds up over steps: tokens, log-likelihood, computed and real positions."""
        return {"tokens": int(self.n_tokens.sum()), "loglik": float(self.loglik.sum()),
                "positions": self.positions, "real_positions": self.real_positions}


class Scorer:
    """This rank's part of a scoring job: a local model (one stage) or a DeepSpeed pipeline stage."""

    def __init__(self, reader, tokenizer, info, comm, parallel: ParallelConfig, cfg: ScoreConfig):
        from ..parallel.layout import stage_plans
        from ..parallel.pipeline import build_pipeline
        from ..parallel.ranks import resolve_dtype

        self.reader, self.tokenizer, self.info, self.comm, self.cfg = reader, tokenizer, info, comm, cfg
        mcfg = reader.config
        self.context = cfg.context or mcfg.max_seq_len
        if self.context > mcfg.max_seq_len:
            raise HpcLlamaError(f"context {self.context} exceeds the model's {mcfg.max_seq_len} tokens")
        self.stride = cfg.stride or self.context
        if self.stride > self.context:
            raise HpcLlamaError(f"stride {self.stride} is larger than the context {self.context}")
        self.pp = parallel.pp
        self.dp = info.world_size // parallel.pp
        self.stage, self.replica = stage_and_replica(info.rank, info.world_size, parallel.pp)
        self.micro_batches = cfg.micro_batches or (16 * parallel.pp if parallel.pp > 1 else 1)
        self.tokens_per_batch = cfg.tokens_per_batch or default_tokens_per_batch(info.device)
        # What a text starts from, and a conditional request's empty context: lm-eval's prefix token,
        # the tokenizer's BOS, else (models without one, as Qwen) its EOS.
        self.prefix = prefix_and_bos(reader, tokenizer)[0]
        self.bos = self.prefix if cfg.add_bos else None
        self.dtype = resolve_dtype(parallel.dtype, info.device)
        load: dict = {}
        if parallel.pp == 1:
            # One stage holds the whole model: no pipeline engine, no torch.distributed.
            from ..checkpoint.slices import load_slice
            from ..inference import ready_for_inference

            model = load_slice(reader, device=info.device, dtype=self.dtype, stats=load)
            ready_for_inference(model, pack=False)
            self.engine, self.model, self.last = None, model, True
        else:
            self.engine, plan, _ = build_pipeline(reader, info, parallel, micro_batch=1, head_fn=score_head,
                                                  dtype=self.dtype, load_stats=load, segmented=True)
            self.model, self.last = None, plan.head
        plan = stage_plans(mcfg, parallel)[self.stage]
        self.load_stats = {"rank": info.rank, "stage": self.stage, "replica": self.replica,
                           "layers": [plan.layers.start, plan.layers.stop], "load_s": load["seconds"],
                           "model_bytes_read": load["bytes_read"]}
        self.first_forward_s = None

    def rank_stats(self) -> list[dict] | None:
        """Every rank's load statistics and peak memory, on rank 0."""
        mine = dict(self.load_stats, peak_rss=peak_rss(), first_forward_s=self.first_forward_s)
        return self.comm.gather(mine, root=0)

    # --- running -------------------------------------------------------------

    def _forward(self, batches):
        if self.first_forward_s is None:  # how long this rank took to start: a summary field
            self.first_forward_s = seconds_since_start()
        if self.engine is None:
            with torch.inference_mode():
                return [score_head(self.model, self.model.trunk(b[0], b[1], segments=b[2]), b) for b in batches]
        from ..parallel.pipeline import eval_batches

        return eval_batches(self.engine, batches)

    def score_step(self, docs) -> StepResult | None:
        """Score a step's documents; rank 0 gets the per-document results, others None."""
        seqs, contexts = tokenize_requests(docs, self.tokenizer, self.bos, self.prefix, self.comm, self.info.rank,
                                           self.info.world_size)
        try:
            rows = request_rows(seqs, contexts, self.context, self.stride, self.cfg.share_context)
        except ContinuationTooLong as e:  # every rank reaches the same verdict on the same documents
            raise HpcLlamaError(f"{docs[e.doc].where}: {e}") from None
        row_pieces = [r.pieces() for r in rows]
        pieces = [p for ps in row_pieces for p in ps]
        calls = plan_calls([r.length for r in rows], self.tokens_per_batch, self.cfg.max_batch, self.micro_batches)
        first_piece = np.cumsum([0] + [len(ps) for ps in row_pieces])
        ids, ll, greedy, lps, lp_len = [], [], [], [], []
        positions = real = 0
        for round_ in replica_rounds(len(calls), self.dp):
            mine = round_[self.replica]
            if mine is None:
                self._forward(dummy_call(self.info.device))
                continue
            call = calls[mine]
            outs = self._forward(call_tensors(call, rows, seqs, self.info.device))
            if not self.last:
                continue
            positions += call.positions
            real += sum(rows[r].length for mb in call.micro for r in mb.rows)
            for mb, (token_lp, is_max) in zip(call.micro, outs, strict=True):
                token_lp, is_max = token_lp.float().cpu().numpy(), is_max.cpu().numpy()
                for b, rid in enumerate(mb.rows):
                    for pid, (_, lo, hi) in enumerate(row_pieces[rid], int(first_piece[rid])):
                        ids.append(pid)
                        ll.append(token_lp[b, lo:hi].sum(dtype=np.float64))
                        greedy.append(is_max[b, lo:hi].all())
                        if self.cfg.token_logprobs:
                            lps.append(token_lp[b, lo:hi])
                            lp_len.append(hi - lo)
        # Only the last stage of each replica has results; one gather brings them to rank 0.
        g_ids = gather_array(self.comm, np.array(ids, dtype=np.int64))
        g_ll = gather_array(self.comm, np.array(ll, dtype=np.float64))
        g_greedy = gather_array(self.comm, np.array(greedy, dtype=np.bool_))
        g_len = gather_array(self.comm, np.array(lp_len, dtype=np.int64))
        g_lp = gather_array(self.comm, np.concatenate(lps).astype(np.float32) if lps else np.zeros(0, np.float32))
        counts = gather_array(self.comm, np.array([positions, real], dtype=np.int64))
        if g_ids is None:
            return None
        return self._merge(docs, seqs, contexts, pieces, g_ids, g_ll, g_greedy, g_len, g_lp, counts)

    def _merge(self, docs, seqs, contexts, pieces, g_ids, g_ll, g_greedy, g_len, g_lp, counts) -> StepResult:
        n = len(docs)
        ids = np.concatenate(g_ids)
        if len(ids) != len(pieces) or len(set(ids.tolist())) != len(pieces):
            raise HpcLlamaError(f"internal: {len(ids)} results for {len(pieces)} scored pieces")
        piece_ll = np.empty(len(pieces), np.float64)
        piece_ll[ids] = np.concatenate(g_ll)
        piece_greedy = np.empty(len(pieces), np.bool_)
        piece_greedy[ids] = np.concatenate(g_greedy)
        loglik = np.zeros(n, np.float64)
        is_greedy = np.ones(n, np.bool_)
        conditional = contexts >= 0
        n_tokens = np.array([len(s) - c if c >= 0 else max(len(s) - 1, 0) for s, c in zip(seqs, contexts)],
                            dtype=np.int64)
        # Pieces are summed in their own order, so a document's total never
        # depends on which replica scored which window.
        for pid, (doc, _, _) in enumerate(pieces):
            loglik[doc] += piece_ll[pid]
            is_greedy[doc] &= piece_greedy[pid]
        token_logprobs = None
        if self.cfg.token_logprobs:
            parts: list = [None] * len(pieces)
            for r_ids, r_len, r_lp in zip(g_ids, g_len, g_lp, strict=True):
                for pid, part in zip(r_ids, np.split(r_lp, np.cumsum(r_len)[:-1]) if len(r_len) else [], strict=True):
                    parts[pid] = part
            token_logprobs = [[] for _ in range(n)]
            for pid, (doc, _, _) in enumerate(pieces):
                token_logprobs[doc].append(parts[pid])
            token_logprobs = [np.concatenate(p) if p else np.zeros(0, np.float32) for p in token_logprobs]
        totals = np.sum(counts, axis=0)
        return StepResult(loglik, n_tokens, is_greedy, conditional, token_logprobs, int(totals[0]), int(totals[1]))
