"""`hpc-llama prepare` and `hpc-llama train` for real: DeepSpeed engines under mpirun, on real text."""

import glob
import json
import os
import signal
import subprocess
import time

import h5py
import numpy as np
import pytest
import torch

from hpc_llama.train.trainer import default_zero

from helpers.files import metrics
from helpers.models import TINY
from helpers.run import HPC, MPIRUN, ROOT, one_line_error, run_job

STDLIB = os.path.dirname(os.__file__)


# --- prepare ------------------------------------------------------------------------------


def test_prepare_is_the_same_on_any_number_of_ranks(corpus, tmp_path):
    text_dir, data = corpus
    other = tmp_path / "data2"
    run_job(2, "prepare", "--input", text_dir, "--output", other, "--tokenizer", os.path.join(data, "tokenizer.json"),
            "--split", "0.9,0.05,0.05", "--chunk-docs", "8")
    a, b = json.load(open(os.path.join(data, "manifest.json"))), json.load(open(other / "manifest.json"))
    assert a["shards"] == b["shards"] and a["totals"] == b["totals"] and len(a["shards"]) == 5
    for s in a["shards"]:
        assert open(os.path.join(data, s["file"]), "rb").read() == open(other / s["file"], "rb").read()
    assert a["totals"]["val"]["documents"] >= 1 and a["train_unigram_entropy"] > 4


def test_task_data_puts_the_loss_on_the_response(corpus, tmp_path):
    _, data = corpus
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Repeat: word{i}\n", "response": f"word{i}"}) + "\n" for i in range(60)))
    out = tmp_path / "sft"
    run_job(1, "prepare", "--input", tasks, "--output", out, "--task", "--tokenizer",
            os.path.join(data, "tokenizer.json"), "--split", "0.8,0.2,0")
    from hpc_llama.tokenizer import Tokenizer
    from hpc_llama.train.data import SplitData, load_manifest

    m = load_manifest(str(out))
    assert m["kind"] == "task"
    tok = Tokenizer(open(os.path.join(data, "tokenizer.json"), "rb").read(), 512)
    train = SplitData(str(out), m, "train")
    tokens, mask = train.document(0)
    assert tokens[0] == m["bos_id"] and tokens[-1] == m["eos_id"]
    answer = tok.decode(tokens[mask.astype(bool)][:-1])
    assert answer.startswith("word") and tok.decode(tokens[1:][~mask[1:]]).startswith("Repeat: word")


@pytest.mark.parametrize("args, needle", [
    (["--split", "0.9,0.2,0.1"], "sum to 1.2"),
    (["--input-empty"], "nothing to train on"),
])
def test_prepare_bad_input(corpus, tmp_path, args, needle):
    _, data = corpus
    inp = tmp_path / "in.jsonl"
    inp.write_text('{"text": ""}\n{"text": ""}\n' if "--input-empty" in args else '{"text": "hello"}\n')
    extra = [a for a in args if a != "--input-empty"]
    one_line_error(run_job(1, "prepare", "--input", inp, "--output", tmp_path / "out", "--tokenizer",
                           os.path.join(data, "tokenizer.json"), *extra, check=False), needle)
    assert not os.path.exists(tmp_path / "out") and not os.path.exists(tmp_path / ".out.partial")


# --- the same maths for every layout --------------------------------------------------------


def _layout_args(data):
    return [*TINY, "--data", data, "--steps", "4", "--set", "train.eval_every=0", "--set", "train.eval_sequences=8",
            "--quiet"]


@pytest.fixture(scope="module")
def one_rank_run(corpus, tmp_path_factory):
    """One rank, PP 1, ZeRO-1 (DeepSpeed's optimiser, clipping and gradient norm): what every layout reproduces."""
    run = tmp_path_factory.mktemp("layout-ref") / "ref"
    run_job(1, "train", *_layout_args(corpus[1]), "--out", run, "--pp", "1", "--zero", "1")
    return metrics(run)


@pytest.fixture(scope="module")
def one_rank_losses(one_rank_run):
    return [r["loss"] for r in one_rank_run]


def check_first_losses(run, ref, layout):
    """A run's first 4 losses are the one-rank reference's; a longer run shares them, since the learning rate
    warms up over the first 5 steps whatever the total and each step's sequences depend on the step alone."""
    got = [r["loss"] for r in metrics(run)][:4]
    print(f"{layout}: losses {got} vs {ref}")
    assert len(got) == 4
    assert np.allclose(got, ref, rtol=1e-5, atol=0)
    assert got[-1] < got[0]


# The two pipeline layouts (PP 2 and PP 2 x DP 2, ZeRO-1) are checked on the longer runs below, which
# train on them anyway: one start of the 4-rank run instead of two.
@pytest.mark.parametrize("n, pp, zero", [(2, 1, 2), (2, 1, 3), (1, 1, None)])
def test_first_losses_agree_across_layouts(corpus, one_rank_losses, tmp_path, n, pp, zero):
    _, data = corpus
    run_job(n, "train", *_layout_args(data), "--out", tmp_path / "run", "--pp", pp,
            *(["--zero", zero] if zero is not None else []))
    check_first_losses(tmp_path / "run", one_rank_losses, f"PP {pp} x DP {n // pp}, ZeRO-{'default' if zero is None else zero}")


def test_one_fp32_process_trains_without_zero_and_reports_the_same_gradient_norms(corpus, one_rank_run, tmp_path):
    """Unset, the ZeRO stage of one process in fp32 is 0: we clip with torch's clip_grad_norm_ and report its
    norm, which must be DeepSpeed's ZeRO-1 norm and clipping (the losses after clipped steps agree too)."""
    _, data = corpus
    run = tmp_path / "run"
    run_job(1, "train", *_layout_args(data), "--out", run, "--set", "train.grad_clip=0.5")
    ref = tmp_path / "ref"
    run_job(1, "train", *_layout_args(data), "--out", ref, "--set", "train.grad_clip=0.5", "--zero", "1")
    assert json.load(open(run / "config.json"))["zero"] == 0
    got, want = metrics(run), metrics(ref)
    print("gradient norms:", [r["grad_norm"] for r in got], "vs ZeRO-1", [r["grad_norm"] for r in want])
    assert all(r["grad_norm"] > 0.5 for r in want[:2])  # the limit really clips
    assert np.allclose([r["grad_norm"] for r in got], [r["grad_norm"] for r in want], rtol=1e-5, atol=0)
    assert np.allclose([r["loss"] for r in got], [r["loss"] for r in want], rtol=1e-5, atol=0)


@pytest.mark.parametrize("pp, dp, dtype, zero", [
    (1, 1, torch.float32, 0), (1, 2, torch.float32, 1), (2, 1, torch.float32, 1), (1, 1, torch.bfloat16, 1),
])
def test_default_zero_stage(pp, dp, dtype, zero):
    assert default_zero(pp, dp, dtype) == zero


# --- learning, export, resume ----------------------------------------------------------------


# 60 steps on 2 pipeline stages, evaluated every 20; no checkpoint on the way (the signal test's is the signal's).
PIPELINE = [*TINY, "--pp", "2", "--steps", "60", "--set", "train.eval_every=20", "--set", "train.checkpoint_every=100",
            "--quiet"]


@pytest.fixture(scope="module")
def pipeline_run(corpus, tmp_path_factory):
    """PIPELINE under mpirun -n 2, uninterrupted."""
    _, data = corpus
    run = tmp_path_factory.mktemp("pp2") / "run"
    run_job(2, "train", *PIPELINE, "--data", data, "--out", run)
    return str(run)


def test_first_losses_agree_under_a_pipeline(pipeline_run, one_rank_losses):
    check_first_losses(pipeline_run, one_rank_losses, "PP 2 x DP 1, ZeRO-1")


def test_validation_loss_falls_under_a_pipeline(pipeline_run, corpus):
    rows = metrics(pipeline_run)
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    baseline = json.load(open(os.path.join(corpus[1], "manifest.json")))["train_unigram_entropy"]
    print(f"validation losses {val}, unigram baseline {baseline:.3f}")
    assert len(val) == 3 and val[0] > val[1] > val[2]
    assert val[-1] < baseline
    assert [r["step"] for r in rows] == list(range(1, 61))
    assert all(r["grad_norm"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["lr"] < rows[4]["lr"] and rows[59]["lr"] < rows[10]["lr"]  # warm-up, then decay
    test = json.load(open(os.path.join(pipeline_run, "test.json")))
    assert test["test_loss"] < baseline and test["trainable_parameters"]["frozen"] == 0
    assert os.path.getsize(os.path.join(pipeline_run, "loss.png")) > 10_000
    assert glob.glob(os.path.join(pipeline_run, "tensorboard", "events.out.tfevents.*"))


@pytest.fixture(scope="module")
def pipeline_dp_run(corpus, tmp_path_factory):
    """20 steps under mpirun -n 4 --pp 2 (two replicas of a 2-stage pipeline), evaluated every 10: the loss is
    still falling fast there, so a shorter run shows learning as well as 40 steps did."""
    run = tmp_path_factory.mktemp("pp2dp2") / "run"
    run_job(4, "train", *TINY, "--data", corpus[1], "--out", run, "--pp", "2", "--steps", "20",
            "--set", "train.eval_every=10", "--quiet")
    return str(run)


def test_first_losses_agree_with_pipeline_and_data_parallel(pipeline_dp_run, one_rank_losses):
    check_first_losses(pipeline_dp_run, one_rank_losses, "PP 2 x DP 2, ZeRO-1")


def test_validation_loss_falls_with_pipeline_and_data_parallel(pipeline_dp_run):
    val = [r["val_loss"] for r in metrics(pipeline_dp_run) if r.get("val_loss") is not None]
    assert len(val) == 2 and val[1] < val[0]


def test_export_at_another_pipeline_degree_scores_like_the_trained_model(pipeline_run, corpus, tmp_path):
    """The exported .h5, scored on 4 stages, gives the test loss the run measured on its 2 stages in memory."""
    from hpc_llama.train.data import SplitData, load_manifest, read_sequence, sequence_count

    data = corpus[1]
    test = SplitData(data, load_manifest(data), "test")
    seqs = [read_sequence(test, i, 64) for i in range(sequence_count(test, 64))]
    docs = tmp_path / "test.jsonl"
    docs.write_text("".join(json.dumps({"input_ids": [int(x) for x in s[0]] + [int(s[1][-1])]}) + "\n" for s in seqs))
    run_job(4, "score", "--model", os.path.join(pipeline_run, "final.h5"), "--input", docs, "--output",
            tmp_path / "s.jsonl", "--pp", "4", "--context", "64", "--quiet")
    recs = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    scored = -sum(r["loglik"] for r in recs) / sum(r["n_tokens"] for r in recs)
    measured = json.load(open(os.path.join(pipeline_run, "test.json")))["test_loss"]
    assert scored == pytest.approx(measured, rel=1e-5)


def test_export_on_demand_from_the_last_checkpoint(pipeline_run, corpus, tmp_path):
    import shutil

    run = tmp_path / "copy"
    shutil.copytree(pipeline_run, run)
    os.remove(run / "final.h5")
    run_job(2, "train", *PIPELINE, "--data", corpus[1], "--out", run, "--resume", "--export-only")
    assert (run / "final.h5").read_bytes() == open(os.path.join(pipeline_run, "final.h5"), "rb").read()


def _interrupt(cmd, run, after_steps, how):
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, DS_ACCELERATOR="cpu"))
    import psutil

    deadline = time.monotonic() + 180
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if len(metrics(run)) >= after_steps:
                break
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "train" in " ".join(c.cmdline())]
    assert proc.poll() is None and len(ranks) == 2, "the run ended before it could be interrupted"
    targets = ranks[1:] if how == "usr1-one-rank" else ranks
    for r in targets:
        r.send_signal(signal.SIGUSR1 if how.startswith("usr1") else signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    return proc.returncode, err


# SIGUSR1 to one rank only: the others learn of it at the next step and all stop together. SIGTERM to
# every rank (a preemption) is tested through Slurm's own `scontrol requeue` in test_slurm.py.
# The uninterrupted run to equal is pipeline_run: the same flags, already run for the tests above.
@pytest.mark.parametrize("how", ["usr1-one-rank"])
def test_signal_checkpoint_and_resume_give_the_same_losses(corpus, pipeline_run, tmp_path, how):
    _, data = corpus
    run = tmp_path / "cut"
    cmd = [MPIRUN, "-n", "2", HPC, "train", *map(str, PIPELINE), "--data", data, "--out", str(run), "--resume"]
    code, err = _interrupt(cmd, run, 6, how)
    assert code == 0, err  # a signal is a clean stop: Slurm requeues, nothing failed
    done = len(metrics(run))
    assert 6 <= done < 60 and "checkpoint saved" in err
    run_job(2, *cmd[4:])
    whole = [(r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(pipeline_run)]
    resumed = [(r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(run)]
    assert resumed == whole  # bit for bit in fp32


def test_bf16_trains(corpus, tmp_path):
    _, data = corpus
    run_job(2, "train", *TINY, "--data", data, "--out", tmp_path / "run", "--pp", "2", "--steps", "8",
            "--dtype", "bf16", "--set", "train.eval_every=0", "--set", "train.eval_sequences=8", "--quiet")
    losses = [r["loss"] for r in metrics(tmp_path / "run")]
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    with h5py.File(tmp_path / "run" / "final.h5") as f:
        assert f["tensors/layers.0.attention.wq.weight"].attrs["dtype"] == "bfloat16"


# --- LoRA -------------------------------------------------------------------------------------


def test_lora_fine_tune_beats_the_base_model(pipeline_run, corpus, tmp_path):
    _, data = corpus
    base = os.path.join(pipeline_run, "final.h5")
    words = sorted({w for w in open(os.path.join(STDLIB, "os.py")).read().split() if w.isidentifier()})[:300]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Repeat: {w}\n", "response": f" {w}"}) + "\n" for w in words))
    sft = tmp_path / "sft"
    run_job(1, "prepare", "--input", tasks, "--output", sft, "--task", "--tokenizer", base, "--split", "0.8,0.2,0")
    run = tmp_path / "lora"
    run_job(2, "train", *TINY, "--data", sft, "--init", base, "--out", run, "--pp", "2", "--lora", "8",
            "--steps", "15", "--set", "train.lr=0.01", "--set", "train.eval_every=15", "--quiet")
    rows = metrics(run)
    assert rows[0]["step"] == 0  # the base model, before any step
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    print(f"task validation loss: base {val[0]:.3f} -> {val[-1]:.3f}")
    assert val[-1] < val[0] - 0.1
    test = json.load(open(run / "test.json"))
    assert test["trainable_parameters"]["trainable"] < 0.2 * test["trainable_parameters"]["frozen"]
    # Merged export: adapted projections changed, everything else is the base, bit for bit.
    with h5py.File(base) as b, h5py.File(run / "final.h5") as m:
        for name in b["tensors"]:
            same = np.array_equal(b["tensors"][name][()], m["tensors"][name][()])
            assert same == (not name.endswith(("wq.weight", "wk.weight", "wv.weight", "wo.weight"))), name


def test_lora_adapters_alone(pipeline_run, corpus, tmp_path):
    _, data = corpus
    run = tmp_path / "lora"
    run_job(2, "train", *TINY, "--data", data, "--init", os.path.join(pipeline_run, "final.h5"), "--out", run,
            "--pp", "2", "--lora", "4", "--steps", "3", "--set", "train.export=adapters", "--set", "train.eval_every=0",
            "--set", "train.lora_targets=[wq,wk,wv,wo,w2]",
            "--set", "train.eval_sequences=4", "--quiet")
    with h5py.File(run / "adapters.h5") as f:
        names = list(f["tensors"])
    assert names and all(n.endswith((".lora_a", ".lora_b")) for n in names)
    assert len(names) == 4 * 5 * 2  # 4 layers x (wq wk wv wo, and the MLP's w2) x (A, B)


# --- bad input ------------------------------------------------------------------------------


def test_bad_training_input_fails_cleanly(corpus, pipeline_run, tmp_path):
    _, data = corpus
    base = os.path.join(pipeline_run, "final.h5")
    out = tmp_path / "run"
    cases = [
        (1, ["--init", base, "--set", "model.n_layers=6"], ["model disagrees with --init", "n_layers is 6"]),
        (2, ["--pp", "1", "--set", "train.global_batch=20"], ["not divisible by micro-batch 4 x 2"]),
        (2, ["--pp", "2", "--zero", "2"], ["ZeRO-2 cannot be combined with a pipeline"]),
    ]
    for n, extra, needles in cases:
        p = run_job(n, "train", *TINY, "--data", data, "--out", out, *extra, check=False)
        one_line_error(p, *needles, rank=0 if n > 1 else None)
        assert not out.exists()
    # Resuming into a run of another config.
    p = run_job(1, "train", *TINY, "--data", data, "--out", pipeline_run, "--resume", "--set", "train.lr=0.001", check=False)
    one_line_error(p, "belongs to a run with a different sections")


def test_corrupt_token_shard_is_refused(corpus, tmp_path):
    import shutil

    _, data = corpus
    bad = tmp_path / "data"
    shutil.copytree(data, bad)
    shard = bad / "shard-000000.h5"
    with h5py.File(shard, "r") as f:
        offset = f["train/tokens"].id.get_offset()
    with open(shard, "r+b") as f:
        f.seek(offset + 10)
        f.write(b"\xff\xff")
    p = run_job(1, "train", *TINY, "--data", bad, "--out", tmp_path / "run", check=False)
    one_line_error(p, "checksum mismatch in train/tokens")
    assert not (tmp_path / "run").exists()
