/* writeheavy: a write-heavy table of per-item statistics, a ufcram demo (see README.md).
 * Threads apply bursts of updates to random pages of a big array over several passes. */
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEMO_NAME "writeheavy"
#include "demo.h"

#define NPART 64        /* fixed, so the result does not depend on the thread count */
#define PER_PAGE 64     /* records in a 4 KiB page */
#define BURST 16        /* updates per page visit */

struct rec {            /* 64 bytes */
    uint32_t id, kind, count, flags;
    uint64_t sum;
    uint32_t min, max;
    uint64_t last_pass;
    char name[24];
};

static struct rec *tab;
static size_t nrec;
static unsigned passes = 4, nthreads = 2;
static uint64_t part_rng[NPART];

/* Each partition owns a contiguous range of records and its own random stream, so
 * partitions never share a record and any thread may run any partition. */
static void run_partition(unsigned p, unsigned pass)
{
    size_t lo = nrec * p / NPART, hi = nrec * (p + 1) / NPART;
    size_t pages = (hi - lo + PER_PAGE - 1) / PER_PAGE;
    for (size_t b = 0; b < pages; b++) {
        size_t page = lo + splitmix64(&part_rng[p]) % pages * PER_PAGE;
        for (int u = 0; u < BURST; u++) {
            uint64_t r = splitmix64(&part_rng[p]);
            size_t i = page + r % PER_PAGE;
            if (i >= hi)
                continue;
            struct rec *x = &tab[i];
            uint32_t v = (r >> 32) % 1000;
            x->count++;
            x->sum += v;
            x->min = v < x->min ? v : x->min;
            x->max = v > x->max ? v : x->max;
            x->last_pass = pass + 1;
        }
    }
}

static void *worker(void *arg)
{
    unsigned t = (unsigned)(uintptr_t)arg;
    for (unsigned pass = 0; pass < passes; pass++)
        for (unsigned p = t; p < NPART; p += nthreads)
            run_partition(p, pass);
    return NULL;
}

int main(int argc, char **argv)
{
    unsigned long long mib = 64, seed = 1;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mib") && i + 1 < argc)
            mib = num(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = num(argv[++i]);
        else if (!strcmp(argv[i], "--passes") && i + 1 < argc)
            passes = num(argv[++i]);
        else if (!strcmp(argv[i], "--threads") && i + 1 < argc)
            nthreads = num(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--mib N] [--seed S] [--passes N] [--threads N]\n", argv[0]);
            return 2;
        }
    }
    if (mib < 2 || nthreads < 1 || nthreads > NPART) {
        fprintf(stderr, "writeheavy: need --mib >= 2 and 1 <= --threads <= %d\n", NPART);
        return 2;
    }
    double t0 = now();
    nrec = (size_t)(mib << 20) / sizeof(struct rec);
    tab = calloc(nrec, sizeof *tab);
    if (!tab) {
        perror("writeheavy: calloc");
        return 1;
    }
    for (size_t i = 0; i < nrec; i++) {
        tab[i].id = i;
        tab[i].kind = i % 7;
        tab[i].min = UINT32_MAX;
        snprintf(tab[i].name, sizeof tab[i].name, "item-%07u", (unsigned)i);
    }
    for (unsigned p = 0; p < NPART; p++)
        part_rng[p] = seed * 0x100000001b3ULL + p;

    pthread_t th[NPART];
    for (unsigned t = 0; t < nthreads; t++)
        if (pthread_create(&th[t], NULL, worker, (void *)(uintptr_t)t)) {
            fprintf(stderr, "writeheavy: pthread_create failed\n");
            return 1;
        }
    for (unsigned t = 0; t < nthreads; t++)
        pthread_join(th[t], NULL);

    uint64_t updates = 0, sum = 0;
    for (size_t i = 0; i < nrec; i++) {
        updates += tab[i].count;
        sum += tab[i].sum;
    }
    printf("writeheavy: %zu records of %zu bytes (%llu MiB), %u passes of random 16-update page bursts, %u threads\n",
           nrec, sizeof(struct rec), mib, passes, nthreads);
    printf("writeheavy: %" PRIu64 " updates, value sum %" PRIu64 "\n", updates, sum);
    printf("checksum %016" PRIx64 "\n", hash_words(0xcbf29ce484222325ULL, tab, nrec * sizeof *tab));
    fprintf(stderr, "writeheavy: %.2f s\n", now() - t0);
    free(tab);
    return 0;
}
