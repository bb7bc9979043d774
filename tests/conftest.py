"""Shared fixtures: tiny random HF Llama models (the numerical reference) and command runners."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)
MPIRUN = os.path.join(BIN, "mpirun")
# Every multi-rank command is bounded so that a hang fails the test instead of eating CI.
RUN_TIMEOUT = 240

# Tiny reference configurations in HF's own field names. Each exercises a
# different part of the architecture.
HF_CONFIGS = {
    # Llama 2 style: multi-head attention, default rope.
    "llama2": dict(vocab_size=320, hidden_size=64, intermediate_size=172, num_hidden_layers=4,
                   num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-5,
                   max_position_embeddings=256, rope_theta=10000.0),
    # Llama 3 style: grouped-query attention, theta 500000 and llama3 rope scaling
    # (original context 32 so the scaling changes frequencies the tests reach).
    "llama3": dict(vocab_size=320, hidden_size=64, intermediate_size=160, num_hidden_layers=4,
                   num_attention_heads=8, num_key_value_heads=2, rms_norm_eps=1e-5,
                   max_position_embeddings=512, rope_theta=500000.0,
                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 32}),
    # Tied embeddings, head_dim not equal to hidden/heads, linear rope scaling.
    "tied": dict(vocab_size=320, hidden_size=48, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-6,
                 max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
                 rope_scaling={"rope_type": "linear", "factor": 2.0}),
    # Biases on attention and MLP projections (some Llama derivatives).
    "bias": dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5,
                 max_position_embeddings=256, attention_bias=True, mlp_bias=True),
}


def make_hf_model(name: str, seed: int = 0, dtype=torch.float32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**HF_CONFIGS[name])).to(dtype).eval()
    # HF initialises norms to one; random norms make the parity tests see them.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.copy_(1 + 0.1 * torch.randn_like(p))
    return model


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
    from transformers import LlamaForCausalLM

    return {n: LlamaForCausalLM.from_pretrained(d, dtype=torch.float32).eval() for n, d in hf_dirs.items()}


def run_cli(*args, timeout=RUN_TIMEOUT, env=None, check=None):
    """Run `hpc-llama ARGS` in a process of its own; returns CompletedProcess (text).

    The process is forked from a server that has imported torch once
    (tests/cli_server.py); HPC_LLAMA_TEST_EXEC=1 starts each one from scratch.
    """
    cmd = [os.path.join(BIN, "hpc-llama"), *map(str, args)]
    return _run(cmd, timeout, env, check, forked=True)


class _CliServer:
    """The one fork server of this test session, started on first use."""

    proc = None
    # Read when torch or its OpenMP runtime loads, which the server did already:
    # a run that sets one of these starts from scratch.
    IMPORT_TIME = ("OMP_", "MKL_", "KMP_", "GOMP_", "TORCH_", "PYTHON", "LD_", "CUDA", "DS_ACCELERATOR")
    # Under mpirun (the --with-mpi runs) a child would inherit the launcher's PMI state: no server.
    LAUNCHED = ("PMI_RANK", "PMI_FD", "OMPI_COMM_WORLD_RANK", "SLURM_PROCID")

    @classmethod
    def usable(cls, env) -> bool:
        if os.environ.get("HPC_LLAMA_TEST_EXEC") or any(k in os.environ for k in cls.LAUNCHED):
            return False
        base = dict(os.environ, DS_ACCELERATOR="cpu")
        keys = {k for k in set(env) | set(base) if k.startswith(cls.IMPORT_TIME)}
        return all(env.get(k) == base.get(k) for k in keys)

    @classmethod
    def _start(cls):
        import atexit

        cls.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "cli_server.py")],
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=ROOT, bufsize=0,
                                    env=dict(os.environ, DS_ACCELERATOR="cpu"))
        atexit.register(cls.proc.stdin.close)  # end of input ends the server
        assert cls._reply(60).get("ready"), "the CLI fork server did not start"

    @classmethod
    def _reply(cls, timeout):
        import json
        import select

        if not select.select([cls.proc.stdout], [], [], timeout)[0]:
            return None
        line = cls.proc.stdout.readline()  # unbuffered: select() sees every reply still unread
        if not line:
            raise RuntimeError("the CLI fork server ended")
        return json.loads(line)

    @classmethod
    def run(cls, cmd, env, timeout):
        import json
        import signal
        import tempfile

        if cls.proc is None or cls.proc.poll() is not None:
            cls._start()
        with tempfile.TemporaryDirectory(prefix="cli-") as d:
            out, err = os.path.join(d, "stdout"), os.path.join(d, "stderr")
            req = {"argv0": cmd[0], "argv": cmd[1:], "env": env, "cwd": ROOT, "out": out, "err": err}
            data = (json.dumps(req) + "\n").encode()
            while data:
                data = data[cls.proc.stdin.write(data):]
            pid = cls._reply(60)["pid"]
            done = cls._reply(timeout)
            if done is None:  # as subprocess.run does on a timeout: kill, then raise
                os.kill(pid, signal.SIGKILL)
                cls._reply(60)
                raise subprocess.TimeoutExpired(cmd, timeout, cls._text(out), cls._text(err))
            return subprocess.CompletedProcess(cmd, done["rc"], cls._text(out), cls._text(err))

    @staticmethod
    def _text(path):
        """What the child wrote there; universal newlines, as subprocess.run(text=True) reads it."""
        return open(path, errors="replace").read() if os.path.exists(path) else ""


def run_mpi(n: int, *args, timeout=RUN_TIMEOUT, env=None, check=None):
    """Run `mpirun -n N ARGS` with the environment's MPI; bounded by `timeout`."""
    cmd = [MPIRUN, "-n", str(n), *map(str, args)]
    return _run(cmd, timeout, env, check)


def _run(cmd, timeout, env, check, forked=False):
    full_env = dict(os.environ, DS_ACCELERATOR="cpu", **(env or {}))
    if forked and _CliServer.usable(full_env):
        p = _CliServer.run(cmd, full_env, timeout)
    else:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    if check is not None and (p.returncode == 0) != check:
        raise AssertionError(f"{' '.join(cmd)} exited {p.returncode}\n--- stdout\n{p.stdout}\n--- stderr\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def tokenizer_json(tmp_path_factory) -> str:
    """A real byte-level BPE tokenizer.json (320 ids, like the tiny models), trained on stdlib text."""
    import glob

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    files = sorted(glob.glob(os.path.join(os.path.dirname(os.__file__), "*.py")))[:40]
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
