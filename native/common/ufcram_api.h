/* Every function and struct the native shim exports to Python: this file is both a C
 * header and the cffi cdef. C does syscalls, ioctls, fd passing, page copies and every
 * fault's transition (the fault engine); Python computes the numbers (limits, grants,
 * which pages to demote) and keeps the books. Functions return >= 0, or -errno. */

struct ufc_run { uint64_t addr; uint64_t len; };
struct ufc_agent_cmd {
    uint32_t magic; uint32_t op; uint32_t seq; uint32_t nruns;
    uint64_t staging_offset;
    struct ufc_run runs[];
};
struct ufc_agent_reply {
    uint32_t magic; uint32_t seq; int32_t status; int32_t tid; uint64_t bytes;
};

/* userfaultfd */
int ufc_uffd_open_syscall(int flags);
int ufc_uffd_open_dev(int flags);
int ufc_uffd_api(int fd, uint64_t want, uint64_t *features, uint64_t *ioctls);
int ufc_uffd_register(int fd, uint64_t start, uint64_t len, uint64_t mode, uint64_t *ioctls);
int ufc_uffd_unregister(int fd, uint64_t start, uint64_t len);
int ufc_uffd_copy(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);
int ufc_uffd_copy_batch(int fd, const uint64_t *dst, const uint64_t *src, const uint64_t *len,
                        int n, uint64_t mode, int32_t *results);
int ufc_uffd_zeropage(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int ufc_uffd_writeprotect(int fd, uint64_t start, uint64_t len, uint64_t mode);
int ufc_uffd_wake(int fd, uint64_t start, uint64_t len);
int ufc_uffd_move(int fd, uint64_t dst, uint64_t src, uint64_t len, uint64_t mode, int64_t *done);
int ufc_uffd_poison(int fd, uint64_t start, uint64_t len, uint64_t mode, int64_t *done);
int ufc_uffd_read_msgs(int fd, void *buf, int max_msgs);
int ufc_wait_readable(int fd, int timeout_ms);

/* the fault engine (engine/plan.c, engine/faults.c): views of the pool and of page tables, numpy arrays
 * the handler owns and keeps alive while the views exist */
struct ufc_pool_view {
    const int64_t *location; const int16_t *size; int64_t nhandles;
    const uint64_t *arena; int64_t narenas;   /* arena base addresses, 0 if released */
    int (*decompress)(const char *src, char *dst, int src_size, int dst_capacity);
};
/* a pool entry read back (entries.c): the one decoder of pool.py's format */
int ufc_load_entry(const struct ufc_pool_view *pool, int64_t h, uint8_t *page);
int64_t ufc_load_entries(const struct ufc_pool_view *pool, const int64_t *handles, int64_t n,
                         uint8_t *out);
struct ufc_region_view {
    uint64_t base; uint64_t npages;
    uint8_t *state; int64_t *entry; int64_t *tally; uint8_t *referenced;
    int64_t *readahead; int64_t readahead_max;   /* Readahead's window and next */
    int64_t limit;      /* resident limit in pages, -1 for none */
    int64_t budget;     /* write budget in pages, -1 for auto (the call's auto_grants) */
    int64_t faults;     /* out: faults served in this region */
    int64_t restored;   /* out: pages restored for them */
    int64_t promoted;   /* out: written pages the budget refused, now normal memory */
    int64_t zero_filled; /* out: pages first touched */
};
struct ufc_fault_call {
    int64_t client_limit;   /* resident limit over all regions in pages, -1 for none */
    int may_grant;          /* 0: every written page is promoted (node closed, forked child) */
    int throttle;           /* its process tree is being demoted: faults that add pages wait */
    int cover;              /* faults outside every region are Python's (coverage) */
    uint32_t agent_tid;     /* the client's agent thread, 0 for none */
    int64_t auto_grants;    /* in/out: writable pages auto budgets may still grant */
    int max_faults;
    uint8_t *bounce; int64_t bounce_pages;
    int32_t *why;                         /* out: why each message left was left */
    int *touched; int ntouched;           /* out: regions served in (index, once each) */
    int64_t *released; int nreleased;     /* out: entries written pages no longer hold */
    int over;               /* out: a resident limit was crossed: Python demotes now */
    int drained;            /* out: the call ended on an empty queue */
    int64_t room;           /* private: pages the client limit still lets in */
};
/* one fault's plan: pure, for the engine and for tests that hold it against a model */
struct ufc_plan {
    int32_t action;     /* UFC_FAULT_* to do, or UFC_LEFT_* */
    int32_t region;     /* index in regions, -1 outside every one */
    int64_t page;       /* the faulting page, first of the run */
    int64_t count;      /* pages in the run */
    int64_t window;     /* the readahead window after it, -1 for unchanged */
    uint8_t state;      /* the pages' state once served */
    uint8_t wp;         /* installed write-protected */
    uint8_t write;      /* a write (or write-protect) fault */
};
int ufc_plan_fault(struct ufc_region_view *const *regions, int nregions, uint64_t address,
                   uint64_t flags, uint32_t tid, uint64_t freed, const struct ufc_fault_call *call,
                   struct ufc_plan *plan);
/* read and serve a client's faults, until a read leaves an event, a resident limit is
 * crossed or none comes for spin_ns; ufc_serve_msgs serves messages given as one read.
 * Both return how many are left, moved to the front of msgs with call->why, or -errno */
int ufc_serve_faults(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *const *regions,
                     int nregions, void *msgs, int max_msgs, int64_t spin_ns,
                     struct ufc_fault_call *call);
int ufc_serve_msgs(int uffd, const struct ufc_pool_view *pool, struct ufc_region_view *const *regions,
                   int nregions, void *msgs, int n, struct ufc_fault_call *call);

/* descriptors over Unix sockets (SCM_RIGHTS) */
int ufc_send_fds(int sock, const void *data, size_t len, const int *fds, int nfds);
int ufc_recv_fds(int sock, void *data, size_t len, int *fds, int maxfds, int *nfds);

/* memory */
int ufc_madvise(uint64_t addr, uint64_t len, int advice);
int64_t ufc_process_vm_readv(int pid, uint64_t local, uint64_t remote, uint64_t len);
int ufc_gettid(void);

/* the agent thread */
int ufc_agent_start(int uffd, int sock, uint64_t staging, uint64_t staging_len);
int ufc_agent_demote(int uffd, const struct ufc_run *runs, uint32_t nruns,
                     uint64_t staging, uint64_t staging_len, uint64_t *bytes);
