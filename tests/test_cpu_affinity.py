"""A role's cpu_affinity pins its replicas (every thread, and threads started later) to those cores."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pydantic import ValidationError

from cluster.deployments import pin_to_cores
from cluster.products import Role

# Runs in a child: pinning the test process itself would slow the rest of the suite.
CHILD = """
import json, os, threading
from cluster.deployments import pin_to_cores
before = threading.Thread(target=lambda: started.wait())
started = threading.Event()
before.start()
pin_to_cores([0])
seen = {}
after = threading.Thread(target=lambda: seen.update(after=sorted(os.sched_getaffinity(0))))
after.start(); after.join()
threads = {int(t): sorted(os.sched_getaffinity(int(t))) for t in os.listdir("/proc/self/task")}
started.set(); before.join()
print(json.dumps({"threads": list(threads.values()), "after": seen["after"]}))
"""


def test_every_thread_and_later_threads_run_on_the_given_cores() -> None:
    out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=180, check=True)
    result = json.loads(out.stdout)
    assert len(result["threads"]) >= 2  # the main thread and one started before pinning
    assert all(cores == [0] for cores in result["threads"]), result
    assert result["after"] == [0]


def test_no_cores_means_no_pinning() -> None:
    before = os.sched_getaffinity(0)
    pin_to_cores(())
    assert os.sched_getaffinity(0) == before


def test_cores_the_process_cannot_use_fail_at_start() -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(ValueError, match="none of these cores is available"):
        pin_to_cores([max(before) + 1000])
    assert os.sched_getaffinity(0) == before


def test_config_refuses_negative_core_ids() -> None:
    assert Role(cpu_affinity=[1, 0]).cpu_affinity == (1, 0)
    with pytest.raises(ValidationError, match="core ids"):
        Role(cpu_affinity=[-1])
