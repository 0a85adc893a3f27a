"""The floor under any userfaultfd pager, for `ufcram bench`: a bare round trip in C
(fault in one thread, UFFDIO_COPY from another), compiled with gcc at run time.
"""
import os
import shutil
import subprocess
import tempfile

# One thread touches each page of a registered range once, timing every touch; a
# second thread reads the fault message and resolves it with UFFDIO_COPY. Nothing
# else runs, so this is what the kernel alone costs per fault on this machine. Both
# threads on one CPU, or on two: waking a thread on another (idle) vCPU is most of the
# cost there, and which of the two a free-running pager gets varies from run to run.
SOURCE = r"""
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef UFFD_USER_MODE_ONLY
#define UFFD_USER_MODE_ONLY 1
#endif

static long page;
static int uffd;
static char *src;
static int serve_cpu;

static void pin(int cpu) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    sched_setaffinity(0, sizeof set, &set);   /* 0: the calling thread */
}

static void *serve(void *arg) {
    struct uffd_msg msg;
    (void)arg;
    pin(serve_cpu);
    for (;;) {
        if (read(uffd, &msg, sizeof msg) != sizeof msg) {
            if (errno == EINTR || errno == EAGAIN) continue;
            return NULL;
        }
        if (msg.event != UFFD_EVENT_PAGEFAULT) continue;
        struct uffdio_copy copy = {
            .dst = msg.arg.pagefault.address & ~(unsigned long long)(page - 1),
            .src = (unsigned long)src, .len = page, .mode = 0};
        if (ioctl(uffd, UFFDIO_COPY, &copy) < 0 && errno != EEXIST) {
            perror("UFFDIO_COPY");
            exit(3);
        }
    }
}

static int cmp(const void *a, const void *b) {
    double x = *(const double *)a, y = *(const double *)b;
    return (x > y) - (x < y);
}

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 4096;
    serve_cpu = argc > 2 && strcmp(argv[2], "cross") == 0;
    pin(0);
    page = sysconf(_SC_PAGESIZE);
    uffd = syscall(SYS_userfaultfd, O_CLOEXEC);
    if (uffd < 0 && errno == EPERM)  /* user faults only: enough for plain loads */
        uffd = syscall(SYS_userfaultfd, O_CLOEXEC | UFFD_USER_MODE_ONLY);
    if (uffd < 0) { perror("userfaultfd"); return 2; }
    struct uffdio_api api = {.api = UFFD_API};
    if (ioctl(uffd, UFFDIO_API, &api) < 0) { perror("UFFDIO_API"); return 2; }
    char *mem = mmap(NULL, n * page, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 2; }
    madvise(mem, n * page, MADV_NOHUGEPAGE);
    src = aligned_alloc(page, page);
    memset(src, 0x5a, page);
    struct uffdio_register reg = {
        .range = {.start = (unsigned long)mem, .len = n * page},
        .mode = UFFDIO_REGISTER_MODE_MISSING};
    if (ioctl(uffd, UFFDIO_REGISTER, &reg) < 0) { perror("UFFDIO_REGISTER"); return 2; }
    pthread_t thread;
    pthread_create(&thread, NULL, serve, NULL);
    double *lat = malloc(n * sizeof *lat), total = 0;
    volatile char sink = 0;
    for (long i = 0; i < n; i++) {
        double t0 = now_ns();
        sink += mem[i * page];
        lat[i] = now_ns() - t0;
        total += lat[i];
    }
    qsort(lat, n, sizeof *lat, cmp);
    printf("faults=%ld p50_us=%.3f p99_us=%.3f mean_us=%.3f\n", n, lat[n / 2] / 1e3,
           lat[(long)(n * 0.99)] / 1e3, total / n / 1e3);
    return 0;
}
"""


def measure(faults=4096, timeout=60):
    """{"same_cpu": ..., "cross_cpu": ...}, each {faults, p50_us, p99_us, mean_us}; or
    {"skipped": why} when it cannot run."""
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        return {"skipped": "no C compiler (gcc) on PATH"}
    with tempfile.TemporaryDirectory(prefix="ufcram-floor-") as tmp:
        src, exe = os.path.join(tmp, "floor.c"), os.path.join(tmp, "floor")
        with open(src, "w") as f:
            f.write(SOURCE)
        built = subprocess.run([gcc, "-O2", "-pthread", "-o", exe, src],
                               capture_output=True, text=True)
        if built.returncode:
            return {"skipped": f"gcc failed: {built.stderr.strip()[-300:]}"}
        modes = ("same", "cross") if len(os.sched_getaffinity(0)) > 1 else ("same",)
        out = {}
        for mode in modes:
            out[f"{mode}_cpu"] = _run(exe, faults, mode, timeout)
            if "skipped" in out[f"{mode}_cpu"]:
                return out[f"{mode}_cpu"]
        return out


def _run(exe, faults, mode, timeout):
    try:
        ran = subprocess.run([exe, str(faults), mode], capture_output=True, text=True,
                             timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"skipped": f"the C round trip did not finish in {timeout} s"}
    if ran.returncode:
        return {"skipped": f"the C round trip failed: {ran.stderr.strip()[-300:]}"}
    fields = dict(kv.split("=") for kv in ran.stdout.split())
    return {k: int(v) if k == "faults" else float(v) for k, v in fields.items()}
