/*
 * The lookups of libfabric's MR cache through the C API: mmu_uffd_cache_find (never
 * registers, never stale), the byte limit (max_bytes), and registration attributes in the
 * key (mmu_uffd_cache_get_attrs, reg_attrs, mmu_uffd_reg_attrs), alone and from several
 * threads. Prints "SKIPPED: ..." and exits 0 where userfaultfd is unavailable; prints "OK"
 * at the end; exits 1 with a message on the first failed check.
 *
 * Driven by tests/c_api.rs (static, dynamic through pkg-config, and with sanitizers).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include "mmu_uffd.h"

#define CHECK(cond, msg)                                                                   \
    do {                                                                                   \
        if (!(cond)) {                                                                     \
            fprintf(stderr, "FAIL %s:%d: %s: %s (last error: %s)\n", __FILE__, __LINE__,   \
                    #cond, (msg), mmu_uffd_last_error());                                  \
            exit(1);                                                                       \
        }                                                                                  \
    } while (0)

#define READ 1u
#define WRITE 2u
#define MAX_KEYS 100000

static size_t page;

/* ---- the registrar: keys are serial numbers; it records each key's attributes and
 * length, and the bytes registered now ---- */

struct registrar {
    mmu_uffd_attrs attrs[MAX_KEYS + 1];
    size_t len[MAX_KEYS + 1];
    atomic_int live[MAX_KEYS + 1];
    atomic_ullong next;
    atomic_long regs, deregs, pinned;
    long budget; /* reg fails past this many bytes registered at once (0: no limit) */
};

static int reg_attrs_cb(void *user, void *addr, size_t len, const mmu_uffd_attrs *attrs,
                        uint64_t *key_out) {
    (void)addr;
    struct registrar *r = user;
    long now = atomic_fetch_add(&r->pinned, (long)len) + (long)len;
    if (r->budget && now > r->budget) {
        atomic_fetch_sub(&r->pinned, (long)len);
        return -ENOSPC;
    }
    uint64_t key = atomic_fetch_add(&r->next, 1) + 1;
    if (key > MAX_KEYS) return -ENOMEM;
    r->attrs[key] = *attrs;
    r->len[key] = len;
    atomic_store(&r->live[key], 1);
    atomic_fetch_add(&r->regs, 1);
    *key_out = key;
    return 0;
}

static void dereg_cb(void *user, uint64_t key) {
    struct registrar *r = user;
    if (key == 0 || key > MAX_KEYS || !atomic_exchange(&r->live[key], 0)) {
        fprintf(stderr, "FAIL: dereg of unknown or released key %llu\n",
                (unsigned long long)key);
        exit(1);
    }
    atomic_fetch_sub(&r->pinned, (long)r->len[key]);
    atomic_fetch_add(&r->deregs, 1);
}

static char *map(size_t len) {
    char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    CHECK(p != MAP_FAILED, "mmap");
    memset(p, 0x5a, len);
    return p;
}

static int same(mmu_uffd_attrs a, mmu_uffd_attrs b) {
    return a.access == b.access && a.device == b.device;
}

static mmu_uffd_cache_stats stats(const mmu_uffd_cache *cache) {
    mmu_uffd_cache_stats s;
    CHECK(mmu_uffd_cache_get_stats(cache, &s) == 0, "stats");
    return s;
}

static mmu_uffd_cache *new_cache(mmu_uffd_monitor *monitor, struct registrar *r,
                                 uint64_t max_bytes, size_t capacity) {
    mmu_uffd_registrar registrar = {.dereg = dereg_cb, .user = r, .reg_attrs = reg_attrs_cb};
    mmu_uffd_cache_config cfg = mmu_uffd_cache_config_default();
    CHECK(cfg.max_bytes == 0, "no byte limit by default");
    cfg.max_bytes = max_bytes;
    cfg.capacity = capacity;
    mmu_uffd_cache *cache = NULL;
    CHECK(mmu_uffd_cache_new(monitor, &cfg, &registrar, &cache) == 0, "cache_new");
    return cache;
}

/* ---- several threads: each uses its own attributes on shared buffers, with get and
 * find; every handle must carry the attributes asked for, registered with them ---- */

#define THREADS 4
#define NBUF 4
#define ROUNDS 2000

struct shared {
    mmu_uffd_cache *cache;
    struct registrar *r;
    char *bufs[NBUF];
    size_t pages[NBUF];
    uint64_t max_bytes;
    atomic_long wrong, over, found;
};

struct arg {
    struct shared *s;
    int t;
};

static void *worker(void *p) {
    struct arg *a = p;
    struct shared *s = a->s;
    for (int i = 0; i < ROUNDS; i++) {
        mmu_uffd_attrs want = {.access = (i & 1) ? READ | WRITE : READ,
                               .device = (uint64_t)(a->t % 2)};
        int b = (i + a->t) % NBUF;
        mmu_uffd_reg *h = NULL;
        if (i % 3 == 0) {
            int rc = mmu_uffd_cache_find(s->cache, s->bufs[b], page, &want, &h);
            CHECK(rc == 0 || rc == 1, "find");
            CHECK((rc == 1) == (h != NULL), "find stores a handle exactly when it finds");
            if (!h) continue;
            atomic_fetch_add(&s->found, 1);
        } else {
            CHECK(mmu_uffd_cache_get_attrs(s->cache, s->bufs[b], s->pages[b] * page, &want,
                                           &h) == 0,
                  "get_attrs");
        }
        mmu_uffd_attrs got;
        CHECK(mmu_uffd_reg_attrs(h, &got) == 0, "reg_attrs");
        uint64_t key = mmu_uffd_reg_key(h);
        if (!same(got, want) || !same(s->r->attrs[key], want) ||
            mmu_uffd_reg_start(h) != s->bufs[b] || !atomic_load(&s->r->live[key]))
            atomic_fetch_add(&s->wrong, 1);
        if (s->max_bytes && stats(s->cache).bytes > s->max_bytes) atomic_fetch_add(&s->over, 1);
        mmu_uffd_reg_put(h);
    }
    return NULL;
}

static void threads(mmu_uffd_monitor *monitor, uint64_t max_bytes) {
    static struct registrar r;
    memset(&r, 0, sizeof r);
    struct shared s = {.r = &r, .max_bytes = max_bytes};
    s.cache = new_cache(monitor, &r, max_bytes, 12);
    for (int b = 0; b < NBUF; b++) {
        s.pages[b] = (size_t)b + 1;
        s.bufs[b] = map(s.pages[b] * page);
    }
    pthread_t t[THREADS];
    struct arg args[THREADS];
    for (int i = 0; i < THREADS; i++) {
        args[i] = (struct arg){&s, i};
        CHECK(pthread_create(&t[i], NULL, worker, &args[i]) == 0, "pthread_create");
    }
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    CHECK(atomic_load(&s.wrong) == 0, "a handle with other attributes or memory");
    CHECK(atomic_load(&s.over) == 0, "the cached bytes went over max_bytes");
    CHECK(atomic_load(&s.found) > 0, "find never found anything: the test is vacuous");
    mmu_uffd_cache_stats st = stats(s.cache);
    CHECK(st.hits > 0 && st.entries <= 12, "hits, and the capacity holds");
    CHECK(!max_bytes || st.evictions > 0, "the byte limit evicted");
    mmu_uffd_cache_free(s.cache);
    CHECK(atomic_load(&r.regs) == atomic_load(&r.deregs), "every registration released");
    for (int b = 0; b < NBUF; b++) CHECK(munmap(s.bufs[b], s.pages[b] * page) == 0, "munmap");
    printf("threads (max_bytes %llu): %ld registrations, %ld finds found\n",
           (unsigned long long)max_bytes, (long)atomic_load(&r.regs),
           (long)atomic_load(&s.found));
}

int main(void) {
    page = (size_t)sysconf(_SC_PAGESIZE);
    setvbuf(stdout, NULL, _IONBF, 0);

    mmu_uffd_monitor *monitor = NULL;
    mmu_uffd_monitor_config mcfg = {0};
    int rc = mmu_uffd_monitor_new(&mcfg, &monitor);
    if (rc == -ENOSYS || rc == -EOPNOTSUPP) {
        printf("SKIPPED: %s\n", mmu_uffd_last_error());
        return 0;
    }
    CHECK(rc == 0 && monitor != NULL, "monitor_new");

    static struct registrar r;
    mmu_uffd_cache *cache = new_cache(monitor, &r, 0, 0);

    /* ---- find: never registers; finds what get cached; never stale ---- */
    char *p = map(4 * page);
    mmu_uffd_reg *h = (mmu_uffd_reg *)&r, *f = NULL;
    CHECK(mmu_uffd_cache_find(cache, p, page, NULL, &h) == 0, "a miss finds nothing");
    CHECK(h == NULL, "a miss stores NULL");
    CHECK(atomic_load(&r.regs) == 0, "find does not register");
    CHECK(stats(cache).not_found == 1, "not_found counts it");
    CHECK(mmu_uffd_cache_get(cache, p, 2 * page, &h) == 0, "get");
    CHECK(mmu_uffd_cache_find(cache, p + page, 10, NULL, &f) == 1, "find hits");
    CHECK(mmu_uffd_reg_key(f) == mmu_uffd_reg_key(h), "the entry get cached");
    mmu_uffd_reg_put(f);
    CHECK(mmu_uffd_cache_find(cache, p, 4 * page, NULL, &f) == 0 && f == NULL,
          "a range no entry covers is not found (nor registered)");
    CHECK(atomic_load(&r.regs) == 1, "one registration");
    CHECK(madvise(p, page, MADV_DONTNEED) == 0, "madvise");
    CHECK(mmu_uffd_cache_find(cache, p, page, NULL, &f) == 0, "madvise: not found");
    mmu_uffd_reg_put(h);
    CHECK(mmu_uffd_cache_get(cache, p, 2 * page, &h) == 0, "get again");
    mmu_uffd_reg_put(h);
    CHECK(munmap(p, 4 * page) == 0, "munmap");
    CHECK(mmu_uffd_cache_find(cache, p, page, NULL, &f) == 0, "munmap: not found");
    CHECK(mmu_uffd_cache_find(cache, p, 0, NULL, &f) == -EINVAL, "find(len 0)");
    CHECK(mmu_uffd_cache_find(cache, p, page, NULL, NULL) == -EINVAL, "find(NULL out)");
    CHECK(mmu_uffd_cache_find(NULL, p, page, NULL, &f) == -EINVAL, "find(NULL cache)");

    /* ---- attributes: one range, distinct entries per attributes ---- */
    char *q = map(8 * page);
    mmu_uffd_attrs ro = {.access = READ, .device = 0};
    mmu_uffd_attrs rw = {.access = READ | WRITE, .device = 0};
    mmu_uffd_attrs dev1 = {.access = READ, .device = 1};
    mmu_uffd_reg *a = NULL, *b = NULL, *c = NULL, *none = NULL;
    CHECK(mmu_uffd_cache_get_attrs(cache, q, 4 * page, &ro, &a) == 0, "get ro");
    CHECK(mmu_uffd_cache_get_attrs(cache, q, 4 * page, &rw, &b) == 0, "get rw");
    CHECK(mmu_uffd_cache_get(cache, q, 4 * page, &none) == 0, "get without attributes");
    CHECK(mmu_uffd_reg_key(a) != mmu_uffd_reg_key(b) &&
              mmu_uffd_reg_key(a) != mmu_uffd_reg_key(none),
          "three registrations of one range");
    CHECK(same(r.attrs[mmu_uffd_reg_key(a)], ro) && same(r.attrs[mmu_uffd_reg_key(b)], rw),
          "reg_attrs got the lookup's attributes");
    mmu_uffd_attrs got;
    CHECK(mmu_uffd_reg_attrs(b, &got) == 0 && same(got, rw), "mmu_uffd_reg_attrs");
    CHECK(mmu_uffd_reg_attrs(none, &got) == 0 && got.access == 0 && got.device == 0,
          "no attributes are zeros");
    CHECK(mmu_uffd_reg_attrs(a, NULL) == -EINVAL && mmu_uffd_reg_attrs(NULL, &got) == -EINVAL,
          "reg_attrs(NULL)");
    CHECK(mmu_uffd_cache_find(cache, q + page, page, &ro, &f) == 1 &&
              mmu_uffd_reg_key(f) == mmu_uffd_reg_key(a),
          "find with attributes");
    mmu_uffd_reg_put(f);
    CHECK(mmu_uffd_cache_find(cache, q, page, &dev1, &f) == 0, "other attributes: nothing");
    /* Merging stays within one key: rw's [2, 6) merges with rw's [0, 4) only. */
    CHECK(mmu_uffd_cache_get_attrs(cache, q + 2 * page, 4 * page, &rw, &c) == 0, "get rw 2-6");
    CHECK(mmu_uffd_reg_start(c) == q && mmu_uffd_reg_len(c) == 6 * page, "merged within rw");
    CHECK(mmu_uffd_cache_find(cache, q, 4 * page, &ro, &f) == 1, "ro untouched");
    mmu_uffd_reg_put(f);
    CHECK(mmu_uffd_cache_len(cache) == 3, "three entries");
    CHECK(munmap(q, 8 * page) == 0, "munmap");
    CHECK(!mmu_uffd_reg_is_valid(a) && !mmu_uffd_reg_is_valid(b) && !mmu_uffd_reg_is_valid(c) &&
              !mmu_uffd_reg_is_valid(none),
          "an unmap invalidates every key's entry");
    CHECK(mmu_uffd_cache_len(cache) == 0, "all purged");
    mmu_uffd_reg_put(a);
    mmu_uffd_reg_put(b);
    mmu_uffd_reg_put(c);
    mmu_uffd_reg_put(none);
    mmu_uffd_cache_free(cache);
    CHECK(atomic_load(&r.regs) == atomic_load(&r.deregs), "every registration released");

    /* ---- the byte limit: a registrar with exactly max_bytes to pin never runs out ---- */
    static struct registrar lim;
    lim.budget = (long)(5 * page);
    cache = new_cache(monitor, &lim, 5 * page, 0);
    char *bufs[5];
    for (int i = 0; i < 5; i++) bufs[i] = map((size_t)(i + 1) * page);
    for (int i = 0; i < 40; i++) {
        int n = (i * 3) % 5;
        CHECK(mmu_uffd_cache_get(cache, bufs[n], (size_t)(n + 1) * page, &h) == 0,
              "the registrar's budget ran out");
        CHECK(stats(cache).bytes <= 5 * page, "bytes within max_bytes");
        mmu_uffd_reg_put(h);
    }
    mmu_uffd_cache_stats st = stats(cache);
    CHECK(st.evictions > 0, "the byte limit evicted");
    char *big = map(8 * page);
    CHECK(mmu_uffd_cache_get(cache, big, 8 * page, &h) == -ECANCELED,
          "a range over the registrar's budget fails in reg");
    lim.budget = 0;
    CHECK(mmu_uffd_cache_get(cache, big, 8 * page, &h) == 0, "a range over max_bytes");
    st = stats(cache);
    CHECK(st.uncached == 1 && st.bytes <= 5 * page, "registered, not cached");
    CHECK(mmu_uffd_cache_find(cache, big, page, NULL, &f) == 0, "an uncached range");
    mmu_uffd_reg_put(h);
    mmu_uffd_cache_free(cache);
    CHECK(atomic_load(&lim.pinned) == 0, "every byte unpinned");
    for (int i = 0; i < 5; i++) CHECK(munmap(bufs[i], (size_t)(i + 1) * page) == 0, "munmap");
    CHECK(munmap(big, 8 * page) == 0, "munmap");

    /* ---- neither reg nor reg_attrs ---- */
    mmu_uffd_registrar no_reg = {.dereg = dereg_cb, .user = &r};
    mmu_uffd_cache *bad = NULL;
    CHECK(mmu_uffd_cache_new(monitor, NULL, &no_reg, &bad) == -EINVAL && bad == NULL,
          "cache_new without reg nor reg_attrs");

    threads(monitor, 0);
    threads(monitor, 6 * page);

    mmu_uffd_monitor_free(monitor);
    printf("OK\n");
    return 0;
}
