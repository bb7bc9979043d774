"""Generation throughput: our KV-cache ring against transformers' generate, and 2 stages against 1.

    python benchmarks/generate.py [--new-tokens 64] [--repeats 3] [--out benchmarks/results/generate.json]

One process, in turns, on the same ~100M-parameter random Llama (bench-100m,
fp32), greedy, 8 prompts of 24-120 tokens, each continued by exactly
--new-tokens tokens (no EOS):
  ours       RingGenerator, 1 rank: batch 8 (all prompts in 8 slots) and batch 1
             (one prompt at a time);
  reference  LlamaForCausalLM.generate(do_sample=False): batch 8 left-padded
             with an attention mask, and batch 1.
New tokens/s counts generated tokens over wall time, prefill included; each
side runs --repeats times in turns and the median counts. Both
produce the same tokens (checked, batch 1). Then `hpc-llama generate` on 2
ranks as a 2-stage pipeline against the 1-rank job, with each stage's
utilisation (time computing / wall time).
Goal (issue #6): ours / reference >= 1.0 at batch 8.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from common import ROOT, save_result  # noqa: E402  (benchmarks/common.py, beside this script)


def ours(model, info, prompts, new_tokens, batch, capacity):
    from hpc_llama.config import GenerateConfig
    from hpc_llama.generate.engine import RingGenerator
    from hpc_llama.generate.sampling import Prompt

    cfg = GenerateConfig(max_new_tokens=new_tokens, batch_size=batch, groups=1)
    ring = RingGenerator(model, info, 1, cfg, None, (), capacity, torch.float32)
    items = [Prompt(i, i, tuple(p)) for i, p in enumerate(prompts)]
    t0 = time.perf_counter()
    out = []
    for k in range(0, len(items), batch):
        out += ring.run(items[k:k + batch])
    seconds = time.perf_counter() - t0
    return seconds, [r["tokens"] for r in sorted(out, key=lambda r: r["index"])]


def reference(model, prompts, new_tokens, batch):
    t0 = time.perf_counter()
    out = []
    with torch.inference_mode():
        for k in range(0, len(prompts), batch):
            part = prompts[k:k + batch]
            T = max(len(p) for p in part)
            ids = torch.zeros(len(part), T, dtype=torch.long)
            mask = torch.zeros(len(part), T, dtype=torch.long)
            for j, p in enumerate(part):  # left padding, as generate wants
                ids[j, T - len(p):] = torch.tensor(p)
                mask[j, T - len(p):] = 1
            g = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                               min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            out += g[:, T:].tolist()
    return time.perf_counter() - t0, out


def job(n, pp, model_path, prompts_path, out, new_tokens):
    bin_dir = os.path.dirname(sys.executable)
    subprocess.run([os.path.join(bin_dir, "mpirun"), "-n", str(n), os.path.join(bin_dir, "hpc-llama"), "generate",
                    "--model", model_path, "--input", prompts_path, "--output", out, "--pp", str(pp), "--dtype", "fp32",
                    "--max-new-tokens", str(new_tokens), "--batch-size", "8", "--overwrite", "--quiet"],
                   check=True, env=dict(os.environ, DS_ACCELERATOR="cpu"))
    with open(out + ".summary.json") as f:
        s = json.load(f)
    return {"ranks": n, "pp": pp, "new_tokens_per_s": s["new_tokens_per_s"], "wall_s": s["wall_s"],
            "utilisation": [r["utilisation"] for r in s["ranks"]]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, in turns; the median counts")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "generate.json"))
    args = ap.parse_args()

    from transformers import LlamaForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.h5 import write_checkpoint
    from hpc_llama.checkpoint.hf import write_hf
    from hpc_llama.checkpoint.slices import load_slice
    from hpc_llama.checkpoint.views import InitReader
    from hpc_llama.config import load_sections
    from hpc_llama.parallel.ranks import RankInfo

    # No EOS: every prompt gets exactly --new-tokens tokens on both sides.
    cfg = load_sections("bench-100m", ["model.eos_ids=[]"])["model"]
    tmp = tempfile.mkdtemp(prefix="hpc-llama-gen-bench-")
    path, hf = os.path.join(tmp, "m.h5"), os.path.join(tmp, "hf")
    write_checkpoint(path, InitReader(cfg, seed=0))
    with open_checkpoint(path) as r:
        write_hf(hf, r)
        model = load_slice(r)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(24, 121, 8)]
    prompts_path = os.path.join(tmp, "p.jsonl")
    with open(prompts_path, "w") as f:
        for p in prompts:
            f.write(json.dumps({"input_ids": p}) + "\n")
    ref_model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    info = RankInfo()
    capacity = max(len(p) for p in prompts) + args.new_tokens
    ours(model, info, prompts[:2], 4, 2, capacity)  # warm-up, both sides
    reference(ref_model, prompts[:2], 4, 2)

    rows = {}
    for batch in (8, 1):
        times = {"ours": [], "reference": []}
        for _ in range(args.repeats):  # in turns, so a slow spell of the machine hits both sides
            o_s, o_tok = ours(model, info, prompts, args.new_tokens, batch, capacity)
            r_s, r_tok = reference(ref_model, prompts, args.new_tokens, batch)
            times["ours"].append(o_s)
            times["reference"].append(r_s)
        o_s, r_s = float(np.median(times["ours"])), float(np.median(times["reference"]))
        total = len(prompts) * args.new_tokens
        rows[f"batch_{batch}"] = {"ours_tokens_per_s": round(total / o_s, 1), "reference_tokens_per_s": round(total / r_s, 1),
                                  "ours_vs_reference": round(r_s / o_s, 3),
                                  "same_tokens": o_tok == r_tok}
    del ref_model, model
    one = job(1, 1, path, prompts_path, os.path.join(tmp, "g1.jsonl"), args.new_tokens)
    two = job(2, 2, path, prompts_path, os.path.join(tmp, "g2.jsonl"), args.new_tokens)
    two["vs_1_rank"] = round(two["new_tokens_per_s"] / one["new_tokens_per_s"], 3)
    result = {"benchmark": "generate", "parameters": cfg.n_params, "prompts": len(prompts),
              "prompt_tokens": [len(p) for p in prompts], "new_tokens_each": args.new_tokens,
              "threads": torch.get_num_threads(), **rows, "job_1_rank": one, "job_pp2": two,
              "note": "the 1-rank job runs 2 torch threads, each of the 2 pipeline ranks 1: the same 2 cores",
              "goals": {"ours_vs_reference_batch_8": 1.0}}
    save_result(result, args.out)


if __name__ == "__main__":
    main()
