/* Shared by the shim's C sources: kernel compat, agent constants (whose values
 * constants.cdef hands to Python) and the exported API. */
#ifndef UFCRAM_NATIVE_H
#define UFCRAM_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/mman.h>
#include "uffd_compat.h"
#include "protocol.h"

#define UFC_PAGE_SIZE 4096
#define UFC_MAX_FDS 8

/* The page states: the one list, which pagetable.py takes from here (their meaning is
 * there) and engine/faults.c reads and writes in the page tables' state arrays. */
#define UFC_STATE_UNTOUCHED 0
#define UFC_STATE_NORMAL 1
#define UFC_STATE_DEMOTING 2
#define UFC_STATE_DEMOTED 3
#define UFC_STATE_READONLY 4
#define UFC_STATE_WRITABLE 5
#define UFC_NSTATES 6

#define UFC_AGENT_MAGIC 0x55464341u /* "UFCA" */
#define UFC_AGENT_MAX_RUNS 256
#define UFC_AGENT_DEMOTE 1
#define UFC_AGENT_DROP 2
#define UFC_AGENT_PING 3
#define UFC_AGENT_STOP 4
#define UFC_AGENT_ADOPT 5 /* a forked child's uffd and the handler's pidfd; no reply */
#define UFC_AGENT_MOVED 6 /* mremap moved runs[0] to runs[1].addr; no reply */

#include "ufcram_api.h"

#endif
