"""This ingress replica's rank and its deployment's replica count, read from Ray Serve.

Serve keeps each replica's rank in its replica context (`serve.get_replica_context().rank`), unique and,
once the deployment settles, contiguous from 0 (it re-ranks survivors after a scale-down). The context's
`world_size` is the configured num_replicas, not what autoscaling runs (Ray 2.60), so the count comes
from the controller (`serve.status()`): every replica it tracks, starting and stopping ones included. A
starting replica takes no traffic yet and a stopping one still holds its requests: counting both keeps
the shares' sum at the bound through a scale-up or a drain, at the price of early 429s meanwhile.
"""

from __future__ import annotations

from ray import serve

from cluster.admission_split import Membership


def serve_membership() -> Membership:
    """Rank and replica count of the calling replica's deployment (blocking: a call to the controller).
    Raises RayServeException outside a replica, LookupError while the controller does not list it."""
    context = serve.get_replica_context()
    rank = context.rank
    if rank is None:
        raise LookupError("this replica has no rank yet")
    app = serve.status().applications.get(context.app_name)
    deployment = app.deployments.get(context.deployment) if app is not None else None
    if deployment is None:
        raise LookupError(f"deployment {context.app_name}/{context.deployment} not listed by the controller")
    return Membership(rank=rank.rank, replicas=sum(deployment.replica_states.values()))
