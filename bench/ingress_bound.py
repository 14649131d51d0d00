"""The 429 bound across ingress replicas: a product with max_queue_len B behind W ingress replicas admits at
most B requests at once in total, and reaches B.

Method: a colocated product on the built-in tiny model whose answers are long (max_tokens tokens, EOS
ignored: seconds of decoding); waves of B concurrent streaming requests go to it until B are admitted (200)
or the deadline passes, then `probe_waves` more waves while those B still stream: each of those must get
429. A 429 comes at once; an admitted request answers 200 at its first token, and each admitted stream is
read to its end in its own thread, so the client sees a request end only after the ingress released it.
The run is valid only if no admitted stream ended before the last wave answered (else a slot freed and a
later 200 was lawful): `valid` says so. Requests go to 127.0.0.1 only.

    python -m bench.ingress_bound --replicas 1 3 --bound 5     # starts a local Ray and Serve, ~2 min
"""

from __future__ import annotations

import argparse
import http.client
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from bench.load_client import require_local

# Enough decoding to outlast the waves by far (the tiny model: ~2 ms a step on one core, more when shared).
HOLD_TOKENS = 3000


@dataclass
class BoundRun:
    """One measurement: counts in requests, times in seconds."""

    replicas: int
    bound: int
    admitted: int = 0  # 200s
    refused: int = 0  # 429s
    other: list[int] = field(default_factory=list)  # any other status
    waves: int = 0
    seconds: float = 0.0
    valid: bool = True  # no admitted stream ended before the last wave answered

    @property
    def held(self) -> bool:
        """The bound held and was reached: exactly B admitted, everything else 429."""
        return self.valid and self.admitted == self.bound and not self.other


class _Held:
    """Admitted streams, each read to its end in a thread; closed all at once at the end."""

    def __init__(self) -> None:
        self.connections: list[http.client.HTTPConnection] = []
        self.first_end: float | None = None
        self._lock = threading.Lock()

    def read_to_end(self, connection: http.client.HTTPConnection, response: http.client.HTTPResponse) -> None:
        try:
            while response.read(65536):
                pass
        except OSError:  # closed by close_all
            pass
        with self._lock:
            self.first_end = self.first_end or time.monotonic()

    def close_all(self) -> None:
        for connection in self.connections:
            if connection.sock is not None:
                connection.sock.shutdown(socket.SHUT_RDWR)
            connection.close()


def _send(url: str, model: str, max_tokens: int) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=120)
    body = json.dumps({"model": model, "prompt": "hold", "max_tokens": max_tokens, "stream": True,
                       "ignore_eos": True, "temperature": 0})
    connection.request("POST", f"{parts.path}/v1/completions", body, {"Content-Type": "application/json"})
    return connection, connection.getresponse()


def measure(url: str, model: str, bound: int, replicas: int, max_tokens: int = HOLD_TOKENS,
            probe_waves: int = 3, deadline_s: float = 60.0) -> BoundRun:
    """Fill the product's bound with waves of `bound` concurrent streams, then probe it; see the module."""
    url = require_local(url)
    run, held, counting = BoundRun(replicas=replicas, bound=bound), _Held(), threading.Lock()
    readers = ThreadPoolExecutor(max_workers=2 * bound + 4)
    start = time.monotonic()
    probes_left = probe_waves

    def one(_: int) -> None:
        connection, response = _send(url, model, max_tokens)
        if response.status == 200:
            with counting:
                held.connections.append(connection)
                run.admitted += 1
            readers.submit(held.read_to_end, connection, response)
            return
        response.read()
        connection.close()
        with counting:
            if response.status == 429:
                run.refused += 1
            else:
                run.other.append(response.status)

    try:
        with ThreadPoolExecutor(max_workers=bound) as wave:
            while probes_left > 0 and time.monotonic() - start < deadline_s:
                probing = run.admitted >= bound  # a wave sent once the bound is full: all must be 429
                list(wave.map(one, range(bound)))
                run.waves += 1
                probes_left -= probing
        last_answer = time.monotonic()
        run.valid = held.first_end is None or held.first_end > last_answer
    finally:
        run.seconds = round(time.monotonic() - start, 1)
        held.close_all()
        readers.shutdown(wait=True)
    return run


def bounded_app(name: str, bound: int, replicas: int, max_tokens: int = HOLD_TOKENS):
    """A Serve application of one colocated product `name` (tiny model) with max_queue_len `bound`, behind
    `replicas` ingress replicas (fixed: autoscaling from replicas to replicas)."""
    from cluster.app import build_app
    from cluster.ingress_config import IngressConfig
    from cluster.products import Autoscaling, ProductConfig

    product = ProductConfig(name=name, model="tiny", cache_salt=name, disaggregated=False, max_queue_len=bound,
                            max_output_tokens=max_tokens, engine={"kv_cache_bytes": 128 << 20, "num_threads": 1})
    ingress = IngressConfig(autoscaling=Autoscaling(min_replicas=replicas, max_replicas=replicas,
                                                    target_ongoing_requests=64))
    return build_app({name: product}, ingress, token_stream_host="127.0.0.1")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--replicas", type=int, nargs="+", default=[1, 3], help="ingress replica counts to try")
    parser.add_argument("--bound", type=int, default=5, help="the product's max_queue_len")
    args = parser.parse_args(argv)
    import ray
    from ray import serve

    ray.init(address="local", num_cpus=16, include_dashboard=False, namespace="pdserve", log_to_driver=False)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        for replicas in args.replicas:
            name = f"bound{replicas}"
            serve.run(bounded_app(name, args.bound, replicas), name=name, route_prefix=f"/{name}")
            run = measure(f"http://127.0.0.1:{port}/{name}", name, args.bound, replicas)
            print(json.dumps({**asdict(run), "held": run.held}), flush=True)
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
