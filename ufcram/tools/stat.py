"""`ufcram stat`: a node's counters as zramctl shows a zram device's, one table per sample.
It only observes (STATS of the NODE, which a node answers before any HELLO).
"""
import itertools
import json
import os
import socket
import sys
import time

from ufcram import PAGE_SIZE
from ufcram import protocol as P
from ufcram.errors import ProtocolError

NO_NODE = "no node: pass --node PATH or set UFCRAM_NODE"
TIMEOUT = 10.0   # seconds: a handler that never answers fails the sample, not hangs it


class StatError(Exception):
    """The node cannot be read; the message is the one line the user sees."""


def query(path, timeout=TIMEOUT):
    """The node's STATS reply, raw JSON bytes. A connection per sample: a watcher that
    held one would keep a node alive after its last memory client has gone."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
            sock.settimeout(timeout)
            sock.connect(os.fspath(path))
            sock.send(P.encode(P.STATS, 1, P.pack_request(P.STATS, P.NODE)))
            frame = P.recv_frame(sock)
            if not frame:
                raise StatError(f"the ufcram node at {path} closed the connection "
                                "(a node of another user?)")
            op, seq, body = P.decode(frame)
    except (FileNotFoundError, ConnectionRefusedError):
        raise StatError(f"no ufcram node listens on {path}") from None
    except TimeoutError:
        raise StatError(f"the ufcram node at {path} did not answer in {timeout:g} s") from None
    except OSError as e:
        raise StatError(f"cannot reach the ufcram node at {path}: {e.strerror or e}") from None
    except ProtocolError as e:
        raise StatError(f"{path} does not speak the ufcram protocol: {e}") from None
    if op == P.ERROR:
        raise StatError(f"the ufcram node at {path} refused: {P.parse_error(body)[1]}")
    if (op, seq) != (P.OK, 1):
        raise StatError(f"the ufcram node at {path} sent op {op}, seq {seq} for STATS")
    return body


def human(nbytes):
    """zramctl's sizes (util-linux size_to_human_string): 1023B, 4K, 1.5M; powers of
    1024, one decimal, none when it rounds to .0."""
    exp = next((e for e in range(0, 60, 10) if nbytes < 1 << (e + 10)), 60)
    whole, frac = divmod(nbytes, 1 << exp)
    tenths = (frac * 1000 // (1 << exp) + 50) // 100
    if tenths == 10:
        whole, tenths = whole + 1, 0
    return f"{whole}{'.' + str(tenths) if tenths else ''}{'BKMGTPE'[exp // 10]}"


def ratio(data, compr):
    """Original over compressed bytes; '-' when nothing is compressed (all same-filled)."""
    return f"{data / compr:.2f}" if compr else "-"


def table(header, rows, left):
    """Columns as wide as their widest cell; the text columns (indices in left) flush
    left, the numbers right, as zramctl prints them."""
    widths = [max(map(len, column)) for column in zip(header, *rows)]
    return "\n".join(" ".join(cell.ljust(w) if i in left else cell.rjust(w)
                              for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
                     for row in (header, *rows))


def render(stats, path, size=human):
    """The node's line, then one line per client (the largest first)."""
    data = stats["pages_stored"] * PAGE_SIZE
    node = table(("NODE", "DATA", "COMPR", "TOTAL", "ZERO-PAGES", "COMP-RATIO", "CAPACITY",
                  "STATE", "CLIENTS"),
                 [(os.fspath(path), size(data), size(stats["compr_data_size"]),
                   size(stats["mem_used_total"]), str(stats["same_pages"]),
                   ratio(data, stats["compr_data_size"]), size(stats["mem_limit"]),
                   "closed" if stats["node_closed"] else "open", str(stats["clients"]))],
                 left={0, 7})
    rows = []
    for c in stats["per_client"]:
        budget = c["write_budget"]
        stored = c["stored_pages"] * PAGE_SIZE
        rows.append((str(c["pid"]) if c["pid"] > 0 else "-",
                     c["name"] + (" (forked)" if c["forked"] else ""), size(stored),
                     size(c["compr_bytes"]),
                     size(c["resident"] * PAGE_SIZE), size(c["readonly"] * PAGE_SIZE),
                     f"{size(c['writable'] * PAGE_SIZE)}/"
                     f"{budget if budget == 'auto' else size(budget * PAGE_SIZE)}",
                     str(c["promotions"]), str(c["same_pages"]), ratio(stored, c["compr_bytes"])))
    clients = table(("PID", "NAME", "DATA", "COMPR", "RESIDENT", "READ-ONLY", "WRITABLE/BUDGET",
                     "PROMOTIONS", "ZERO-PAGES", "COMP-RATIO"), rows, left={1})
    omitted = stats.get("clients_omitted", 0)
    more = f"\n({omitted} more clients not listed)" if omitted else ""
    return f"{node}\n\n{clients}{more}"


def main(args):
    """Print `count` samples `interval` seconds apart (one without an interval, and
    forever without a count, as vmstat does); 1 and one line on stderr on failure."""
    path = args.node or os.environ.get("UFCRAM_NODE")
    try:
        if not path:
            raise StatError(NO_NODE)
        count = 1 if args.interval is None else args.count
        for i in itertools.count() if count is None else range(count):
            if i:
                time.sleep(args.interval)
                if not args.json:
                    print()
            body = query(path)
            print(body.decode() if args.json else
                  render(json.loads(body), path, str if args.bytes else human), flush=True)
    except StatError as e:
        print(f"ufcram stat: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:   # `ufcram stat 1 | head`: the reader has had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
