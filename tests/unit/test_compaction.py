"""Compaction (the node's TRIM): sparse arenas released, handles valid, every byte kept,
and the memory back with the OS."""
import lz4.block
import numpy as np
import psutil
import pytest

from ufcram.store.pool import PAGE_SIZE, Pool

from .test_pool import check_exact, make_page, rows

pytestmark = pytest.mark.timeout(120)


def test_compaction_releases_sparse_arenas_and_keeps_handles():
    pool = Pool(1 << 30, arena_size=16 * PAGE_SIZE)
    pages = [make_page(("text", "numbers", "random", "partial")[i % 4], i) for i in range(3000)]
    hs = pool.store_many(rows(*pages))
    model = dict(zip(hs.tolist(), pages))
    drop = [h for i, h in enumerate(hs.tolist()) if i % 10]          # scattered 90 %
    pool.free_many(drop)
    for h in drop:
        del model[h]
    before = pool.stats()
    released = pool.compact()
    after = pool.stats()
    assert released > 0
    assert after["arena_bytes"] == before["arena_bytes"] - released
    assert before["mem_used_total"] - after["mem_used_total"] >= 0.9 * released
    assert after["pages_compacted"] > 0
    assert after["compr_data_size"] == before["compr_data_size"]
    check_exact(pool, model)
    assert pool.compact() == 0                 # nothing more to gain right away
    more = [make_page("text", 10**6 + i) for i in range(200)]      # freed slots are reused
    model.update(zip(pool.store_many(rows(*more)).tolist(), more))
    check_exact(pool, model)
    pool.free_many(list(model))
    pool.compact()
    assert pool.stats()["arena_bytes"] == 0


def test_compaction_moves_entries_into_the_tail_of_the_current_arena():
    pages = [make_page("tiny", i) for i in range(400)]
    slot = -(-len(lz4.block.compress(pages[0], store_size=False)) // 32) * 32
    arena = 4 * PAGE_SIZE
    per_arena = arena // slot
    assert {-(-len(lz4.block.compress(p, store_size=False)) // 32) * 32 for p in pages} == {slot}
    pool = Pool(1 << 30, arena_size=arena)
    hs = pool.store_many(rows(*pages)).tolist()
    keep = set(range(0, per_arena, 50)) | set(range(per_arena, 400))
    pool.free_many([h for i, h in enumerate(hs) if i not in keep])
    before = pool.stats()["arena_bytes"]
    # the first arena's survivors fit only in never-used slots of the current arena
    assert pool.compact() == arena
    assert pool.stats()["arena_bytes"] == before - arena
    assert pool.stats()["pages_compacted"] == len(range(0, per_arena, 50))
    check_exact(pool, {hs[i]: pages[i] for i in keep})


def test_arena_memory_is_physical_and_goes_back_to_the_os():
    proc = psutil.Process()
    pages = rows(*[make_page("random", i) for i in range(64)])
    pool = Pool(1 << 30)
    rss0 = proc.memory_info().rss
    handles = [pool.store_many(pages) for _ in range(256)]       # 64 MiB of raw pages
    grown = proc.memory_info().rss - rss0
    arena = pool.stats()["arena_bytes"]
    assert arena == 64 << 20
    assert 0.9 * arena <= grown <= arena + (8 << 20)
    pool.free_many(np.concatenate(handles))
    rss1 = proc.memory_info().rss
    released = pool.compact()
    assert released == arena
    assert rss1 - proc.memory_info().rss >= 0.9 * released
