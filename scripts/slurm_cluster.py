#!/usr/bin/env python3
"""A one-node SLURM cluster on this machine for transfer-cli's tests: `start`, `stop`, `status`.

Debian's slurm-wlm and munge (`apt-get install slurm-wlm munge`) give the daemons; this script writes
a slurm.conf with this host as the only node and one CPU-only partition, `cpu` (as many clusters'
default partition is), and runs munged, slurmctld and slurmd in the background. Job accounting is
off (no slurmdbd), as on many small clusters: `sacct` fails there and job states come from squeue.
Everything it makes lives in one folder (TRANSFER_CLI_SLURM_DIR, default /tmp/transfer-cli-slurm):
config, munge key and socket, state, logs, and the pid files through which `stop` ends only what
`start` started. Clients (sbatch, squeue, and so the tests) find this cluster through
SLURM_CONF=<folder>/slurm.conf; `status` prints that line. Needs root: slurmd starts jobs as their
user.
"""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

FOLDER = Path(os.environ.get("TRANSFER_CLI_SLURM_DIR", "/tmp/transfer-cli-slurm"))
PORT = int(os.environ.get("TRANSFER_CLI_SLURM_PORT", "16817"))  # slurmctld; slurmd takes the next one
PARTITION = "cpu"
DAEMONS = ("munged", "slurmctld", "slurmd")  # started in this order, stopped in the reverse
CONF = FOLDER / "slurm.conf"
SOCKET = FOLDER / "munge" / "munge.socket.2"


def pid_file(daemon: str) -> Path:
    return FOLDER / "pids" / f"{daemon}.pid"


def running(daemon: str) -> int | None:
    """The pid of `daemon` as this script started it, if that process still runs."""
    try:
        pid = int(pid_file(daemon).read_text())
        command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except (OSError, ValueError):
        return None
    # the pid is still ours: the same program, started with this folder's files
    if Path(command[0].decode()).name == daemon and str(FOLDER).encode() in b" ".join(command):
        return pid
    return None


def slurm_env() -> dict:
    return {**os.environ, "SLURM_CONF": str(CONF)}


def node_line() -> str:
    """This machine as slurmd sees it (CPUs, sockets, cores, memory), named by its host name."""
    described = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    fields = described.splitlines()[0].split()
    return " ".join([f"NodeName={socket.gethostname()}", *fields[1:], "NodeAddr=127.0.0.1", "State=UNKNOWN"])


def write_config() -> None:
    host = socket.gethostname()
    logs = FOLDER / "log"
    CONF.write_text("\n".join([
        "ClusterName=transfercli",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={PORT}",
        f"SlurmdPort={PORT + 1}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={SOCKET},cred_expire=10",  # also how long a requeued job waits to start again (120 s)
        f"StateSaveLocation={FOLDER / 'state'}",
        f"SlurmdSpoolDir={FOLDER / 'spool'}",
        f"SlurmctldPidFile={FOLDER / 'slurmctld.pid'}",
        f"SlurmdPidFile={FOLDER / 'slurmd.pid'}",
        f"SlurmctldLogFile={logs / 'slurmctld.log'}",
        f"SlurmdLogFile={logs / 'slurmd.log'}",
        f"PlugStackConfig={FOLDER / 'plugstack.conf'}",
        "ProctrackType=proctrack/linuxproc",  # no cgroups needed (containers, CI)
        "TaskPlugin=task/affinity",  # a job runs on the CPUs it was given
        "JobAcctGatherType=jobacct_gather/none",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/filetxt",  # each finished job's final state, one line
        f"JobCompLoc={logs / 'jobcomp.log'}",
        "SchedulerType=sched/backfill",
        "SchedulerParameters=sched_interval=5,bf_interval=5",  # a requeued or waiting job starts within seconds
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core_Memory",  # CPUs and memory are what jobs ask for and wait for
        "MpiDefault=none",
        "ReturnToService=2",
        "SlurmctldTimeout=30",
        "SlurmdTimeout=30",
        "InactiveLimit=0",
        "KillWait=10",
        "MinJobAge=600",  # a finished job's state stays visible to squeue / scontrol for 10 minutes
        node_line(),
        f"PartitionName={PARTITION} Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
        "",
    ]))
    (FOLDER / "plugstack.conf").write_text("")


def spawn(daemon: str, command: list[str]) -> None:
    log = open(FOLDER / "log" / f"{daemon}.out", "ab")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=slurm_env(), start_new_session=True)  # outlives this script
    pid_file(daemon).write_text(f"{proc.pid}\n")


def wait_for(what: str, ready, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if ready():
            return
        time.sleep(0.5)
    logs = "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                     for p in sorted((FOLDER / "log").glob("*")) if p.is_file())
    stop()
    sys.exit(f"slurm_cluster: {what} did not come up in {seconds:.0f} s; the cluster was stopped\n{logs}")


def node_state() -> str:
    done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, env=slurm_env())
    return done.stdout.strip() if done.returncode == 0 else ""


def start() -> None:
    if os.geteuid() != 0:
        sys.exit("slurm_cluster: run as root (slurmd starts jobs as their user)")
    missing = [d for d in DAEMONS if shutil.which(d) is None]
    if missing:
        sys.exit(f"slurm_cluster: {', '.join(missing)} not found; apt-get install -y slurm-wlm munge")
    if all(running(d) for d in DAEMONS):
        print(f"already up; SLURM_CONF={CONF}")
        return
    stop()  # a half-started cluster from before
    shutil.rmtree(FOLDER, ignore_errors=True)
    for sub in ("munge", "pids", "log", "state", "spool"):
        (FOLDER / sub).mkdir(parents=True, mode=0o700)
    FOLDER.chmod(0o755)
    key = FOLDER / "munge" / "munge.key"
    key.write_bytes(secrets.token_bytes(1024))
    key.chmod(0o400)
    write_config()
    munge = FOLDER / "munge"
    spawn("munged", ["munged", "--foreground", "--force", f"--socket={SOCKET}", f"--key-file={key}",
                     f"--pid-file={munge / 'munged.pid'}", f"--log-file={munge / 'munged.log'}",
                     f"--seed-file={munge / 'munged.seed'}"])
    wait_for("munged", SOCKET.exists, 20)
    spawn("slurmctld", ["slurmctld", "-D", "-f", str(CONF)])
    spawn("slurmd", ["slurmd", "-D", "-f", str(CONF), "-N", socket.gethostname()])
    wait_for("the node", lambda: node_state() == "idle", 90)
    print(f"up: partition {PARTITION}, node {socket.gethostname()} idle; SLURM_CONF={CONF}")


def stop() -> None:
    if not any(running(d) for d in DAEMONS):
        return
    if running("slurmctld"):  # first the jobs this cluster runs: their processes outlive slurmd
        subprocess.run(["scancel", f"--partition={PARTITION}"], env=slurm_env(), capture_output=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and subprocess.run(
                ["squeue", "-h", "-t", "running,completing"], env=slurm_env(), capture_output=True,
                text=True).stdout.strip():
            time.sleep(1)
    for daemon in reversed(DAEMONS):
        pid = running(daemon)
        if pid:
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and running(daemon):
                time.sleep(0.2)
            if running(daemon):
                os.kill(pid, signal.SIGKILL)
        pid_file(daemon).unlink(missing_ok=True)
    print("stopped")


def status() -> int:
    pids = {d: running(d) for d in DAEMONS}
    state = node_state() if all(pids.values()) else ""
    up = state in ("idle", "mixed", "allocated")
    daemons = ", ".join(f"{d} {pid or 'not running'}" for d, pid in pids.items())
    print(f"{'up' if up else 'down'}: {daemons}; node {state or 'unknown'}; SLURM_CONF={CONF}")
    return 0 if up else 1


if __name__ == "__main__":
    commands = {"start": start, "stop": stop, "status": status}
    if len(sys.argv) != 2 or sys.argv[1] not in commands:
        sys.exit(f"usage: {sys.argv[0]} start|stop|status")
    sys.exit(commands[sys.argv[1]]() or 0)
