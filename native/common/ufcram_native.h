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
 * there) and the fault engine (engine/) reads and writes in the page tables' state arrays. */
#define UFC_STATE_UNTOUCHED 0
#define UFC_STATE_NORMAL 1
#define UFC_STATE_DEMOTING 2
#define UFC_STATE_DEMOTED 3
#define UFC_STATE_READONLY 4
#define UFC_STATE_WRITABLE 5
#define UFC_NSTATES 6

/* The fault engine's plans (engine/plan.c), and the faults it leaves to Python with
 * why: UFC_FAULT_DONE once served, a UFC_LEFT_* code, or a failed ioctl's -errno. */
#define UFC_FAULT_DONE 0
#define UFC_FAULT_RESTORE 1     /* the page's entry (and demoted pages after it) installed */
#define UFC_FAULT_UPGRADE 2     /* a read-only page unprotected for a write */
#define UFC_FAULT_ZERO_FILL 3   /* a first touch: zeros (and untouched pages after it) */
#define UFC_FAULT_UNPROTECT 4   /* stale protection, or outside every region */
#define UFC_FAULT_ZEROS 5       /* a missing page outside every region */
#define UFC_FAULT_AGENT_ZEROS 6 /* the agent copying a page freed in flight */
#define UFC_LEFT_EVENT 16       /* not a fault: an event, Python's */
#define UFC_LEFT_AFTER_EVENTS 17 /* on a page an event of its read changes: after it */
#define UFC_LEFT_WAIT 18        /* its page is in flight, or its process tree over its
                                   limit and being demoted: after that demotion */
#define UFC_LEFT_RETRY 19       /* EAGAIN: the mappings are changing; once events are read */
#define UFC_LEFT_OUTSIDE 20     /* outside every region of a client that covers its
                                   mappings: once Python has covered its mapping */
#define UFC_LEFT_GONE 21        /* its range or process is gone: nobody waits */

#define UFC_AGENT_MAGIC 0x55464341u /* "UFCA" */
#define UFC_AGENT_MAX_RUNS 256
#define UFC_AGENT_DEMOTE 1
#define UFC_AGENT_DROP 2
#define UFC_AGENT_PING 3
#define UFC_AGENT_STOP 4
#define UFC_AGENT_ADOPT 5 /* a forked child's uffd and the handler's pidfd; no reply */
#define UFC_AGENT_MOVED 6 /* mremap moved runs[0] to runs[1].addr; no reply */
#define UFC_AGENT_MOVE 7  /* DEMOTE by UFFDIO_MOVE: the reply is followed by a bitmap
                             of the pages that did not move (one bit a page, in order) */
#define UFC_AGENT_DISCARD 8  /* DROP by UFFDIO_MOVE (clean pages: nothing to keep); the
                                reply has MOVE's bitmap */
#define UFC_AGENT_MOVE_MAX_PAGES 8192   /* per MOVE or DISCARD command: its bitmap's 1 KiB */

#include "ufcram_api.h"

#endif
