"""A fork server for the tests' one-process `hpc-llama` runs.

Most of a one-process CLI run in this suite is the interpreter importing torch
(about 2.5 s of a 3 s bad-input case on this 2-core machine), and the suite
runs hundreds of them. This server imports torch and the CLI once, and forks
a child per run: the child is a real process with its own pid, environment,
working directory, stdout/stderr and exit status, running the same `main()`
as the console script; only the imports are shared, as in multiprocessing's
forkserver. Multi-rank runs (mpirun) and the tests of the console script and
launchers themselves start real processes from scratch.

Forking after `import torch` is safe because nothing has run yet: no
OpenMP pool, no MPI (mpi4py is imported by the child), no CUDA.

Protocol: one JSON request per line on stdin ({"argv0", "argv", "env", "cwd",
"out", "err"}: out and err are files the child writes its stdout and stderr
to); replies {"pid"} when the child starts and {"rc"} when it ends.
"""

from __future__ import annotations

import json
import os
import sys


def _child(req, reply_fd):
    try:
        os.close(reply_fd)  # the request pipe is only read, and not inherited by what the child starts
        os.dup2(os.open(req["out"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 1)
        os.dup2(os.open(req["err"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.environ.clear()
        os.environ.update(req["env"])
        os.chdir(req["cwd"])
        sys.argv = [req["argv0"], *req["argv"]]
        from hpc_llama.cli import main
    except BaseException:  # noqa: BLE001 -- the server's own failure, never the CLI's
        import traceback

        traceback.print_exc()
        os._exit(99)
    # main() ends with sys.exit(code): the SystemExit unwinds this child out of
    # the server loop and the interpreter shuts down as a fresh process would
    # (atexit handlers such as MPI_Finalize, stdio flushed).
    main(req["argv"])
    sys.exit(0)  # never reached; if it were, the child must still not return into the server loop


def serve():
    reply_fd, req_fd = os.dup(1), os.dup(0)
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    import torch  # noqa: F401 -- the point of the server

    from hpc_llama.cli import build_parser

    build_parser()  # imports every job module

    def reply(obj):
        os.write(reply_fd, (json.dumps(obj) + "\n").encode())

    reply({"ready": True})
    with os.fdopen(req_fd, "rb", buffering=0) as requests:
        buf = b""
        while True:
            chunk = requests.read(65536)
            if not chunk:
                return
            buf += chunk
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                req = json.loads(line)
                pid = os.fork()
                if pid == 0:
                    _child(req, reply_fd)
                reply({"pid": pid})
                _, status = os.waitpid(pid, 0)
                reply({"rc": os.waitstatus_to_exitcode(status)})


if __name__ == "__main__":
    serve()
