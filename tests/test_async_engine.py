"""AsyncEngine streams: a consumer that falls behind gets the waiting tokens in one message."""

from __future__ import annotations

import asyncio
import threading

import pytest

from engine import LLM, EngineConfig, SamplingParams, async_engine
from engine.async_engine import AsyncEngine, EngineDeadError, StepOutput
from engine.engine import Engine
from tests.engine_helpers import random_prompts

GREEDY = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def engine():
    eng = AsyncEngine(EngineConfig())
    yield eng
    eng.shutdown()


def _output(rid: str, tokens: list[int], total: int, finished: bool = False) -> StepOutput:
    return StepOutput(rid, tokens, None, 5, 0, total, finished, "length" if finished else None)


def test_lagging_consumer_gets_every_waiting_token_in_one_message(engine) -> None:
    prompt = random_prompts([40], 8192, seed=3)[0]
    expected = LLM().generate([prompt], GREEDY)[0].outputs[0].token_ids

    async def run() -> list[StepOutput]:
        stream = engine.generate(prompt, GREEDY, "lagging")
        outs = [await stream.__anext__()]  # the first token, then stop reading until the request is done
        while await engine.call(lambda e: e.has_unfinished_requests()):
            await asyncio.sleep(0.01)
        outs += [out async for out in stream]
        return outs

    outs = asyncio.run(run())
    assert len(outs) == 2, [o.new_token_ids for o in outs]
    assert outs[0].new_token_ids + outs[1].new_token_ids == expected
    assert outs[1].finished and outs[1].finish_reason == "length" and outs[1].num_output_tokens == 12


def test_error_behind_waiting_tokens_raises_after_them(engine) -> None:
    async def run() -> tuple[list[StepOutput], BaseException | None]:
        stream = engine.open_stream("failing")
        stream.queue.put_nowait(_output("failing", [7], 1))
        stream.queue.put_nowait(_output("failing", [8, 9], 3))
        stream.queue.put_nowait(EngineDeadError("step failed"))
        outs: list[StepOutput] = []
        try:
            async for out in engine.iterate("failing", stream):
                outs.append(out)
        except EngineDeadError as exc:
            return outs, exc
        return outs, None

    outs, error = asyncio.run(run())
    assert [o.new_token_ids for o in outs] == [[7, 8, 9]] and outs[0].num_output_tokens == 3
    assert isinstance(error, EngineDeadError)


def test_merging_stops_at_the_finished_output(engine) -> None:
    async def run() -> list[StepOutput]:
        stream = engine.open_stream("done")
        for out in (_output("done", [1], 1), _output("done", [2], 2, finished=True)):
            stream.queue.put_nowait(out)
        return [out async for out in engine.iterate("done", stream)]

    outs = asyncio.run(run())
    assert len(outs) == 1 and outs[0].new_token_ids == [1, 2] and outs[0].finished


def test_a_steps_outputs_reach_the_loop_in_one_wake_up(engine) -> None:
    """Every stream on one event loop gets its output of a step from a single call_soon_threadsafe: one
    wake-up of the loop per step, not one per request (what lets the token stream send one frame)."""
    prompts = random_prompts([30, 31, 32, 33], 8192, seed=4)

    async def run() -> tuple[list[int], list[list[int]]]:
        loop = asyncio.get_running_loop()
        hand_off = loop.call_soon_threadsafe
        sizes: list[int] = []

        def counting(callback, *args):
            if callback is async_engine._put_all:
                sizes.append(len(args[0]))
            return hand_off(callback, *args)

        loop.call_soon_threadsafe = counting

        async def tokens(i: int) -> list[int]:
            return [t async for out in engine.generate(prompts[i], GREEDY, f"batch-{i}") for t in out.new_token_ids]

        return sizes, await asyncio.gather(*(tokens(i) for i in range(4)))

    sizes, outs = asyncio.run(run())
    assert all(len(out) == GREEDY.max_tokens for out in outs)
    assert sum(sizes) >= 4 * GREEDY.max_tokens // 2 and max(sizes) == 4  # a step of all four: one hand-off
    assert len(sizes) < sum(sizes)


class _ThreadRecordingEngine(Engine):
    """Records the thread of every construction and step (class-level: one test at a time uses it)."""

    threads: list[str] = []

    def __init__(self, config: EngineConfig) -> None:
        self.threads.append(threading.current_thread().name)
        super().__init__(config)

    def step(self):
        self.threads.append(threading.current_thread().name)
        return super().step()


def test_engine_is_built_and_stepped_on_the_loop_thread(monkeypatch) -> None:
    """One OpenMP team: torch work from a second thread gives OpenMP more threads than cores, and it
    then puts its waiting threads to sleep after every parallel region (decode steps 1.4-2x slower)."""
    monkeypatch.setattr(async_engine, "Engine", _ThreadRecordingEngine)
    _ThreadRecordingEngine.threads = []
    eng = AsyncEngine(EngineConfig())
    try:
        async def run() -> list[int]:
            return [t for out in [o async for o in eng.generate([5, 6, 7], GREEDY, "r")] for t in out.new_token_ids]

        assert len(asyncio.run(run())) == GREEDY.max_tokens
    finally:
        eng.shutdown()
    assert len(_ThreadRecordingEngine.threads) > GREEDY.max_tokens // 2  # the construction and the steps
    assert set(_ThreadRecordingEngine.threads) == {"pdserve-engine"}


def test_engine_that_cannot_be_built_raises_from_the_constructor(tmp_path) -> None:
    before = {t.ident for t in threading.enumerate()}
    with pytest.raises(ValueError, match="no-such-model"):
        AsyncEngine(EngineConfig(model=str(tmp_path / "no-such-model")))
    assert not [t for t in threading.enumerate() if t.ident not in before and t.name == "pdserve-engine"]


def test_health_reports_a_wedged_step_and_recovers(engine) -> None:
    """An iteration that runs past the stall limit (here a command that blocks the loop thread, as a hung
    device call would) makes health_problem name the stall; once it ends, the engine is healthy again."""
    release = threading.Event()
    entered = threading.Event()

    def wedge(_engine: Engine) -> None:
        entered.set()
        assert release.wait(60), "the test never released the loop"

    async def run() -> tuple[str | None, str | None, str | None]:
        before = engine.health_problem(stall_limit_s=0.2)
        blocked = asyncio.ensure_future(engine.call(wedge))
        assert await asyncio.to_thread(entered.wait, 60)
        deadline = asyncio.get_running_loop().time() + 60
        while (during := engine.health_problem(stall_limit_s=0.2)) is None:
            assert asyncio.get_running_loop().time() < deadline, "the stall was never reported"
            await asyncio.sleep(0.05)
        release.set()
        await blocked
        await engine.call(lambda e: None)  # one more iteration ended after the stall
        return before, during, engine.health_problem(stall_limit_s=60)

    before, during, after = asyncio.run(run())
    assert before is None and after is None
    assert during is not None and "stalled" in during


def _wedged(engine: AsyncEngine) -> tuple[threading.Event, threading.Event]:
    """Block the loop thread on a command until the returned `release` is set; `entered` is set once it is."""
    release, entered = threading.Event(), threading.Event()

    def wedge(_engine: Engine) -> None:
        entered.set()
        assert release.wait(60), "the test never released the loop"

    engine._commands.put(async_engine._Command(wedge, asyncio.get_running_loop(),
                                               asyncio.get_running_loop().create_future()))
    engine._wake.set()
    return release, entered


@pytest.mark.parametrize("defer", [False, True])
def test_an_add_cancelled_in_flight_leaves_no_request_behind(engine, defer: bool) -> None:
    """The caller gives up while its add_request waits behind a long step: the add still runs on the loop
    thread, and the request it made (a deferred one holding reserved prefix blocks, or a queued one) is
    aborted right after, not left running or holding blocks."""
    prompt = random_prompts([40], 8192, seed=11)[0]

    async def run():
        await engine.call(lambda e: e.add_request(prompt, GREEDY, "warm-prefix", defer=False))  # a cached
        while await engine.call(lambda e: e.has_unfinished_requests()):  # prefix for the deferred add
            await asyncio.sleep(0.01)
        release, entered = _wedged(engine)
        assert await asyncio.to_thread(entered.wait, 60)
        adding = asyncio.ensure_future(engine.add_request(prompt, GREEDY, f"gone-{defer}", defer=defer))
        await asyncio.sleep(0)  # the add is queued behind the wedge
        adding.cancel()
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await adding
        return await engine.call(lambda e: (e.stats(), dict(e.requests)))

    stats, requests = asyncio.run(run())
    assert not requests
    assert stats.num_requests_running == stats.num_requests_waiting == stats.num_requests_deferred == 0
    assert stats.num_blocks_free == stats.num_blocks_total


def test_a_command_whose_caller_loop_closed_does_not_stop_the_engine(engine) -> None:
    """A caller's event loop that closes while its command waits (asyncio.run returning) has nobody to tell;
    the engine loop drops the reply and goes on."""
    release: threading.Event | None = None

    async def leave_a_command_behind() -> None:
        nonlocal release
        release, entered = _wedged(engine)
        assert await asyncio.to_thread(entered.wait, 60)
        engine._commands.put(async_engine._Command(lambda e: e.stats(), asyncio.get_running_loop(),
                                                   asyncio.get_running_loop().create_future()))

    asyncio.run(leave_a_command_behind())  # its loop is closed from here on
    release.set()

    async def still_serving() -> bool:
        return await engine.call(lambda e: e.stats()) is not None

    assert asyncio.run(still_serving()) and engine.alive


def test_a_cancelled_finish_prefill_still_frees_the_held_blocks(engine) -> None:
    """The hand-over is one command: a caller cancelled while it waits (the decode side gave up) drops the
    export, and the engine has freed the request's blocks anyway."""
    prompt = random_prompts([70], 8192, seed=5)[0]
    one_token = SamplingParams(temperature=0.0, max_tokens=1)

    async def run():
        stream = engine.open_stream("handover")
        await engine.add_request(prompt, one_token, "handover", hold_kv=True, defer=True)
        await engine.import_kv("handover")
        [out] = [o async for o in engine.iterate("handover", stream)]
        finishing = asyncio.ensure_future(engine.finish_prefill("handover"))
        await asyncio.sleep(0)  # queued on the loop thread, then given up on
        finishing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await finishing
        return out, await engine.stats()

    out, stats = asyncio.run(run())
    assert out.finished and len(out.new_token_ids) == 1
    assert stats.num_requests_held == 0 and stats.num_blocks_free == stats.num_blocks_total
    assert engine.info.block_size == 16 and engine.load().kv_free_blocks == stats.num_blocks_total


def test_after_step_sees_each_step_without_polling() -> None:
    """A prompt of 4 chunks: each after_step answer comes after a step, so the computed tokens it reads grow
    by whole chunks and never repeat (a `call` between steps would read the same count again); the first
    is asked before any step, so it sees exactly the first chunk; then the request is done (None)."""
    eng = AsyncEngine(EngineConfig(max_num_batched_tokens=16))
    try:
        prompt = random_prompts([64], 8192, seed=9)[0]

        async def run() -> list[int | None]:
            stream = eng.open_stream("chunked")
            # one wedged command holds the loop, so the request and the first question queue before any step
            release, entered = _wedged(eng)
            assert await asyncio.to_thread(entered.wait, 60)
            add = asyncio.ensure_future(eng.add_request(prompt, SamplingParams(max_tokens=1), "chunked"))
            seen: list[int | None] = []

            def computed(e: Engine) -> int | None:
                req = e.requests.get("chunked")
                return None if req is None else req.num_computed_tokens

            first = asyncio.ensure_future(eng.after_step(computed))
            await asyncio.sleep(0)  # both queued before the loop goes on
            release.set()
            await add
            seen.append(await first)
            while seen[-1] is not None:
                seen.append(await eng.after_step(computed))
            async for _ in eng.iterate("chunked", stream):
                pass
            return seen

        seen = asyncio.run(run())
        counts = seen[:-1]
        assert seen[-1] is None and counts[0] == 16
        assert counts == sorted(set(counts)) and set(counts) <= {16, 32, 48}
    finally:
        eng.shutdown()


def test_after_step_answers_an_idle_engine_and_fails_with_a_dead_one() -> None:
    eng = AsyncEngine(EngineConfig())

    async def run() -> tuple[int, BaseException | None]:
        idle = await asyncio.wait_for(eng.after_step(lambda e: len(e.requests)), 30)  # no step will come
        eng.engine.step = lambda: (_ for _ in ()).throw(RuntimeError("device lost"))  # the next step fails
        await eng.add_request(random_prompts([8], 8192, seed=1)[0], SamplingParams(max_tokens=2), "doomed")
        # asked before the failing step ends (failed with the loop) or after (refused): never answered
        waiting = asyncio.ensure_future(eng.after_step(lambda e: "never"))
        try:
            await asyncio.wait_for(waiting, 30)
        except EngineDeadError as exc:
            return idle, exc
        return idle, None

    try:
        idle, error = asyncio.run(run())
        assert idle == 0 and isinstance(error, EngineDeadError)
    finally:
        eng.shutdown()
