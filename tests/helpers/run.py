"""How the tests run hpc-llama, and the one check of how it reports a user error.

`run_job(n, ...)` is the one way to run a job on n ranks: one rank is a
process of its own forked from a warm server (tests/cli_server.py), more
ranks start from scratch under the environment's mpirun. `one_line_error`
is the contract every error test holds a run to.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.dirname(sys.executable)
MPIRUN = os.path.join(BIN, "mpirun")
HPC = os.path.join(BIN, "hpc-llama")
# Every multi-rank command is bounded so that a hang fails the test instead of eating CI.
RUN_TIMEOUT = 240


def run_job(n: int, *args, check=True, timeout=RUN_TIMEOUT, env=None):
    """Run `hpc-llama ARGS` on n ranks: one process (forked), or `mpirun -n N`; returns CompletedProcess."""
    if n == 1:
        return run_cli(*args, check=check, timeout=timeout, env=env)
    return run_mpi(n, HPC, *args, check=check, timeout=timeout, env=env)


def run_cli(*args, timeout=RUN_TIMEOUT, env=None, check=None):
    """Run `hpc-llama ARGS` in a process of its own; returns CompletedProcess (text).

    The process is forked from a server that has imported torch once
    (tests/cli_server.py); HPC_LLAMA_TEST_EXEC=1 starts each one from scratch.
    """
    cmd = [HPC, *map(str, args)]
    return _run(cmd, timeout, env, check, forked=True)


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


def one_line_error(p, *needles, code=2, rank=None, prog="hpc-llama"):
    """`p` failed as a user sees a user error: exit `code`, one line `PROG: error: ...` holding every needle,
    no traceback.

    Exit 2 is a user error (bad input, options, environment); a test that means
    another status (1: an unexpected exception) says so with `code`. One
    process: stderr is that one line and nothing else. Under mpirun (`rank`
    given), the line is `PROG: [rank R] error: ...` and is the only line of
    ours; the lines the MPI library adds about the abort are not ours.
    """
    assert p.returncode == code, f"exit {p.returncode}, expected {code}\n--- stderr\n{p.stderr}"
    assert "Traceback" not in p.stderr, p.stderr
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    if rank is not None:
        lines = [line for line in lines if line.startswith(f"{prog}:")]
    assert len(lines) == 1, p.stderr
    tag = "" if rank is None else re.escape(f"[rank {rank}] ")
    assert re.match(f"{re.escape(prog)}: {tag}error: ", lines[0]), lines[0]
    for needle in needles:
        assert needle in lines[0], lines[0]


# --- interrupting a multi-rank job -----------------------------------------------------


def _rank_processes(proc):
    import psutil

    # The ranks are the python processes running hpc-llama (not mpirun's own helpers).
    return [c for c in psutil.Process(proc.pid).children(recursive=True)
            if "hpc-llama" in " ".join(c.cmdline()) and "mpirun" not in c.cmdline()[0] and "hydra" not in c.name()]


def kill_midway(cmd, journal, how):
    """Start `cmd` (two ranks), and once its journal records 3 whole steps, SIGKILL one rank ("kill-one")
    or SIGTERM both ("term-all"); returns the steps recorded by then."""
    import json

    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            env=dict(os.environ, DS_ACCELERATOR="cpu"))
    deadline = time.monotonic() + 120
    steps = 0
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            steps = json.load(open(journal))["state"]["steps"]
        except (OSError, ValueError, KeyError):
            steps = 0
        if steps >= 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None and steps >= 3, "the job finished before it could be interrupted"
    ranks = _rank_processes(proc)
    assert len(ranks) == 2
    if how == "kill-one":
        ranks[1].send_signal(signal.SIGKILL)
    else:
        for r in ranks:
            r.send_signal(signal.SIGTERM)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    return steps


# --- the fork server -------------------------------------------------------------------


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
