/*
 * The C API end to end: a monitor, a cache with a counting registrar, hits and misses,
 * invalidation by munmap and MAP_FIXED, threads reusing addresses with a per-page token
 * check (a stale hit would show an old token), error paths, and freeing the monitor
 * before the cache. Prints "SKIPPED: ..." and exits 0 where userfaultfd is unavailable;
 * prints "OK" at the end; exits 1 with a message on the first failed check.
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

static size_t page;

/* ---- the registrar: counts, and records the first 8 bytes of each page ---- */

struct record {
    uintptr_t start;
    size_t pages;
    uint64_t *tokens; /* first 8 bytes of each page at registration */
    int live;
};

struct registrar {
    pthread_mutex_t lock;
    struct record *records; /* indexed by key - 1 */
    size_t n, cap;
    atomic_long regs, deregs;
    int fail_with; /* when non-zero, reg returns it */
};

static int reg_cb(void *user, void *addr, size_t len, uint64_t *key_out) {
    struct registrar *r = user;
    if (r->fail_with) return r->fail_with;
    size_t pages = len / page;
    uint64_t *tokens = malloc(pages * sizeof *tokens);
    if (!tokens) return -ENOMEM;
    for (size_t i = 0; i < pages; i++)
        memcpy(&tokens[i], (char *)addr + i * page, sizeof tokens[i]);
    pthread_mutex_lock(&r->lock);
    if (r->n == r->cap) {
        size_t cap = r->cap ? 2 * r->cap : 256;
        struct record *grown = realloc(r->records, cap * sizeof *grown);
        if (!grown) {
            pthread_mutex_unlock(&r->lock);
            free(tokens);
            return -ENOMEM;
        }
        r->records = grown;
        r->cap = cap;
    }
    r->records[r->n] = (struct record){(uintptr_t)addr, pages, tokens, 1};
    *key_out = ++r->n;
    pthread_mutex_unlock(&r->lock);
    atomic_fetch_add(&r->regs, 1);
    return 0;
}

static void dereg_cb(void *user, uint64_t key) {
    struct registrar *r = user;
    pthread_mutex_lock(&r->lock);
    if (key == 0 || key > r->n || !r->records[key - 1].live) {
        fprintf(stderr, "FAIL: dereg of unknown or released key %llu\n",
                (unsigned long long)key);
        exit(1);
    }
    r->records[key - 1].live = 0;
    free(r->records[key - 1].tokens);
    r->records[key - 1].tokens = NULL;
    pthread_mutex_unlock(&r->lock);
    atomic_fetch_add(&r->deregs, 1);
}

/* Whether the registration behind `reg` recorded the tokens now in [p, p + len). */
static int tokens_match(struct registrar *r, const mmu_uffd_reg *reg, const char *p, size_t len) {
    uint64_t key = mmu_uffd_reg_key(reg);
    int ok = 1;
    pthread_mutex_lock(&r->lock);
    CHECK(key >= 1 && key <= r->n, "a key the registrar made");
    struct record *rec = &r->records[key - 1];
    CHECK(rec->live, "the registration of a live handle is registered");
    uintptr_t s = (uintptr_t)p;
    CHECK(rec->start <= s && s + len <= rec->start + rec->pages * page, "it covers the range");
    for (size_t off = 0; off < len; off += page) {
        uint64_t now;
        memcpy(&now, p + off, sizeof now);
        if (rec->tokens[(s + off - rec->start) / page] != now) ok = 0;
    }
    pthread_mutex_unlock(&r->lock);
    return ok;
}

static atomic_ullong next_token = 1;

static void stamp(char *p, size_t len) {
    for (size_t off = 0; off < len; off += page) {
        uint64_t t = atomic_fetch_add(&next_token, 1);
        memcpy(p + off, &t, sizeof t);
    }
}

static char *map(void *at, size_t len) {
    int flags = MAP_PRIVATE | MAP_ANONYMOUS | (at ? MAP_FIXED : 0);
    void *p = mmap(at, len, PROT_READ | PROT_WRITE, flags, -1, 0);
    CHECK(p != MAP_FAILED, "mmap");
    stamp(p, len);
    return p;
}

/* ---- threads: mmap / get / check / munmap, addresses reused ---- */

struct worker {
    const mmu_uffd_cache *cache;
    struct registrar *r;
    int iterations;
    long stale, hits_checked;
};

static void *work(void *arg) {
    struct worker *w = arg;
    for (int i = 0; i < w->iterations; i++) {
        size_t len = (size_t)(1 + i % 3) * page;
        char *p = map(NULL, len);
        for (int round = 0; round < 2; round++) {
            mmu_uffd_reg *h = NULL;
            int rc = mmu_uffd_cache_get(w->cache, p, len, &h);
            CHECK(rc == 0, "get in a thread");
            if (!tokens_match(w->r, h, p, len)) w->stale++;
            w->hits_checked++;
            mmu_uffd_reg_put(h);
        }
        CHECK(munmap(p, len) == 0, "munmap");
    }
    return NULL;
}

static int expect_einval(int rc, const char *what) {
    if (rc != -EINVAL) {
        fprintf(stderr, "FAIL: %s returned %d, not -EINVAL\n", what, rc);
        exit(1);
    }
    CHECK(strlen(mmu_uffd_last_error()) > 0, "a message for the failed call");
    return 1;
}

static void *fresh_thread_error(void *arg) {
    (void)arg;
    /* Messages are per thread: nothing has failed on this one yet. */
    CHECK(strcmp(mmu_uffd_last_error(), "") == 0, "a new thread has no message");
    mmu_uffd_reg *h = NULL;
    expect_einval(mmu_uffd_cache_get(NULL, &h, 1, &h), "get(NULL cache)");
    CHECK(strstr(mmu_uffd_last_error(), "cache") != NULL, "the message names the argument");
    return NULL;
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
    CHECK(mmu_uffd_monitor_stopped(monitor) == 0, "the monitor runs");

    struct registrar r = {.lock = PTHREAD_MUTEX_INITIALIZER};
    mmu_uffd_registrar registrar = {.reg = reg_cb, .dereg = dereg_cb, .user = &r};
    mmu_uffd_cache_config ccfg = mmu_uffd_cache_config_default();
    CHECK(ccfg.capacity == 1024 && ccfg.merge && ccfg.reuse_check, "defaults");
    ccfg.merge = false; /* reg reads the pages it registers: only the caller's own */
    mmu_uffd_cache *cache = NULL;
    CHECK(mmu_uffd_cache_new(monitor, &ccfg, &registrar, &cache) == 0, "cache_new");

    /* ---- miss, hit, munmap, MAP_FIXED at the same address ---- */
    size_t len = 4 * page;
    char *p = map(NULL, len);
    mmu_uffd_reg *h1 = NULL, *h2 = NULL, *h3 = NULL;
    CHECK(mmu_uffd_cache_get(cache, p, len, &h1) == 0, "first get");
    CHECK(atomic_load(&r.regs) == 1, "a miss registers");
    CHECK(mmu_uffd_reg_start(h1) == p && mmu_uffd_reg_len(h1) == len, "the range");
    CHECK(mmu_uffd_reg_is_valid(h1), "valid");
    CHECK(tokens_match(&r, h1, p, len), "tokens of the new registration");
    CHECK(mmu_uffd_cache_get(cache, p + page, page, &h2) == 0, "second get");
    CHECK(atomic_load(&r.regs) == 1, "a hit does not register");
    CHECK(mmu_uffd_reg_key(h2) == mmu_uffd_reg_key(h1), "a hit has the same key");
    mmu_uffd_cache_stats cs;
    CHECK(mmu_uffd_cache_get_stats(cache, &cs) == 0, "cache stats");
    CHECK(cs.hits == 1 && cs.misses == 1 && cs.entries == 1, "one hit, one miss, one entry");
    CHECK(mmu_uffd_cache_len(cache) == 1, "len");

    CHECK(munmap(p, len) == 0, "munmap");
    CHECK(!mmu_uffd_reg_is_valid(h1) && !mmu_uffd_reg_is_valid(h2), "munmap invalidates");
    char *q = map(p, len);
    CHECK(q == p, "MAP_FIXED at the same address");
    CHECK(mmu_uffd_cache_get(cache, q, len, &h3) == 0, "get after the new mmap");
    CHECK(atomic_load(&r.regs) == 2, "a miss");
    CHECK(mmu_uffd_reg_key(h3) != mmu_uffd_reg_key(h1), "a new key");
    CHECK(tokens_match(&r, h3, q, len), "tokens of the new mapping");
    mmu_uffd_reg_put(h1);
    CHECK(atomic_load(&r.deregs) == 0, "h2 still holds the old registration");
    mmu_uffd_reg_put(h2);
    CHECK(atomic_load(&r.deregs) == 1, "the last put deregisters the invalidated entry");

    /* MAP_FIXED over live watched memory invalidates too. */
    map(q, len);
    CHECK(!mmu_uffd_reg_is_valid(h3), "MAP_FIXED over the range invalidates");
    mmu_uffd_reg_put(h3);

    /* Explicit invalidation, purge, clear. */
    mmu_uffd_reg *h4 = NULL;
    CHECK(mmu_uffd_cache_get(cache, q, page, &h4) == 0, "get");
    CHECK(mmu_uffd_reg_is_valid(h4), "valid");
    CHECK(mmu_uffd_cache_invalidate(cache, q, page) == 0, "invalidate");
    CHECK(!mmu_uffd_reg_is_valid(h4), "invalidate makes it invalid");
    CHECK(mmu_uffd_cache_purge(cache) >= 0, "purge");
    CHECK(mmu_uffd_cache_len(cache) == 0, "no valid entry left");
    mmu_uffd_reg_put(h4);
    CHECK(mmu_uffd_cache_get(cache, q, page, &h4) == 0, "get");
    mmu_uffd_reg_put(h4);
    CHECK(mmu_uffd_cache_len(cache) == 1, "cached after the put");
    CHECK(mmu_uffd_cache_clear(cache) == 0, "clear");
    CHECK(mmu_uffd_cache_len(cache) == 0, "cleared");
    CHECK(atomic_load(&r.regs) == atomic_load(&r.deregs), "clear deregisters idle entries");
    CHECK(munmap(q, len) == 0, "munmap");

    CHECK(mmu_uffd_monitor_sync(monitor) == 0, "sync");
    rc = mmu_uffd_monitor_try_sync(monitor);
    CHECK(rc == 0 || rc == 1, "try_sync");
    mmu_uffd_monitor_stats ms;
    CHECK(mmu_uffd_monitor_get_stats(monitor, &ms) == 0, "monitor stats");
    CHECK(ms.unmaps >= 2 && ms.invalidations >= 2, "the monitor saw the unmaps");

    /* Watch and unwatch by hand. */
    char *w = map(NULL, page);
    CHECK(mmu_uffd_monitor_watch(monitor, w, page) == 0, "watch");
    CHECK(mmu_uffd_monitor_unwatch(monitor, w, page) == 0, "unwatch");
    CHECK(munmap(w, page) == 0, "munmap");

    /* ---- retained watch leases: a miss on evicted memory registers nothing, unless
     * the configuration keeps none ---- */
    CHECK(ccfg.retained == 1024 && mmu_uffd_cache_config_default().retained == 1024,
          "1024 retained leases by default");
    for (size_t retained = 0; retained <= 1024; retained += 1024) {
        mmu_uffd_cache_config one = ccfg;
        one.capacity = 1; /* every lookup of another range evicts */
        one.retained = retained;
        mmu_uffd_cache *c1 = NULL;
        CHECK(mmu_uffd_cache_new(monitor, &one, &registrar, &c1) == 0, "cache_new");
        char *a = map(NULL, 2 * page), *b = map(NULL, page);
        mmu_uffd_reg *ha = NULL, *hb = NULL;
        CHECK(mmu_uffd_cache_get(c1, a, 2 * page, &ha) == 0, "get a");
        mmu_uffd_reg_put(ha);
        CHECK(mmu_uffd_cache_get(c1, b, page, &hb) == 0, "get b (evicts a)");
        mmu_uffd_reg_put(hb);
        CHECK(mmu_uffd_cache_len(c1) == 1, "one entry"); /* also unwatches what is idle */
        mmu_uffd_monitor_stats before, after;
        CHECK(mmu_uffd_monitor_get_stats(monitor, &before) == 0, "monitor stats");
        CHECK(mmu_uffd_cache_get(c1, a, 2 * page, &ha) == 0, "get a again");
        CHECK(mmu_uffd_reg_is_valid(ha), "valid");
        CHECK(mmu_uffd_monitor_get_stats(monitor, &after) == 0, "monitor stats");
        unsigned long long regs = after.watch_registrations - before.watch_registrations;
        printf("retained %zu: the miss on evicted memory made %llu registrations\n", retained,
               regs);
        CHECK(retained ? regs == 0 : regs >= 1,
              "retained leases decide whether a miss on evicted memory registers it again");
        mmu_uffd_reg_put(ha);
        mmu_uffd_cache_free(c1);
        CHECK(munmap(a, 2 * page) == 0 && munmap(b, page) == 0, "munmap");
    }

    /* ---- threads reusing addresses: no stale registration ---- */
    enum { THREADS = 4, ITERATIONS = 2000 };
    pthread_t threads[THREADS];
    struct worker workers[THREADS];
    for (int i = 0; i < THREADS; i++) {
        workers[i] = (struct worker){cache, &r, ITERATIONS, 0, 0};
        CHECK(pthread_create(&threads[i], NULL, work, &workers[i]) == 0, "pthread_create");
    }
    long stale = 0, checked = 0;
    for (int i = 0; i < THREADS; i++) {
        pthread_join(threads[i], NULL);
        stale += workers[i].stale;
        checked += workers[i].hits_checked;
    }
    CHECK(mmu_uffd_cache_get_stats(cache, &cs) == 0, "cache stats");
    printf("threads: %ld lookups checked, %ld stale; cache: %llu hits, %llu misses, "
           "%llu registered\n",
           checked, stale, (unsigned long long)cs.hits, (unsigned long long)cs.misses,
           (unsigned long long)cs.registered);
    CHECK(stale == 0, "no stale registration");

    /* ---- error paths ---- */
    char *e = map(NULL, page);
    mmu_uffd_reg *h = NULL;
    expect_einval(mmu_uffd_monitor_new(NULL, NULL), "monitor_new(NULL out)");
    CHECK(strstr(mmu_uffd_last_error(), "monitor_out") != NULL, "names the argument");
    expect_einval(mmu_uffd_cache_get(cache, e, 0, &h), "get(len 0)");
    CHECK(strstr(mmu_uffd_last_error(), "zero") != NULL, "says the length is zero");
    CHECK(h == NULL, "a failed get stores NULL");
    expect_einval(mmu_uffd_cache_get(cache, e, page, NULL), "get(NULL out)");
    expect_einval(mmu_uffd_cache_get(NULL, e, page, &h), "get(NULL cache)");
    expect_einval(mmu_uffd_cache_get(cache, (void *)(UINTPTR_MAX - 10), 100, &h),
                  "get(overflow)");
    expect_einval(mmu_uffd_monitor_watch(NULL, e, page), "watch(NULL)");
    expect_einval(mmu_uffd_monitor_watch(monitor, e, 0), "watch(len 0)");
    expect_einval(mmu_uffd_monitor_sync(NULL), "sync(NULL)");
    expect_einval(mmu_uffd_monitor_get_stats(monitor, NULL), "stats(NULL out)");
    expect_einval(mmu_uffd_cache_get_stats(cache, NULL), "cache stats(NULL out)");
    expect_einval(mmu_uffd_cache_len(NULL), "len(NULL)");
    expect_einval(mmu_uffd_cache_invalidate(cache, e, 0), "invalidate(len 0)");
    mmu_uffd_registrar no_reg = {.reg = NULL, .dereg = dereg_cb, .user = &r};
    mmu_uffd_cache *bad = NULL;
    expect_einval(mmu_uffd_cache_new(monitor, NULL, &no_reg, &bad), "cache_new(NULL reg)");
    expect_einval(mmu_uffd_cache_new(monitor, NULL, NULL, &bad), "cache_new(NULL registrar)");
    expect_einval(mmu_uffd_cache_new(NULL, NULL, &registrar, &bad), "cache_new(NULL monitor)");
    CHECK(bad == NULL, "nothing created");
    CHECK(mmu_uffd_reg_key(NULL) == 0 && mmu_uffd_reg_len(NULL) == 0 &&
              mmu_uffd_reg_start(NULL) == NULL && !mmu_uffd_reg_is_valid(NULL),
          "accessors of NULL");
    mmu_uffd_reg_put(NULL);
    mmu_uffd_cache_free(NULL);
    mmu_uffd_monitor_free(NULL);

    r.fail_with = -ENOMEM;
    rc = mmu_uffd_cache_get(cache, e, page, &h);
    CHECK(rc == -ECANCELED, "a failing registrar is -ECANCELED");
    CHECK(strstr(mmu_uffd_last_error(), "-12") != NULL, "its value is in the message");
    r.fail_with = 0;
    CHECK(munmap(e, page) == 0, "munmap");
    rc = mmu_uffd_cache_get(cache, e, page, &h);
    CHECK(rc < 0 && h == NULL, "unmapped memory cannot be registered");
    printf("get of unmapped memory: %d (%s)\n", rc, mmu_uffd_last_error());

    pthread_t t;
    CHECK(pthread_create(&t, NULL, fresh_thread_error, NULL) == 0, "pthread_create");
    pthread_join(t, NULL);

    /* ---- the monitor freed before the cache ---- */
    char *m = map(NULL, page);
    mmu_uffd_reg *held = NULL;
    CHECK(mmu_uffd_cache_get(cache, m, page, &held) == 0, "get");
    mmu_uffd_monitor_free(monitor);
    CHECK(!mmu_uffd_reg_is_valid(held), "a stopped monitor's registrations are invalid");
    rc = mmu_uffd_cache_get(cache, m, page, &h);
    CHECK(rc == -ESHUTDOWN, "lookups fail once the monitor is gone");
    mmu_uffd_cache_free(cache);
    CHECK(atomic_load(&r.regs) == atomic_load(&r.deregs) + 1, "the held one is registered");
    mmu_uffd_reg_put(held);
    CHECK(atomic_load(&r.regs) == atomic_load(&r.deregs), "every registration released");
    CHECK(munmap(m, page) == 0, "munmap");
    for (size_t i = 0; i < r.n; i++) free(r.records[i].tokens);
    free(r.records);

    printf("OK: %ld registrations, all released\n", (long)atomic_load(&r.regs));
    return 0;
}
