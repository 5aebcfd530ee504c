/* The libfabric side of `benches/miss_vs_libfabric.rs`: a registration-cache miss of
 * libfabric 1.17's own cache (ofi_mr_cache_search with its userfaultfd monitor, what the
 * verbs and efa providers' fi_mr_reg calls), linked statically from the installed
 * libfabric.a (the cache is not exported by libfabric.so), and the floors of the same run:
 *
 *   libfabric_miss cycle  BATCHES OPS  64 buffers of 16 pages through a 16-entry cache, in
 *                                      a cycle: every search misses, evicts the least
 *                                      recently used entry (UFFDIO_UNREGISTER) and
 *                                      registers (UFFDIO_REGISTER); the entry is released
 *                                      at once (ofi_mr_cache_delete), as a handle drop
 *   libfabric_miss fresh  BATCHES OPS  a miss on a fresh 4-page mapping each time (mapped
 *                                      before the timed loop) in a 4096-entry cache,
 *                                      nothing evicted
 *   libfabric_miss bare-reregister BATCHES OPS  UFFDIO_REGISTER (MISSING mode) of one of
 *                                      the 64 buffers, all registered already: the one
 *                                      system call of libfabric's cycle miss, on a bare
 *                                      userfaultfd
 *   libfabric_miss bare-wp BATCHES OPS UFFDIO_REGISTER (write-protect mode, mmu-uffd's)
 *                                      + UFFDIO_UNREGISTER of one of the 64 buffers
 *   libfabric_miss bare-fresh BATCHES OPS  UFFDIO_REGISTER (WP) of a fresh 4-page mapping
 *   libfabric_miss bare-fresh-check BATCHES OPS  the same and msync(MS_ASYNC) of it: the
 *                                      two system calls of mmu-uffd's miss on memory
 *                                      never seen (registration, hole check)
 *   libfabric_miss getppid BATCHES OPS an empty system call
 *
 * Prints "NAME MEDIAN" (ns per operation, the median of BATCHES batches of OPS
 * operations, after one batch of warm-up). The registrar is a no-op on both sides.
 *
 * libfabric 1.17's internal cache interface is not installed: the few offsets used below
 * are that version's (x86-64), read from libfabric.a's code, and checked at run time
 * after the first search (see check_layout()); a libfabric.a with another layout makes
 * this program print SKIPPED rather than measure something else. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "../../tests/c/check.h"

/* --- libfabric 1.17 (x86-64) internals this program uses, declared here --- */
/* struct ofi_mr_cache: 0x180 bytes; the fields used: */
#define LF_CACHE_SIZE 0x180
#define LF_CACHE_DOMAIN 0x000          /* struct util_domain * */
#define LF_CACHE_MONITOR0 0x008        /* monitors[FI_HMEM_SYSTEM] */
#define LF_CACHE_ENTRY_DATA_SIZE 0x098 /* size_t */
#define LF_CACHE_LRU 0x0e0             /* struct dlist_entry */
#define LF_CACHE_CACHED_CNT 0x128      /* size_t */
#define LF_CACHE_SEARCH_CNT 0x148      /* size_t */
#define LF_CACHE_ENTRY_POOL 0x168      /* struct ofi_bufpool * */
#define LF_CACHE_ADD_REGION 0x170      /* int (*)(cache, entry) */
#define LF_CACHE_DELETE_REGION 0x178   /* void (*)(cache, entry) */
/* struct util_domain: ofi_mr_cache_init takes a reference (an atomic int at 0x90). */
#define LF_DOMAIN_SIZE 0x400
/* struct ofi_mr_info: an iovec first, the memory interface (0: system) at 0x10. */
#define LF_INFO_SIZE 0x68
/* The number of memory interfaces (OFI_HMEM_MAX): the monitors array's length. */
#define LF_HMEM_MAX 6

struct lf_cache_params {
	size_t max_cnt, max_size;
};
extern struct lf_cache_params cache_params;
extern void *uffd_monitor; /* struct ofi_mem_monitor * */
void ofi_mem_init(void);
void ofi_monitors_init(void);
int ofi_mr_cache_init(void *domain, void **monitors, void *cache);
int ofi_mr_cache_search(void *cache, void *info, void **entry);
void ofi_mr_cache_delete(void *cache, void *entry);
void ofi_mr_cache_cleanup(void *cache);

#define FIELD(base, off, type) (*(type *)((char *)(base) + (off)))

static int add_region(void *cache, void *entry)
{
	(void)cache;
	(void)entry;
	return 0;
}

static void delete_region(void *cache, void *entry)
{
	(void)cache;
	(void)entry;
}

static _Alignas(64) char cache[LF_CACHE_SIZE];
static _Alignas(64) char domain[LF_DOMAIN_SIZE];

static void *lf_get(void *addr, size_t len)
{
	_Alignas(16) char info[LF_INFO_SIZE] = {0};
	struct {
		void *base;
		size_t len;
	} *iov = (void *)info;
	iov->base = addr;
	iov->len = len;
	void *entry = NULL;
	int ret = ofi_mr_cache_search(cache, info, &entry);
	CHECK(ret == 0 && entry);
	return entry;
}

/* What can be checked of the declared layout once a search has run. */
static void check_layout(size_t searches, size_t cached)
{
	if (FIELD(cache, LF_CACHE_DOMAIN, void *) != domain ||
	    FIELD(cache, LF_CACHE_MONITOR0, void *) != uffd_monitor ||
	    !FIELD(cache, LF_CACHE_ENTRY_POOL, void *) ||
	    FIELD(cache, LF_CACHE_SEARCH_CNT, size_t) != searches ||
	    FIELD(cache, LF_CACHE_CACHED_CNT, size_t) != cached) {
		printf("SKIPPED: libfabric.a's cache layout is not 1.17's\n");
		exit(0);
	}
}

static void start_cache(size_t max_cnt)
{
	ofi_mem_init();
	ofi_monitors_init();
	cache_params.max_cnt = max_cnt;
	CHECK(cache_params.max_size > 0);
	FIELD(cache, LF_CACHE_ENTRY_DATA_SIZE, size_t) = 0;
	FIELD(cache, LF_CACHE_ADD_REGION, void *) = (void *)add_region;
	FIELD(cache, LF_CACHE_DELETE_REGION, void *) = (void *)delete_region;
	void *monitors[LF_HMEM_MAX] = {uffd_monitor};
	int ret = ofi_mr_cache_init(domain, monitors, cache);
	if (ret) {
		printf("SKIPPED: libfabric's cache with its userfaultfd monitor does not start "
		       "here: %d\n",
		       ret);
		exit(0);
	}
	CHECK(FIELD(cache, LF_CACHE_LRU, void *) == cache + LF_CACHE_LRU);
}

static size_t page;

static char *anon(size_t len)
{
	void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(p != MAP_FAILED);
	return p;
}

/* The layout shift (see miss_vs_libfabric.rs): MISS_SHIFT one-page mappings, read-only
 * and inaccessible in turn so that none merges with its neighbours, mapped just before the
 * buffers. */
static void shift_layout(void)
{
	const char *v = getenv("MISS_SHIFT");
	long n = v ? atol(v) : 0;
	for (long i = 0; i < n; i++) {
		int prot = i % 2 ? PROT_NONE : PROT_READ;
		void *p = mmap(NULL, page, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
		CHECK(p != MAP_FAILED);
	}
}

static uint64_t now(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return x < y ? -1 : x > y;
}

static long batches, ops;

/* The start (after the warm-up batch) and the end of the timed batches, for the system
 * call count of miss_vs_libfabric.rs (getpgid(0): nothing else here calls it). */
static void marker(long b)
{
	if (b == -1 || b == batches - 1)
		getpgid(0);
}

/* Runs the statements given `ops` times per batch: one untimed warm-up batch (b = -1),
 * then `batches` timed ones whose ns per operation go to samples[], each batch followed
 * by its strace marker. A macro, not a function taking a callback, so that the timed loop
 * makes no call the measured operation does not. */
#define TIME_BATCHES(...)                                                                    \
	for (long b = -1; b < batches; b++) {                                                \
		uint64_t t0 = now();                                                         \
		for (long i = 0; i < ops; i++) {                                             \
			__VA_ARGS__;                                                         \
		}                                                                            \
		if (b >= 0)                                                                  \
			samples[b] = (double)(now() - t0) / (double)ops;                     \
		marker(b);                                                                   \
	}
static double *samples;

static void report(const char *name)
{
	qsort(samples, (size_t)batches, sizeof *samples, cmp);
	printf("%s %.1f\n", name, samples[batches / 2]);
}

#define NBUFS 64
#define ENTRIES 16
#define BUF_PAGES 16
#define FRESH_PAGES 4
#define FRESH_CAPACITY 4096

static int bare_fd(void)
{
	int fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK | UFFD_USER_MODE_ONLY);
	if (fd < 0)
		fd = (int)syscall(SYS_userfaultfd, O_CLOEXEC | O_NONBLOCK);
	if (fd < 0) {
		printf("SKIPPED: userfaultfd: %s\n", strerror(errno));
		exit(0);
	}
	struct uffdio_api api = {.api = UFFD_API};
	CHECK(ioctl(fd, UFFDIO_API, &api) == 0);
	return fd;
}

static void bare_register(int fd, char *p, size_t len, uint64_t mode)
{
	struct uffdio_register r = {.range = {(uintptr_t)p, len}, .mode = mode};
	CHECK(ioctl(fd, UFFDIO_REGISTER, &r) == 0);
}

static void bare_unregister(int fd, char *p, size_t len)
{
	struct uffdio_range r = {(uintptr_t)p, len};
	CHECK(ioctl(fd, UFFDIO_UNREGISTER, &r) == 0);
}

int main(int argc, char **argv)
{
	CHECK(argc == 4);
	const char *mode = argv[1];
	batches = atol(argv[2]);
	ops = atol(argv[3]);
	CHECK(batches > 0 && ops > 0);
	samples = calloc((size_t)batches, sizeof *samples);
	CHECK(samples);
	page = (size_t)sysconf(_SC_PAGESIZE);
	unsetenv("FI_MR_CACHE_MONITOR");

	if (!strcmp(mode, "cycle")) {
		start_cache(ENTRIES);
		char *bufs[NBUFS];
		shift_layout();
		for (int i = 0; i < NBUFS; i++)
			bufs[i] = anon(BUF_PAGES * page);
		ofi_mr_cache_delete(cache, lf_get(bufs[0], BUF_PAGES * page));
		check_layout(1, 1);
		unsigned j = 0;
		TIME_BATCHES(j = (j + 1) & (NBUFS - 1);
			     ofi_mr_cache_delete(cache, lf_get(bufs[j], BUF_PAGES * page)));
		/* Every search missed: no more than ENTRIES entries, each other buffer's. */
		CHECK(FIELD(cache, LF_CACHE_CACHED_CNT, size_t) == ENTRIES);
		report("libfabric-cycle");
	} else if (!strcmp(mode, "fresh")) {
		size_t n = (size_t)(batches + 1) * (size_t)ops + 1;
		CHECK(n <= FRESH_CAPACITY);
		start_cache(FRESH_CAPACITY);
		char **bufs = calloc(n, sizeof *bufs);
		CHECK(bufs);
		shift_layout();
		for (size_t i = 0; i < n; i++)
			bufs[i] = anon(FRESH_PAGES * page);
		ofi_mr_cache_delete(cache, lf_get(bufs[0], FRESH_PAGES * page));
		check_layout(1, 1);
		size_t k = 1;
		TIME_BATCHES(ofi_mr_cache_delete(cache, lf_get(bufs[k++], FRESH_PAGES * page)));
		CHECK(FIELD(cache, LF_CACHE_CACHED_CNT, size_t) == n);
		report("libfabric-fresh");
	} else if (!strcmp(mode, "bare-reregister") || !strcmp(mode, "bare-wp")) {
		int again = !strcmp(mode, "bare-reregister");
		uint64_t m = again ? UFFDIO_REGISTER_MODE_MISSING : UFFDIO_REGISTER_MODE_WP;
		int fd = bare_fd();
		char *bufs[NBUFS];
		shift_layout();
		for (int i = 0; i < NBUFS; i++) {
			bufs[i] = anon(BUF_PAGES * page);
			if (again)
				bare_register(fd, bufs[i], BUF_PAGES * page, m);
		}
		unsigned j = 0;
		TIME_BATCHES(j = (j + 1) & (NBUFS - 1); bare_register(fd, bufs[j], BUF_PAGES * page, m);
			     if (!again) bare_unregister(fd, bufs[j], BUF_PAGES * page));
		report(mode);
	} else if (!strcmp(mode, "bare-fresh") || !strcmp(mode, "bare-fresh-check")) {
		int check = !strcmp(mode, "bare-fresh-check");
		int fd = bare_fd();
		size_t n = (size_t)(batches + 1) * (size_t)ops;
		char **bufs = calloc(n, sizeof *bufs);
		CHECK(bufs);
		shift_layout();
		for (size_t i = 0; i < n; i++)
			bufs[i] = anon(FRESH_PAGES * page);
		size_t k = 0;
		TIME_BATCHES(bare_register(fd, bufs[k], FRESH_PAGES * page, UFFDIO_REGISTER_MODE_WP);
			     if (check) CHECK(msync(bufs[k], FRESH_PAGES * page, MS_ASYNC) == 0);
			     k++);
		report(mode);
	} else if (!strcmp(mode, "getppid")) {
		TIME_BATCHES(syscall(SYS_getppid));
		report(mode);
	} else {
		fprintf(stderr, "unknown mode %s\n", mode);
		return 2;
	}
	return 0;
}
