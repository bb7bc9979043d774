"""Slice loading: time against a raw read of the same bytes, and peak memory per rank against the whole model.

    python benchmarks/load.py [--configs bench-100m] [--pp 4] [--repeat 5] [--out benchmarks/results/load.json]

For each stage of a P-way split this measures, in one process and in turns:
  ours  load_slice(): open the checkpoint, build the slice on the meta device,
        read each tensor into place and verify its xxh3 checksum;
  raw   pread of exactly the same byte ranges into preallocated buffers, with
        no HDF5, no checksum and no model -- the floor for reading those bytes.
Both are timed with the file in the page cache (warm) and, where the kernel
lets us drop it (posix_fadvise DONTNEED), from storage (cold).
Peak RSS is measured in a fresh process per stage, and for the whole model,
as the growth of the peak (VmHWM) over the process's size after its imports.
Goals (issue #3): ours/raw <= 1.2; stage RSS <= whole RSS x (1/P + 0.15).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from common import ROOT, save_result  # noqa: E402  (benchmarks/common.py, beside this script)


def drop_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def raw_read(path: str, ranges: list[tuple[int, int]]):
    """The floor: the same byte ranges, pread back to back into one fresh buffer."""
    import numpy as np

    fd = os.open(path, os.O_RDONLY)
    buf = np.empty(sum(n for _, n in ranges), np.uint8)  # fresh memory, as any loader must fill
    view, at = memoryview(buf), 0
    try:
        for offset, n in ranges:
            done = 0
            while done < n:
                done += os.preadv(fd, [view[at + done:at + n]], offset + done)
            at += n
    finally:
        os.close(fd)
    return buf


def settle() -> None:
    # Return freed memory to the kernel before each timed load, so both
    # contestants fault in fresh pages instead of one reusing the other's.
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def time_stage(path: str, plan, repeat: int, cold: bool) -> dict:
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.slices import load_slice, slice_sources

    with open_checkpoint(path) as r:
        infos = [r.info(n) for n in slice_sources(r, plan.layers, plan.embed, plan.head)]
    ranges = [(i.offset, i.nbytes) for i in infos]
    ours, raw = [], []
    for _ in range(repeat):
        for kind in ("ours", "raw"):  # interleaved, so drift hits both alike
            settle()
            if cold:
                drop_cache(path)
            t0 = time.perf_counter()
            if kind == "ours":
                r = open_checkpoint(path)
                model = load_slice(r, plan.layers, plan.embed, plan.head)
                ours.append(time.perf_counter() - t0)
                r.close()
            else:
                model = raw_read(path, ranges)
                raw.append(time.perf_counter() - t0)
            del model
    nbytes = sum(n for _, n in ranges)
    o, w = min(ours), min(raw)
    return {"bytes": nbytes, "ours_s": round(o, 4), "raw_s": round(w, 4), "ratio": round(o / w, 3),
            "ours_GBps": round(nbytes / o / 1e9, 2), "raw_GBps": round(nbytes / w / 1e9, 2)}


RSS_CHILD = r"""
import json, sys
from hpc_llama.checkpoint import open_checkpoint
from hpc_llama.checkpoint.slices import load_slice
from hpc_llama.config import ParallelConfig
from hpc_llama.parallel.layout import stage_plans
def status(key):
    # VmHWM, not ru_maxrss: ru_maxrss survives fork+exec and would report
    # the parent's peak.
    with open("/proc/self/status") as f:
        return int(next(l for l in f if l.startswith(key + ":")).split()[1]) * 1024
path, pp, stage = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = open_checkpoint(path)
import torch  # everything imported before the baseline
base = status("VmRSS")
if stage < 0:
    m = load_slice(r)
else:
    p = stage_plans(r.config, ParallelConfig(pp=pp, partition="balanced"))[stage]
    m = load_slice(r, p.layers, p.embed, p.head)
peak = status("VmHWM")
print(json.dumps({"growth": peak - base, "params_bytes": sum(t.nbytes for t in m.parameters())}))
"""


def rss_growth(path: str, pp: int, stage: int) -> dict:
    out = subprocess.run([sys.executable, "-c", RSS_CHILD, path, str(pp), str(stage)],
                         capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"the peak-memory child for stage {stage} failed:\n{out.stderr}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_config(name: str, pp: int, repeat: int) -> dict:
    from hpc_llama.checkpoint import open_checkpoint
    from hpc_llama.checkpoint.h5 import write_checkpoint
    from hpc_llama.checkpoint.views import InitReader
    from hpc_llama.config import ParallelConfig, load_sections
    from hpc_llama.parallel.layout import stage_plans

    cfg = load_sections(name)["model"]
    tmp = tempfile.mkdtemp(prefix="hpc-llama-bench-")
    path = os.path.join(tmp, "model.h5")
    try:
        write_checkpoint(path, InitReader(cfg, seed=0))
        with open_checkpoint(path) as r:
            total = sum(r.info(n).nbytes for n in r.names())
        cold_ok = True
        try:
            drop_cache(path)
        except OSError:
            cold_ok = False
        whole = rss_growth(path, pp, -1)
        stages = []
        for plan in stage_plans(cfg, ParallelConfig(pp=pp, partition="balanced")):
            row = {"stage": plan.stage, "layers": [plan.layers.start, plan.layers.stop],
                   "warm": time_stage(path, plan, repeat, cold=False)}
            if cold_ok:
                row["cold"] = time_stage(path, plan, repeat, cold=True)
            rss = rss_growth(path, pp, plan.stage)
            row["rss_growth"] = rss["growth"]
            row["rss_vs_whole"] = round(rss["growth"] / whole["growth"], 3)
            row["param_share"] = round(rss["params_bytes"] / whole["params_bytes"], 3)
            stages.append(row)
            print(json.dumps({"config": name, **row}), flush=True)
    finally:
        for f in os.listdir(tmp):
            os.remove(os.path.join(tmp, f))
        os.rmdir(tmp)
    return {
        "config": name, "parameters": cfg.n_params, "checkpoint_bytes": total, "pp": pp,
        "whole_model_rss_growth": whole["growth"], "stages": stages,
        "worst_warm_ratio": max(s["warm"]["ratio"] for s in stages),
        "worst_cold_ratio": max(s["cold"]["ratio"] for s in stages) if cold_ok else None,
        "worst_rss_vs_whole": max(s["rss_vs_whole"] for s in stages),
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", default="bench-100m,tinyllama-1.1b", help="comma-separated presets")
    ap.add_argument("--pp", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "load.json"))
    args = ap.parse_args()

    results = [bench_config(c, args.pp, args.repeat) for c in args.configs.split(",")]
    goal_rss = round(1 / args.pp + 0.15, 3)
    out = {"benchmark": "load", "pp": args.pp, "goals": {"ratio_max": 1.2, "rss_vs_whole_max": goal_rss},
           "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]}, "results": results}
    save_result(out, args.out, show=False)
    print("\n| model | stage | bytes | ours warm (s) | raw warm (s) | ours/raw warm | ours/raw cold | peak RSS vs whole model |")
    print("|---|---|---|---|---|---|---|---|")
    for res in results:
        for s in res["stages"]:
            cold = f"{s['cold']['ratio']:.2f}" if "cold" in s else "n/a"
            print(f"| {res['config']} ({res['parameters'] / 1e6:.0f}M) | {s['stage']} | {s['warm']['bytes'] / 1e6:.0f} MB "
                  f"| {s['warm']['ours_s']:.3f} | {s['warm']['raw_s']:.3f} | {s['warm']['ratio']:.2f} | {cold} "
                  f"| {s['rss_vs_whole']:.3f} |")
    print(f"goals: ours/raw <= 1.2, peak RSS per stage <= {goal_rss} of the whole model's")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
