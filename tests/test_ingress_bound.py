"""A product's 429 bound holds across ingress replicas: with max_queue_len 5 behind 1 and behind 3 ingress
replicas, exactly 5 long streams are admitted at once in total and every other request gets 429
(bench/ingress_bound.py does the measuring). Per-replica bounds would admit 15 behind 3 replicas.

Each case runs its own small application (a colocated product on the tiny model), bounded: waves of 5
requests for at most 60 s, 127.0.0.1 only.
"""

from __future__ import annotations

import pytest
from ray import serve

from bench.ingress_bound import bounded_app, measure

BOUND = 5  # uneven over 3 replicas: shares 2, 2, 1


@pytest.mark.parametrize("replicas", [1, 3])
def test_the_bound_holds_and_is_reached_with_any_ingress_replica_count(pdserve_url: str, replicas: int) -> None:
    name = f"bound{replicas}"
    serve.run(bounded_app(name, BOUND, replicas), name=name, route_prefix=f"/{name}")
    try:
        running = serve.status().applications[name].deployments["ingress"].replica_states.get("RUNNING", 0)
        assert running == replicas
        run = measure(f"{pdserve_url}/{name}", name, BOUND, replicas, deadline_s=60)
    finally:
        serve.delete(name)
    assert run.valid, f"an admitted stream ended during the waves; the run proves nothing: {run}"
    assert not run.other, run
    assert run.admitted == BOUND, run  # never more, and the split leaves no share unreachable
    assert run.refused >= 3 * BOUND, run  # the probe waves after the bound was full: all 429
