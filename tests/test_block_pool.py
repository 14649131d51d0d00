"""Block pool state machine under random operation sequences (hypothesis).

Invariants after every step: free + used == total, ref counts >= 0 and zero
exactly for free blocks, the hash index consistent, and nothing leaked once
every holder has released its blocks. Eviction is least-recently-freed first.
"""

from __future__ import annotations

import hypothesis.strategies as st
import pytest
from hypothesis import settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from engine.block_pool import BlockPool, FreeBlockQueue, KVBlock

NUM_BLOCKS = 12


class BlockPoolMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.pool = BlockPool(NUM_BLOCKS)
        self.holders: list[list[KVBlock]] = []  # each holder owns one reference per listed block
        self.next_hash = 0

    @rule(n=st.integers(min_value=1, max_value=5))
    def allocate(self, n: int) -> None:
        if n > self.pool.num_free_blocks:
            with pytest.raises(ValueError):
                self.pool.get_new_blocks(n)
            return
        blocks = self.pool.get_new_blocks(n)
        assert all(b.ref_cnt == 1 and b.block_hash is None for b in blocks)
        self.holders.append(blocks)

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def publish(self, data: st.DataObject) -> None:
        holder = data.draw(st.sampled_from(self.holders))
        block = data.draw(st.sampled_from(holder))
        h = self.next_hash.to_bytes(32, "big")
        self.next_hash += 1
        self.pool.cache_block(block, h)
        if block.block_hash == h:
            assert self.pool.get_cached_block(h) is block

    @precondition(lambda self: self.pool.cached)
    @rule(data=st.data())
    def share(self, data: st.DataObject) -> None:
        h = data.draw(st.sampled_from(sorted(self.pool.cached)))
        block = self.pool.get_cached_block(h)
        free_before = self.pool.num_free_blocks
        was_free = block.ref_cnt == 0
        self.pool.touch([block])
        assert self.pool.num_free_blocks == free_before - int(was_free)
        self.holders.append([block])

    @precondition(lambda self: self.holders)
    @rule(data=st.data())
    def free(self, data: st.DataObject) -> None:
        holder = self.holders.pop(data.draw(st.integers(0, len(self.holders) - 1)))
        self.pool.free_blocks(reversed(holder))

    @rule()
    def evict_all_cached(self) -> None:
        self.pool.reset_prefix_cache()
        assert all(b.ref_cnt > 0 for b in self.pool.cached.values())

    @invariant()
    def invariants_hold(self) -> None:
        self.pool.check_invariants()
        refs: dict[int, int] = {}
        for holder in self.holders:
            for b in holder:
                refs[b.block_id] = refs.get(b.block_id, 0) + 1
        for b in self.pool.blocks:
            assert b.ref_cnt == refs.get(b.block_id, 0)

    def teardown(self) -> None:
        for holder in self.holders:
            self.pool.free_blocks(holder)
        self.pool.check_invariants()
        assert self.pool.num_free_blocks == NUM_BLOCKS


TestBlockPoolMachine = BlockPoolMachine.TestCase
TestBlockPoolMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)


def test_lru_eviction_order() -> None:
    pool = BlockPool(3)
    a, b, c = pool.get_new_blocks(3)
    for i, blk in enumerate((a, b, c)):
        pool.cache_block(blk, bytes([i]) * 32)
    pool.free_blocks([b, a, c])  # freed in this order: b is least recently freed
    (first,) = pool.get_new_blocks(1)
    assert first is b and pool.get_cached_block(bytes([1]) * 32) is None
    assert pool.get_cached_block(bytes([0]) * 32) is a  # still reusable


def test_touching_a_free_cached_block_revives_it() -> None:
    pool = BlockPool(2)
    (a,) = pool.get_new_blocks(1)
    pool.cache_block(a, b"x" * 32)
    pool.free_blocks([a])
    assert pool.num_free_blocks == 2
    pool.touch([pool.get_cached_block(b"x" * 32)])
    assert a.ref_cnt == 1 and pool.num_free_blocks == 1
    pool.check_invariants()


def test_double_free_is_an_error() -> None:
    pool = BlockPool(1)
    (a,) = pool.get_new_blocks(1)
    pool.free_blocks([a])
    with pytest.raises(RuntimeError):
        pool.free_blocks([a])


def test_free_queue_operations_are_constant_time_links() -> None:
    blocks = [KVBlock(i) for i in range(4)]
    q = FreeBlockQueue(blocks)
    q.remove(blocks[2])
    assert [b.block_id for b in q] == [0, 1, 3] and q.size == 3
    q.append(blocks[2])
    assert q.popleft() is blocks[0] and [b.block_id for b in q] == [1, 3, 2]
