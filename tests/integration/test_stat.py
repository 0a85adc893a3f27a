"""`ufcram stat` end to end: a shared node with real regions, read by the command in a
process of its own, its numbers checked against node.stats() and region.stats()."""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import ufcram
from ufcram import PAGE_SIZE, Region
from ufcram import protocol as P
from ufcram.tools.stat import NO_NODE, human

from .test_region import mixed_bytes

pytestmark = pytest.mark.timeout(90)
MiB = 1 << 20
PAGES = 256
CLIENT_COLUMNS = ("PID", "NAME", "DATA", "COMPR", "RESIDENT", "READ-ONLY", "WRITABLE/BUDGET",
                  "PROMOTIONS", "ZERO-PAGES", "COMP-RATIO")


@pytest.fixture()
def shared(tmp_path):
    """A shared node and this process's region on it: half resident (its limit), a
    quarter of it read back read-only, the rest demoted."""
    path = tmp_path / "node.sock"
    with ufcram.Node(capacity=64 * MiB, path=path) as node:
        region = Region(PAGES * PAGE_SIZE, node=node, resident_limit=PAGES // 2 * PAGE_SIZE)
        a = region.array()
        a[:] = mixed_bytes(region.nbytes, seed=11)
        region.demote()
        int(a[:PAGES // 4 * PAGE_SIZE:PAGE_SIZE].sum())   # reads: read-only pages
        yield node, region, path
        del a
        region.close()


def ufcram_stat(*args, env=None):
    return subprocess.run([sys.executable, "-m", "ufcram", "stat", *map(str, args)],
                          capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})})


def stat_json(path):
    done = ufcram_stat("--node", path, "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def mine(stats):
    [entry] = [c for c in stats["per_client"] if c["pid"] == os.getpid()]
    return entry


def test_json_matches_the_node_and_the_region(shared):
    node, region, path = shared
    got, want, r = stat_json(path), node.stats(), region.stats()
    for key in ("pages_stored", "compr_data_size", "same_pages", "mem_used_total"):
        assert got[key] == want[key], key
    assert got["clients"] == 1                        # the observer is no client
    assert got["clients_omitted"] == 0
    entry = mine(got)
    for key in ("demoted", "readonly", "resident", "faults", "demotions", "restores",
                "zero_fills", "promotions"):
        assert entry[key] == r[key], key
    assert r["demoted"] > 0 and r["readonly"] > 0
    with open("/proc/self/comm") as f:
        assert entry["name"] == f.read().strip()
    assert entry["write_budget"] == "auto"
    # the only client holds every entry of the pool
    assert (entry["stored_pages"], entry["same_pages"], entry["compr_bytes"]) == \
        (want["pages_stored"], want["same_pages"], want["compr_data_size"])
    assert 0 < entry["compr_bytes"] < entry["stored_pages"] * PAGE_SIZE
    assert got["departed"] == dict.fromkeys(("clients", "faults", "demotions",
                                             "clean_redemotions", "restores", "promotions",
                                             "zero_fills"), 0)


def table_rows(text):
    """The node's row and the clients' rows of one printed table, as lists of cells."""
    lines = text.splitlines()
    assert lines[0].split()[:2] == ["NODE", "DATA"] and lines[2] == ""
    assert tuple(lines[3].split()) == CLIENT_COLUMNS
    return lines[1].split(), [line.split() for line in lines[4:]]


def test_table_shows_the_node_and_this_client(shared):
    node, region, path = shared
    want, r = node.stats(), region.stats()
    exact = ufcram_stat("--bytes", env={"UFCRAM_NODE": str(path)})   # the default node
    assert exact.returncode == 0, exact.stderr
    row, clients = table_rows(exact.stdout)
    assert row[:4] == [str(path), str(want["pages_stored"] * PAGE_SIZE),
                       str(want["compr_data_size"]), str(want["mem_used_total"])]
    assert row[-2:] == ["open", "1"]
    [client] = clients
    assert client[0] == str(os.getpid())
    assert client[4:7] == [str(r["resident"] * PAGE_SIZE), str(r["readonly"] * PAGE_SIZE),
                           f"{r['writable'] * PAGE_SIZE}/auto"]
    human_form = ufcram_stat("--node", path)
    assert human_form.returncode == 0, human_form.stderr
    row, [client] = table_rows(human_form.stdout)
    assert row[1:3] == [human(want["pages_stored"] * PAGE_SIZE), human(want["compr_data_size"])]
    assert row[5] == f"{want['orig_data_size'] / want['compr_data_size']:.2f}"
    assert client[2] == human(want["pages_stored"] * PAGE_SIZE)


CHILD = textwrap.dedent("""
    import json, sys, ufcram
    node = ufcram.Node.connect(sys.argv[1])
    r = ufcram.Region(512 * 4096, node=node, write_budget=8)
    a = r.array()
    a[:] = 7
    r.demote()
    assert (a[::4096] == 7).all()
    print(json.dumps(r.stats()), flush=True)
    sys.stdin.readline()   # then exit with the region open, as a program ends
""")


def test_a_client_that_leaves_is_counted_in_departed(shared):
    node, region, path = shared
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], text=True,
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    theirs = json.loads(child.stdout.readline())
    got = stat_json(path)
    assert got["clients"] == 2
    first, second = got["per_client"]                 # the largest first
    assert (first["pid"], second["pid"]) == (child.pid, os.getpid())
    assert first["write_budget"] == 8 and first["same_pages"] == 512
    assert first["compr_bytes"] == 0                  # same-filled pages cost no bytes
    child.stdin.close()
    assert child.wait(20) == 0
    deadline = time.monotonic() + 10
    while node.stats()["departed"]["clients"] == 0 and time.monotonic() < deadline:
        time.sleep(0.02)
    departed = stat_json(path)["departed"]
    assert departed == {"clients": 1, **{k: theirs[k] for k in (
        "faults", "demotions", "clean_redemotions", "restores", "promotions", "zero_fills")}}
    assert departed["demotions"] == 512 and departed["faults"] > 0
    assert [c["pid"] for c in node.stats()["per_client"]] == [os.getpid()]


def test_interval_and_count_repeat_like_vmstat(shared):
    _, _, path = shared
    tables = ufcram_stat("--node", path, 0.05, 3)
    assert tables.returncode == 0, tables.stderr
    assert [line.split()[0] for line in tables.stdout.splitlines() if line.startswith("NODE")] \
        == ["NODE"] * 3
    lines = ufcram_stat("--node", path, "--json", 0.05, 2)
    assert lines.returncode == 0, lines.stderr
    assert [json.loads(line)["clients"] for line in lines.stdout.splitlines()] == [1, 1]


def test_missing_node_is_one_clear_line_and_status_1(tmp_path):
    missing = ufcram_stat("--node", tmp_path / "none.sock")
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr == f"ufcram stat: no ufcram node listens on {tmp_path / 'none.sock'}\n"
    unnamed = ufcram_stat(env={"UFCRAM_NODE": ""})
    assert (unnamed.returncode, unnamed.stderr) == (1, f"ufcram stat: {NO_NODE}\n")


def test_an_observer_sees_the_node_and_nothing_else(shared):
    """Before HELLO only STATS of the NODE is answered; and an observer that came and
    went does not keep the handler alive once its last memory client has left."""
    node, region, path = shared
    before = region.stats()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.settimeout(10)
        sock.connect(os.fspath(path))
        for seq, (op, fields) in enumerate([(P.STATS, (region.id,)),
                                            (P.DEMOTE, (region.id, 0, PAGE_SIZE)),
                                            (P.STATS, (P.NODE,))], 1):
            sock.send(P.encode(op, seq, P.pack_request(op, *fields)))
            rop, rseq, body = P.decode(sock.recv(P.MAX_FRAME))
            assert rseq == seq
            if op == P.STATS and fields == (P.NODE,):
                assert rop == P.OK and json.loads(body)["clients"] == 1
            else:
                assert rop == P.ERROR and "before HELLO" in P.parse_error(body)[1]
    assert region.stats() == before                    # the refused DEMOTE did nothing
    region.close()
    node.close()
    assert node.process.returncode == 0                # it left by itself, not killed


def test_a_node_started_to_observe_has_no_client_and_serves_until_closed():
    """Node(observe=True), as `ufcram run` starts its private node: the handler serves
    its stats (and whoever joins) while this process observes, and leaves when it closes."""
    with ufcram.Node(capacity=MiB, observe=True) as node:
        stats = node.stats()
        assert (stats["clients"], stats["per_client"], stats["departed"]["clients"]) == (0, [], 0)
        with pytest.raises(ufcram.RegionError, match="only observes"):
            Region(PAGE_SIZE, node=node)
        time.sleep(0.2)
        assert node.process.poll() is None and node.stats(summary=True)["clients"] == 0
    assert node.process.returncode == 0
