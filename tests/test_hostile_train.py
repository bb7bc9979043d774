"""Training checkpoints survive any kill: a rank SIGKILLed at each point of a checkpoint save leaves the previous
complete checkpoint, and `--resume` carries on from the newest complete one with the losses of an uninterrupted
run. The kill points come from the test hook HPC_LLAMA_TEST_DIE_AT=POINT:RANK:STEP (hpc_llama.train.trainer)."""

import json
import os
import shutil

import pytest

from hpc_llama.errors import HpcLlamaError
from hpc_llama.train.trainer import MARKER, MARKER_FORMAT, checkpoint_problem, choose_checkpoint, retention_victims

from helpers.files import metrics
from helpers.models import TINY
from helpers.run import one_line_error, run_job

# Checkpoints at steps 2, 4, 6 and 8, one kept: each save's retention is exercised too.
STEPS = 8
COMMON = [*TINY, "--pp", "2", "--steps", str(STEPS), "--set", "train.checkpoint_every=2",
          "--set", "train.keep_checkpoints=1", "--set", "train.eval_every=0", "--set", "train.eval_sequences=8"]


def _rows(run):
    return [(r["step"], r.get("loss"), r.get("val_loss")) for r in metrics(run)]


def _checkpoints(run):
    """What checkpoints/ holds, less the recovery scripts DeepSpeed copies there (zero_to_fp32.py...)."""
    return sorted(n for n in os.listdir(os.path.join(run, "checkpoints")) if not n.endswith(".py"))


def _latest(run):
    return open(os.path.join(run, "checkpoints", "latest")).read()


def _complete(run, step):
    return checkpoint_problem(os.path.join(run, "checkpoints", f"step-{step:07d}")) is None


def _notice(torn, back_to):
    return f"checkpoint step-{torn:07d} is incomplete (no complete.json: its save was interrupted); " \
           f"resuming from step-{back_to:07d}"


def test_a_run_killed_at_every_phase_of_a_save_ends_with_the_losses_of_an_uninterrupted_one(corpus, tmp_path):
    """Rank 0 or 1 SIGKILLed in four saves in a row, at each phase of the protocol; every --resume takes the
    newest complete checkpoint, says when it passes over a torn one, and the last one finishes the run."""
    data = corpus[1]
    run_job(2, "train", *COMMON, "--data", data, "--out", tmp_path / "whole", "--quiet")
    assert _checkpoints(tmp_path / "whole") == ["latest", "step-0000008"]
    marker = json.load(open(tmp_path / "whole" / "checkpoints" / "step-0000008" / MARKER))
    assert marker["world_size"] == 2 and {e["rank"] for e in marker["files"].values()} == {0, 1}

    run = tmp_path / "run"
    args = ["train", *COMMON, "--data", data, "--out", run, "--resume"]

    def killed_at(point):
        p = run_job(2, *args, env={"HPC_LLAMA_TEST_DIE_AT": point}, check=False)
        assert p.returncode != 0, p.stderr
        return p.stderr

    # 1. Rank 1 dies after its first file of step 4 while rank 0 writes on: the torn save of the issue.
    killed_at("mid-files:1:4")
    assert _complete(run, 2) and not _complete(run, 4) and _latest(run) == "step-0000002"

    # Nothing complete left (a file of step 2 cut short as well): the run refuses, in one line.
    bad = tmp_path / "bad"
    shutil.copytree(run, bad)
    cut = next(n for n in sorted(os.listdir(bad / "checkpoints" / "step-0000002")) if "optim" in n)
    with open(bad / "checkpoints" / "step-0000002" / cut, "r+b") as f:
        f.truncate(100)
    one_line_error(run_job(2, "train", *COMMON, "--data", data, "--out", bad, "--resume", check=False),
                   "no complete checkpoint to resume from", "step-0000004: no complete.json", f"{cut} has 100 bytes",
                   rank=0)

    # 2. Back to step 2, saying so; rank 0 dies after step 4's marker, before `latest` moves: step 4 is complete.
    err = killed_at("after-marker:0:4")
    assert _notice(4, 2) in err and "resuming after step 2 of 8" in err
    assert _complete(run, 4) and _latest(run) == "step-0000002"

    # 3. On from step 4; rank 1 dies with its files of step 6 written and fsynced, before it reports them.
    err = killed_at("after-files:1:6")
    assert "resuming after step 4 of 8" in err and "incomplete" not in err
    assert not _complete(run, 6)

    # 4. Back to step 4, saying so; rank 0 dies after `latest` moved to step 6, before retention.
    err = killed_at("after-latest:0:6")
    assert _notice(6, 4) in err and "resuming after step 4 of 8" in err
    assert _latest(run) == "step-0000006" and _checkpoints(run) == ["latest", "step-0000002", "step-0000004",
                                                                    "step-0000006"]

    # 5. On from step 6 to the end; the last save's retention clears what the kills left.
    p = run_job(2, *args, check=True)
    assert "resuming after step 6 of 8" in p.stderr and "incomplete" not in p.stderr
    assert _rows(run) == _rows(tmp_path / "whole")  # bit for bit in fp32
    assert _checkpoints(run) == ["latest", "step-0000008"] and _latest(run) == "step-0000008"


# --- choosing a checkpoint and retention, on made-up directories --------------------------------


def _tag(ckpt, step, files=None, marker=True, written=None):
    """A checkpoint directory: files {name: (rank, size)} as listed in its marker; `written` overrides the sizes
    on disk (None: a file is missing)."""
    files = files if files is not None else {"mp_rank_00_model_states.pt": (0, 8), "mp_rank_01_model_states.pt": (1, 5)}
    d = ckpt / f"step-{step:07d}"
    d.mkdir(parents=True)
    for name, (rank, size) in files.items():
        size = (written or {}).get(name, size)
        if size is not None:
            (d / name).write_bytes(b"x" * size)
    if marker:
        (d / MARKER).write_text(json.dumps({"format": MARKER_FORMAT, "version": 1, "tag": d.name, "step": step,
                                            "files": {n: {"rank": r, "size": s} for n, (r, s) in files.items()}}))
    return d


def test_what_makes_a_checkpoint_incomplete(tmp_path):
    assert checkpoint_problem(_tag(tmp_path, 1)) is None
    assert checkpoint_problem(_tag(tmp_path, 2, marker=False)) == "no complete.json: its save was interrupted"
    assert checkpoint_problem(_tag(tmp_path, 3, written={"mp_rank_01_model_states.pt": None})) == \
        "rank 1's mp_rank_01_model_states.pt is missing"
    assert checkpoint_problem(_tag(tmp_path, 4, written={"mp_rank_00_model_states.pt": 3})) == \
        "rank 0's mp_rank_00_model_states.pt has 3 bytes, not 8"
    (_tag(tmp_path, 5) / MARKER).write_text('{"format": "hpc_llama.train_checkp')
    assert checkpoint_problem(tmp_path / "step-0000005").startswith("unreadable complete.json")
    assert checkpoint_problem(tmp_path / "step-0000006") == "its directory is missing"


def test_choosing_the_checkpoint_to_resume_from(tmp_path):
    ckpt = tmp_path / "checkpoints"
    assert choose_checkpoint(str(ckpt)) == (None, None)  # nothing at all: start from scratch
    _tag(ckpt, 8)
    _tag(ckpt, 10)
    (ckpt / "latest").write_text("step-0000008")
    # A marker makes a checkpoint complete, even if the kill came before `latest` moved.
    assert choose_checkpoint(str(ckpt)) == ("step-0000010", None)
    _tag(ckpt, 12, marker=False)
    (ckpt / "latest").write_text("step-0000014")  # naming a directory that is gone
    tag, notice = choose_checkpoint(str(ckpt))
    assert tag == "step-0000010"
    assert notice == ("checkpoints step-0000014, step-0000012 are incomplete (step-0000014: its directory is "
                      "missing; step-0000012: no complete.json: its save was interrupted); resuming from step-0000010")
    # Step numbers, not names, order the tags: step-10000000 is newer than step-9999999.
    _tag(ckpt, 9_999_999)
    _tag(ckpt, 10_000_000)
    assert choose_checkpoint(str(ckpt))[0] == "step-10000000"
    for d in ckpt.glob("step-*"):
        (d / MARKER).unlink(missing_ok=True)
    with pytest.raises(HpcLlamaError, match="no complete checkpoint to resume from: checkpoints step-10000000, "
                       r"step-9999999, step-0000014, step-0000012, step-0000010, step-0000008 are incomplete \("):
        choose_checkpoint(str(ckpt))


@pytest.mark.parametrize("tags, complete, keep, victims", [
    ("9 8 7 6", "9 8 7 6", 2, "7 6"),
    ("9 8 7 6", "9 8 7 6", 0, ""),           # keep 0: keep everything
    ("9 8 7 6", "9 7", 1, "8 7 6"),          # incomplete tags older than the newest complete one go
    ("9 8 7 6", "8 6", 1, "7 6"),            # a newer torn one stays (its step's next save replaces it)...
    ("9 8 7 6", "8 6", 2, "7"),              # ...and does not count as kept
    ("9 8 7", "", 1, ""),                    # nothing complete: nothing goes
    ("9 8 7", "7", 1, ""),                   # the only complete one is never deleted
])
def test_retention_keeps_the_newest_complete_checkpoints(tags, complete, keep, victims):
    assert retention_victims(tags.split(), set(complete.split()), keep) == victims.split()
