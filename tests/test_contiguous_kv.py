"""kv_layout="contiguous": the incident's allocator, in isolation and inside the real engine.

The allocator: first fit, in-place growth, moves (possibly overlapping the
old place), failure that changes nothing, coalesced holes, and a scripted
fragmentation that refuses a region while half the arena is free. A
stateful property test checks the invariants and that a region's data
survives every move when the caller copies as documented.

The engine: greedy outputs equal the paged engine's token for token while
regions grow in place, move (the KV data is really copied), fail to grow
(preempt + recompute) or are reserved at their maximum up front; a scripted
workload gets admission refusals while >= 25% of the arena is free where the
paged layout gets none; no block leaks once every request ended.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine import LLM, EngineStats, SamplingParams
from engine.config import EngineConfig
from engine.contiguous_allocator import ContiguousAllocator, Growth, Region, admission_size, grown_size
from tests.engine_helpers import assert_all_free, random_prompts

BS = 16  # block size of the engine tests, in tokens


# ---- the allocator alone -------------------------------------------------------------------------------
def _four_regions(arena: ContiguousAllocator) -> list[Region]:
    regions = [arena.allocate(4) for _ in range(4)]
    assert [r.start for r in regions] == [0, 4, 8, 12]
    return regions


def test_first_fit_takes_the_lowest_hole_that_fits() -> None:
    arena = ContiguousAllocator(16)
    a, b, c, d = _four_regions(arena)
    arena.free(a)  # hole [0, 4)
    arena.free(c)  # hole [8, 12)
    assert arena.allocate(3).start == 0
    assert arena.allocate(2).start == 8  # [3, 4) is too small, next hole
    arena.check_invariants()


def test_grow_in_place_when_the_next_blocks_are_free() -> None:
    arena = ContiguousAllocator(16)
    a, b, c, d = _four_regions(arena)
    arena.free(b)
    assert arena.grow(a, need=5, target=6) is Growth.IN_PLACE
    assert (a.start, a.length) == (0, 6)
    assert arena.holes() == [(6, 2)]
    # only 2 more blocks after a: extends as far as the hole goes when that still meets need
    assert arena.grow(a, need=7, target=12) is Growth.IN_PLACE
    assert (a.start, a.length, arena.holes()) == (0, 8, [])
    arena.check_invariants()


def test_grow_moves_to_the_first_hole_when_blocked() -> None:
    arena = ContiguousAllocator(24)
    a, b, c, d = _four_regions(arena)  # hole [16, 24)
    assert arena.grow(a, need=5, target=6) is Growth.MOVED
    assert (a.start, a.length) == (16, 6)
    assert arena.holes() == [(0, 4), (22, 2)]
    arena.check_invariants()


def test_a_move_may_overlap_the_old_place() -> None:
    arena = ContiguousAllocator(16)
    a, b, c, d = _four_regions(arena)
    arena.free(a)  # hole [0, 4) right before b
    assert arena.grow(b, need=6, target=6) is Growth.MOVED
    assert (b.start, b.length) == (0, 6)  # old place [4, 8) merged with [0, 4): a memmove
    assert arena.holes() == [(6, 2)]
    arena.check_invariants()


def test_fragmented_arena_refuses_while_half_is_free() -> None:
    """The incident in 16 blocks: 8 free, but in two holes of 4, so neither 5 fits nor can b grow to 13."""
    arena = ContiguousAllocator(16)
    a, b, c, d = _four_regions(arena)
    arena.free(a)
    arena.free(c)
    assert arena.num_free == 8 and arena.largest_hole() == 4
    assert arena.allocate(5) is None
    before = (arena.holes(), b.start, b.length)
    assert arena.grow(b, need=13, target=13) is Growth.FAILED
    assert (arena.holes(), b.start, b.length) == before  # failure changes nothing
    arena.check_invariants()


def test_falls_back_to_need_when_target_does_not_fit() -> None:
    arena = ContiguousAllocator(16)
    a, b, c, d = _four_regions(arena)
    arena.free(c)
    arena.free(d)  # hole [8, 16): 8 blocks
    assert arena.grow(a, need=8, target=12) is Growth.MOVED
    assert (a.start, a.length) == (8, 8)


def test_free_coalesces_and_refuses_double_free() -> None:
    arena = ContiguousAllocator(16)
    a, b, c, d = _four_regions(arena)
    for region in (a, c, b):
        arena.free(region)
    assert arena.holes() == [(0, 12)]
    with pytest.raises(ValueError):
        arena.free(b)
    arena.free(d)
    assert arena.holes() == [(0, 16)] and arena.num_free == 16


def test_sizing_policies() -> None:
    assert grown_size(10, 11, 100) == 15  # +50%
    assert grown_size(10, 11, 12) == 12  # never past what the request can use
    assert grown_size(2, 5, 100) == 5  # at least what is needed now
    assert grown_size(1, 2, 100) == 2  # at least one more block
    assert admission_size(3, 10, "grow") == 3
    assert admission_size(12, 10, "grow") == 10  # a ceiling is a ceiling
    assert admission_size(3, 10, "max") == 10


class AllocatorMachine(RuleBasedStateMachine):
    """Random allocate / grow / free with a model arena of block contents, copied on every move."""

    NUM_BLOCKS = 24

    def __init__(self) -> None:
        super().__init__()
        self.arena = ContiguousAllocator(self.NUM_BLOCKS)
        self.data: list[object] = [None] * self.NUM_BLOCKS  # what each block holds
        self.owned: dict[int, tuple[Region, int]] = {}  # label -> (region, filled blocks)
        self.next_label = 0

    @rule(length=st.integers(1, 8))
    def allocate(self, length: int) -> None:
        fits = self.arena.largest_hole() >= length
        region = self.arena.allocate(length)
        assert (region is not None) == fits
        if region is not None:
            label = self.next_label
            self.next_label += 1
            for i in range(length):
                self.data[region.start + i] = (label, i)
            self.owned[label] = (region, length)

    @precondition(lambda self: self.owned)
    @rule(data=st.data(), extra=st.integers(1, 8), slack=st.integers(0, 4))
    def grow(self, data: st.DataObject, extra: int, slack: int) -> None:
        label = data.draw(st.sampled_from(sorted(self.owned)))
        region, filled = self.owned[label]
        old_start, old_length, free_before = region.start, region.length, self.arena.num_free
        outcome = self.arena.grow(region, region.length + extra, region.length + extra + slack)
        if outcome is Growth.MOVED:  # read-then-write: safe when old and new places overlap
            moved = self.data[old_start: old_start + filled]
            self.data[region.start: region.start + filled] = moved
        if outcome is Growth.FAILED:
            assert (region.start, region.length, self.arena.num_free) == (old_start, old_length, free_before)
            return
        assert old_length + extra <= region.length <= old_length + extra + slack
        assert outcome is Growth.MOVED or region.start == old_start
        for i in range(filled, region.length):
            self.data[region.start + i] = (label, i)
        self.owned[label] = (region, region.length)

    @precondition(lambda self: self.owned)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        label = data.draw(st.sampled_from(sorted(self.owned)))
        self.arena.free(self.owned.pop(label)[0])

    @invariant()
    def consistent(self) -> None:
        self.arena.check_invariants()
        for label, (region, filled) in self.owned.items():
            assert self.data[region.start: region.start + filled] == [(label, i) for i in range(filled)]
        assert self.arena.num_free == self.NUM_BLOCKS - sum(r.length for r, _ in self.owned.values())


TestAllocatorMachine = AllocatorMachine.TestCase
TestAllocatorMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


# ---- inside the engine ---------------------------------------------------------------------------------
def _contiguous(reserve: str = "grow", **config) -> LLM:
    return LLM(kv_layout="contiguous", contiguous_reserve=reserve, enable_prefix_caching=False, **config)


def _greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)


def _tokens(llm: LLM, prompts: list[list[int]], params: SamplingParams | list[SamplingParams]) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params)]


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="enable_prefix_caching=False"):
        EngineConfig(kv_layout="contiguous")  # prefix caching is on by default
    with pytest.raises(ValueError, match="kv_layout"):
        EngineConfig(kv_layout="ring")
    with pytest.raises(ValueError, match="contiguous_reserve"):
        EngineConfig(kv_layout="contiguous", enable_prefix_caching=False, contiguous_reserve="some")
    assert EngineConfig(kv_layout="contiguous", enable_prefix_caching=False).contiguous_reserve == "grow"


def test_region_grows_in_place_with_outputs_equal_to_paged() -> None:
    llm = _contiguous()
    engine = llm.engine
    prompt = random_prompts([40], engine.vocab_size, seed=21)[0]
    req = engine.add_request(prompt, _greedy(100))
    starts, lengths = set(), []
    while engine.has_unfinished_requests():
        engine.step()
        for region in engine.kv.regions.values():
            starts.add(region.start)
            lengths.append(region.length)
    assert starts == {0} and lengths[0] == 3 and max(lengths) == -(-140 // BS)  # 41 tokens, then to the ceiling
    assert len(set(lengths)) > 2  # several growth steps, all in place
    stats = llm.stats()
    assert stats.num_kv_moves == 0 and stats.num_growth_failures == 0
    assert _tokens(LLM(enable_prefix_caching=False), [prompt], _greedy(100)) == [req.output_token_ids]
    assert_all_free(llm)


def _matches_paged(llm: LLM, lengths: list[int], seed: int, max_tokens: int) -> EngineStats:
    """Run prompts of these lengths on llm; outputs must equal a paged engine's; every block is back after."""
    prompts = random_prompts(lengths, llm.engine.vocab_size, seed=seed)
    got = _tokens(llm, prompts, _greedy(max_tokens))
    assert got == _tokens(LLM(enable_prefix_caching=False), prompts, _greedy(max_tokens))
    assert_all_free(llm)
    return llm.stats()


def test_moved_regions_keep_their_kv() -> None:
    """Regions admitted side by side block each other: growth moves them, copying the KV for real."""
    stats = _matches_paged(_contiguous(num_kv_blocks=64), [20, 20, 20, 20], seed=22, max_tokens=120)
    assert stats.num_kv_moves > 0
    assert stats.kv_bytes_moved > 0 and stats.kv_move_seconds > 0


def test_growth_failure_preempts_and_recomputes() -> None:
    """A small arena: running regions can neither grow nor move; the newest is preempted, none is lost."""
    stats = _matches_paged(_contiguous(num_kv_blocks=24), [30, 50, 70, 40], seed=23, max_tokens=90)
    assert stats.num_growth_failures > 0 and stats.num_preemptions > 0


def test_reserve_max_takes_the_whole_region_at_admission() -> None:
    llm = _contiguous("max", num_kv_blocks=64)
    engine = llm.engine
    prompts = random_prompts([20, 33], engine.vocab_size, seed=24)
    reqs = [engine.add_request(p, _greedy(n)) for p, n in zip(prompts, (60, 100), strict=True)]
    engine.step()
    ceilings = [-(-(20 + 60) // BS), -(-(33 + 100) // BS)]
    assert [engine.kv.regions[r].length for r in reqs] == ceilings
    assert llm.stats().num_blocks_free == 64 - sum(ceilings)
    while engine.has_unfinished_requests():
        engine.step()
    stats = llm.stats()
    assert stats.num_kv_moves == 0 and stats.num_growth_failures == 0
    assert [r.output_token_ids for r in reqs] == _tokens(LLM(enable_prefix_caching=False), prompts,
                                                        [_greedy(60), _greedy(100)])
    assert_all_free(llm)


def _fragment(llm: LLM) -> list[list[int]]:
    """Four requests side by side (short, long, short, long); when the short ones end, a fifth arrives
    that needs more room than either hole they left. Returns every request's output tokens."""
    engine = llm.engine
    short, long = _greedy(10), _greedy(44)
    prompts = random_prompts([50, 20, 50, 20, 70], engine.vocab_size, seed=25)
    reqs = [engine.add_request(p, s) for p, s in zip(prompts, (short, long, short, long), strict=False)]
    while not (reqs[0].is_finished and reqs[2].is_finished):
        engine.step()
    reqs.append(engine.add_request(prompts[4], short))
    while engine.has_unfinished_requests():
        engine.step()
    return [r.output_token_ids for r in reqs]


def test_fragmentation_refuses_admission_while_memory_is_free() -> None:
    contiguous, paged = _contiguous("max", num_kv_blocks=16), LLM(enable_prefix_caching=False, num_kv_blocks=16)
    assert _fragment(contiguous) == _fragment(paged)
    c, p = contiguous.stats(), paged.stats()
    assert c.num_admission_failures_free_memory > 0  # refused with 8 of 16 blocks free in two holes of 4
    assert p.num_admission_failures_free_memory == 0 and p.num_admission_failures == 0
    assert_all_free(contiguous)
    assert_all_free(paged)
