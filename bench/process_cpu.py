"""CPU time and memory of the local Ray cluster this process started, per component.

A local `ray.init()` starts the cluster's processes as descendants of the driver (GCS, raylet, then the
workers the raylet forks), so the driver's process tree is the cluster and nobody else's. Each process is
named by its title: Ray sets `ray::<actor class>` (Serve replicas: `ray::ServeReplica:<app>:<deployment>`).
CPU seconds are user + system time (psutil), so a thread asleep (a stand-in engine's step) costs none.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

import psutil

# (substring of the process's command line, component), first match wins; unmatched processes are "ray"
# (GCS, raylet, dashboard and log agents, idle workers): the Ray runtime itself.
COMPONENTS: tuple[tuple[str, str], ...] = (
    (":ingress", "ingress"),
    ("-prefill", "prefill"),
    ("-decode", "decode"),
    ("ProxyActor", "proxy"),
    ("ServeController", "controller"),
    ("PrefixDirectory", "directory"),
    ("MetricsHub", "hub"),
)
RAY = "ray"
ENGINES = frozenset({"prefill", "decode"})  # the worker replicas; everything else is the control plane


def component(cmdline: str) -> str:
    for needle, name in COMPONENTS:
        if needle in cmdline:
            return name
    return RAY


@dataclass(frozen=True)
class ProcessCPU:
    """One process at one moment: its component, CPU seconds so far and unique memory (bytes)."""

    pid: int
    component: str
    cpu_s: float
    uss_bytes: int = 0


def snapshot(memory: bool = False, root: int | None = None) -> dict[int, ProcessCPU]:
    """Every descendant of `root` (default: this process), by pid. memory: also read unique memory (USS,
    slower: it reads each process's page map)."""
    out: dict[int, ProcessCPU] = {}
    for proc in psutil.Process(root or os.getpid()).children(recursive=True):
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                name = component(" ".join(proc.cmdline()))
                uss = proc.memory_full_info().uss if memory else 0
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        out[proc.pid] = ProcessCPU(proc.pid, name, times.user + times.system, uss)
    return out


def cpu_delta(before: Mapping[int, ProcessCPU], after: Mapping[int, ProcessCPU]) -> dict[str, float]:
    """CPU seconds per component between two snapshots; a process started in between counts from zero, one
    gone by `after` is lost (the run should keep its processes)."""
    spent: dict[str, float] = {}
    for pid, proc in after.items():
        start = before[pid].cpu_s if pid in before else 0.0
        spent[proc.component] = spent.get(proc.component, 0.0) + proc.cpu_s - start
    return spent


def memory_by_component(snap: Mapping[int, ProcessCPU]) -> dict[str, tuple[int, int]]:
    """component -> (processes, unique bytes) from a snapshot taken with memory=True."""
    out: dict[str, tuple[int, int]] = {}
    for proc in snap.values():
        count, total = out.get(proc.component, (0, 0))
        out[proc.component] = (count + 1, total + proc.uss_bytes)
    return out


def own_cpu_s() -> float:
    """This process's CPU seconds (the driver: the load client)."""
    times = psutil.Process().cpu_times()
    return times.user + times.system
