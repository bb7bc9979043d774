"""Shared fixtures: tiny random HF Llama models (the numerical reference), a tokenizer, a prepared
corpus and a Slurm cluster. How to run commands is in tests/helpers/run.py."""

from __future__ import annotations

import glob
import os
import shutil

import pytest
import torch

from helpers.models import HF_CONFIGS, make_hf_model
from helpers.run import run_cli

STDLIB = os.path.dirname(os.__file__)


@pytest.fixture(scope="session")
def hf_dirs(tmp_path_factory):
    """name -> directory of a saved random HF model (config.json + model.safetensors)."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for name in HF_CONFIGS:
        path = root / name
        make_hf_model(name).save_pretrained(path)
        out[name] = str(path)
    return out


@pytest.fixture(scope="session")
def hf_models(hf_dirs):
    from transformers import AutoModelForCausalLM

    return {n: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for n, d in hf_dirs.items()}


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> str:
    """A real byte-level BPE tokenizer.json (320 ids, like the tiny models), trained on stdlib text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(os.path.join(STDLIB, "*.py")))[:40]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tok.save(str(path))
    return str(path)


@pytest.fixture(scope="session")
def text_model(hf_dirs, tokenizer_json, tmp_path_factory):
    """The llama3-style random HF model with a real tokenizer beside it, read in place (jobs only read it)."""
    d = tmp_path_factory.mktemp("text-model") / "hf"
    shutil.copytree(hf_dirs["llama3"], d)
    shutil.copy(tokenizer_json, d / "tokenizer.json")
    return str(d)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    """Real text: 40 modules of the Python standard library, tokenized with a BPE trained on them.

    Prepared once for the session: the training, hostile-training and Slurm tests only read it (a test that
    damages a shard damages a copy)."""
    d = tmp_path_factory.mktemp("corpus")
    files = sorted(glob.glob(os.path.join(STDLIB, "*.py")))[:40]
    for f in files:
        os.symlink(f, d / (os.path.basename(f) + ".txt"))
    data = tmp_path_factory.mktemp("data") / "data"
    run_cli("prepare", "--input", d, "--output", data, "--train-tokenizer", "512", "--split", "0.9,0.05,0.05",
            "--chunk-docs", "8", check=True, timeout=300)
    return str(d), str(data)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """A real two-node Slurm cluster (n1, n2 on localhost), started fresh for this test run."""
    from slurm_cluster import SlurmCluster, missing_tools

    missing = missing_tools()
    if missing:
        pytest.fail(f"Slurm is not installed ({', '.join(missing)} missing): `make test` installs it "
                    "(apt-get install slurmctld slurmd slurm-client munge)")
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


def pytest_collection_modifyitems(config, items):
    """GPU tests run where CUDA is; elsewhere they are skipped, saying why."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; this machine has none (the CPU tests cover the same logic)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
