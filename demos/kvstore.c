/* kvstore: a read-mostly in-memory key-value index, a ufcram demo (see README.md).
 * An open-addressing hash table of 64-byte records, bulk-loaded in slot order; skewed
 * lookups with ~1% updates. */
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define DEMO_NAME "kvstore"
#include "demo.h"

struct rec {            /* 64 bytes: 16 to a cache line pair, 64 to a page */
    uint64_t key;       /* 0 marks an empty slot */
    char val[56];       /* text, NUL-padded, as a real store would keep it */
};

static size_t home(uint64_t key, size_t cap)
{
    uint64_t s = key;
    return splitmix64(&s) % cap;
}

static void set_value(struct rec *r, uint64_t rnd, unsigned version)
{
    static const char *names[] = {"alice", "bob", "carol", "dave", "erin", "frank", "grace", "heidi"};
    static const char *cities[] = {"berlin", "paris", "oslo", "madrid", "lisbon", "vienna", "prague", "rome"};
    memset(r->val, 0, sizeof r->val);
    snprintf(r->val, sizeof r->val, "user:%08x|%s|%s|score=%u|v=%u", (unsigned)r->key,
             names[rnd & 7], cities[(rnd >> 3) & 7], (unsigned)(rnd >> 6) % 1000, version % 1000);
}

static struct rec *lookup(struct rec *tab, size_t cap, uint64_t key)
{
    for (size_t i = home(key, cap);; i = (i + 1) % cap) {
        if (tab[i].key == key)
            return &tab[i];
        if (!tab[i].key)
            return NULL;
    }
}

/* Value text is derived from the key, so the bulk load needs no second stream in step
 * with the keys and placing a key writes its whole record at once. */
static void set_initial(struct rec *r, uint64_t key, uint64_t seed)
{
    uint64_t s = key ^ seed;
    r->key = key;
    set_value(r, splitmix64(&s), 0);
}

static void insert(struct rec *tab, size_t cap, uint64_t key, uint64_t seed)
{
    size_t i = home(key, cap);
    while (tab[i].key && tab[i].key != key)
        i = (i + 1) % cap;
    set_initial(&tab[i], key, seed);
}

/* Bulk load, as stores load sorted data: keys are bucketed by the table page their home
 * slot falls in (a counting sort), sorted by home within a bucket, then written in slot
 * order, so the table is written front to back once instead of at random (a random
 * insert into a table larger than the resident limit faults on nearly every key).
 * Taking the keys in home order, each goes to the first free slot at or after its
 * home, which is exactly where linear probing looks for it. The keys are drawn from the
 * random stream twice (count, then scatter) rather than kept in another array as large
 * as `sorted`, which would be more memory to demote. */
#define PAGE_RECS 64
static void bulk_load(struct rec *tab, size_t cap, size_t nkeys, uint64_t seed, uint64_t *rng)
{
    size_t nb = (cap + PAGE_RECS - 1) / PAGE_RECS;
    size_t *start = calloc(nb + 1, sizeof *start);
    uint64_t *sorted = malloc(nkeys * sizeof *sorted);
    if (!start || !sorted) {
        perror("kvstore: bulk load");
        exit(1);
    }
    uint64_t r = *rng;
    for (size_t k = 0; k < nkeys; k++)
        start[home(splitmix64(&r) | 1, cap) / PAGE_RECS + 1]++;
    for (size_t b = 0; b < nb; b++)
        start[b + 1] += start[b];
    for (size_t k = 0; k < nkeys; k++) {
        uint64_t key = splitmix64(rng) | 1;
        sorted[start[home(key, cap) / PAGE_RECS]++] = key;
    }
    /* The scatter advanced each start to the next bucket's, so bucket b now ends at
     * start[b] and begins at start[b - 1]. */
    size_t next = 0, spill = nkeys;   /* first free slot; first key that wrapped */
    for (size_t b = 0, lo = 0; b < nb; lo = start[b++]) {
        for (size_t j = lo + 1; j < start[b]; j++) {      /* ~45 keys: insertion sort */
            uint64_t key = sorted[j];
            size_t h = home(key, cap), i = j;
            for (; i > lo; i--) {
                size_t hp = home(sorted[i - 1], cap);
                if (hp < h || (hp == h && sorted[i - 1] <= key))
                    break;
                sorted[i] = sorted[i - 1];
            }
            sorted[i] = key;
        }
        for (size_t j = lo; j < start[b]; j++) {
            uint64_t key = sorted[j];
            if (j > lo && key == sorted[j - 1])
                continue;                 /* a repeated key is one entry */
            size_t h = home(key, cap), i = h > next ? h : next;
            if (i >= cap) {               /* past the end: probing wraps to the front */
                spill = j;
                break;
            }
            set_initial(&tab[i], key, seed);
            next = i + 1;
        }
        if (spill < nkeys)
            break;
    }
    /* The few keys whose chain runs off the end go in by plain inserts, now that the
     * front of the table holds its own keys; they land a few slots in. */
    for (size_t j = spill; j < nkeys; j++)
        insert(tab, cap, sorted[j], seed);
    free(sorted);
    free(start);
}

int main(int argc, char **argv)
{
    unsigned long long mib = 64, seed = 1, ops = 0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--mib") && i + 1 < argc)
            mib = num(argv[++i]);
        else if (!strcmp(argv[i], "--seed") && i + 1 < argc)
            seed = num(argv[++i]);
        else if (!strcmp(argv[i], "--ops") && i + 1 < argc)
            ops = num(argv[++i]);
        else {
            fprintf(stderr, "usage: %s [--mib N] [--seed S] [--ops N]\n", argv[0]);
            return 2;
        }
    }
    if (mib < 2) {
        fprintf(stderr, "kvstore: --mib must be at least 2\n");
        return 2;
    }
    double t0 = now();
    size_t cap = (size_t)(mib << 20) / sizeof(struct rec);
    size_t nkeys = cap / 10 * 7;    /* load factor 0.7 keeps linear probe chains short */
    if (!ops)
        ops = nkeys / 2;    /* cold lookups fault under a resident limit: keep it short */
    struct rec *tab = calloc(cap, sizeof *tab);
    if (!tab) {
        perror("kvstore: calloc");
        return 1;
    }

    uint64_t rng = seed;
    bulk_load(tab, cap, nkeys, seed, &rng);

    /* The hot set is a contiguous tenth of the table, so it fits in a few resident
     * pages (a scattered one would touch every page). A request names a key that
     * exists: the one at or after a random slot, then looked up through its hash. */
    size_t hot0 = splitmix64(&rng) % cap, hotn = cap / 10;
    uint64_t h = 0xcbf29ce484222325ULL, updates = 0, misses = 0;
    for (unsigned long long n = 0; n < ops; n++) {
        uint64_t kind = splitmix64(&rng), r = splitmix64(&rng);
        size_t i = (kind % 100 < 90) ? (hot0 + r % hotn) % cap : r % cap;
        while (!tab[i].key)
            i = (i + 1) % cap;
        struct rec *found = lookup(tab, cap, tab[i].key);
        if (!found) {
            misses++;
            continue;
        }
        if (kind / 100 % 100 == 0) {
            set_value(found, splitmix64(&rng), (unsigned)(n + 1));
            updates++;
        }
        h = hash_words(h, found, sizeof *found);
    }

    printf("kvstore: %zu keys in %zu slots of %zu bytes (%llu MiB, load 0.70)\n",
           nkeys, cap, sizeof(struct rec), mib);
    printf("kvstore: %llu lookups (90%% on a hot 10%% of the table), %" PRIu64 " updates, %" PRIu64 " misses\n",
           ops, updates, misses);
    printf("checksum %016" PRIx64 "\n", h);
    fprintf(stderr, "kvstore: %.2f s\n", now() - t0);
    free(tab);
    return misses ? 1 : 0;
}
