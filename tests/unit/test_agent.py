"""The handler's side of the agent (handler/agent.py): AgentDrops tells the agent's own
REMOVE events from the application's frees by their order. No userfaultfd: the events are
the ranges the kernel would send.
"""
import numpy as np
import pytest

from ufcram.handler import proc
from ufcram.handler.agent import AgentDrops

pytestmark = pytest.mark.timeout(10)
P = 4096
A, B, C = 0x10000, 0x20000, 0x30000


def drops(*spans):
    return AgentDrops(np.array([(addr, pages * P) for addr, pages in spans], np.uint64))


def test_the_agents_events_come_span_after_span():
    d = drops((A, 1), (B, 2), (C, 1))
    assert [d.take(1, s, e) for s, e in ((A, A + P), (B, B + 2 * P), (C, C + P))] == [True] * 3
    assert not d.take(1, A, A + P)   # all dropped: any later REMOVE is a free


def test_an_exact_free_of_a_span_not_reached_yet_is_the_applications():
    """The agent's madvise of B waits until its event for A has been read: an event of
    exactly B before that one is the application freeing B."""
    d = drops((A, 1), (B, 1))
    assert not d.take(1, B, B + P)
    assert d.take(1, A, A + P) and d.take(1, B, B + P)


def test_a_free_of_the_span_the_agent_is_at_is_taken_for_its_own_then_its_own_for_a_free():
    d = drops((A, 1), (B, 1))
    assert d.take(1, A, A + P)       # the application's, as it happens: not told apart
    assert not d.take(1, A, A + P)   # so the agent's own, after it, counts as the free
    assert d.take(1, B, B + P)


def test_a_part_of_a_span_is_the_agents_only_where_a_mapping_ends(monkeypatch):
    monkeypatch.setattr(proc, "vma_starts_at", lambda pid, addr: addr == A + 2 * P)
    d = drops((A, 4))
    assert not d.take(1, A, A + P)            # a free of its first page
    assert d.take(1, A, A + 2 * P)            # the part in the first mapping
    assert not d.take(1, A, A + 4 * P)        # the rest comes from where it was cut
    assert d.take(1, A + 2 * P, A + 4 * P)


def test_a_free_larger_than_the_span_is_the_applications():
    d = drops((A, 1))
    assert not d.take(1, A, A + 2 * P)
    assert d.take(1, A, A + P)
