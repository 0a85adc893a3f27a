"""ufcram.policy: each decision on plain numbers and arrays."""
import numpy as np
import pytest

from ufcram.errors import UfcramError
from ufcram.handler.policy import (ENTRY_OVERHEAD, PAGE_SIZE, Clock, Overflow, ResidentLimit,
                           WriteBudget, exposed_pages)

pytestmark = pytest.mark.timeout(10)


def test_fixed_budget_is_what_it_says():
    assert WriteBudget(5).allowance(0, 10**9, 1.0) == 5


def test_auto_budget_fits_incompressible_pages_in_free_capacity():
    b = WriteBudget("auto")
    per = PAGE_SIZE + ENTRY_OVERHEAD
    assert b.allowance(100 * per + 7, 0, 1.0) == 100
    assert b.allowance(100 * per, 100 * per, 1.0) == 0
    assert b.allowance(10, 100, 1.0) == 0                       # over capacity: none
    assert b.allowance(100 * per, 0, 0.25) > b.allowance(100 * per, 0, 1.0)   # risk dial


@pytest.mark.parametrize("spec", [-1, 1.5, "lots", True, None])
def test_bad_budgets(spec):
    with pytest.raises(UfcramError):
        WriteBudget(spec)


def test_resident_limit_demotes_to_the_low_watermark():
    lim = ResidentLimit(100 * PAGE_SIZE, low=0.9)
    assert lim.excess(100) == 0
    assert lim.excess(101) == 11
    assert ResidentLimit(None).excess(10**9) == 0
    with pytest.raises(UfcramError):
        ResidentLimit(-1)


def test_clock_prefers_unreferenced_pages_and_gives_second_chances():
    c = Clock(8)
    everything = np.ones(8, bool)
    c.touch([0, 1, 2])
    assert c.coldest(everything, 2).tolist() == [3, 4]   # 0..2 get a second chance
    assert not c.referenced[:3].any()                     # ...and lose their bits
    c.touch([6])
    assert c.coldest(everything, 3).tolist() == [5, 7, 0]   # wraps; 6 spared
    assert c.referenced.tolist() == [False] * 8


def test_clock_respects_candidates_and_touches():
    c = Clock(6)
    candidates = np.array([1, 0, 1, 0, 1, 1], bool)
    c.touch([0, 2])
    assert c.coldest(candidates, 2).tolist() == [4, 5]
    c.touch([4])
    assert c.coldest(candidates, 2).tolist() == [0, 2]   # cleared on the last lap
    assert c.coldest(np.zeros(6, bool), 3).tolist() == []


def test_overflow_hysteresis():
    o = Overflow(low=0.5)
    assert not o.update(90, 100)
    assert o.update(90, 100, refused=True) and o.events == 1
    assert o.target(90, 100) == 40
    assert o.update(60, 100)               # still above the low watermark
    assert not o.update(50, 100)
    assert o.update(101, 100) and o.events == 2


def test_balloon_follows_the_ratio():
    assert exposed_pages(PAGE_SIZE * 100, 0, 0) == 100
    assert exposed_pages(PAGE_SIZE * 100, 1000, 1000 * 1024) == 400
