/* Drives an imported memory monitor the way libfabric's registration cache does, and
 * counts stale hits.
 *
 *   libfabric_harness uffd  [threads] [iterations]  the mmu-uffd monitor (1.x: no unsubscribe)
 *   libfabric_harness uffd2 [threads] [iterations]  the same, unsubscribing inside notify (2.1+)
 *   libfabric_harness none  [threads] [iterations]  no monitor: valid always true (baseline)
 *
 * The cache: entries under mm_lock; a miss registers the buffer with mm_lock dropped
 * (recording each page's token: what a NIC would read), then under mm_lock subscribes and
 * inserts; a hit calls valid() under mm_lock; notify() takes mm_list_rwlock (read) then
 * mm_lock and removes every overlapping entry. Each thread owns buffers (1 to 4 pages,
 * separated by PROT_NONE guards) and changes them in every way the kernel reports:
 * munmap + mmap(MAP_FIXED) through libc and through raw system calls, mmap(MAP_FIXED)
 * over, madvise(MADV_DONTNEED), mremap away and back, and munmap + mmap(NULL) (another
 * thread may get the address). Every new page gets a fresh token; a hit whose recorded
 * tokens differ from the memory is stale. Prints "stale=N hits=N misses=N notified=N". */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include "libfabric_common.h"

static pthread_mutex_t mm_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_rwlock_t mm_list_rwlock = PTHREAD_RWLOCK_INITIALIZER;
static struct fid_mem_monitor *mon;
static int mode_none, mode_unsub;
static size_t page;
static atomic_uint_fast64_t next_token = 1, stale, hits, misses, notifies, started;

#include "cache_harness.h"

static struct entry entries[MAX_ENTRIES];

/* libfabric's notify: mm_list_rwlock, then mm_lock; drop every overlapping entry. */
static void notify(struct fid_mem_monitor *m, const void *addr, size_t len)
{
	CHECK(m == mon);
	CHECK(atomic_load(&started));
	atomic_fetch_add(&notifies, 1);
	pthread_rwlock_rdlock(&mm_list_rwlock);
	pthread_mutex_lock(&mm_lock);
	for (size_t i = 0; i < MAX_ENTRIES; i++) {
		if (overlaps(&entries[i], (uintptr_t)addr, len)) {
			entries[i].used = 0;
			if (mode_unsub)
				m->export_ops->unsubscribe(m, (void *)entries[i].addr, entries[i].len);
		}
	}
	pthread_mutex_unlock(&mm_lock);
	pthread_rwlock_unlock(&mm_list_rwlock);
}

static struct fi_ops_mem_notify notify_ops = {
	.size = sizeof(struct fi_ops_mem_notify),
	.notify = notify,
};

static bool valid(uintptr_t a, size_t l)
{
	return mode_none ? true : mon->export_ops->valid(mon, (void *)a, l);
}

/* One lookup of [a, a + l), in libfabric's order. */
static void lookup(uintptr_t a, size_t l)
{
	pthread_mutex_lock(&mm_lock);
	for (size_t i = 0; i < MAX_ENTRIES; i++) {
		struct entry *e = &entries[i];
		if (!e->used || e->addr > a || e->addr + e->len < a + l)
			continue;
		if (valid(e->addr, e->len)) {
			/* A hit: the registration must still name the pages there now (only the
			 * requested pages are read: the rest may belong to someone else now). */
			size_t first = (a - e->addr) / page;
			for (size_t p = 0; p < l / page; p++)
				if (e->tokens[first + p] != *tok(a, p)) {
					atomic_fetch_add(&stale, 1);
					break;
				}
			atomic_fetch_add(&hits, 1);
			pthread_mutex_unlock(&mm_lock);
			return;
		}
		e->used = 0; /* invalid: a miss */
		if (mode_unsub)
			mon->export_ops->unsubscribe(mon, (void *)e->addr, e->len);
		break;
	}
	pthread_mutex_unlock(&mm_lock);
	atomic_fetch_add(&misses, 1);
	/* Register (with mm_lock dropped), then subscribe and insert. */
	struct entry n = {.used = 1, .addr = a, .len = l};
	for (size_t p = 0; p < l / page; p++)
		n.tokens[p] = *tok(a, p);
	pthread_mutex_lock(&mm_lock);
	if (!mode_none) {
		int ret = mon->export_ops->subscribe(mon, (void *)a, l);
		if (ret) {
			fprintf(stderr, "subscribe: %d (%s)\n", ret, mmu_uffd_last_error());
			exit(1);
		}
	}
	size_t free_slot = MAX_ENTRIES;
	for (size_t i = 0; i < MAX_ENTRIES; i++) {
		if (overlaps(&entries[i], a, l)) {
			entries[i].used = 0;
			if (mode_unsub)
				mon->export_ops->unsubscribe(mon, (void *)entries[i].addr, entries[i].len);
		}
		if (!entries[i].used && free_slot == MAX_ENTRIES)
			free_slot = i;
	}
	CHECK(free_slot < MAX_ENTRIES);
	entries[free_slot] = n;
	pthread_mutex_unlock(&mm_lock);
}

static void note_change(int change) { (void)change; }

static int raw_syscalls(void) { return 1; }

static double now(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return ts.tv_sec + ts.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "uffd";
	int threads = argc > 2 ? atoi(argv[2]) : 4;
	iterations = argc > 3 ? atol(argv[3]) : 20000;
	page = (size_t)sysconf(_SC_PAGESIZE);
	mode_none = !strcmp(mode, "none");
	mode_unsub = !strcmp(mode, "uffd2");
	if (!mode_none) {
		int ret = mmu_uffd_fi_monitor_new(&mon);
		if (ret == -ENOSYS) {
			printf("SKIPPED: %s\n", mmu_uffd_last_error());
			return 0;
		}
		CHECK(ret == 0);
		mon->import_ops = &notify_ops; /* what libfabric fills in on import */
		atomic_store(&started, 1);
		CHECK(mon->export_ops->start(mon) == 0);
	}
	pthread_t t[64];
	CHECK(threads > 0 && threads <= 64);
	for (int i = 0; i < threads; i++)
		CHECK(pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1)) == 0);
	for (int i = 0; i < threads; i++)
		pthread_join(t[i], NULL);
	double per_valid = 0;
	if (!mode_none) {
		/* Cost of valid() on a hit (nothing in flight). */
		uintptr_t a = map_at(0, page, 0, 0);
		lookup(a, page);
		long n = 200000;
		double t0 = now();
		for (long i = 0; i < n; i++)
			CHECK(mon->export_ops->valid(mon, (void *)a, page));
		per_valid = (now() - t0) / n * 1e9;
		/* Every invalidation is notified eventually. */
		uint64_t pending = 1;
		for (int i = 0; i < 5000 && pending; i++) {
			mmu_uffd_fi_notified(&pending);
			if (pending)
				usleep(1000);
		}
		CHECK(pending == 0);
		mon->export_ops->stop(mon);
	}
	printf("mode=%s threads=%d stale=%lu hits=%lu misses=%lu notified=%lu valid_ns=%.0f\n", mode,
	       threads, (unsigned long)stale, (unsigned long)hits, (unsigned long)misses,
	       (unsigned long)notifies, per_valid);
	return 0;
}
