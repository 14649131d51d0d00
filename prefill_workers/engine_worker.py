"""EngineWorker: what every worker that owns an engine shares, the prefill and the decode server alike.

One engine on its own thread (AsyncEngine) and one KV connector per worker, both made at construction;
a health check that fails when the engine loop died or wedged (Serve then replaces the replica); abort;
shutdown; stats, the engine's next to the role's own counters.

Why here, in prefill_workers: imports point one way, cluster -> workers -> kvtransfer -> engine, and
between the two worker packages decode_workers already imports prefill_workers (a decode worker calls
a prefill worker with its protocol), never the other way. The base therefore sits in the package both
may import; in decode_workers it would make each worker package import the other.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import ray

from engine.async_engine import AsyncEngine
from engine.config import EngineConfig
from engine.outputs import EngineStats
from kvtransfer import KVTransferConfig, make_connector


@dataclass(frozen=True)
class WorkerStats:
    """What every worker reports; each role's stats add their own counters after these two fields."""

    worker_id: str
    engine: EngineStats


class EngineWorker:
    """Subclasses set `role` (it names the worker in health failures and default ids) and `_stats`."""

    role = "worker"

    def __init__(self, engine_config: EngineConfig | dict | None, transfer_config: KVTransferConfig | dict | None,
                 worker_id: str | None) -> None:
        self.engine = self._make_engine(EngineConfig.coerce(engine_config))
        self.connector = make_connector(
            KVTransferConfig.coerce(transfer_config).for_node(ray.util.get_node_ip_address()))
        self.block_size = self.engine.info.block_size  # tokens per KV block
        self.layout = self.engine.info.layout  # what this worker's KV blocks look like, exported or imported
        self.worker_id = worker_id or f"{self.role}-{uuid.uuid4().hex[:8]}"

    def _make_engine(self, config: EngineConfig) -> AsyncEngine:
        """This worker's engine loop. Serving never overrides it; a benchmark's subclass may run another Engine
        in it (bench/engine_standin.py)."""
        return AsyncEngine(config)

    async def check_health(self) -> None:
        """Ray Serve's health probe: fail when the engine loop is dead or wedged (Serve then replaces the
        replica)."""
        problem = self.engine.health_problem()
        if problem is not None:
            raise RuntimeError(f"{self.role} {problem}")

    async def abort(self, request_id: str) -> None:
        """Stop a request and free its blocks now; an unknown or finished id is ignored."""
        await self.engine.abort(request_id)

    async def stats(self) -> WorkerStats:
        return self._stats(await self.engine.stats())

    def _stats(self, engine: EngineStats) -> WorkerStats:
        """The role's stats around a fresh engine snapshot."""
        return WorkerStats(self.worker_id, engine)

    def shutdown(self, timeout_s: float = 5.0) -> None:
        """Stop the engine loop (waiting up to timeout_s seconds) and close the connector, which frees every
        export still staged here. Idempotent."""
        self.engine.shutdown(timeout_s)
        self.connector.close()

    def __del__(self) -> None:
        # Serve calls this when it stops a replica: stop the engine thread. The connector is left to the
        # process's exit (its exports end with it), so a stopping replica never waits out a transport's grace.
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown(timeout_s=1.0)
