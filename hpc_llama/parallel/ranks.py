"""The one place that reads the launcher's environment, and starts and guards a distributed job.

`describe_rank` returns a frozen description of this rank under mpirun
(MPICH or Open MPI), srun, or plain python (a world of one). `start_distributed`
starts torch.distributed and DeepSpeed from it -- rank 0 opens the rendezvous
store on a free port and broadcasts it over MPI, instead of DeepSpeed's own
discovery, which guesses addresses from `hostname -I`. `run_guarded` turns an
exception on any rank into one rank-tagged line and ends every rank.
"""

from __future__ import annotations

import datetime
import errno
import os
import socket
import sys
import time
import traceback
from dataclasses import dataclass

from ..errors import HpcLlamaError

# Launcher variables that carry the node-local rank, most specific first.
# SLURM_LOCALID is trusted only when srun started the task (see _launcher).
_LOCAL_RANK_VARS = ("OMPI_COMM_WORLD_LOCAL_RANK", "MPI_LOCALRANKID", "PMI_LOCAL_RANK", "PALS_LOCAL_RANKID")


@dataclass(frozen=True)
class RankInfo:
    """Who this process is in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_size: int = 1
    node: str = "localhost"
    """Node name (Slurm's name under srun, else the host name)."""
    host: str = "localhost"
    """The machine's host name; ranks on one host talk over loopback."""
    launcher: str = "python"
    """mpich, openmpi, srun or python."""
    device: str = "cpu"
    """cuda:<local rank> where a GPU exists, else cpu."""

    @property
    def tag(self) -> str:
        return f"[rank {self.rank}]"


def _launcher(environ) -> str:
    if "OMPI_COMM_WORLD_SIZE" in environ:
        return "openmpi"
    if "MPI_LOCALRANKID" in environ or ("PMI_RANK" in environ and "SLURM_STEP_ID" not in environ):
        return "mpich"
    if "SLURM_STEP_ID" in environ and "SLURM_PROCID" in environ:
        return "srun"
    return "python"


def local_rank_from_env(environ, launcher: str) -> int | None:
    for var in _LOCAL_RANK_VARS:
        if var in environ:
            return int(environ[var])
    if launcher == "srun" and "SLURM_LOCALID" in environ:
        return int(environ["SLURM_LOCALID"])
    return None


def choose_device(local_rank: int, cuda_count: int, force: str | None = None) -> str:
    """cuda:<local rank> when GPUs exist (one rank per GPU), cpu otherwise."""
    if force:
        return force
    if cuda_count == 0:
        return "cpu"
    if local_rank >= cuda_count:
        raise HpcLlamaError(f"local rank {local_rank} but this node has only {cuda_count} GPUs: "
                            f"start at most one rank per GPU (or set HPC_LLAMA_DEVICE=cpu)")
    return f"cuda:{local_rank}"


def check_slurm_world(world_size: int, environ) -> None:
    """Under srun the MPI world must be the whole step, or the --mpi plugin is wrong."""
    if _launcher(environ) != "srun":
        return
    ntasks = environ.get("SLURM_STEP_NUM_TASKS") or environ.get("SLURM_NTASKS")
    if ntasks is not None and int(ntasks) != world_size:
        raise HpcLlamaError(
            f"srun started {ntasks} tasks but MPI sees a world of {world_size}: the srun --mpi plugin does not "
            f"match this MPI library (MPICH: --mpi=pmi2, Open MPI: --mpi=pmix)")


def describe_rank(comm=None, environ=None, cuda_count: int | None = None) -> RankInfo:
    """Describe this rank. `comm` is an mpi4py communicator (COMM_WORLD when None)."""
    environ = os.environ if environ is None else environ
    comm = world_comm() if comm is None else comm
    rank, size = comm.Get_rank(), comm.Get_size()
    launcher = _launcher(environ)
    check_slurm_world(size, environ)
    host = socket.gethostname()
    local = local_rank_from_env(environ, launcher)
    if size > 1:
        from mpi4py import MPI

        shared = comm.Split_type(MPI.COMM_TYPE_SHARED, key=rank)
        local_size = shared.Get_size()
        if local is None:
            local = shared.Get_rank()
        shared.Free()
    else:
        local, local_size = local or 0, 1
    if cuda_count is None:
        import torch

        cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    node = environ.get("SLURMD_NODENAME", host) if launcher == "srun" else host
    device = choose_device(local, cuda_count, environ.get("HPC_LLAMA_DEVICE"))
    return RankInfo(rank, size, local, local_size, node, host, launcher, device)


def start_rank(comm=None) -> RankInfo:
    """Describe this rank and give it its share of the node's cores for torch's threads.

    Under mpirun, OpenMP in each rank may start with one thread whatever the
    cores (Intel's runtime divides by the MPI ranks it detects); an explicit
    OMP_NUM_THREADS is always respected.
    """
    info = describe_rank(comm)
    if info.device == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        import torch

        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        torch.set_num_threads(max(1, cores // info.local_size))
    return info


def world_comm():
    """MPI.COMM_WORLD: a plain `python` start is a world of one, so every job speaks MPI the same way."""
    try:
        from mpi4py import MPI
    except ImportError:  # a requirement of the package, but a broken MPI install shows up here
        raise HpcLlamaError("mpi4py cannot be imported: install it (pip install mpi4py mpich, or build it "
                            "against your cluster's MPI)") from None
    return MPI.COMM_WORLD


def start_distributed(info: RankInfo, comm, timeout_s: float = 600.0) -> None:
    """Start torch.distributed (gloo on CPU, nccl on GPU) and DeepSpeed's comm layer for this job.

    DeepSpeed's engine and PipelineModule read RANK/WORLD_SIZE/LOCAL_RANK from
    the environment, so they are set here -- when the job starts, never while
    parsing configuration.
    """
    import torch
    import torch.distributed as dist

    backend = "nccl" if info.device.startswith("cuda") else "gloo"
    hosts = comm.allgather(info.host)
    one_host = len(set(hosts)) == 1
    addr = "127.0.0.1" if one_host else os.environ.get("HPC_LLAMA_MASTER_ADDR", _routable_address())
    store = None
    if info.rank == 0:
        # Port 0: the store binds a free port itself, so there is no race
        # between choosing a port and using it.
        store = dist.TCPStore(addr if not one_host else "127.0.0.1", 0, info.world_size, is_master=True,
                              timeout=datetime.timedelta(seconds=timeout_s), wait_for_workers=False)
        addr_port = (addr, store.port)
    else:
        addr_port = None
    addr, port = comm.bcast(addr_port, root=0)
    if store is None:
        store = dist.TCPStore(addr, port, info.world_size, is_master=False,
                              timeout=datetime.timedelta(seconds=timeout_s))
    os.environ.update(RANK=str(info.rank), WORLD_SIZE=str(info.world_size), LOCAL_RANK=str(info.local_rank),
                      MASTER_ADDR=addr, MASTER_PORT=str(port))
    if one_host:
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    if backend == "nccl":
        torch.cuda.set_device(info.device)
    dist.init_process_group(backend, store=store, rank=info.rank, world_size=info.world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    if info.device == "cpu":
        # Tell DeepSpeed up front instead of letting it probe and warn.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    # DeepSpeed JIT-compiles a shared-memory all-reduce for CPU on first use
    # (about a minute); only AutoTP inference uses it, so it is switched off.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False,
                               timeout=datetime.timedelta(seconds=timeout_s))


def stop_distributed() -> None:
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()


def _routable_address() -> str:
    # The address other nodes reach this one at: the one the default route uses.
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.connect(("192.0.2.1", 9))  # TEST-NET address: nothing is sent
        return s.getsockname()[0]
    except OSError:
        return socket.gethostbyname(socket.gethostname())
    finally:
        s.close()


_ENVIRONMENT_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EIO}


def run_guarded(main, argv=None, comm=None) -> int:
    """Run `main(argv)`; an exception on any rank prints one rank-tagged line and ends every rank.

    A user error (HpcLlamaError) prints its message; anything else prints its
    type and message, and the traceback only with HPC_LLAMA_DEBUG=1. With more
    than one rank the job is aborted through MPI so that ranks blocked in a
    collective end too, instead of waiting for a peer that will never come.
    """
    try:
        comm = world_comm() if comm is None else comm
    except HpcLlamaError as e:
        print(f"hpc-llama: error: {e}", file=sys.stderr, flush=True)
        return 2
    size, rank = comm.Get_size(), comm.Get_rank()
    tag = f"[rank {rank}] " if size > 1 else ""
    try:
        return main(argv) or 0
    except BaseException as e:  # noqa: BLE001 -- the last line of defence for every rank
        if isinstance(e, SystemExit):
            if not e.code:
                return 0
            if size == 1:
                raise
            code, line = (e.code if isinstance(e.code, int) else 1), None
        elif isinstance(e, KeyboardInterrupt):
            code, line = 130, "interrupted"
        elif isinstance(e, HpcLlamaError):
            code, line = 2, f"error: {e}"
        elif isinstance(e, OSError) and (e.filename is not None or e.errno in _ENVIRONMENT_ERRNOS):
            # The file system said no (permissions, a full disk, a missing path): the user's environment,
            # named by its path, not a bug.
            where = "" if e.filename is None else f"{e.filename}: "
            code, line = 2, f"error: {where}{e.strerror or e}"
        else:
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            code, line = 1, f"error: {type(e).__name__}: {detail}"
            if os.environ.get("HPC_LLAMA_DEBUG"):
                traceback.print_exc()
        from ..atomic import OutputLock

        OutputLock.release_all()  # the job ends here: its outputs are free for the next one
        if line is not None:
            if rank != 0:
                # Bad input fails on every rank at once; rank 0 speaks for
                # them all and its abort ends this rank before it repeats it.
                # A failure on this rank alone is reported a moment later.
                time.sleep(5)
            print(f"hpc-llama: {tag}{line}", file=sys.stderr, flush=True)
    if size > 1:
        sys.stdout.flush()
        # The line is in the pipe to mpirun's forwarder, but MPI_Abort can
        # kill the job before the forwarder reads it (seen under CI load: exit
        # 2 with an empty stderr); a moment's grace lets it through.
        time.sleep(0.5)
        comm.Abort(code)
    return code


def resolve_dtype(name: str, device: str) :
    """fp32 / bf16, or auto: bf16 on a GPU that supports it, fp32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    import torch

    if name == "fp32":
        return torch.float32
    if name == "bf16":
        return torch.bfloat16
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32
