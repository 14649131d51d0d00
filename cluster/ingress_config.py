"""The ingress deployment's settings (the app's `ingress` argument), validated with pydantic.

The ingress scales with Serve's autoscaling like the worker roles, on ongoing requests per replica (an
open stream is one for its whole length). Every product's max_queue_len holds for the whole deployment:
each replica admits its share (cluster/admission_split.py), so a product's bound must leave every
replica up to max_replicas a share of at least one request.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cluster.products import Autoscaling, ProductConfig

# One replica unless a config asks for more; when it does, Serve adds one per 64 streams open per replica.
DEFAULT_INGRESS_AUTOSCALING = Autoscaling(min_replicas=1, max_replicas=1, target_ongoing_requests=64)


class IngressConfig(BaseModel):
    """autoscaling: Serve autoscaling_config fields (cluster/products.py Autoscaling; signals are for
    engines, not here). num_cpus: per replica. max_ongoing_requests: per replica, streams included."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    autoscaling: Autoscaling = DEFAULT_INGRESS_AUTOSCALING
    num_cpus: float = Field(0.1, ge=0)
    max_ongoing_requests: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _no_signals(self) -> IngressConfig:
        if self.autoscaling.signals:
            raise ValueError("ingress autoscaling takes no signals (they are engine load signals)")
        return self

    def check_products(self, products: dict[str, ProductConfig]) -> None:
        """Raise ValueError when a product's bound would leave some ingress replica a share of 0."""
        most = self.autoscaling.max_replicas
        small = sorted(name for name, p in products.items() if p.max_queue_len < most)
        if small:
            raise ValueError(f"max_queue_len of {', '.join(small)} is below ingress.autoscaling.max_replicas "
                             f"({most}): each ingress replica admits a share of it, and a replica with a share "
                             "of 0 would answer every request 429")


DEFAULT_INGRESS = IngressConfig()
