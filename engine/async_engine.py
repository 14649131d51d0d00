"""The engine loop in its own thread, driven from asyncio.

Why a thread: a step is a long blocking torch call. Running it beside the
event loop keeps streaming and new arrivals moving while a batch computes
(torch releases the GIL inside its kernels).

Invariant: only the loop thread touches the Engine. Callers send it closures
(`call`) that run between steps, or (`after_step`) once the next step has run;
results come back as asyncio futures.
Streams get a StepOutput per step in which their request got a token, the
last one with `finished` set; a consumer that falls behind reads the waiting
ones merged into one (all tokens since its last read). A consumer that stops early (cancelled, client
gone) aborts its request, which frees its blocks before the next step.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

import torch

from engine.config import EngineConfig, SamplingParams
from engine.engine import Engine
from engine.outputs import EngineInfo, EngineLoad, EngineStats, PrefillExport
from engine.request import Request, RequestStatus

T = TypeVar("T")

# One loop iteration (a step, or the commands run between steps) longer than this, in seconds, means the
# engine is wedged (a hung device call, a deadlock): health checks fail so the replica is replaced. Far
# above any real step: a full 8,192-token prefill chunk of a 1.7B model on this 2-core CPU takes ~20 s.
STEP_STALL_LIMIT_S = 120.0


@dataclass(frozen=True)
class StepOutput:
    """New tokens of one request since its previous StepOutput."""

    request_id: str
    new_token_ids: list[int]
    new_logprobs: list[dict[int, float]] | None
    num_prompt_tokens: int
    num_cached_tokens: int
    num_output_tokens: int
    finished: bool
    finish_reason: str | None = None  # "stop" | "length" | "abort" (a request that fails raises instead)
    stop_reason: int | str | None = None
    text: str | None = None  # the whole output text, on the finished output only


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    sent: int = 0
    error: BaseException | None = None  # taken from the queue while merging; raised next


class EngineDeadError(RuntimeError):
    """The engine loop stopped after an error; the worker needs replacing."""


class RequestFailedError(RuntimeError):
    """This request's own step work failed (its logits, its stop check); the engine goes on with the rest."""


@dataclass
class _Command:
    fn: Callable[[Engine], Any]
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future = field(repr=False)


class AsyncEngine:
    def __init__(self, config: EngineConfig, idle_wait_s: float = 0.05,
                 build: Callable[[EngineConfig], Engine] | None = None) -> None:
        """Builds the Engine on the loop thread and returns once it is built (or raises its error).

        build: a factory of the engine, None for Engine itself (what serving always uses; a benchmark may pass
        a subclass, bench/engine_standin.py).

        Why there: torch's CPU thread settings and OpenMP's thread team belong to the
        thread that runs the parallel regions. An engine built (weights packed, thread
        count set) on one thread and stepped on another ran its decode steps 1.4-2x
        slower (BENCHMARKS.md, "Where the HTTP gap was"); on the loop thread every
        torch call of the engine comes from one thread.
        """
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._after_step: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, _Stream] = {}
        self._idle_wait_s = idle_wait_s
        self._stopping = False
        self.error: BaseException | None = None
        self.last_step_time = time.monotonic()  # monotonic seconds: when the loop last finished an iteration
        self.engine: Engine  # set by the loop thread before `built` hears from it; only that thread uses it
        self.info: EngineInfo  # likewise; never changes, read it from anywhere
        built: queue.SimpleQueue[BaseException | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, args=(config, build, built), name="pdserve-engine",
                                        daemon=True)
        self._thread.start()
        error = built.get()
        if error is not None:
            self._thread.join()
            raise error

    # ---- public, called from the event loop ------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    def health_problem(self, stall_limit_s: float = STEP_STALL_LIMIT_S) -> str | None:
        """Why this engine cannot serve now, or None: its loop died, or its current iteration has run for
        more than stall_limit_s seconds. A stalled engine that finishes the iteration is healthy again."""
        if not self.alive:
            return f"engine loop is dead: {self.error!r}"
        stalled_s = time.monotonic() - self.last_step_time
        if stalled_s > stall_limit_s:
            return f"engine loop stalled: one iteration has run {stalled_s:.0f} s (limit {stall_limit_s:.0f} s)"
        return None

    async def call(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) in the loop thread between steps and return its result."""
        if not self.alive:
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")
        return await self._submit(fn)

    async def after_step(self, fn: Callable[[Engine], T]) -> T:
        """Run fn(engine) in the loop thread once the step running now, or else the next one, has ended, and
        return its result: what a step changed, seen without polling. With no request unfinished no step
        will come, so fn runs when the idle loop next looks (within idle_wait_s seconds)."""
        if not self.alive:
            raise EngineDeadError(f"engine loop is not running: {self.error!r}")
        return await self._submit(fn, self._after_step)

    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                          cache_salt: str | None = None, **add_kwargs: Any) -> Request:
        """Engine.add_request on the loop thread. A caller cancelled while the add is queued or running
        leaves nothing behind: the add still runs (a queued command cannot be taken back), so an abort is
        queued right after it (commands run in order) and frees whatever the request got, deferred
        requests' reserved prefix blocks included. (An add that raised added nothing: no abort, which
        could hit another request that holds the id.)"""
        try:
            return await self.call(lambda e: e.add_request(prompt, params, request_id, cache_salt, **add_kwargs))
        except asyncio.CancelledError:
            if self.alive:
                self._abort_soon(request_id)
            raise

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       cache_salt: str | None = None, **add_kwargs: Any) -> AsyncIterator[StepOutput]:
        """Add a request and yield its outputs as they come. Closing the iterator early aborts it."""
        stream = self.open_stream(request_id)
        try:
            await self.add_request(prompt, params, request_id, cache_salt, **add_kwargs)
        except BaseException:
            self.discard_stream(request_id)
            raise
        async for out in self.iterate(request_id, stream):
            yield out

    def open_stream(self, request_id: str) -> _Stream:
        """Register a stream before the request exists, so no output can be missed."""
        if request_id in self._streams:
            raise ValueError(f"request_id {request_id!r} is already streaming")
        stream = _Stream(asyncio.get_running_loop(), asyncio.Queue())
        self._streams[request_id] = stream
        return stream

    def discard_stream(self, request_id: str) -> None:
        """Forget a stream whose request was never added (adding it failed)."""
        self._streams.pop(request_id, None)

    async def iterate(self, request_id: str, stream: _Stream) -> AsyncIterator[StepOutput]:
        """Yield a registered stream's outputs until finished; abort the request if left early."""
        finished = False
        try:
            while True:
                item = stream.error or await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                item = _coalesce(item, stream)
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            self._streams.pop(request_id, None)
            if not finished and self.alive:
                await self.abort(request_id)

    async def abort(self, request_id: str) -> None:
        await self.call(lambda e: e.abort_request(request_id))

    async def import_kv(self, request_id: str, blocks: torch.Tensor | None = None, num_tokens: int = 0, *,
                        num_cached_tokens: int | None = None) -> None:
        """Engine.import_kv on the loop thread: attach K/V from elsewhere (if any) and queue the request."""
        await self.call(lambda e: e.import_kv(request_id, blocks, num_tokens, num_cached_tokens=num_cached_tokens))

    async def finish_prefill(self, request_id: str, skip_blocks: int = 0) -> PrefillExport:
        """Engine.finish_prefill on the loop thread. Its blocks are freed there even when the caller is
        cancelled meanwhile (a queued command still runs): the export is then simply dropped."""
        return await self.call(lambda e: e.finish_prefill(request_id, skip_blocks))

    async def stats(self) -> EngineStats:
        return await self.call(lambda e: e.stats())

    def load(self) -> EngineLoad:
        """The engine's load now, without waiting for a step: plain reads of values the loop thread owns,
        possibly a step stale (fine for routing, which reads it every few seconds)."""
        return self.engine.load()

    def _abort_soon(self, request_id: str) -> None:
        """Queue an abort of request_id without waiting for it (for a caller being cancelled)."""
        self._submit(lambda e: e.abort_request(request_id))

    def _submit(self, fn: Callable[[Engine], T], commands: queue.SimpleQueue | None = None) -> asyncio.Future:
        """Queue fn for the loop thread (on `commands`, the between-steps queue by default); the future (on the
        caller's loop) gets its result. Only a between-steps command wakes an idle loop: an after-step one
        waits for a step, or for the idle loop's next look (idle_wait_s) when none comes, so a caller that
        keeps asking after each step never spins an idle loop."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        (self._commands if commands is None else commands).put(_Command(fn, loop, future))
        if commands is None:
            self._wake.set()
        return future

    def shutdown(self, timeout_s: float = 5.0) -> None:
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s)

    # ---- the loop thread ---------------------------------------------------------------------
    def _run(self, config: EngineConfig, build: Callable[[EngineConfig], Engine] | None,
             built: queue.SimpleQueue) -> None:
        try:
            self.engine = (build or Engine)(config)
        except BaseException as exc:  # bad config, missing model: the constructor re-raises it
            built.put(exc)
            return
        self.info = self.engine.info()
        self.last_step_time = time.monotonic()  # building (loading weights) is not a stall
        built.put(None)
        try:
            while not self._stopping:
                self._drain_commands()
                if self.engine.has_unfinished_requests():
                    self._publish(self.engine.step())
                    self._publish(self.engine.pop_finished())
                    self.last_step_time = time.monotonic()
                    self._run_after_step()
                else:
                    self._run_after_step()  # no step will come: they run now
                    self.last_step_time = time.monotonic()
                    self._wake.wait(self._idle_wait_s)
                    self._wake.clear()
        except BaseException as exc:  # a failed step leaves the engine unusable: fail every stream
            self.error = exc
            for stream in list(self._streams.values()):
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, EngineDeadError(repr(exc)))
        finally:
            self._fail_pending_commands()

    def _drain_commands(self) -> None:
        """Run the between-steps commands until none is left: one queued meanwhile still runs before the step."""
        while (cmd := _take(self._commands)) is not None:
            self._run_command(cmd)

    def _run_after_step(self) -> None:
        """Run the after-step commands queued so far: one queued meanwhile waits for the next step."""
        for _ in range(self._after_step.qsize()):
            if (cmd := _take(self._after_step)) is None:
                return
            self._run_command(cmd)

    def _run_command(self, cmd: _Command) -> None:
        try:
            result = cmd.fn(self.engine)
        except Exception as exc:  # the caller's error (bad input): report it, keep the loop
            _reply(cmd, _set_exception, exc)
        else:
            _reply(cmd, _set_result, result)
        # a command may end requests (abort, a first token that stops) or give them a token
        # (attach_kv with the prefill worker's first token): send those now, not a step later
        self._publish(self.engine.pop_finished())
        self._publish([self.engine.requests[rid] for rid in list(self._streams) if rid in self.engine.requests])

    def _publish(self, requests: list[Request]) -> None:
        """Hand these requests' new outputs to their streams: one wake-up per event loop, not one per
        request, so a step's outputs reach the loop together (and leave it together, see token_stream)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, StepOutput | BaseException]]] = {}
        for req in requests:
            stream = self._streams.get(req.request_id)
            out = None if stream is None else self._output(req, stream)
            if out is not None:
                batches.setdefault(stream.loop, []).append((stream.queue, out))
        for loop, items in batches.items():
            loop.call_soon_threadsafe(_put_all, items)

    def _output(self, req: Request, stream: _Stream) -> StepOutput | RequestFailedError | None:
        """The request's output since the stream's last one (None: nothing new); marks it sent. A request
        that failed gives its error instead, which the stream raises after the tokens it already sent."""
        if req.status == RequestStatus.FINISHED_ERROR:
            self._streams.pop(req.request_id, None)
            return RequestFailedError(f"request {req.request_id!r} failed: {req.error}")
        sent = max(stream.sent, req.num_resumed_tokens)  # a resumed request's leading tokens went out elsewhere
        new = req.output_token_ids[sent:]
        if not new and not req.is_finished:
            return None
        logprobs = req.output_logprobs[sent:] if req.sampling_params.logprobs is not None else None
        stream.sent = req.num_output_tokens
        finished = req.is_finished
        out = StepOutput(
            request_id=req.request_id, new_token_ids=list(new), new_logprobs=logprobs,
            num_prompt_tokens=req.num_prompt_tokens, num_cached_tokens=max(req.num_cached_tokens, 0),
            num_output_tokens=req.num_output_tokens, finished=finished,
            finish_reason=req.status.value if finished else None, stop_reason=req.stop_reason,
            text=self.engine.output_text(req) if finished else None,
        )
        if finished:
            self._streams.pop(req.request_id, None)
        return out

    def _fail_pending_commands(self) -> None:
        for commands in (self._commands, self._after_step):
            while (cmd := _take(commands)) is not None:
                _reply(cmd, _set_exception, EngineDeadError("engine loop stopped"))


def _take(commands: queue.SimpleQueue) -> _Command | None:
    """The next queued command, or None when there is none."""
    try:
        return commands.get_nowait()
    except queue.Empty:
        return None


def _coalesce(first: StepOutput, stream: _Stream) -> StepOutput:
    """Merge the outputs already waiting behind `first` into one (a consumer that fell behind
    gets one message with every token since its last read, not one message per step).
    An error found behind them is kept on the stream: the merged tokens go out first, then it raises."""
    out = first
    while not out.finished and not stream.queue.empty():
        nxt = stream.queue.get_nowait()
        if isinstance(nxt, BaseException):
            stream.error = nxt
            break
        logprobs = None if out.new_logprobs is None else out.new_logprobs + (nxt.new_logprobs or [])
        out = replace(nxt, new_token_ids=out.new_token_ids + nxt.new_token_ids, new_logprobs=logprobs)
    return out


def _put_all(items: list[tuple[asyncio.Queue, StepOutput | BaseException]]) -> None:
    for queue_, out in items:
        queue_.put_nowait(out)


def _reply(cmd: _Command, setter: Callable[[asyncio.Future, Any], None], value: Any) -> None:
    """Hand a command's outcome to its caller's event loop; a loop closed meanwhile has nobody to tell
    (its caller is gone), which must not stop the engine loop."""
    try:
        cmd.loop.call_soon_threadsafe(setter, cmd.future, value)
    except RuntimeError:  # "Event loop is closed"
        pass


def _set_result(future: asyncio.Future, result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future, exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
