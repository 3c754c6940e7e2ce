"""BlockManager: block counts by hand, growth of a table, ref counts, idempotent free."""
from __future__ import annotations

import pytest

from server.engine.block_manager import BlockManager, OutOfBlocksError
from server.engine.request import Request
from server.engine.sampling_params import SamplingParams


def _req(rid: str = "r", n_prompt: int = 10) -> Request:
    return Request(rid, list(range(n_prompt)), SamplingParams(max_tokens=4))


def test_blocks_for_tokens_is_ceil_division():
    bm = BlockManager(num_blocks=8, block_size=4)
    assert [bm.blocks_for_tokens(n) for n in (0, 1, 4, 5, 8, 9)] == [0, 1, 1, 2, 2, 3]


def test_allocate_grows_table_to_cover_computed_plus_new():
    bm = BlockManager(num_blocks=8, block_size=4)
    r = _req()
    assert bm.allocate_for(r, 6) == r.block_ids and len(r.block_ids) == 2  # ceil(6/4)
    assert bm.num_free_blocks == 6
    r.num_computed_tokens = 6
    assert bm.allocate_for(r, 2) == []  # 8 tokens still fit in 2 blocks
    r.num_computed_tokens = 8
    new = bm.allocate_for(r, 1)  # the 9th token needs a third block
    assert len(new) == 1 and len(r.block_ids) == 3 and len(set(r.block_ids)) == 3
    assert bm.num_free_blocks == 5
    assert bm.usage == pytest.approx(3 / 8)
    assert all(bm.ref_count(b) == 1 for b in r.block_ids)


def test_can_allocate_and_out_of_blocks():
    bm = BlockManager(num_blocks=3, block_size=4)
    assert bm.can_allocate(12) and not bm.can_allocate(13)
    a, b = _req("a"), _req("b")
    bm.allocate_for(a, 8)
    assert bm.can_allocate_for(b, 4) and not bm.can_allocate_for(b, 5)
    with pytest.raises(OutOfBlocksError):
        bm.allocate_for(b, 5)
    assert b.block_ids == [] and bm.num_free_blocks == 1  # a failed allocation takes nothing


def test_free_is_idempotent_and_blocks_are_distinct_across_requests():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = _req("a"), _req("b")
    bm.allocate_for(a, 4)
    bm.allocate_for(b, 3)
    assert set(a.block_ids).isdisjoint(b.block_ids)
    assert bm.num_free_blocks == 0
    assert bm.free(a) == 2
    assert bm.num_free_blocks == 2 and a.block_ids == []
    assert bm.free(a) == 0  # second free: nothing happens
    assert bm.num_free_blocks == 2
    assert bm.free(b) == 2 and bm.num_free_blocks == 4
    # All blocks back: a full pool can be allocated again, each block exactly once.
    c = _req("c")
    bm.allocate_for(c, 8)
    assert sorted(c.block_ids) == [0, 1, 2, 3]


def test_shared_block_is_freed_only_by_its_last_holder():
    bm = BlockManager(num_blocks=4, block_size=2)
    a, b = _req("a"), _req("b")
    bm.allocate_for(a, 4)
    bm.share(b, a.block_ids[:1])
    assert bm.ref_count(a.block_ids[0]) == 2 and bm.ref_count(a.block_ids[1]) == 1
    shared = a.block_ids[0]
    assert bm.free(a) == 1  # only the unshared block returns
    assert bm.num_free_blocks == 3 and bm.ref_count(shared) == 1
    assert bm.free(b) == 1 and bm.ref_count(shared) == 0 and bm.num_free_blocks == 4
    with pytest.raises(ValueError):
        bm.share(b, [shared])  # a free block cannot be shared


def test_bad_sizes_raise_value_error():
    with pytest.raises(ValueError, match="num_blocks"):
        BlockManager(0, 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockManager(4, 0)


def test_freed_blocks_are_reused_first():
    """LIFO reuse keeps the KV working set small: a finished request's blocks go to the next one."""
    bm = BlockManager(num_blocks=64, block_size=4)
    a = _req("a")
    bm.allocate_for(a, 12)
    first = list(a.block_ids)
    assert first == [0, 1, 2]  # a fresh pool hands out low block ids first
    bm.free(a)
    b = _req("b")
    bm.allocate_for(b, 12)
    assert b.block_ids == first  # same blocks, same order
