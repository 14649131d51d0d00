"""Disaggregated prefill/decode on a real local Ray cluster.

Greedy outputs of disaggregated, colocated and transformers runs are identical;
the shared system prompt is computed once for the whole cluster; a decode
worker that already holds the system prompt receives fewer bytes; leases,
faults and a killed prefill worker lose no request and leak no block.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import ray

from cluster.prefix_directory import DIRECTORY_NAME
from decode_workers.server import DecodeServer
from engine.config import SamplingParams
from engine.tiny_model import path as model_path
from prefill_workers.protocol import PrefillRequest, PrefillResult
from prefill_workers.server import PrefillServer
from tests.cluster_helpers import (
    TIMEOUT_S,
    assert_idle,
    generate,
    kill_all,
    start_decode,
    start_directory,
    start_prefill,
)
from tests.engine_helpers import hf_greedy, random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
SYSTEM = random_prompts([220], 8192, seed=31)[0]
# KV streamed while the prompt computes: a prefill engine whose 64-token budget splits every prompt here into
# chunks (4 blocks each), and decode workers that fetch each chunk as it is published.
STREAMED_PREFILL = {"max_num_batched_tokens": 64}


@pytest.fixture
def directory(ray_local):
    handle = start_directory()
    yield handle
    ray.kill(handle)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # the name is released asynchronously
        try:
            ray.get_actor(DIRECTORY_NAME, namespace="pdserve")
        except ValueError:
            break
        time.sleep(0.1)


def _prompts(n: int = 5) -> list[list[int]]:
    return random_prompts([1, 30, 90, 250, 9][:n], 8192, seed=32, prefix=SYSTEM)


def _streaming(streamed: bool) -> tuple[dict | None, dict]:
    """The prefill engine config and the decode worker's keyword arguments of a streamed (or whole) export."""
    return (STREAMED_PREFILL, {"kv_streaming": True}) if streamed else (None, {})


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
@pytest.mark.parametrize("transport", ["ray", "grpc"])
def test_disaggregated_colocated_and_transformers_agree(ray_local, directory, transport: str, streamed: bool) -> None:
    transfer = {"transport": transport}
    engine, options = _streaming(streamed)
    prefill = start_prefill(transfer, engine)
    decode = start_decode(prefill, transfer, **options)
    colocated = start_decode(None, transfer)
    try:
        for prompt in _prompts():
            disagg = generate(decode, prompt, GREEDY)
            coloc = generate(colocated, prompt, GREEDY)
            ref, _ = hf_greedy(model_path("tiny"), prompt, GREEDY.max_tokens)
            assert disagg["token_ids"] == coloc["token_ids"] == ref
            assert disagg["finish_reason"] == "length"
        stats = ray.get(decode.stats.remote(), timeout=TIMEOUT_S)
        assert stats.remote_prefills == 5 and stats.recomputed_prefills == 0
        assert stats.engine.prompt_tokens_computed == 0  # every prompt was prefilled remotely
        chunks = ray.get(prefill.stats.remote(), timeout=TIMEOUT_S).kv_chunks_published
        assert chunks > 0 if streamed else chunks == 0
        assert_idle([prefill], [decode, colocated])
    finally:
        kill_all(prefill, decode, colocated)


def test_short_uncached_prompts_are_computed_on_the_decode_engine(ray_local, directory) -> None:
    """Conditional disaggregation: with local_prefill_max_tokens 64, a prompt whose uncached part is short
    is computed by the decode engine itself (no prefill call, no KV moved), a long one on the prefill worker;
    the tokens are the same as a colocated engine's either way."""
    prefill = start_prefill()
    decode = start_decode(prefill, local_prefill_max_tokens=64)
    colocated = start_decode(None)
    try:
        short, long = random_prompts([40, 300], 8192, seed=35)
        for prompt in (short, long):
            assert generate(decode, prompt, GREEDY)["token_ids"] == generate(colocated, prompt, GREEDY)["token_ids"]
        stats = ray.get(decode.stats.remote(), timeout=TIMEOUT_S)
        assert (stats.local_prefills, stats.remote_prefills, stats.recomputed_prefills) == (1, 1, 0)
        assert stats.engine.prompt_tokens_computed == len(short)
        prefilled = ray.get(prefill.stats.remote(), timeout=TIMEOUT_S).engine.prompt_tokens_computed
        assert prefilled == len(long)
        assert_idle([prefill], [decode, colocated])
    finally:
        kill_all(prefill, decode, colocated)


def test_system_prompt_computed_once_per_cluster(ray_local, directory) -> None:
    prefills = [start_prefill(worker_id=f"p{i}") for i in range(2)]
    decodes = [start_decode(p) for p in prefills]
    try:
        pinned = ray.get(prefills[0].warm_prefix.remote(SYSTEM), timeout=TIMEOUT_S)
        assert pinned == 220 // 16
        before = ray.get(directory.stats.remote(), timeout=TIMEOUT_S)
        prompts = random_prompts([40, 70, 15, 120, 33, 64, 5, 80], 8192, seed=33, prefix=SYSTEM)
        for i, prompt in enumerate(prompts):
            generate(decodes[i % 2], prompt, GREEDY)
        # The directory is asked once in all: by the second worker, to fetch the system prompt its index
        # listed. Every other request read the index (no call), and nothing was offered again.
        after = ray.get(directory.stats.remote(), timeout=TIMEOUT_S)
        assert after.lookups - before.lookups == 1
        assert (after.contains_calls, after.publish_calls) == (before.contains_calls, before.publish_calls)
        computed = sum(ray.get(p.stats.remote(), timeout=TIMEOUT_S).engine.prompt_tokens_computed
                       for p in prefills)
        full_prefix = (220 // 16) * 16
        # the warm-up computed the system prompt (220 tokens); every request computed only its own suffix
        assert computed == 220 + sum(len(p) - full_prefix for p in prompts)
        second = ray.get(prefills[1].stats.remote(), timeout=TIMEOUT_S)
        assert second.directory_blocks_fetched == 220 // 16  # once, then its own pool holds them
        d = ray.get(directory.stats.remote(), timeout=TIMEOUT_S)
        assert d.pinned_entries == 220 // 16
        assert_idle(prefills, decodes)
    finally:
        kill_all(*prefills, *decodes)


def test_streamed_kv_with_directory_blocks_equals_transformers(ray_local, directory) -> None:
    """A prefill worker that takes the system prompt's blocks from the directory streams them as its first
    chunk (they land in its pool with the first step), then its own chunks: the tokens are transformers'."""
    warm, prefill = start_prefill(worker_id="w0"), start_prefill(engine=STREAMED_PREFILL, worker_id="w1")
    decode = start_decode(prefill, kv_streaming=True)
    try:
        assert ray.get(warm.warm_prefix.remote(SYSTEM), timeout=TIMEOUT_S) == 220 // 16
        for prompt in random_prompts([40, 150], 8192, seed=38, prefix=SYSTEM):
            assert generate(decode, prompt, GREEDY)["token_ids"] == hf_greedy(model_path("tiny"), prompt,
                                                                               GREEDY.max_tokens)[0]
        stats = ray.get(prefill.stats.remote(), timeout=TIMEOUT_S)
        assert stats.directory_blocks_fetched == 220 // 16 and stats.kv_chunks_published > 0
        assert_idle([warm, prefill], [decode])
    finally:
        kill_all(warm, prefill, decode)


def test_directory_gets_prefixes_seen_twice_not_every_prompt(ray_local, directory) -> None:
    prefills = [start_prefill(worker_id=f"q{i}") for i in range(2)]
    decodes = [start_decode(p) for p in prefills]
    try:
        once, twice = random_prompts([100, 100], 8192, seed=35)
        generate(decodes[0], once, GREEDY)
        generate(decodes[0], twice, GREEDY)
        assert ray.get(directory.stats.remote(), timeout=TIMEOUT_S).entries == 0  # unique so far: kept local
        generate(decodes[0], twice + [5, 6, 7], GREEDY)  # its 6 full blocks are now a reused prefix
        deadline = time.monotonic() + TIMEOUT_S
        while ray.get(directory.stats.remote(), timeout=TIMEOUT_S).entries < 100 // 16:  # published after
            assert time.monotonic() < deadline, "reused prefix never reached the directory"
            time.sleep(0.2)
        # ... so the other worker fetches it instead of computing it, and still never sees `once`.
        generate(decodes[1], twice + [8, 9], GREEDY)
        other = ray.get(prefills[1].stats.remote(), timeout=TIMEOUT_S)
        assert other.directory_blocks_fetched == 100 // 16
        assert other.engine.prompt_tokens_computed == 102 - (100 // 16) * 16
        assert ray.get(directory.stats.remote(), timeout=TIMEOUT_S).entries == 100 // 16
        assert_idle(prefills, decodes)
    finally:
        kill_all(*prefills, *decodes)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_decode_worker_holding_the_prefix_receives_fewer_bytes(ray_local, directory, streamed: bool) -> None:
    engine, options = _streaming(streamed)
    prefill = start_prefill(engine=engine)
    decode = start_decode(prefill, **options)
    try:
        first, second = random_prompts([100, 100], 8192, seed=34, prefix=SYSTEM)
        generate(decode, first, GREEDY)
        bytes_first = ray.get(decode.stats.remote(), timeout=TIMEOUT_S).kv_transfer_bytes
        out = generate(decode, second, GREEDY)
        bytes_second = ray.get(decode.stats.remote(), timeout=TIMEOUT_S).kv_transfer_bytes - bytes_first
        block_bytes = 2 * 2 * 16 * 2 * 16 * 4  # tiny: layers * K/V * block * kv heads * head dim * fp32
        assert bytes_first == -(-320 // 16) * block_bytes
        assert bytes_second == (-(-320 // 16) - 220 // 16) * block_bytes
        assert out["token_ids"] == hf_greedy(model_path("tiny"), second, GREEDY.max_tokens)[0]
        assert_idle([prefill], [decode])
    finally:
        kill_all(prefill, decode)


@pytest.mark.parametrize("fault,streamed", [("corrupt", False), ("wrong_layout", False), ("truncate", False),
                                            ("timeout", False), ("corrupt", True), ("timeout", True)])
def test_transfer_faults_recompute_and_count(ray_local, directory, fault: str, streamed: bool) -> None:
    """Streamed: the first chunk's fetch fails, the fetches queued behind it give up with it (one failure
    counted), and every chunk export is released or leased out."""
    transfer = {"transport": "grpc", "timeout_s": 1.0, "lease_s": 3.0}
    engine, options = _streaming(streamed)
    prefill = start_prefill({**transfer, "fault": fault}, engine)
    decode = start_decode(prefill, transfer, **options)
    try:
        prompt = _prompts(3)[2]
        out = generate(decode, prompt, GREEDY)
        assert out["token_ids"] == hf_greedy(model_path("tiny"), prompt, GREEDY.max_tokens)[0]
        stats = ray.get(decode.stats.remote(), timeout=TIMEOUT_S)
        assert stats.kv_transfer_failures == 1 and stats.recomputed_prefills == 1
        assert stats.engine.prompt_tokens_computed == len(prompt)
        time.sleep(3.5)  # a faulty export nobody could use is freed by its lease at the latest
        assert_idle([prefill], [decode])
    finally:
        kill_all(prefill, decode)


def test_first_token_that_ends_the_request_moves_no_kv(ray_local) -> None:
    prefill = start_prefill(directory=False)  # the default lease (30 s): only a release frees the export now
    decode = start_decode(prefill)
    try:
        prompt = _prompts(3)[2]
        out = generate(decode, prompt, SamplingParams(temperature=0.0, max_tokens=1))
        assert out["token_ids"] == hf_greedy(model_path("tiny"), prompt, 1)[0] and out["finish_reason"] == "length"
        stats = ray.get(decode.stats.remote(), timeout=TIMEOUT_S)
        assert stats.kv_transfer_bytes == 0 and stats.remote_prefills == 0 and stats.recomputed_prefills == 0
        assert stats.engine.prompt_tokens_computed == 0
        deadline = time.monotonic() + 10
        while ray.get(prefill.stats.remote(), timeout=TIMEOUT_S).exports_alive:  # released, not left to the lease
            assert time.monotonic() < deadline, "the unneeded export was not released"
            time.sleep(0.05)
        assert_idle([prefill], [decode])
    finally:
        kill_all(prefill, decode)


def test_first_token_streams_before_the_kv_arrives(ray_local) -> None:
    """The prefill worker's token goes out at once; the transfer (here one that hangs until its 3 s
    timeout, then recomputes) only delays the second."""
    transfer = {"transport": "grpc", "timeout_s": 3.0, "lease_s": 5.0}
    prefill = start_prefill({**transfer, "fault": "timeout"}, directory=False)
    decode = start_decode(prefill, transfer)
    try:
        prompt = _prompts(3)[2]
        request = {"request_id": "early", "prompt_token_ids": prompt, "sampling_params": GREEDY}
        stream = decode.generate.options(num_returns="streaming").remote(request)
        first = ray.get(next(stream), timeout=TIMEOUT_S)
        assert len(first["new_token_ids"]) == 1 and not first["finished"]
        assert ray.get(decode.stats.remote(), timeout=TIMEOUT_S).kv_transfer_failures == 0  # still fetching
        tokens = list(first["new_token_ids"])
        for ref in stream:
            tokens.extend(ray.get(ref, timeout=TIMEOUT_S)["new_token_ids"])
        assert tokens == hf_greedy(model_path("tiny"), prompt, GREEDY.max_tokens)[0]
        stats = ray.get(decode.stats.remote(), timeout=TIMEOUT_S)
        assert stats.kv_transfer_failures == 1 and stats.recomputed_prefills == 1
        assert stats.engine.prompt_tokens_computed == len(prompt)
        time.sleep(2.5)  # the hung export's lease
        assert_idle([prefill], [decode])
    finally:
        kill_all(prefill, decode)


class _Call:
    """`.remote(...)` returning an awaitable, as a Ray or Serve handle's method does."""

    def __init__(self, fn) -> None:
        self.remote = fn


class _ForeignTokenPrefill:
    """A real PrefillServer whose first token comes back outside the decode engine's vocabulary, as from a
    worker serving another model."""

    def __init__(self, server: PrefillServer) -> None:
        async def prefill(request: PrefillRequest) -> PrefillResult:
            return replace(await server.prefill(request), first_token=10**6)

        self.prefill = _Call(prefill)
        # fire and forget, as a handle's .remote() is
        self.release_kv = _Call(lambda export_id, owner: asyncio.ensure_future(server.release_kv(export_id, owner)))


def test_first_token_the_decode_engine_refuses_is_recomputed() -> None:
    """In one process, no Ray: the refused token costs a recompute, not the request, and the export is freed."""
    transfer = {"transport": "local"}
    prefill = PrefillServer(None, transfer)
    decode = DecodeServer(None, transfer, _ForeignTokenPrefill(prefill))
    prompt = _prompts(3)[2]

    async def run():
        request = {"request_id": "foreign", "prompt_token_ids": prompt, "sampling_params": GREEDY}
        tokens = [t async for out in decode.generate(request) for t in out["new_token_ids"]]
        return tokens, await decode.stats(), await prefill.stats()

    tokens, stats, prefill_stats = asyncio.run(run())
    assert tokens == hf_greedy(model_path("tiny"), prompt, GREEDY.max_tokens)[0]
    assert stats.prefill_failures == 1 and stats.recomputed_prefills == 1 and stats.kv_transfer_bytes == 0
    assert stats.engine.prompt_tokens_computed == len(prompt)
    assert prefill_stats.exports_alive == 0  # released at once, not left to its lease
    assert stats.engine.num_blocks_free == stats.engine.num_blocks_total


def test_lease_expiry_frees_unfetched_exports(ray_local) -> None:
    prefill = start_prefill({"transport": "ray", "lease_s": 0.5}, directory=False)
    try:
        result = ray.get(prefill.prefill.remote(PrefillRequest("orphan", _prompts(1)[0], GREEDY)), timeout=TIMEOUT_S)
        assert result.kv.nbytes > 0
        assert ray.get(prefill.stats.remote(), timeout=TIMEOUT_S).exports_alive == 1
        time.sleep(1.5)
        assert_idle([prefill])
    finally:
        kill_all(prefill)


def _wait_until_prefilling(prefill) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while ray.get(prefill.stats.remote(), timeout=TIMEOUT_S).engine.num_requests_running == 0:
        assert time.monotonic() < deadline, "the request never reached the prefill worker"
        time.sleep(0.02)


def _wait_for_chunks(prefill, n: int) -> None:
    deadline = time.monotonic() + TIMEOUT_S
    while ray.get(prefill.stats.remote(), timeout=TIMEOUT_S).kv_chunks_published < n:
        assert time.monotonic() < deadline, "no chunk was published"
        time.sleep(0.02)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_killed_prefill_worker_mid_request_recomputes(ray_local, streamed: bool) -> None:
    # A token budget of 4 makes the 2,000-token prefill take 500 steps: time to kill the worker mid-way.
    prefill = start_prefill(engine={"max_num_batched_tokens": 4}, directory=False)
    decode = start_decode(prefill, kv_streaming=streamed)
    try:
        prompt = random_prompts([2000], 8192, seed=35)[0]
        request = {"request_id": "victim", "prompt_token_ids": prompt, "sampling_params": GREEDY}
        stream = decode.generate.options(num_returns="streaming").remote(request)
        _wait_until_prefilling(prefill)
        if streamed:  # the decode worker holds chunk handles of a worker about to die
            _wait_for_chunks(prefill, 2)
        ray.kill(prefill, no_restart=True)
        tokens = []
        for ref in stream:
            tokens.extend(ray.get(ref, timeout=TIMEOUT_S)["new_token_ids"])
        assert tokens == hf_greedy(model_path("tiny"), prompt, GREEDY.max_tokens)[0]
        stats = ray.get(decode.stats.remote(), timeout=TIMEOUT_S)
        assert stats.prefill_failures == 1 and stats.recomputed_prefills == 1
        assert_idle([], [decode])
    finally:
        kill_all(prefill, decode)


@pytest.mark.parametrize("streamed", [False, True], ids=["whole", "streamed"])
def test_abort_frees_blocks_on_both_sides(ray_local, streamed: bool) -> None:
    """Streamed: chunks were published (a block every 4 steps) before the cancel; none outlives it."""
    prefill = start_prefill(engine={"max_num_batched_tokens": 4}, directory=False)
    decode = start_decode(prefill, kv_streaming=streamed)
    try:
        prompt = random_prompts([2000], 8192, seed=36)[0]
        request = {"request_id": "gone", "prompt_token_ids": prompt,
                   "sampling_params": SamplingParams(temperature=0, max_tokens=500, ignore_eos=True)}
        stream = decode.generate.options(num_returns="streaming").remote(request)
        _wait_until_prefilling(prefill)
        if streamed:
            _wait_for_chunks(prefill, 2)
        ray.cancel(stream)
        deadline = time.monotonic() + 10
        while True:
            try:
                assert_idle([prefill], [decode])
                break
            except AssertionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
    finally:
        kill_all(prefill, decode)


class _HungDirectory:
    """A prefix directory whose every call hangs, as during a directory or GCS outage."""

    def __init__(self) -> None:
        def never(*_args):
            return asyncio.get_running_loop().create_future()

        self.lookup = self.contains = self.publish = self.pin = self.changes = _Call(never)


def test_a_hung_directory_costs_a_bounded_delay_not_the_request(monkeypatch: pytest.MonkeyPatch) -> None:
    """In one process, no Ray: the first request waits a bounded time for the directory's change feed and
    computes the prompt; the feed's long poll and the background publish give up too, leaving no task
    behind. They are counted as directory errors."""
    import prefill_workers.directory_client as client

    monkeypatch.setattr(client, "DIRECTORY_LOOKUP_TIMEOUT_S", 0.2)
    monkeypatch.setattr(client, "DIRECTORY_PUBLISH_TIMEOUT_S", 0.2)
    monkeypatch.setattr(client, "FEED_POLL_S", 0.1)
    monkeypatch.setattr(client, "FEED_MARGIN_S", 0.1)
    prefill = PrefillServer(None, {"transport": "local"}, _HungDirectory())
    prompt = _prompts(2)[1]

    async def run():
        started = time.monotonic()
        first = await prefill.prefill(PrefillRequest("hung-1", prompt, GREEDY))
        elapsed = time.monotonic() - started
        prefill.connector.release(first.kv.export_id)
        again = await prefill.prefill(PrefillRequest("hung-2", prompt, GREEDY))  # a local hit: publishes
        prefill.connector.release(again.kv.export_id)
        deadline = time.monotonic() + 30
        while prefill._background and time.monotonic() < deadline:  # the publish task ends by its timeout
            await asyncio.sleep(0.05)
        return first, elapsed, await prefill.stats(), len(prefill._background)

    first, elapsed, stats, pending = asyncio.run(run())
    assert first.first_token == hf_greedy(model_path("tiny"), prompt, 1)[0][0]
    assert first.num_computed_tokens == len(prompt)
    assert elapsed < 30  # the lookup's timeout and the compute, far below a prefill call's own 60 s timeout
    assert stats.directory_errors >= 2 and pending == 0
    prefill.shutdown(timeout_s=5)


def test_a_seeded_run_resumed_on_another_decode_worker_continues_it(ray_local) -> None:
    """A disaggregated seeded run (its first token, and that token's random draw, on the prefill worker)
    resumed on another decode worker from its first k tokens gives the rest of the same run: what the ingress
    asks when the first decode replica died."""
    prefill = start_prefill(directory=False)
    first, second = start_decode(prefill), start_decode(prefill)
    params = SamplingParams(temperature=1.0, seed=77, max_tokens=12, ignore_eos=True)
    try:
        prompt = random_prompts([60], 8192, seed=37)[0]
        whole = generate(first, prompt, params)["token_ids"]
        for k in (1, 5):
            request = {"prompt_token_ids": prompt, "sampling_params": params, "resume_token_ids": whole[:k]}
            outs = [ray.get(ref, timeout=TIMEOUT_S)
                    for ref in second.generate.options(num_returns="streaming").remote(request)]
            assert [t for out in outs for t in out["new_token_ids"]] == whole[k:]
            assert outs[-1]["num_output_tokens"] == params.max_tokens and outs[-1]["finish_reason"] == "length"
        assert_idle([prefill], [first, second])
    finally:
        kill_all(prefill, first, second)
