"""Generation throughput: our KV-cache ring against transformers' generate and llama.cpp, and 2 stages against 1.

    python benchmarks/generate.py [--new-tokens 64] [--repeats 3] [--models bench-100m,smollm2-135m]
                                  [--out benchmarks/results/generate.json]

One process, in turns, per model: bench-100m (a ~100M-parameter random Llama)
and the embedded SmolLM2-135M (its GGUF dequantized), fp32, greedy, 8 prompts
of 24-120 tokens, each continued by exactly --new-tokens tokens (no EOS):
  ours        RingGenerator, 1 rank: batch 8 (all prompts in 8 slots) and
              batch 1 (one prompt at a time);
  reference   LlamaForCausalLM.generate(do_sample=False): batch 8 left-padded
              with an attention mask, and batch 1;
  llama.cpp   batch 1, the same weights written as an f32 GGUF (f32 KV cache),
              through llama-cpp-python when it is installed (not needed by CI:
              `pip install llama-cpp-python` builds llama.cpp for this CPU), one
              eval call per token and the argmax of its logits.
New tokens/s counts generated tokens over wall time, prefill included; each
side runs --repeats times in turns and the median counts. Ours and the
reference must produce the same tokens (checked at both batch sizes). Then,
on bench-100m, `hpc-llama generate` on 2 ranks as a 2-stage pipeline against
the 1-rank job, with each stage's utilisation (time computing / wall time).
Goals (issue #18): batch 1 >= 1.0x llama.cpp, batch 8 >= 2.5x the reference.
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

from common import ROOT, llama_gguf_writer, save_result  # noqa: E402  (benchmarks/common.py, beside this script)

GGUF_NAMES = {"attention.wq": "attn_q", "attention.wk": "attn_k", "attention.wv": "attn_v",
              "attention.wo": "attn_output", "feed_forward.w1": "ffn_gate", "feed_forward.w3": "ffn_up",
              "feed_forward.w2": "ffn_down", "attention_norm": "attn_norm", "ffn_norm": "ffn_norm"}


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


def write_f32_gguf(path, model) -> None:
    """Our weights as llama.cpp's converter writes an f32 llama GGUF: its names, its Q/K row order, a tied
    head left out. No vocabulary: the benchmark gives llama.cpp token ids."""
    import gguf

    cfg = model.cfg
    w = llama_gguf_writer(path, gguf.LlamaFileType.ALL_F32, n_layers=cfg.n_layers, context=cfg.max_seq_len, dim=cfg.dim,
                          ffn_dim=cfg.ffn_dim, n_heads=cfg.n_heads, n_kv_heads=cfg.n_kv_heads, head_dim=cfg.head_dim,
                          vocab=cfg.vocab_size, rope_theta=cfg.rope_theta, norm_eps=cfg.norm_eps)
    w.add_tokenizer_model("no_vocab")

    def permute(a, heads):  # llama.cpp rotates adjacent pairs; HF's layout rotates halves
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    for name, t in model.state_dict().items():
        a = t.detach().float().numpy()
        if name == "tok_embeddings.weight":
            out = "token_embd.weight"
        elif name == "norm.weight":
            out = "output_norm.weight"
        elif name == "output.weight":
            if cfg.tie_embeddings:
                continue
            out = "output.weight"
        else:
            _, layer, *part, kind = name.split(".")
            part = ".".join(part)
            out = f"blk.{layer}.{GGUF_NAMES[part]}.{kind}"
            if part == "attention.wq":
                a = permute(a, cfg.n_heads)
            elif part == "attention.wk":
                a = permute(a, cfg.n_kv_heads)
        w.add_tensor(out, np.ascontiguousarray(a, np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def llama_cpp_runner(path, capacity, threads):
    """A function generating greedily with llama.cpp (batch 1), or None when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    # f32 keys and values as ours (llama.cpp's default cache is f16)
    llm = llama_cpp.Llama(path, n_ctx=capacity, n_batch=512, n_threads=threads, n_threads_batch=threads, type_k=0, type_v=0,
                verbose=False)

    vocab = llm.n_vocab()

    def run(prompts, new_tokens):
        t0 = time.perf_counter()
        out = []
        for p in prompts:
            llm.reset()
            llm.eval(p)
            tokens = []
            while True:
                last = llama_cpp.llama_get_logits_ith(llm.ctx, -1)  # the binding keeps no logits itself
                tokens.append(int(np.argmax(np.ctypeslib.as_array(last, shape=(vocab,)))))
                if len(tokens) == new_tokens:
                    break
                llm.eval(tokens[-1:])
            out.append(tokens)
        return time.perf_counter() - t0, out

    run.close = llm.close
    return run


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


def matmul_floor(model, batch: int, repeats: int = 24) -> float:
    """Seconds of one decode step's matmuls alone (its projections, fused as the job runs them, and the
    head) at `batch` rows: what a step costs with no other work, the limit of torch's CPU kernels."""
    mods = []
    for block in model.layers.values():
        a, f = block.attention, block.feed_forward
        mods += [a.qkv or a.wq, a.wo, f.w13 or f.w1, f.w2]  # without fusing, the first of each group
    mods.append(model.output)
    xs = [torch.randn(batch, 1, m.weight.shape[1]) for m in mods]
    best = float("inf")
    with torch.inference_mode():
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(repeats):
                for m, x in zip(mods, xs):
                    m(x)
            best = min(best, (time.perf_counter() - t0) / repeats)
    return best


def load_model(name: str, tmp: str):
    """(our model, a transformers copy's directory, the checkpoint path): bench-100m freshly initialised, or the
    embedded SmolLM2 (its GGUF dequantized to fp32)."""
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.h5 import write_checkpoint
    from hpc_llama.checkpoint.hf import write_hf
    from hpc_llama.checkpoint.slices import load_slice
    from hpc_llama.checkpoint.views import InitReader
    from hpc_llama.config import load_sections
    from hpc_llama.embedded import resolve
    from hpc_llama.inference import ready_for_inference

    hf = os.path.join(tmp, f"{name}-hf")
    if name == "bench-100m":
        cfg = load_sections("bench-100m", ["model.eos_ids=[]"])["model"]  # no EOS: every prompt gets its tokens
        path = os.path.join(tmp, "bench-100m.h5")
        write_checkpoint(path, InitReader(cfg, seed=0))
    else:
        path = resolve(name)
    with open_checkpoint(path) as r:
        write_hf(hf, r)
        model = load_slice(r, dtype=torch.float32)
    ready_for_inference(model, pack=True)  # as `hpc-llama generate` does
    return model, hf, path


def compare(name, args, tmp, info):
    from transformers import LlamaForCausalLM

    model, hf, path = load_model(name, tmp)
    cfg = model.cfg
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, cfg.vocab_size, int(n)).tolist() for n in rng.integers(24, 121, 8)]
    ref_model = LlamaForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    # No EOS on either side: with one, min_new_tokens would mask it out of transformers' choices only.
    ref_model.generation_config.eos_token_id = None
    capacity = max(len(p) for p in prompts) + args.new_tokens
    ours(model, info, prompts[:2], 4, 2, capacity)  # warm-up, every side
    reference(ref_model, prompts[:2], 4, 2)
    gguf_path = os.path.join(tmp, f"{name}-f32.gguf")
    write_f32_gguf(gguf_path, model)
    llama = llama_cpp_runner(gguf_path, capacity, torch.get_num_threads())
    if llama is not None:
        llama(prompts[:1], 4)

    rows = {"parameters": cfg.n_params, "prompt_tokens": [len(p) for p in prompts]}
    total = len(prompts) * args.new_tokens
    for batch in (8, 1):
        sides = {"ours": [], "reference": []} | ({"llama_cpp": []} if llama and batch == 1 else {})
        for _ in range(args.repeats):  # in turns, so a slow spell of the machine hits every side
            o_s, o_tok = ours(model, info, prompts, args.new_tokens, batch, capacity)
            r_s, r_tok = reference(ref_model, prompts, args.new_tokens, batch)
            sides["ours"].append(o_s)
            sides["reference"].append(r_s)
            if "llama_cpp" in sides:
                l_s, l_tok = llama(prompts, args.new_tokens)
                sides["llama_cpp"].append(l_s)
        med = {k: float(np.median(v)) for k, v in sides.items()}
        row = {f"{k}_tokens_per_s": round(total / v, 1) for k, v in med.items()}
        row["ours_vs_reference"] = round(med["reference"] / med["ours"], 3)
        row["same_tokens_as_reference"] = o_tok == r_tok
        if "llama_cpp" in med:
            row["ours_vs_llama_cpp"] = round(med["llama_cpp"] / med["ours"], 3)
            # llama.cpp rounds differently (its own f32 kernels): a random model's near-ties can part ways
            row["llama_cpp_tokens_equal_to_ours"] = round(
                float(np.mean([a == b for x, y in zip(o_tok, l_tok) for a, b in zip(x, y)])), 3)
        floor = matmul_floor(model, batch)
        row["matmuls_alone_step_ms"] = round(floor * 1e3, 2)
        row["matmuls_alone_tokens_per_s"] = round(batch / floor, 1)  # decode only: no prefill in it
        rows[f"batch_{batch}"] = row
    if llama is not None:
        llama.close()
    else:
        rows["llama_cpp"] = "not installed (pip install llama-cpp-python)"
    return rows, path, prompts


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3, help="runs of each side, in turns; the median counts")
    ap.add_argument("--models", default="bench-100m,smollm2-135m")
    ap.add_argument("--no-jobs", action="store_true", help="skip the 1-rank / 2-stage job comparison")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "generate.json"))
    args = ap.parse_args()

    from hpc_llama.parallel.ranks import RankInfo

    tmp = tempfile.mkdtemp(prefix="hpc-llama-gen-bench-")
    atexit.register(shutil.rmtree, tmp, ignore_errors=True)  # models and documents: hundreds of MB
    info = RankInfo()
    result = {"benchmark": "generate", "new_tokens_each": args.new_tokens, "threads": torch.get_num_threads()}
    for name in args.models.split(","):
        result[name], path, prompts = compare(name, args, tmp, info)
        if name == "bench-100m" and not args.no_jobs:
            prompts_path = os.path.join(tmp, "p.jsonl")
            with open(prompts_path, "w") as f:
                for p in prompts:
                    f.write(json.dumps({"input_ids": p}) + "\n")
            one = job(1, 1, path, prompts_path, os.path.join(tmp, "g1.jsonl"), args.new_tokens)
            two = job(2, 2, path, prompts_path, os.path.join(tmp, "g2.jsonl"), args.new_tokens)
            two["vs_1_rank"] = round(two["new_tokens_per_s"] / one["new_tokens_per_s"], 3)
            result["job_1_rank"], result["job_pp2"] = one, two
    result["note"] = "the 1-rank job runs 2 torch threads, each of the 2 pipeline ranks 1: the same 2 cores"
    result["goals"] = {"ours_vs_llama_cpp_batch_1": 1.0, "ours_vs_reference_batch_8": 2.5, "pp2_vs_1_rank": 0.9}
    save_result(result, args.out)


if __name__ == "__main__":
    main()
