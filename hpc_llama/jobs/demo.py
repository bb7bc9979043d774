"""Show the whole product on this machine, offline, on 2 ranks, and write a report.

    hpc-llama demo [--out hpc-llama-demo] [--ranks 2] [--steps 300]

Each step is a plain `hpc-llama` command, printed before it runs so it can be
repeated by hand; the demo only strings them together and collects numbers:
  1. prepare  the Python standard library's top-level modules into token
              shards, with a BPE tokenizer trained on the train split
  2. train    a tiny Llama from scratch, 2 pipeline stages under mpirun
  3. inspect  the exported checkpoint; convert it to an HF directory and back,
              bit for bit
  4. check    2 stages reading the HF directory in place, logits against the
              whole model
  5. score    held-out code (the json and email packages, never trained on)
              on 2 stages, and again in one process: the same numbers
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("--out", default="hpc-llama-demo", help="directory for everything the demo writes")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks for the parallel steps")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps")
    p.add_argument("--force", action="store_true", help="reuse an existing output directory")


def run(args) -> int:
    import json
    import os
    import shutil
    import subprocess
    import sys
    import time

    from ..errors import HpcLlamaError
    from ..runtime import world_comm

    comm = world_comm()
    if comm is not None and comm.Get_size() > 1:
        raise HpcLlamaError("run the demo as one process: it starts mpirun itself for the parallel steps")
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.force:
        raise HpcLlamaError(f"{out} already exists (use --force to reuse it)")
    os.makedirs(out, exist_ok=True)
    bin_dir = os.path.dirname(sys.executable)
    exe = shutil.which("hpc-llama", path=bin_dir) or shutil.which("hpc-llama")
    mpirun = shutil.which("mpirun", path=bin_dir) or shutil.which("mpirun")
    if mpirun is None:
        raise HpcLlamaError("mpirun not found: install an MPI (pip install mpich) or put yours on PATH")
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    stdlib = os.path.dirname(os.__file__)
    steps = []

    def step(title, cmd, show_output=True):
        shown = " ".join(os.path.relpath(c) if c.startswith(out) else c for c in cmd)
        shown = shown.replace(exe, "hpc-llama").replace(mpirun, "mpirun")
        print(f"\n== {title}\n$ {shown}", flush=True)
        t0 = time.perf_counter()
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
        seconds = time.perf_counter() - t0
        if show_output or p.returncode != 0:
            print(p.stdout.rstrip(), flush=True)
        if p.returncode != 0:
            raise HpcLlamaError(f"demo step '{title}' failed (exit {p.returncode}); its output is above")
        steps.append({"title": title, "command": shown, "seconds": round(seconds, 1)})
        return p.stdout

    mpi = [mpirun, "-n", str(args.ranks), exe]
    data, run_dir = os.path.join(out, "data"), os.path.join(out, "pretrain")
    model, hf, back = os.path.join(run_dir, "final.h5"), os.path.join(out, "model-hf"), os.path.join(out, "roundtrip.h5")
    step("prepare the standard library", [exe, "prepare", "--input", os.path.join(stdlib, "*.py"), "--output", data,
                                          "--train-tokenizer", "2048", "--split", "0.9,0.05,0.05", "--skip-bad", "--force"])
    step(f"pretrain a tiny Llama on {args.ranks} pipeline stages",
         [*mpi, "train", "--config", "tiny-train", "--data", data, "--out", run_dir, "--pp", str(args.ranks),
          "--steps", str(args.steps), "--force"])
    step("inspect and verify the result", [exe, "inspect", model, "--pp", str(args.ranks), "--verify"])
    step("convert to an HF directory", [exe, "convert", model, hf, "--format", "hf", "--force"])
    step("convert back to HDF5", [exe, "convert", hf, back, "--force"])
    same = _checksums(model) == _checksums(back)
    print(f"round trip HDF5 -> HF -> HDF5: {'bit-identical' if same else 'DIFFERENT'}")
    if not same:
        raise HpcLlamaError("the converted checkpoint differs from the original")
    check = step(f"{args.ranks} stages reading the HF directory in place",
                 [*mpi, "check", "--model", hf, "--pp", str(args.ranks)])
    held_out = [os.path.join(stdlib, "json", "*.py"), os.path.join(stdlib, "email", "*.py")]
    scores = os.path.join(out, "scores.jsonl")
    step(f"score held-out code on {args.ranks} stages",
         [*mpi, "score", "--model", model, "--input", *held_out, "--output", scores, "--pp", str(args.ranks),
          "--context", "256", "--overwrite"])
    step("score it in one process", [exe, "score", "--model", model, "--input", *held_out, "--output",
                                     os.path.join(out, "scores-1.jsonl"), "--context", "256", "--overwrite", "--quiet"])
    diff = _max_loglik_difference(scores, os.path.join(out, "scores-1.jsonl"))
    with open(scores + ".summary.json") as f:
        summary = json.load(f)
    with open(os.path.join(run_dir, "test.json")) as f:
        test = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    _report(out, args, steps, rows, val, test, summary, diff, check, same)
    print(f"\ntrained {args.steps} steps: validation loss {val[0][1]:.2f} -> {val[-1][1]:.2f} nats/token "
          f"(unigram baseline {test['unigram_baseline']:.2f}); held-out perplexity {summary['corpus_ppl']:.1f} "
          f"over {summary['tokens']} tokens (largest difference from one process {diff:.1e})")
    print(f"wrote {os.path.join(out, 'report.md')} and {os.path.join(run_dir, 'loss.png')}")
    return 0


def _report(out, args, steps, rows, val, test, summary, diff, check, same):
    import math
    import os

    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("# hpc-llama demo\n\n![loss](pretrain/loss.png)\n\n")
        f.write("| step | seconds | command |\n|---|---|---|\n")
        for s in steps:
            f.write(f"| {s['title']} | {s['seconds']} | `{s['command']}` |\n")
        f.write(f"\n## Pretraining\n\n{args.steps} steps on {args.ranks} pipeline stages; final train loss "
                f"{rows[-1]['loss']:.3f}. Validation loss (nats/token) by step: "
                + ", ".join(f"{s}: {v:.3f}" for s, v in val)
                + f". Test loss {test['test_loss']:.3f} (perplexity {test['test_ppl']:.1f}) against the unigram "
                f"baseline {test['unigram_baseline']:.3f} (perplexity {math.exp(test['unigram_baseline']):.0f}).\n")
        f.write(f"\n## Checkpoint\n\nRound trip HDF5 -> HF -> HDF5: {'bit-identical' if same else 'different'}.\n\n"
                f"```\n{check.strip()}\n```\n")
        f.write(f"\n## Scoring held-out code\n\n{summary['documents']} modules of the json and email packages, "
                f"{summary['tokens']} tokens: corpus perplexity {summary['corpus_ppl']:.1f}, "
                f"{summary['tokens_per_s_this_run']:.0f} tokens/s on {args.ranks} stages, padding waste "
                f"{summary['padding_waste']:.1%}. Largest |loglik| difference from one process: {diff:.1e}.\n")


def _checksums(path: str) -> dict:
    from ..checkpoint import open_checkpoint

    with open_checkpoint(path) as r:
        return {n: r.info(n).checksum for n in r.names()}


def _max_loglik_difference(a: str, b: str) -> float:
    import json

    with open(a) as fa, open(b) as fb:
        return max(abs(json.loads(x)["loglik"] - json.loads(y)["loglik"]) for x, y in zip(fa, fb))
