"""A real two-node Slurm cluster on this machine, started and stopped by the tests.

munged, slurmctld and two slurmd ("nodes" n1 and n2, both on localhost) run
in the foreground as children of the test process, with every state, spool,
log and socket path under a fresh temporary directory. Nothing is installed
here: `make test` installs Debian's slurmctld, slurmd, slurm-client and munge
first. Facts behind the settings: ../shared/SLURM.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

DAEMONS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue")


def missing_tools() -> list[str]:
    return [d for d in DAEMONS if shutil.which(d) is None and not os.path.exists(f"/usr/sbin/{d}")]


def _tool(name: str) -> str:
    return shutil.which(name) or f"/usr/sbin/{name}"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


class SlurmCluster:
    def __init__(self, base: str, cpus_per_node: int = 2):
        self.base = os.path.abspath(base)
        self.conf = os.path.join(self.base, "slurm.conf")
        self.procs: list[subprocess.Popen] = []
        self.cpus = cpus_per_node
        self.env = dict(os.environ, SLURM_CONF=self.conf)

    # --- lifecycle ---------------------------------------------------------

    def start(self, timeout: float = 60) -> "SlurmCluster":
        b = self.base
        for d in ("munge", "state", "spool", "log", "tmp/n1", "tmp/n2", "run"):
            os.makedirs(os.path.join(b, d), exist_ok=True)
        os.chmod(os.path.join(b, "munge"), 0o755)
        key = os.path.join(b, "munge", "munge.key")
        subprocess.run([_tool("mungekey"), "-c", "-k", key], check=True, capture_output=True)
        os.chmod(key, 0o600)
        sock = os.path.join(b, "munge", "munge.sock")
        self._spawn([_tool("munged"), "-F", f"--socket={sock}", f"--key-file={key}",
                     f"--pid-file={b}/munge/munged.pid", f"--seed-file={b}/munge/munge.seed",
                     f"--log-file={b}/log/munged.log", "--force"])
        self._wait(lambda: os.path.exists(sock), timeout, "munged")
        ctld, d1, d2 = _free_ports(3)
        # Job ids must not repeat between clusters: MPICH names its shared-memory segment after the PMI
        # key-value space of the step (job id and step), and a segment left in /dev/shm by a rank killed
        # in an earlier run (the requeue tests kill ranks) makes MPI_Init of a new step with the same name
        # fail ("Out of memory" in MPIDI_POSIX_comm_bootstrap).
        first_job = 1000 + (int(time.time() * 10) + os.getpid()) % 60_000_000
        with open(self.conf, "w") as f:
            f.write(f"""ClusterName=hpcllama
FirstJobId={first_job}
SlurmctldHost=localhost(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={sock},cred_expire=5
SlurmctldPort={ctld}
SlurmdPort={d1}
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
TmpFS={b}/tmp/%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=pmi2
ReturnToService=2
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,bf_interval=1,sched_interval=1,kill_invalid_depend
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
MailProg=/bin/true
KillWait=5
InactiveLimit=0
MinJobAge=300
NodeName=n[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[{d1}-{d1 + 1}] CPUs={self.cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")
        del d2
        self._spawn([_tool("slurmctld"), "-D", "-f", self.conf])
        self._wait(lambda: self._ok(["scontrol", "ping"]), timeout, "slurmctld")
        for node in ("n1", "n2"):
            self._spawn([_tool("slurmd"), "-D", "-N", node, "-f", self.conf])
        self._wait(lambda: self.idle_nodes() == 2, timeout, "slurmd")
        return self

    def stop(self) -> None:
        # slurmd first, then slurmctld, then munged, as their dependencies run.
        for p in reversed(self.procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
        self.procs.clear()

    def _spawn(self, cmd):
        log = open(os.path.join(self.base, "log", os.path.basename(cmd[0]) + ".out"), "ab")
        self.procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env))

    def _ok(self, cmd) -> bool:
        return subprocess.run(cmd, capture_output=True, env=self.env).returncode == 0

    def _wait(self, pred, timeout, what):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if pred():
                return
            dead = [p.args[0] for p in self.procs if p.poll() is not None]
            if dead:
                raise RuntimeError(f"{dead[0]} exited while starting {what}: see {self.base}/log")
            time.sleep(0.2)
        raise RuntimeError(f"{what} did not come up within {timeout} s: see {self.base}/log")

    # --- using it ----------------------------------------------------------

    def run(self, *cmd, check=True, timeout=120, env=None) -> subprocess.CompletedProcess:
        p = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=timeout,
                           env=dict(self.env, **(env or {})))
        if check and p.returncode != 0:
            raise AssertionError(f"{' '.join(map(str, cmd))} exited {p.returncode}\n{p.stdout}\n{p.stderr}")
        return p

    def idle_nodes(self) -> int:
        p = subprocess.run(["sinfo", "-h", "-o", "%T %D"], capture_output=True, text=True, env=self.env)
        return sum(int(n) for state, n in (line.split() for line in p.stdout.splitlines()) if state == "idle")

    def sbatch(self, *args, env=None) -> int:
        """Submit; returns the job id."""
        p = self.run("sbatch", "--parsable", *args, env=env)
        return int(p.stdout.strip().split(";")[0])

    def job(self, job_id: int) -> dict:
        p = self.run("scontrol", "show", "job", "-o", str(job_id), check=False)
        fields = {}
        for item in p.stdout.split():
            if "=" in item:
                k, v = item.split("=", 1)
                fields[k] = v
        return fields

    def wait(self, job_id: int, timeout: float = 300, until=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT",
                                                              "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in until:
                return info
            time.sleep(0.5)
        self.run("scancel", str(job_id), check=False)
        raise AssertionError(f"job {job_id} did not finish within {timeout} s (state {self.job(job_id).get('JobState')})")
