"""Where one launcher task stands in a Slurm job step, and the torchrun arguments that follow.

The sbatch scripts start one launcher per node (`srun --ntasks-per-node=1`); each launcher
starts one torchrun agent, and the agents meet through a c10d rendezvous hosted on the first
node of the step, on a port derived from the job id.
"""
from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass

RDZV_PORT_BASE = 20000      # ports 20000-29999: below Linux's ephemeral range (32768+)
RDZV_PORT_SPAN = 10000


class SlurmError(RuntimeError):
    """The Slurm environment cannot host a megads launch as it stands."""


@dataclass(frozen=True)
class SlurmNode:
    job_id: str
    restart: int            # SLURM_RESTART_COUNT: how often the job was requeued
    nnodes: int
    node_rank: int          # SLURM_NODEID: this node's index in the step
    host: str
    head: str               # first host of the step: it hosts the rendezvous store
    rdzv_port: int
    nproc_per_node: int     # ranks on this node: GPUs if any were allocated, else CPUs
    cpus: int               # CPUs this launcher task may use

    @property
    def rdzv_endpoint(self) -> str:
        return f"{self.head}:{self.rdzv_port}"


def in_slurm_step(env: Mapping[str, str]) -> bool:
    """True inside an `srun` task (the batch shell itself has no SLURM_STEP_ID)."""
    return "SLURM_JOB_ID" in env and "SLURM_STEP_ID" in env


def scontrol_hostnames(nodelist: str) -> list[str]:
    """Expand a compressed Slurm node list (`node[01-04]`) with `scontrol show hostnames`."""
    proc = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SlurmError(f"scontrol show hostnames {nodelist} failed: {proc.stderr.strip()}")
    return proc.stdout.split()


def _tasks_per_node(spec: str) -> list[int]:
    """SLURM_STEP_TASKS_PER_NODE, e.g. `2(x3),1` -> [2, 2, 2, 1]."""
    counts = []
    for item in spec.split(","):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", item.strip())
        if not match:
            raise SlurmError(f"cannot parse SLURM_STEP_TASKS_PER_NODE={spec!r}")
        counts += [int(match.group(1))] * int(match.group(2) or 1)
    return counts


def _int(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None or value == "":
        if default is None:
            raise SlurmError(f"{name} is not set; run the launcher with srun inside a Slurm job")
        return default
    try:
        return int(value)
    except ValueError:
        raise SlurmError(f"{name}={value!r} is not an integer") from None


def slurm_node(env: Mapping[str, str], nproc_per_node: int | None = None,
               hostnames: Callable[[str], list[str]] = scontrol_hostnames) -> SlurmNode:
    """Read this launcher task's place in the job step from the SLURM_* environment."""
    tasks = _tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE", "1"))
    if any(count != 1 for count in tasks):
        raise SlurmError(f"srun started {env['SLURM_STEP_TASKS_PER_NODE']} launcher tasks per node; start one "
                         f"per node (srun --ntasks-per-node=1): it starts every rank of its node")
    nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST")
    if not nodelist:
        raise SlurmError("SLURM_JOB_NODELIST is not set; run the launcher with srun inside a Slurm job")
    hosts = hostnames(nodelist)
    nnodes = _int(env, "SLURM_NNODES")
    if len(hosts) != nnodes:
        raise SlurmError(f"node list {nodelist} expands to {len(hosts)} hosts but SLURM_NNODES={nnodes}")
    job_id = env["SLURM_JOB_ID"]
    cpus = _int(env, "SLURM_CPUS_PER_TASK", _int(env, "SLURM_CPUS_ON_NODE", os.cpu_count() or 1))
    gpus = _int(env, "SLURM_GPUS_ON_NODE", 0)
    port = _int(env, "MEGADS_RDZV_PORT", RDZV_PORT_BASE + int(re.sub(r"\D", "", job_id) or 0) % RDZV_PORT_SPAN)
    node_rank = _int(env, "SLURM_NODEID")
    return SlurmNode(job_id=job_id, restart=_int(env, "SLURM_RESTART_COUNT", 0), nnodes=nnodes, node_rank=node_rank,
                     host=env.get("SLURMD_NODENAME") or hosts[node_rank], head=hosts[0], rdzv_port=port,
                     nproc_per_node=nproc_per_node or gpus or cpus, cpus=cpus)


def slurm_torchrun_args(node: SlurmNode) -> list[str]:
    """torchrun options for one node of a multi-node job. Node 0 (the head) hosts the rendezvous
    store, said explicitly rather than left to torch matching the Slurm node name against the
    machine's host names; the ranks' global numbering is torchrun's."""
    return [f"--nnodes={node.nnodes}", f"--nproc-per-node={node.nproc_per_node}", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={node.rdzv_endpoint}", f"--rdzv-id=megads-{node.job_id}",
            f"--rdzv-conf=is_host={int(node.node_rank == 0)}", "--max-restarts=0"]
