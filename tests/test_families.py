"""Mistral, Qwen2/2.5, Qwen3 and Llama 3.2 through every job, against each family's own transformers class.

The model-level parity (logits, padded batches, KV-cache decode) is in test_model.py; here each family
goes through the jobs a user runs on it: inspect, score, generate, LoRA fine-tuning, compress and
convert both ways, and the export loads in transformers as the family's own class.
"""

import json
import os
import shutil

import pytest
import torch

from helpers.files import read_jsonl, write_jsonl
from helpers.models import FAMILIES, HF_CONFIGS, make_hf_model
from helpers.run import one_line_error, run_cli, run_job
from test_generate import write_prompts
from test_score import reference_scores

# Longer than every family's sliding window (12 and 16), so windows slide in every job.
CONTEXT, STRIDE = 48, 40
PROMPTS = ["def main(", "import os\nimport sys\n\nclass Handler", "x = [", "for i in range(10):"]


@pytest.fixture(scope="module")
def family_dirs(tokenizer_json, tmp_path_factory):
    """name -> an HF directory of the family with the test tokenizer; its final norm is scaled so that
    greedy choices have margins far above fp32 noise (the same tokens on any layout)."""
    root = tmp_path_factory.mktemp("families")
    out = {}
    for name in FAMILIES:
        m = make_hf_model(name, seed=4)
        with torch.no_grad():
            m.model.norm.weight.mul_(30)
        m.config.bos_token_id, m.config.eos_token_id = 1, 2
        m.save_pretrained(root / name)
        shutil.copy(tokenizer_json, root / name / "tokenizer.json")
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    src = open(os.path.join(os.path.dirname(os.__file__), "argparse.py")).read()
    return write_jsonl(tmp_path_factory.mktemp("docs") / "docs.jsonl",
                       [{"id": i, "text": src[i * 700:i * 700 + n]} for i, n in enumerate([40, 300, 650, 5])])


@pytest.mark.parametrize("name", FAMILIES)
def test_score_and_generate_equal_the_family_class(name, family_dirs, docs, tmp_path):
    model = family_dirs[name]
    info = json.loads(run_cli("inspect", model, "--json", check=True).stdout)
    assert info["model_type"] == HF_CONFIGS[name].get("model_type", "llama")
    run_cli("score", "--model", model, "--input", docs, "--output", tmp_path / "s.jsonl", "--context", CONTEXT,
            "--stride", STRIDE, "--quiet", check=True)
    got = read_jsonl(tmp_path / "s.jsonl")
    want = reference_scores(model, docs, CONTEXT, STRIDE)
    assert max(r["n_tokens"] for r in got) > CONTEXT  # several windows
    for r, (n, ll) in zip(got, want):
        assert r["n_tokens"] == n and abs(r["loglik"] - ll) <= 1e-4 * max(n, 1)
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    run_cli("generate", "--model", model, "--input", prompts, "--output", tmp_path / "g.jsonl",
            "--max-new-tokens", "24", "--quiet", check=True)  # prompt + 24 tokens: past the window
    got = [r["tokens"] for r in read_jsonl(tmp_path / "g.jsonl")]
    assert got == greedy_reference(model, PROMPTS, 24)


def greedy_reference(model_dir, prompts, max_new):
    """Greedy tokens from the family's transformers class, one full forward per token (what generate's
    greedy search computes, without its per-step overhead): our KV-cache decode against no cache."""
    from tokenizers import Tokenizer
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
    out = []
    for p in prompts:
        ids = [m.config.bos_token_id] + tok.encode(p, add_special_tokens=False).ids
        new = []
        with torch.no_grad():
            while len(new) < max_new:
                new.append(int(m(torch.tensor([ids + new])).logits[0, -1].argmax()))
                if new[-1] == m.config.eos_token_id:
                    break
        out.append(new)
    return out


def test_pipeline_layouts_give_the_same_numbers(family_dirs, docs, tmp_path):
    # Qwen2 is the hardest case for a pipeline: tied embeddings across stages, the window on the top
    # layers only, biases. Scores and greedy tokens equal one rank's.
    model = family_dirs["qwen2"]
    common = ["--model", model, "--input", docs, "--context", CONTEXT, "--stride", STRIDE, "--quiet"]
    run_job(1, "score", *common, "--output", tmp_path / "one.jsonl", check=True)
    run_job(2, "score", *common, "--output", tmp_path / "pp.jsonl", "--pp", "2", check=True)
    for a, b in zip(read_jsonl(tmp_path / "one.jsonl"), read_jsonl(tmp_path / "pp.jsonl")):
        assert a["n_tokens"] == b["n_tokens"] and abs(a["loglik"] - b["loglik"]) <= 1e-4


@pytest.mark.parametrize("name", ["qwen2"])  # tied embeddings and biases: the most a fine-tune carries along
def test_lora_fine_tune_exports_the_family(name, family_dirs, tokenizer_json, tmp_path):
    from transformers import AutoModelForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    model = family_dirs[name]
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"prompt": f"Repeat: w{i}\n", "response": f" w{i}"}) + "\n"
                             for i in range(40)))
    run_cli("prepare", "--input", tasks, "--output", tmp_path / "sft", "--task", "--tokenizer", model,
            "--split", "0.8,0.2,0", check=True)
    run_cli("train", "--config", "smollm2-lora", "--data", tmp_path / "sft", "--init", model, "--out",
            tmp_path / "run", "--pp", "1", "--steps", "3", "--set", "train.export=merged", "--set",
            "train.seq_len=16", "--set", "train.eval_every=0", "--set", "train.eval_sequences=4", "--quiet",
            check=True)
    final = str(tmp_path / "run" / "final.h5")
    run_cli("convert", final, tmp_path / "hf", "--format", "hf", check=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(exported).__name__ == json.load(open(os.path.join(model, "config.json")))["architectures"][0]
    x = torch.randint(3, 320, (2, 40), generator=torch.Generator().manual_seed(1))
    with open_checkpoint(final) as r, open_checkpoint(model) as base, torch.no_grad():
        ours = load_slice(r)(x)
        assert (ours - exported(x).logits).abs().max() <= 1e-4
        assert (ours - load_slice(base)(x)).abs().max() > 1e-5  # the fine-tune changed the model


@pytest.mark.parametrize("name", FAMILIES)
def test_compress_keeps_the_family(name, family_dirs, docs, tmp_path):
    # Heads and FFN channels pruned, the rest int8: the dense export is the family's class again and
    # computes what our compressed checkpoint computes.
    from transformers import AutoModelForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    out = str(tmp_path / "c.h5")
    run_cli("compress", "--model", family_dirs[name], "--output", out, "--method", "prune-heads,prune-ffn,int8",
            "--head-prune", "0.5", "--ffn-prune", "0.25", "--quiet", check=True)
    run_cli("convert", out, tmp_path / "hf", "--format", "hf", "--dequantize", check=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert exported.config.model_type == HF_CONFIGS[name].get("model_type", "llama")
    assert exported.config.num_attention_heads == HF_CONFIGS[name]["num_attention_heads"] // 2
    x = torch.randint(3, 320, (2, 40), generator=torch.Generator().manual_seed(2))
    with open_checkpoint(out) as r, torch.no_grad():
        assert (load_slice(r)(x) - exported(x).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("change, needle", [
    ({"model_type": "gemma2"}, "model_type 'gemma2' is not supported (llama, mistral, qwen2, qwen3)"),
    ({"num_experts": 8}, "num_experts 8: mixture of experts is not supported"),
    ({"num_local_experts": 8}, "num_local_experts 8: mixture of experts is not supported"),
    ({"attn_logit_softcapping": 50.0}, "attention softcapping is not supported"),
    ({"final_logit_softcapping": 30.0}, "logit softcapping is not supported"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling type 'yarn' is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5"),
    ({"use_sliding_window": True, "layer_types": ["chunked_attention"] * 4}, "layer_types"),
    ({"sliding_window": 0, "use_sliding_window": True}, "sliding_window must be positive"),
])
def test_unsupported_architecture_options_are_refused_by_name(change, needle, family_dirs, docs, tmp_path):
    d = tmp_path / "m"
    shutil.copytree(family_dirs["qwen2"], d)
    cfg = json.load(open(d / "config.json"))
    json.dump({**cfg, **change}, open(d / "config.json", "w"))
    one_line_error(run_cli("score", "--model", d, "--input", docs, "--output", tmp_path / "s.jsonl", check=False),
                   needle)
    assert not os.path.exists(tmp_path / "s.jsonl")


def test_a_family_preset_initialises_and_exports_as_its_class(tmp_path):
    # Pretraining starts from a preset's shape: Qwen3-8B's options at a tiny size, seeded, exported as
    # Qwen3ForCausalLM with the same logits.
    from transformers import AutoModelForCausalLM

    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice

    tiny = [f"model.{k}={v}" for k, v in dict(vocab_size=320, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                               head_dim=32, ffn_dim=128, bos_id=1, eos_ids=[2]).items()]
    run_cli("init", "--config", "qwen3-8b", *[a for s in tiny for a in ("--set", s)], tmp_path / "m.h5",
            check=True)
    run_cli("convert", tmp_path / "m.h5", tmp_path / "hf", "--format", "hf", check=True)
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    assert type(exported).__name__ == "Qwen3ForCausalLM"
    x = torch.randint(3, 320, (2, 30), generator=torch.Generator().manual_seed(3))
    with open_checkpoint(str(tmp_path / "m.h5")) as r, torch.no_grad():
        assert r.config.qk_norm and r.config.model_type == "qwen3"
        assert (load_slice(r)(x) - exported(x).logits).abs().max() <= 1e-4


def test_qwen_tokenizer_without_bos_scores_and_prompts_as_lm_eval_and_transformers(family_dirs, docs, tmp_path):
    # Qwen's config.json names a BOS its tokenizer never uses (tokenizer_config.json: bos_token null):
    # lm-eval starts every rolling text from the tokenizer's EOS then, and transformers puts nothing
    # before a prompt. The model config alone would give both a BOS.
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = tmp_path / "qwen"
    shutil.copytree(family_dirs["qwen2"], d)
    json.dump({"bos_token": None, "eos_token": "</s>", "pad_token": "<pad>",
               "tokenizer_class": "PreTrainedTokenizerFast"}, open(d / "tokenizer_config.json", "w"))
    assert json.load(open(d / "config.json"))["bos_token_id"] == 1  # <s>, which the tokenizer never adds
    run_cli("score", "--model", d, "--input", docs, "--output", tmp_path / "s.jsonl", "--context", CONTEXT,
            "--quiet", check=True)  # windows that do not overlap, as lm-eval's loglikelihood_rolling
    got = [r for r in read_jsonl(tmp_path / "s.jsonl") if r["n_tokens"]]
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(d)
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=2, max_length=CONTEXT, device="cpu")
    texts = [r["text"] for r in read_jsonl(docs)]
    want = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (texts[r["index"]],), i)
                                     for i, r in enumerate(got)], disable_tqdm=True)
    assert lm.prefix_token_id == 2
    assert max(abs(r["loglik"] - w) for r, w in zip(got, want, strict=True)) <= 1e-4
    prompts = write_prompts(tmp_path / "p.jsonl", PROMPTS)
    run_cli("generate", "--model", d, "--input", prompts, "--output", tmp_path / "g.jsonl", "--max-new-tokens", "8",
            "--quiet", check=True)
    for r, p in zip(read_jsonl(tmp_path / "g.jsonl"), PROMPTS, strict=True):
        ids = tok(p, return_tensors="pt").input_ids
        assert ids[0, 0] != 1  # no BOS
        out = model.generate(ids, max_new_tokens=8, do_sample=False, pad_token_id=0, eos_token_id=2)
        assert r["tokens"] == out[0, ids.shape[1]:].tolist()
