"""What the handler reads of a client's memory from /proc: which pages of a range are
mapped, for memory that was in use before it was registered (the preload's mappings).
"""
import os

import numpy as np

from ufcram.store.pagetable import PAGE_SIZE

# pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst)
PM_PRESENT = 1 << 63
PM_SWAPPED = 1 << 62


def mapped_pages(pid, start, npages):
    """Mask of the pages of [start, start + npages pages) that hold memory: present, or
    swapped out by the kernel (either way the kernel, not a fault to us, brings them)."""
    fd = os.open(f"/proc/{pid}/pagemap", os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = os.pread(fd, npages * 8, start // PAGE_SIZE * 8)
    finally:
        os.close(fd)
    entries = np.frombuffer(raw, np.uint64)
    mapped = np.zeros(npages, bool)
    mapped[:len(entries)] = (entries & np.uint64(PM_PRESENT | PM_SWAPPED)) != 0
    return mapped


def thread_group(tid):
    """The process of thread tid, or -1 if it is gone."""
    try:
        with open(f"/proc/{tid}/status") as status:
            for line in status:
                if line.startswith("Tgid:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return -1


def mapping_around(pid, addr):
    """(start, end) of the mapping of process pid that holds addr, or None."""
    with open(f"/proc/{pid}/maps") as maps:
        for line in maps:
            start, _, end = line.partition(" ")[0].partition("-")
            if int(start, 16) <= addr < int(end, 16):
                return int(start, 16), int(end, 16)
    return None


def vma_starts_at(pid, addr):
    """Whether a mapping of process pid begins at addr."""
    prefix = f"{addr:x}-"
    try:
        with open(f"/proc/{pid}/maps") as maps:
            return any(line.startswith(prefix) for line in maps)
    except OSError:
        return False


def flagged_mappings(pid, *flags):
    """(start, end) of each mapping of process pid whose VmFlags in smaps has any of
    flags: lo, locked (mlock); dc, not copied by a fork (MADV_DONTFORK); wf, read as zeros
    in a forked child (MADV_WIPEONFORK)."""
    found, span = [], None
    with open(f"/proc/{pid}/smaps") as smaps:
        for line in smaps:
            if line[0] in "0123456789abcdef":   # a mapping's line; fields are capitalised
                start, _, end = line.partition(" ")[0].partition("-")
                span = int(start, 16), int(end, 16)
            elif line.startswith("VmFlags:") and span is not None and \
                    not set(flags).isdisjoint(line.split()[1:]):
                found.append(span)
    return found
