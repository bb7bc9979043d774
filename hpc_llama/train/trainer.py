"""Training on DeepSpeed engines: the pipeline engine (pp > 1, ZeRO 0/1) or a ZeRO engine (pp = 1, ZeRO 0-3).

The model is our slice; DeepSpeed does the distributed work. A step's loss is
the mean over every counted target of the global batch, whatever the layout
(see data.make_batches), so PP 1, PP 2, PP 2 x DP 2, ZeRO-2 and ZeRO-3 train
the same model from the same seed.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re
import shutil
import signal
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import fsync_path
from ..errors import HpcLlamaError
from ..model.llama import Transformer

# DeepSpeed broadcasts tied weights (which require grad) at start-up; torch
# warns about the missing autograd kernel although no gradient flows there.
warnings.filterwarnings("ignore", message="c10d::broadcast_: an autograd kernel was not registered")


def weighted_ce(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Sum over tokens of cross-entropy x weight, in fp32 whatever the logits' dtype."""
    ce = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none")
    return (ce * weights.reshape(-1).float()).sum()


def pipeline_loss(outputs, labels):
    targets, weights = labels
    return weighted_ce(outputs, targets, weights)


class TrainModule(nn.Module):
    """The whole model for a ZeRO engine (no pipeline): tokens, targets, weights in; weighted loss out."""

    def __init__(self, model: Transformer):
        super().__init__()
        self.model = model

    def forward(self, tokens, targets, weights):
        return weighted_ce(self.model(tokens), targets, weights)


class TiedCarrier(nn.Module):
    """The embedding matrix that the first and last stages share, for DeepSpeed's tied-weight sync.

    Built only on the two stages that own it, from their slice's own parameter,
    so the slice and DeepSpeed's gradient all-reduce see one Parameter.
    """

    def __init__(self, get_weight):
        super().__init__()
        self.weight = get_weight()


def _identity(module, inputs):
    return inputs


def lr_at(step: int, lr: float, min_lr: float, warmup: int, total: int) -> float:
    """Linear warm-up to lr, then cosine decay to min_lr at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * min(1.0, progress)))


def default_zero(pp: int, dp: int, dtype: torch.dtype) -> int:
    """The ZeRO stage when the config leaves it unset: 0 where one process holds the whole model and its
    optimiser in fp32 (ZeRO-1 would partition over a single replica: only its flat copy of the weights and
    two copies per step, 0.23 s against 0.09 s for the optimiser step of bench-100m's training benchmark),
    else 1 (state split across replicas; bf16's fp32 master weights; the pipeline engine's clipping)."""
    return 0 if pp == 1 and dp == 1 and dtype == torch.float32 else 1


def param_groups(model: nn.Module, weight_decay: float):
    """AdamW groups: decay matrices; not norms, biases or LoRA adapters. Frozen parameters stay out."""
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and "lora_" not in name else plain).append(p)
    # No empty groups: DeepSpeed's ZeRO optimizer drops them, and the LR scheduler
    # would then count more groups than the optimizer has.
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


class Trainer:
    """This rank's part of a training run."""

    def __init__(self, reader, info, comm, parallel, tcfg, dtype: torch.dtype, zero: int):
        import deepspeed

        from ..checkpoint.slices import load_slice
        from ..model.lora import add_lora
        from ..parallel.layout import stage_and_replica, stage_plans
        from ..parallel.pipeline import PipeStage

        self.info, self.comm, self.tcfg, self.dtype, self.zero = info, comm, tcfg, dtype, zero
        self.cfg = reader.config
        self.pp, self.dp = parallel.pp, info.world_size // parallel.pp
        self.gas = tcfg.global_batch // (tcfg.micro_batch * self.dp)
        self.stage, self.replica = stage_and_replica(info.rank, info.world_size, parallel.pp)
        self.plan = stage_plans(self.cfg, parallel)[self.stage]
        p = self.plan
        from ..model.quantized import SCHEMES

        packed = next((n for n in reader.names() if reader.info(n).scheme in SCHEMES), None)
        if packed is not None:
            raise HpcLlamaError(f"{reader.path}: {packed} is quantized ({reader.info(packed).scheme}); training needs "
                                f"dense weights: hpc-llama convert --dequantize first")
        self.model = load_slice(reader, p.layers, p.embed, p.head, device=info.device, dtype=torch.float32).train()
        for param in self.model.parameters():
            param.requires_grad_(True)
        self.lora = add_lora(self.model, tcfg.lora_rank, tcfg.lora_alpha, tcfg.lora_targets, tcfg.seed) \
            if tcfg.lora_rank else []
        # DeepSpeed clips fp32 gradients without ZeRO but keeps no norm; we clip those ourselves (the same
        # rule, torch's clip_grad_norm_) so the metrics report the gradient norm on every layout.
        self.own_clip = zero == 0 and self.pp == 1 and dtype == torch.float32
        self._grad_norm = None
        ds_config = {
            "train_micro_batch_size_per_gpu": tcfg.micro_batch, "gradient_accumulation_steps": self.gas,
            "train_batch_size": tcfg.global_batch, "gradient_clipping": 0.0 if self.own_clip else tcfg.grad_clip,
            "zero_optimization": {"stage": zero}, "bf16": {"enabled": dtype == torch.bfloat16},
            "zero_allow_untested_optimizer": True, "steps_per_print": 1 << 30, "wall_clock_breakdown": False,
        }
        if self.pp > 1:
            from deepspeed.pipe import LayerSpec, PipelineModule, TiedLayerSpec

            tied = self.cfg.tie_embeddings and not tcfg.lora_rank
            specs = [PipeStage(self.model) if s == self.stage else LayerSpec(PipeStage, None) for s in range(self.pp)]
            if tied:
                # The embedding is one matrix on two stages: DeepSpeed all-reduces its gradient between them.
                def weight():
                    m = self.model
                    return m.tok_embeddings.weight if m.tok_embeddings is not None else m.output.weight

                carrier = dict(forward_fn=_identity, tied_weight_attr="weight")
                specs = [TiedLayerSpec("embedding", TiedCarrier, weight, **carrier), *specs,
                         TiedLayerSpec("embedding", TiedCarrier, weight, **carrier)]
            with contextlib.redirect_stdout(io.StringIO()):
                module = PipelineModule(specs, num_stages=self.pp, loss_fn=pipeline_loss,
                                        partition_method="type:^PipeStage$" if tied else "uniform")
        else:
            module = TrainModule(self.model)
        optimizer = torch.optim.AdamW(param_groups(module, tcfg.weight_decay), lr=tcfg.lr, betas=tuple(tcfg.betas),
                                      eps=1e-8)
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda s: lr_at(s, tcfg.lr, tcfg.min_lr, tcfg.warmup_steps, tcfg.steps) / tcfg.lr)
        with contextlib.redirect_stdout(io.StringIO()):
            self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=scheduler,
                                                   config=ds_config)
        self.last = self.pp == 1 or self.engine.is_last_stage()

    # --- steps -------------------------------------------------------------------

    def _tensors(self, b):
        dev = self.info.device
        return (torch.as_tensor(b.tokens, device=dev), torch.as_tensor(b.targets, device=dev),
                torch.as_tensor(b.weights, device=dev))

    def _pipe_items(self, batches):
        for b in batches:
            tokens, targets, weights = self._tensors(b)
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens).contiguous()
            yield (tokens, positions), (targets, weights)

    def train_step(self, batches) -> float:
        """One optimiser step over this replica's micro-batches; returns the step's mean loss (all ranks)."""
        if self.pp > 1:
            loss = self.engine.train_batch(data_iter=self._pipe_items(batches))
            return float(loss)
        total = 0.0
        for b in batches:
            loss = self.engine(*self._tensors(b))
            self.engine.backward(loss)  # all-reduces the gradients (ZeRO-0, several replicas) at the boundary
            if self.own_clip and self.engine.is_gradient_accumulation_boundary():
                params = [p for p in self.engine.module.parameters() if p.grad is not None]
                limit = self.tcfg.grad_clip if self.tcfg.grad_clip > 0 else float("inf")  # 0: measured, not clipped
                self._grad_norm = float(torch.nn.utils.clip_grad_norm_(params, limit))
            self.engine.step()
            total += loss.item()
        return self._sum(total) / (self.gas * self.dp)

    def evaluate(self, batches) -> float:
        """Sum of weighted losses over this replica's batches, summed over every replica (weights pre-scaled)."""
        local = 0.0
        if self.pp > 1:
            self.engine.total_loss = None
            out = self.engine.eval_batch(self._pipe_items(batches), compute_loss=True, reduce_output=None,
                                         bcast_loss=False, num_micro_batches=len(batches))
            if self.last:
                local = float(sum(float(x) for x in out))
        else:
            self.engine.eval()
            with torch.no_grad():
                local = sum(float(self.engine(*self._tensors(b))) for b in batches)
            self.engine.train()
        return self._sum(local)

    def _sum(self, x: float) -> float:
        if self.info.world_size == 1:
            return x
        from mpi4py import MPI

        return self.comm.allreduce(x, op=MPI.SUM)

    def trainable_parameters(self) -> dict:
        """Trainable and frozen parameter counts of the whole model (every stage, one replica)."""
        # A tied head is the embedding again: count it once, on the first stage.
        params = [p for n, p in self.model.named_parameters()
                  if not (n == "output.weight" and self.cfg.tie_embeddings and self.model.tok_embeddings is None)]
        mine = [sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params if not p.requires_grad)]
        if self.info.world_size > 1:
            rows = self.comm.allgather((self.replica, mine))
            mine = [sum(m[i] for r, m in rows if r == 0) for i in range(2)]
        return {"trainable": mine[0], "frozen": mine[1]}

    @property
    def lr(self) -> float:
        return self.engine.get_lr()[0]

    def grad_norm(self) -> float | None:
        g = self._grad_norm if self.own_clip else self.engine.get_global_grad_norm()
        return None if g is None else float(g)

    # --- checkpoints ----------------------------------------------------------------

    def save(self, ckpt_dir: str, step: int, keep: int) -> None:
        """Write checkpoint step-NNNNNNN on every rank, then publish it (the protocol: end of this file)."""
        tag = f"step-{step:07d}"
        tag_dir = os.path.join(ckpt_dir, tag)
        rank = self.info.rank
        if rank == 0:
            os.makedirs(ckpt_dir, exist_ok=True)
            if os.path.lexists(tag_dir):  # a torn save of this step, left before the run resumed from an older one
                shutil.rmtree(tag_dir)
        self.comm.Barrier()
        _test_die_at("before-save", rank, step)
        with _recording_saves(self.engine, rank, step) as written, contextlib.redirect_stdout(io.StringIO()):
            # save_latest=False: DeepSpeed's rank 0 would write `latest` without knowing that the others finished.
            self.engine.save_checkpoint(ckpt_dir, tag=tag, client_state={"step": step}, save_latest=False)
        files, problem = {}, None
        try:
            for path in written:
                fsync_path(path)
                files[os.path.relpath(path, tag_dir)] = os.path.getsize(path)
            fsync_path(tag_dir)
        except OSError as e:
            problem = f"rank {rank}: {e.filename}: {e.strerror}"
        _test_die_at("after-files", rank, step)
        parts = self.comm.gather((files, problem), root=0)
        if rank == 0:
            problem = next((p for _, p in parts if p), None)
            if problem is None:
                try:
                    self._publish(ckpt_dir, tag, step, parts, keep)
                except OSError as e:
                    problem = f"rank 0: {e.filename}: {e.strerror}"
        problem = self.comm.bcast(problem, root=0)
        if problem:
            raise HpcLlamaError(f"checkpoint {tag_dir} could not be written ({problem})")

    def _publish(self, ckpt_dir: str, tag: str, step: int, parts, keep: int) -> None:
        """Rank 0, once every rank's files are durable: the completion marker, then `latest`, then retention."""
        from ..atomic import open_atomic, write_json_atomic

        tag_dir = os.path.join(ckpt_dir, tag)
        listed = {name: {"size": size, "rank": r} for r, (files, _) in enumerate(parts) for name, size in files.items()}
        write_json_atomic(os.path.join(tag_dir, MARKER), {
            "format": MARKER_FORMAT, "version": 1, "tag": tag, "step": step, "world_size": self.info.world_size,
            "pp": self.pp, "dp": self.dp, "zero": self.zero, "dtype": str(self.dtype), "files": listed})
        fsync_path(ckpt_dir)  # the tag directory's own entry, before `latest` can name it
        _test_die_at("after-marker", 0, step)
        with open_atomic(os.path.join(ckpt_dir, "latest")) as f:
            f.write(tag)
        _test_die_at("after-latest", 0, step)
        if keep > 0:
            tags = checkpoint_tags(ckpt_dir)
            complete = {t for t in tags if t == tag or checkpoint_problem(os.path.join(ckpt_dir, t)) is None}
            for old in retention_victims(tags, complete, keep):
                shutil.rmtree(os.path.join(ckpt_dir, old), ignore_errors=True)

    def load(self, ckpt_dir: str) -> tuple[int, str | None]:
        """Restore the newest complete checkpoint, chosen by rank 0 for every rank.

        Returns the number of steps it had done and, when newer checkpoints
        were incomplete and passed over, a line saying so; (0, None) when there
        is no checkpoint at all. Checkpoints that exist but none complete: an error.
        """
        choice = None
        if self.info.rank == 0:
            try:
                choice = (*choose_checkpoint(ckpt_dir), None)
            except HpcLlamaError as e:
                choice = (None, None, str(e))
        tag, notice, error = self.comm.bcast(choice, root=0)
        if error:
            raise HpcLlamaError(error)
        if tag is None:
            return 0, None
        with contextlib.redirect_stdout(io.StringIO()):
            path, state = self.engine.load_checkpoint(ckpt_dir, tag=tag)
        if path is None:
            raise HpcLlamaError(f"{os.path.join(ckpt_dir, tag)}: DeepSpeed could not load this checkpoint")
        return int(state["step"]), notice

    # --- export ---------------------------------------------------------------------

    def export_items(self, merged: bool):
        """(name, tensor) of this rank's slice for a layout-independent checkpoint, module by module.

        merged folds LoRA adapters into their weights; otherwise only the
        adapters are given. A tied model's head is the embedding, written once
        by the first stage. Under ZeRO-3 each module's parameters are gathered
        around its turn, which every rank must take part in.
        """
        from ..model.lora import LoRALinear

        zero3 = self.zero == 3 and self.pp == 1
        skip_head = self.cfg.tie_embeddings and self.model.tok_embeddings is None
        for mod_name, module in self.model.named_modules():
            params = dict(module.named_parameters(recurse=False))
            if not params:
                continue
            gather = contextlib.nullcontext()
            if zero3:
                import deepspeed

                gather = deepspeed.zero.GatheredParameters(list(params.values()))
            with gather:
                for pname, p in params.items():
                    name = f"{mod_name}.{pname}" if mod_name else pname
                    if name == "output.weight" and skip_head:
                        continue
                    if isinstance(module, LoRALinear) and merged and pname.startswith("lora_"):
                        continue
                    if not merged and not pname.startswith("lora_"):
                        continue
                    if isinstance(module, LoRALinear) and merged and pname == "weight":
                        p = module.merged_weight()
                    yield name, p.detach().cpu().contiguous()


def stream_export(trainer: Trainer, writer, merged: bool) -> None:
    """Rank 0 writes every stage's tensors, stage by stage, one tensor in memory at a time.

    Each stage's replica-0 rank streams its tensors to rank 0
    (parallel.collectives.send_tensors). With ZeRO-3 every rank takes part in
    gathering each module in turn.
    """
    from ..parallel.collectives import recv_tensors, send_tensors

    comm, info = trainer.comm, trainer.info
    zero3 = trainer.zero == 3 and trainer.pp == 1
    for stage in range(trainer.pp):
        owner = stage * trainer.dp  # replica 0 of the stage
        if info.rank == owner == 0 or (zero3 and info.rank == 0):
            for name, t in trainer.export_items(merged):
                writer.add(name, t)
        elif info.rank == owner:
            send_tensors(comm, 0, ((name, [t], None) for name, t in trainer.export_items(merged)))
        elif zero3:
            for _ in trainer.export_items(merged):  # every rank takes part in gathering each module
                pass
        elif info.rank == 0:
            for name, (t,), _ in recv_tensors(comm, owner):
                writer.add(name, t)
        comm.Barrier()


# --- training checkpoints that survive a kill ------------------------------------------------
#
# The protocol (Trainer.save): every rank writes its DeepSpeed files into
# checkpoints/step-NNNNNNN/ (DeepSpeed never writes `latest`: save_latest=False)
# and fsyncs them and the directory; the ranks then report their files and
# sizes to rank 0 (a gather), and only then rank 0 writes complete.json in the
# tag directory (every file, its size and the rank that wrote it), fsyncs,
# and atomically replaces `latest`. A checkpoint without its marker, or with a
# listed file missing or of another size, is incomplete: a kill at any moment
# leaves the previous complete checkpoint as it was. Resuming takes the newest
# complete checkpoint (choose_checkpoint); retention never deletes it.

MARKER = "complete.json"
MARKER_FORMAT = "hpc_llama.train_checkpoint"
_TAG = re.compile(r"step-(\d+)")


@contextlib.contextmanager
def _recording_saves(engine, rank: int, step: int):
    """The paths this rank's DeepSpeed engine writes while the block runs.

    Every checkpoint file DeepSpeed writes (module, layer, optimiser and ZeRO
    partition files) goes through engine.checkpoint_engine.save; recording it
    tells each rank which files are its own, which a directory listing of the
    shared tag directory cannot.
    """
    ce = engine.checkpoint_engine
    original, written = ce.save, []

    def save(state_dict, path):
        original(state_dict, path)
        written.append(path)
        if len(written) == 1:
            _test_die_at("mid-files", rank, step)

    ce.save = save
    try:
        yield written
    finally:
        del ce.save


def _test_die_at(point: str, rank: int, step: int) -> None:
    """Test hook, inert unless HPC_LLAMA_TEST_DIE_AT=POINT:RANK:STEP is set: that rank SIGKILLs itself at that
    point of that step's save, so tests/test_hostile_train.py tears a save exactly where it means to. Points, in
    order: before-save, mid-files (after its first file), after-files (all fsynced, not yet reported), and rank
    0's after-marker and after-latest (before retention)."""
    if os.environ.get("HPC_LLAMA_TEST_DIE_AT") == f"{point}:{rank}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def checkpoint_tags(ckpt_dir: str) -> list[str]:
    """The step-NNNNNNN directories in ckpt_dir, newest (highest step) first."""
    try:
        names = os.listdir(ckpt_dir)
    except FileNotFoundError:
        return []
    return _newest_first(n for n in names if _TAG.fullmatch(n) and os.path.isdir(os.path.join(ckpt_dir, n)))


def _newest_first(tags) -> list[str]:
    return sorted(tags, key=lambda t: int(_TAG.fullmatch(t)[1]), reverse=True)


def checkpoint_problem(tag_dir: str) -> str | None:
    """Why the checkpoint in tag_dir is incomplete, or None: its marker is there and lists files all present,
    each of the size its rank wrote."""
    if not os.path.isdir(tag_dir):
        return "its directory is missing"
    try:
        with open(os.path.join(tag_dir, MARKER)) as f:
            marker = json.load(f)
    except FileNotFoundError:
        return f"no {MARKER}: its save was interrupted"
    except (OSError, ValueError) as e:
        return f"unreadable {MARKER}: {e}"
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT or not marker.get("files"):
        return f"{MARKER} is not a {MARKER_FORMAT} marker"
    for name, entry in sorted(marker["files"].items()):
        try:
            size = os.path.getsize(os.path.join(tag_dir, name))
        except OSError:
            return f"rank {entry['rank']}'s {name} is missing"
        if size != entry["size"]:
            return f"rank {entry['rank']}'s {name} has {size} bytes, not {entry['size']}"
    return None


def choose_checkpoint(ckpt_dir: str) -> tuple[str | None, str | None]:
    """The tag to resume from: the newest complete checkpoint, and a line naming the newer incomplete ones
    passed over (None if none was). (None, None): no checkpoint at all, start from scratch.

    `latest` is only a pointer for people and DeepSpeed's tools: a checkpoint
    whose marker was written is complete even if a kill came before `latest`
    moved. A `latest` naming a missing directory counts as an incomplete one.
    """
    tags = checkpoint_tags(ckpt_dir)
    try:
        with open(os.path.join(ckpt_dir, "latest")) as f:
            latest = f.read().strip()
    except OSError:
        latest = ""
    if _TAG.fullmatch(latest) and latest not in tags:
        tags = _newest_first([*tags, latest])
    passed = []
    for tag in tags:
        problem = checkpoint_problem(os.path.join(ckpt_dir, tag))
        if problem is None:
            if not passed:
                return tag, None
            return tag, f"{_incomplete(passed)}; resuming from {tag}"
        passed.append((tag, problem))
    if not passed:
        return None, None
    raise HpcLlamaError(f"{ckpt_dir}: no complete checkpoint to resume from: {_incomplete(passed)} (remove the "
                        f"directory, or use --overwrite instead of --resume, to start over)")


def _incomplete(passed) -> str:
    if len(passed) == 1:
        return f"checkpoint {passed[0][0]} is incomplete ({passed[0][1]})"
    shown = "; ".join(f"{t}: {p}" for t, p in passed[:3]) + (f"; {len(passed) - 3} more" if len(passed) > 3 else "")
    return f"checkpoints {', '.join(t for t, _ in passed)} are incomplete ({shown})"


def retention_victims(tags: list[str], complete: set[str], keep: int) -> list[str]:
    """Which tags (newest first) to delete so that the newest `keep` complete ones stay.

    Incomplete tags older than the newest complete one go; newer ones stay
    (a later save of that step replaces them). With no complete tag nothing
    goes: the only complete checkpoint is never deleted.
    """
    if keep <= 0 or not complete & set(tags):
        return []
    newest = next(i for i, t in enumerate(tags) if t in complete)
    kept, victims = 0, []
    for i, t in enumerate(tags):
        if t in complete:
            kept += 1
            if kept > keep:
                victims.append(t)
        elif i > newest:
            victims.append(t)
    return victims
