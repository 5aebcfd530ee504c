/* The part the two cache harnesses (libfabric_harness.c: this library's import monitor;
 * memhooks_harness.c: libfabric's own monitors) share: per-page tokens, the cache entry,
 * the buffers each worker owns, and the changes it makes to them. A harness defines, before
 * including this file: CHECK, `static size_t page`, `static atomic_uint_fast64_t
 * next_token`; and after it: `lookup(addr, len)` (look the buffer up in its cache, counting
 * stale hits), `note_change(change)` (0-5: the change just made, 6: none) and
 * `raw_syscalls()` (whether change 1 uses raw system calls). */
#ifndef CACHE_HARNESS_H
#define CACHE_HARNESS_H
#include <stdatomic.h>
#include <stdint.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MAX_PAGES 4
#define NBUF 4
#define MAX_ENTRIES 4096

/* A cached registration: the range and each page's token when it was registered. */
struct entry {
	int used;
	uintptr_t addr;
	size_t len;
	uint64_t tokens[MAX_PAGES];
};

static void lookup(uintptr_t addr, size_t len);
static void note_change(int change);
static int raw_syscalls(void);

static uint64_t *tok(uintptr_t addr, size_t i) { return (uint64_t *)(addr + i * page); }

/* Every page of new memory gets a token never used before. */
static void fresh_tokens(uintptr_t addr, size_t len)
{
	for (size_t i = 0; i < len / page; i++)
		*tok(addr, i) = atomic_fetch_add(&next_token, 1);
}

static int overlaps(const struct entry *e, uintptr_t a, size_t l)
{
	return e->used && e->addr < a + l && a < e->addr + e->len;
}

struct buf {
	uintptr_t addr;
	size_t len;
};

static uint64_t rnd(uint64_t *s)
{
	*s ^= *s << 13;
	*s ^= *s >> 7;
	*s ^= *s << 17;
	return *s;
}

/* Maps fresh memory at `at` (over what is there if `over`, else only if the address is
 * still free: another thread's mmap(NULL) may have taken it since we unmapped it; then
 * anywhere). */
static uintptr_t map_at(uintptr_t at, size_t len, int raw, int over)
{
	int flags = MAP_PRIVATE | MAP_ANONYMOUS | (at ? (over ? MAP_FIXED : MAP_FIXED_NOREPLACE) : 0);
	void *p = raw ? (void *)syscall(SYS_mmap, (void *)at, len, PROT_READ | PROT_WRITE, flags, -1, 0)
		      : mmap((void *)at, len, PROT_READ | PROT_WRITE, flags, -1, 0);
	if (p == MAP_FAILED && !over)
		p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(p != MAP_FAILED);
	CHECK(!at || !over || (uintptr_t)p == at);
	fresh_tokens((uintptr_t)p, len);
	return (uintptr_t)p;
}

static long iterations;

static void *worker(void *arg)
{
	uint64_t seed = (uintptr_t)arg * 0x9E3779B97F4A7C15ull + 1;
	struct buf bufs[NBUF];
	/* Each buffer sits between PROT_NONE guards, so its mapping never merges with another. */
	size_t slot = (MAX_PAGES + 1) * page;
	char *region = mmap(NULL, NBUF * slot + page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	char *scratch = mmap(NULL, MAX_PAGES * page, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(region != MAP_FAILED && scratch != MAP_FAILED);
	for (int b = 0; b < NBUF; b++) {
		bufs[b].len = (1 + rnd(&seed) % MAX_PAGES) * page;
		bufs[b].addr = map_at((uintptr_t)region + page + b * slot, bufs[b].len, 0, 1);
	}
	for (long it = 0; it < iterations; it++) {
		struct buf *b = &bufs[rnd(&seed) % NBUF];
		note_change(6);
		lookup(b->addr, b->len); /* cached (or cached now) */
		int change = (int)(rnd(&seed) % 8);
		note_change(change < 6 ? change : 6);
		switch (change) {
		case 0: /* libc munmap + mmap(MAP_FIXED) */
			CHECK(munmap((void *)b->addr, b->len) == 0);
			b->addr = map_at(b->addr, b->len, 0, 0);
			break;
		case 1: /* raw system calls (no libc function to intercept) */
			if (raw_syscalls())
				CHECK(syscall(SYS_munmap, (void *)b->addr, b->len) == 0);
			else
				CHECK(munmap((void *)b->addr, b->len) == 0);
			b->addr = map_at(b->addr, b->len, raw_syscalls(), 0);
			break;
		case 2: /* mmap(MAP_FIXED) over, no munmap */
			map_at(b->addr, b->len, 0, 1);
			break;
		case 3: /* madvise(DONTNEED): zero pages, then new tokens */
			CHECK(madvise((void *)b->addr, b->len, MADV_DONTNEED) == 0);
			fresh_tokens(b->addr, b->len);
			break;
		case 4: { /* mremap away, new memory at the old address, the moved copy unmapped */
			void *moved = mremap((void *)b->addr, b->len, b->len, MREMAP_MAYMOVE | MREMAP_FIXED,
					     scratch);
			if (moved != scratch)
				perror("mremap");
			CHECK(moved == scratch);
			b->addr = map_at(b->addr, b->len, 0, 0);
			CHECK(mmap(scratch, MAX_PAGES * page, PROT_NONE,
				   MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0) == scratch);
			break;
		}
		case 5: /* munmap + mmap(NULL): the address may go to another thread's buffer */
			CHECK(munmap((void *)b->addr, b->len) == 0);
			b->addr = map_at(0, b->len, 0, 0);
			break;
		default: /* no change: the next lookup must hit */
			break;
		}
		lookup(b->addr, b->len);
	}
	return NULL;
}

#endif
