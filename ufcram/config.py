"""Every tunable of ufcram: one UFCRAM_* environment variable each, with unit and default.
docs/configuration.md lists the same table; a unit test keeps the two in step.
"""
import os
from dataclasses import dataclass

import psutil

from .errors import UfcramError


@dataclass(frozen=True)
class Setting:
    name: str
    unit: str
    default: object
    help: str


def _default_capacity():
    return psutil.virtual_memory().total // 4


# computed defaults: a share (or multiple) of this machine's physical memory
COMPUTED = {
    "UFCRAM_NODE_CAPACITY": _default_capacity,
    # more than a node can compress into RAM, yet page tables of at most ~1% of RAM
    "UFCRAM_MAX_CLIENT_BYTES": lambda: psutil.virtual_memory().total * 4,
}


SETTINGS = {s.name: s for s in (
    Setting("UFCRAM_NODE_CAPACITY", "bytes", "25% of physical RAM",
            "physical capacity of a node's compressed pool"),
    Setting("UFCRAM_STAGING_PAGES", "pages", 256,
            "pages the agent copies out per demotion batch (shared staging buffer size)"),
    Setting("UFCRAM_MOVE", "0/1", 1,
            "demote by moving pages out (UFFDIO_MOVE, Linux 6.8+: no write-protection, "
            "no REMOVE event per run), dirty ones into the staging buffer and clean ones "
            "away; 0: by copy and MADV_DONTNEED, as where the kernel cannot move"),
    Setting("UFCRAM_FAULT_AROUND", "pages", 64,
            "largest readahead window: pages restored (or zero-filled) per fault when "
            "access is sequential; 1 turns fault-around off"),
    Setting("UFCRAM_SPIN_US", "microseconds", 100,
            "how long the handler polls without sleeping after an event before it blocks "
            "(a sleeping handler is woken slowly across CPUs)"),
    Setting("UFCRAM_FAST_WAKE_MS", "milliseconds", 100,
            "while faults arrive, and this long after the last, the handler asks for 0 us "
            "CPU wake-up latency (PM QoS, /dev/cpu_dma_latency, root only) so a faulting "
            "thread on an idle CPU wakes in ~15 us, not ~100 us; idle CPUs poll meanwhile. "
            "0: never ask"),
    Setting("UFCRAM_AGENT_TIMEOUT", "seconds", 30.0,
            "how long the handler waits for an agent reply before it drops the client"),
    Setting("UFCRAM_SCAN_INTERVAL", "seconds", 5.0,
            "how often the handler reaps exited forked children and orphaned pool entries"),
    Setting("UFCRAM_MAX_REGIONS", "regions", 4096,
            "most regions one client may register on a node (0: no limit)"),
    Setting("UFCRAM_MAX_CLIENT_BYTES", "bytes", "4 x physical RAM",
            "most bytes one client may register on a node in all (0: no limit); the "
            "handler's page tables cost about 11 bytes per registered page"),
    Setting("UFCRAM_USER_MODE_ONLY", "0/1", 0,
            "open userfaultfd with UFFD_USER_MODE_ONLY (no grant needed; system calls "
            "touching demoted pages then fail with EFAULT)"),
    Setting("UFCRAM_DEBUG", "0/1", 0, "log handler decisions to stderr"),
    Setting("UFCRAM_CHECK_STATES", "0/1", 0,
            "refuse (raise StateError) any page-state move the state machine does not "
            "allow, instead of making it: the test suite runs so"),
    Setting("UFCRAM_NODE", "path", "none",
            "socket of a running node (`ufcram node`) that `ufcram run` and the preload "
            "library join; `ufcram run` starts a private node when it is unset"),
    Setting("UFCRAM_THRESHOLD", "bytes", 1048576,
            "preload library: smallest private anonymous mapping it hands to the node"),
    Setting("UFCRAM_RESIDENT_LIMIT", "bytes", "none",
            "preload library: resident limit over the managed memory of the program's "
            "whole process tree; past it the node demotes the coldest pages of the "
            "largest mappings first"),
    Setting("UFCRAM_WRITE_BUDGET", "pages or auto", "auto",
            "preload library: write budget of each managed mapping"),
    Setting("UFCRAM_FORK_JOIN", "0/1", 1,
            "preload library: a forked child joins the node as a client of its own, so "
            "that what it maps after the fork is managed and counts in the tree's limit; "
            "0 leaves it plain"),
    Setting("UFCRAM_GROUP", "number", "the pid",
            "preload library: the process tree the resident limit holds for; `ufcram "
            "run` gives each run its own, and children keep their parent's"),
)}


def get(name, parse=int):
    """The value of a setting: the environment if set, else its default."""
    setting = SETTINGS[name]
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return COMPUTED[name]() if name in COMPUTED else setting.default
    try:
        value = parse(raw)
    except ValueError:
        raise UfcramError(f"{name}={raw!r}: expected a number of {setting.unit}") from None
    if value < 0:
        raise UfcramError(f"{name}={raw!r}: must not be negative")
    return value
