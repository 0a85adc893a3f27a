"""The handler's side of coverage by mapping: a registered range becomes a region with
the pages it already holds, and a registered mapping that grew is covered as it faults.
"""
import errno
import logging

import numpy as np

from ufcram.errors import UfcramError
from ufcram.store.pagetable import NORMAL
from .proc import mapped_pages, mapping_around

log = logging.getLogger("ufcram.handler")


def add_region(handler, client, start, length, limit, budget):
    """A region at [start, start + length), where any older region holds nothing (the
    application unmapped it and mapped anew), with the pages in use there; its id.
    For a client that covers all its mappings, parts that regions hold already stay
    theirs (the handler covered them as they faulted, before this request came), and
    the rest becomes regions; the id is then the first new one's, or 0."""
    if not client.covers_mappings:
        client.check_quota(length, handler.max_regions, handler.max_client_bytes)
        client.carve(start, start + length)
        return adopt_mapped(handler, client, client.add_region(
            start, length, limit, budget, handler.pager.auto_writable))
    client.default_budget = budget
    client.carve(start, start + length, keep_used=True)
    rids = []
    for first, end in client.gaps(start, start + length):
        client.check_quota(end - first, handler.max_regions, handler.max_client_bytes)
        rids.append(adopt_mapped(handler, client, client.add_region(
            first, end - first, limit, budget, handler.pager.auto_writable)))
    return rids[0] if rids else 0


def adopt_mapped(handler, client, rid):
    """Memory in use before it was registered (the preload library registers the heap
    and arenas as it finds them) is normal memory, and counts against the limits at
    once. It was registered before the request came, so no page comes in unseen after
    this look: a page that faults in meanwhile is served as outside every region."""
    region = client.regions[rid]
    table = region.table
    try:
        pages = np.flatnonzero(mapped_pages(client.pid, table.base, table.npages))
    except OSError as e:   # gone already (ESRCH) is no news
        log.log(logging.DEBUG if e.errno == errno.ESRCH else logging.WARNING,
                "client pid %d: its pages in use are not known (%s); they stay outside "
                "its limits", client.pid, e)
        return rid
    table.set(pages, NORMAL)   # a new region: every page was UNTOUCHED
    handler.faulted(client, region)
    return rid


def cover_fault(handler, client, addr):
    """A fault at addr, outside every region of a client that covers all its mappings:
    a registered mapping grew in place (mremap, which tells no one) or moved with more
    than it had. The parts of its mapping no region holds become regions."""
    try:
        around = mapping_around(client.pid, addr)
        if around is not None:
            add_region(handler, client, around[0], around[1] - around[0], None,
                       client.default_budget)
    except (UfcramError, OSError) as e:   # served either way, as outside every region
        log.debug("client pid %d: the mapping at %#x is not covered: %s", client.pid, addr, e)
