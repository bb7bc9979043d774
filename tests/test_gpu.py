"""The CUDA path: device per local rank, NCCL, bf16. Skipped on machines without a GPU."""

import json

import pytest
import torch

from helpers.files import read_jsonl
from helpers.run import run_cli, run_job

pytestmark = pytest.mark.gpu


def test_rank_takes_the_gpu_of_its_local_rank():
    from hpc_llama.parallel.ranks import describe_rank

    info = describe_rank(comm=None, environ={}, cuda_count=torch.cuda.device_count())
    assert info.device == "cuda:0"


def test_score_on_gpu_matches_cpu(tmp_path, hf_dirs, tokenizer_json):
    import shutil

    shutil.copytree(hf_dirs["llama3"], tmp_path / "hf")
    shutil.copy(tokenizer_json, tmp_path / "hf" / "tokenizer.json")
    docs = tmp_path / "d.jsonl"
    docs.write_text("".join(json.dumps({"text": "gpu check " * (i + 1)}) + "\n" for i in range(20)))
    common = ["--model", tmp_path / "hf", "--input", docs, "--quiet", "--dtype", "fp32"]
    run_cli("score", *common, "--output", tmp_path / "cpu.jsonl", env={"HPC_LLAMA_DEVICE": "cpu"}, check=True)
    run_cli("score", *common, "--output", tmp_path / "gpu.jsonl", check=True)
    a, b = read_jsonl(tmp_path / "cpu.jsonl"), read_jsonl(tmp_path / "gpu.jsonl")
    assert len(a) == len(b) == 20
    assert max(abs(x["loglik"] - y["loglik"]) for x, y in zip(a, b)) <= 1e-3
    summary = json.load(open(str(tmp_path / "gpu.jsonl") + ".summary.json"))
    assert summary["layout"]["device"] == "cuda:0"


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for a 2-stage NCCL pipeline")
def test_nccl_pipeline_in_bf16(tmp_path, hf_dirs):
    p = run_job(2, "check", "--model", hf_dirs["llama3"], "--pp", "2", "--dtype", "bf16")
    assert "cuda:0" in p.stdout and "cuda:1" in p.stdout


def test_packed_int4_weights_run_on_the_gpu_in_bf16(tmp_path, hf_dirs):
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice
    from hpc_llama.model.quantized import QuantizedLinear

    out = tmp_path / "q.h5"
    run_cli("compress", "--model", hf_dirs["llama3"], "--output", out, "--method", "int4", "--group-size", "16",
            "--embeddings", check=True)
    x = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with open_checkpoint(str(out)) as r, torch.no_grad():
        cpu = load_slice(r, dtype=torch.float32)(x)
        model = load_slice(r, device="cuda:0", dtype=torch.bfloat16)
        gpu = model(x.cuda()).float().cpu()
    packed = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert packed and all(m.qweight.device.type == "cuda" and m.qweight.dtype == torch.uint8 for m in packed)
    assert (gpu - cpu).abs().max().item() < 0.1  # bf16 activations against fp32
