"""`ufcram stat` without a kernel: zramctl's size format, the table, and the handler's
NODE reply (per-client entries, held bytes, the cut that keeps it within one frame)."""
import json

import numpy as np
import pytest

from ufcram import PAGE_SIZE
from ufcram import protocol as P
from ufcram.handler.client import Client
from ufcram.handler.loop import Handler
from ufcram.store.pagetable import NORMAL
from ufcram.store.pool import Pool
from ufcram.tools.stat import human, render


@pytest.mark.parametrize("nbytes, text", [
    (0, "0B"), (1023, "1023B"), (1024, "1K"), (1536, "1.5K"), (4096, "4K"),
    (1000 * PAGE_SIZE, "3.9M"), ((1 << 20) - 1, "1024K"), (1 << 20, "1M"),
    (int(2.25 * (1 << 30)), "2.3G"), (5 << 40, "5T")])
def test_sizes_read_like_zramctl(nbytes, text):
    assert human(nbytes) == text


def node_stats(per_client, omitted=0):
    return {"pages_stored": 256, "compr_data_size": 262144, "mem_used_total": 300000,
            "same_pages": 3, "mem_limit": 1 << 30, "node_closed": True, "clients": 2,
            "per_client": per_client, "clients_omitted": omitted}


def client_entry(**kw):
    return {"pid": 4242, "name": "kvstore", "forked": False, "stored_pages": 256,
            "compr_bytes": 0, "resident": 16, "readonly": 8, "writable": 2,
            "write_budget": 32, "promotions": 5, "same_pages": 256, **kw}


def test_table_has_a_node_line_and_a_line_per_client():
    text = render(node_stats([client_entry(),
                              client_entry(pid=-1, name="?", forked=True, write_budget="auto",
                                           compr_bytes=1 << 20)], omitted=7), "/run/n.sock")
    lines = text.splitlines()
    assert lines[1].split() == ["/run/n.sock", "1M", "256K", "293K", "3", "4.00", "1G",
                                "closed", "2"]
    assert lines[4].split() == ["4242", "kvstore", "1M", "0B", "64K", "32K", "8K/128K", "5",
                                "256", "-"]
    assert lines[5].split() == ["-", "?", "(forked)", "1M", "1M", "64K", "32K", "8K/auto",
                                "5", "256", "1.00"]
    assert lines[-1] == "(7 more clients not listed)"
    # the columns line up: every header ends where its cells end
    assert lines[3].index("COMP-RATIO") + len("COMP-RATIO") == len(lines[4]) == len(lines[5])


def test_bytes_form_prints_exact_sizes():
    lines = render(node_stats([client_entry()]), "n", size=str).splitlines()
    assert lines[1].split()[1:4] == [str(256 * PAGE_SIZE), "262144", "300000"]
    assert lines[4].split()[6] == f"{2 * PAGE_SIZE}/{32 * PAGE_SIZE}"
    assert len(lines) == 5


def fake_clients(handler, n, fat=False):
    """n ready clients (no kernel: a placeholder uffd) of 1..n normal pages each."""
    for i in range(n):
        client = Client(None, uffd=object())
        client.pid = 10 ** 9 + i   # no such process: its name reads "?"
        region = client.regions[client.add_region(1 << 30, 512 * PAGE_SIZE)]
        region.table.set(np.arange(i % 512 + 1), NORMAL)
        if fat:   # the largest numbers a JSON entry can carry
            region.counters = dict.fromkeys(region.counters, 10 ** 18)
        handler.by_uffd[i] = client


def node_reply(handler):
    payload = handler.stats(Client(None), [], P.NODE)   # an observer asks
    assert P.HEADER.size + len(payload) <= P.MAX_FRAME
    return json.loads(payload)


@pytest.mark.parametrize("fat", [False, True])
def test_reply_lists_the_largest_clients_within_one_frame(fat):
    handler = Handler(Pool(1 << 20))
    fake_clients(handler, 300, fat)
    stats = node_reply(handler)
    sizes = [c["normal"] for c in stats["per_client"]]
    assert sizes == sorted(sizes, reverse=True) and sizes[0] == 300
    assert len(sizes) + stats["clients_omitted"] == 300
    assert 100 < len(sizes) <= 200               # cut to fit, not far below it
    assert stats["clients"] == 0                  # none came through a socket here


def test_reply_lists_at_most_the_given_number_of_clients():
    handler = Handler(Pool(1 << 20))
    fake_clients(handler, 30)
    stats = json.loads(handler.node_stats_payload({}, most=10))
    assert [c["normal"] for c in stats["per_client"]] == list(range(30, 20, -1))
    assert stats["clients_omitted"] == 20


def test_held_bytes_come_from_the_pool_entries():
    handler = Handler(Pool(1 << 20))
    fake_clients(handler, 1)
    pages = np.zeros((4, PAGE_SIZE), np.uint8)
    pages[1] = np.frombuffer(b"compress me, ", np.uint8)[np.arange(PAGE_SIZE) % 13]
    pages[2:] = np.random.default_rng(0).integers(0, 256, (2, PAGE_SIZE), np.uint8)
    table = handler.by_uffd[0].regions[1].table
    table.entry[10:14] = handler.pool.store_many(pages)
    pool, [entry] = handler.pool.stats(), node_reply(handler)["per_client"]
    assert (entry["stored_pages"], entry["same_pages"], entry["compr_bytes"]) == \
        (4, 1, pool["compr_data_size"])
    assert 2 * PAGE_SIZE < entry["compr_bytes"] < 3 * PAGE_SIZE
    assert entry["name"] == "?" and entry["write_budget"] == 0
