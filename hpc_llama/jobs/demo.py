"""Show the whole product on this machine, offline, on 2 ranks, and write a report.

    hpc-llama demo [--out hpc-llama-demo] [--ranks 2]

Each step is a plain `hpc-llama` command (printed before it runs, so it can be
repeated by hand); the demo only strings them together and collects numbers:
  1. init     a ~100M-parameter Llama (seeded) as one HDF5 checkpoint
  2. inspect  its config, sizes and 2-stage split; verify every checksum
  3. convert  to an HF directory and back, and compare bit for bit
  4. check    under mpirun: 2 pipeline stages, each rank reading only its own
              layers straight from the HF directory, logits against the whole model
  5. check    under mpirun: 2 data-parallel replicas from the HDF5 file
  6. score    documents (token ids: the model is random and has no tokenizer)
              under mpirun as 2 pipeline stages, and again in one process:
              the same numbers, in input order, with a summary beside them
"""

from __future__ import annotations


def add_arguments(p):
    p.add_argument("--out", default="hpc-llama-demo", help="directory for everything the demo writes")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks for the parallel steps")
    p.add_argument("--config", default="bench-100m", help="model preset to initialise")
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
        steps.append({"title": title, "command": shown, "seconds": round(seconds, 2), "output": p.stdout})
        return p.stdout

    model = os.path.join(out, "model.h5")
    hf = os.path.join(out, "model-hf")
    back = os.path.join(out, "model-roundtrip.h5")
    step("initialise a model", [exe, "init", "--config", args.config, model, "--seed", "0", "--force"])
    step("inspect and verify it", [exe, "inspect", model, "--pp", str(args.ranks), "--verify"])
    step("convert to an HF directory", [exe, "convert", model, hf, "--format", "hf", "--force"])
    step("convert back to HDF5", [exe, "convert", hf, back, "--force"])
    a = json.loads(step("summary of the original", [exe, "inspect", model, "--json"], show_output=False))
    b = json.loads(step("summary of the round trip", [exe, "inspect", back, "--json"], show_output=False))
    same = _checksums(model) == _checksums(back)
    print(f"round trip HDF5 -> HF -> HDF5: {'bit-identical' if same else 'DIFFERENT'} "
          f"({a['tensors']} tensors, {a['bytes'] / 1e6:.0f} MB)")
    if not same or a["bytes"] != b["bytes"]:
        raise HpcLlamaError("the converted checkpoint differs from the original")
    pipe = step(f"{args.ranks} pipeline stages reading the HF directory in place",
                [mpirun, "-n", str(args.ranks), exe, "check", "--model", hf, "--pp", str(args.ranks)])
    data = step(f"{args.ranks} data-parallel replicas reading the HDF5 file",
                [mpirun, "-n", str(args.ranks), exe, "check", "--model", model, "--pp", "1"])
    docs = os.path.join(out, "documents.jsonl")
    _token_documents(docs, a["config"]["vocab_size"])
    step(f"score on {args.ranks} pipeline stages", [mpirun, "-n", str(args.ranks), exe, "score", "--model", model,
         "--input", docs, "--output", os.path.join(out, "scores-pp.jsonl"), "--pp", str(args.ranks), "--overwrite"])
    step("score in one process", [exe, "score", "--model", model, "--input", docs,
                                  "--output", os.path.join(out, "scores-1.jsonl"), "--overwrite", "--quiet"])
    diff = _max_loglik_difference(os.path.join(out, "scores-pp.jsonl"), os.path.join(out, "scores-1.jsonl"))
    with open(os.path.join(out, "scores-pp.jsonl.summary.json")) as f:
        summary = json.load(f)
    print(f"scored {summary['documents']} documents ({summary['tokens']} tokens) at {summary['tokens_per_s_this_run']:.0f} "
          f"tokens/s on {args.ranks} stages; largest difference from one process: {diff:.2e}")
    report = os.path.join(out, "report.md")
    with open(report, "w") as f:
        f.write("# hpc-llama demo\n\n")
        f.write(f"Model: `{args.config}` preset, {a['parameters'] / 1e6:.1f}M parameters, seed 0.\n\n")
        f.write("| step | seconds | command |\n|---|---|---|\n")
        for s in steps:
            f.write(f"| {s['title']} | {s['seconds']} | `{s['command']}` |\n")
        f.write(f"\nRound trip HDF5 -> HF -> HDF5: {'bit-identical' if same else 'different'}.\n\n")
        for title, text in (("Pipeline check", pipe), ("Data-parallel check", data)):
            f.write(f"## {title}\n\n```\n{text.strip()}\n```\n\n")
        f.write(f"## Scoring\n\n{summary['documents']} documents, {summary['tokens']} tokens, corpus perplexity "
                f"{summary['corpus_ppl']:.1f} (a random model: about the vocabulary size), "
                f"{summary['tokens_per_s_this_run']:.0f} tokens/s on {args.ranks} pipeline stages, padding waste "
                f"{summary['padding_waste']:.1%}. Largest |loglik| difference between {args.ranks} stages and one "
                f"process: {diff:.2e}.\n")
    print(f"\nwrote {report}\noutputs in {out}: model.h5, model-hf/, model-roundtrip.h5, documents.jsonl, "
          f"scores-pp.jsonl (+ .summary.json), scores-1.jsonl, report.md")
    return 0


def _checksums(path: str) -> dict:
    from ..checkpoint import open_checkpoint

    with open_checkpoint(path) as r:
        return {n: r.info(n).checksum for n in r.names()}


def _token_documents(path: str, vocab: int, n: int = 64) -> None:
    import json

    import numpy as np

    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for i in range(n):
            length = int(np.clip(rng.lognormal(np.log(60), 0.8), 1, 400))
            f.write(json.dumps({"id": f"doc-{i}", "input_ids": rng.integers(3, vocab, length).tolist()}) + "\n")


def _max_loglik_difference(a: str, b: str) -> float:
    import json

    with open(a) as fa, open(b) as fb:
        return max(abs(json.loads(x)["loglik"] - json.loads(y)["loglik"]) for x, y in zip(fa, fb))
