"""Memory semantics unmodified programs rely on (issue 14), kept under `ufcram run` on memory
the node demoted: each check of preload_progs/semantics.c compares every byte it uses."""
import pytest

from .launch import assert_ok, ufcram_run

pytestmark = [pytest.mark.uffd, pytest.mark.timeout(60)]

# Each check, what it does.
CHECKS = {
    "madv-free": "MADV_FREE, then MADV_PAGEOUT so that the kernel drops what it may, then "
                 "every fourth page written: those hold what was written, every other page "
                 "reads all zeros or exactly as before, never an older copy",
    "madv-dontneed": "MADV_DONTNEED of pages read back and pages on the node, and of one "
                     "page apart: zeros there through three rounds of demotion, the rest "
                     "kept",
    "dontneed-ahead": "every fourth page freed with MADV_DONTNEED by a thread just ahead "
                      "of another that reads the demoted buffer in order (its faults bring "
                      "runs in): the freed pages read zeros, the rest kept; 16 rounds",
    "dontfork": "MADV_DONTFORK middle third: not mapped in a forked child (mincore: "
                "ENOMEM), the rest as the parent wrote it; after MADV_DOFORK the child has "
                "it all",
    "wipeonfork": "MADV_WIPEONFORK middle third: zeros in a forked child, which writes "
                  "there; the parent keeps its bytes; twice",
    "mprotect-split": "middle third made read-only, read back and demoted again while the "
                      "rest is written, made writable and rewritten",
    "brk-shrink": "heap grown by sbrk, shrunk by half and grown again: the kept half keeps "
                  "its bytes, the part grown again reads zeros",
    "map-populate": "a MAP_POPULATE mapping reads zeros, then keeps two fills through the "
                    "node",
    "sigaltstack": "a signal handler on an alternate stack in a demoted malloc'd block "
                   "reads and writes the rest of the block",
    "early-threads": "threads started from .preinit_array (before the library joins the "
                     "node) allocate and fill buffers; main reads them demoted",
    "vfork": "vfork+exec of /bin/true, /bin/false and sh -c 'exit 3' (their argv in the "
             "demoted buffer): exit statuses 0, 1, 3, the buffer intact",
    "posix-spawn": "posix_spawn of the same three, the same checks",
    "mremap-reuse": "a demoted mapping moved by mremap and a new mapping where it was: the "
                    "new one reads zeros and keeps its writes, the moved one its bytes",
    "mremap-part-back": "a demoted quarter of a mapping moved by mremap, read there, moved "
                        "back and read again, 8 times: its bytes at each address, the rest "
                        "kept",
    "munmap-in-flight": "the top half of a freshly written mapping unmapped while the node "
                        "demotes it, 64 times: the new mapping there reads zeros, the kept "
                        "half keeps its bytes, and no page stays in flight",
}
# Resident limits: 2M leaves at most half of each buffer resident (8 MiB buffers, or
# thirds of 4 MiB); early-threads has four buffers of 2 MiB.
LIMITS = {"early-threads": "512K"}


@pytest.mark.parametrize("check", CHECKS)
def test_semantics_hold_on_demoted_memory(build, check):
    """One check of preload_progs/semantics.c (CHECKS says what it does) with --demoted:
    the program insists that the memory each operation uses was demoted first."""
    done = ufcram_run(build("semantics"), check, "--demoted", limit=LIMITS.get(check, "2M"))
    assert_ok(done, f"semantics {check}")
    assert done.stdout == b"ok\n"
