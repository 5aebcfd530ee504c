/* The harness of libfabric_harness.c (same cache order, same changes to the memory, same
 * stale-hit check) against libfabric 1.17's OWN memory monitors, linked statically from
 * libfabric.a (they are not exported by libfabric.so):
 *
 *   memhooks_harness memhooks [threads] [iterations] [timeout_s]  libfabric's memhooks
 *   memhooks_harness lfuffd   [threads] [iterations] [timeout_s]  libfabric's userfaultfd
 *   memhooks_harness none     [threads] [iterations] [timeout_s]  no monitor (baseline)
 *
 * A fifth argument "noraw" makes the raw-system-call change (munmap + mmap(MAP_FIXED)
 * through syscall()) use libc's functions instead: what memhooks catches without it.
 *
 * libfabric 1.17's internal monitor interface is not installed; the few declarations this
 * needs are declared below from that version's layout, and checked at run time as far as
 * possible (see check_monitor()). The risk: a libfabric.a of another version with another
 * layout; then the checks fail (or, worse, a function pointer is misread: the checks
 * accept only pointers into this program's text, which holds libfabric.a's code).
 *
 * How a monitor reaches the harness: libfabric's monitors report a change by calling
 * ofi_monitor_notify(), which walks the monitor's list of caches and calls
 * ofi_mr_cache_notify(cache, addr, len) for each, with libfabric's mm_list_rwlock (read)
 * and mm_lock held. The program is linked with -Wl,--wrap=ofi_mr_cache_notify, so those
 * calls reach __wrap_ofi_mr_cache_notify below (the harness's cache) instead of
 * libfabric's cache code; the harness puts one list node on the monitor's list so that
 * the walk finds one "cache". The harness's cache is guarded by libfabric's mm_lock, as
 * libfabric's is; valid() is called under it on every hit; 1.17's cache never
 * unsubscribes (it leaves that to the monitor), so neither does the harness.
 *
 * libfabric's userfaultfd monitor registers in MISSING mode: a thread touching registered
 * memory without pages behind it (here: writing new tokens after MADV_DONTNEED, whose
 * REMOVE event leaves the range registered) waits for a page that no one provides (the
 * monitor's thread sits in poll, the writers in the fault). A watchdog (alarm) then prints
 * the counts so far with hang=1 and exits. Its notifications are also asynchronous: the
 * thread that unmapped goes on once the event is read, not once it is handled.
 *
 * Prints "mode=M threads=N stale=N hits=N misses=N notified=N hang=0|1 stale_after=..."
 * (stale hits by the change made just before the lookup). */
#define _GNU_SOURCE
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>

#include "check.h"

/* --- libfabric 1.17's internal monitor interface (declared, for this harness only) --- */
struct lf_list {
	struct lf_list *next, *prev;
};
struct lf_entry_head { /* the start of a cache entry: the registered range */
	struct iovec iov;
	int iface;
};
struct lf_monitor {
	struct lf_list list; /* the caches this monitor notifies */
	int iface;
	int state;
	void (*init)(struct lf_monitor *);
	void (*cleanup)(struct lf_monitor *);
	int (*start)(struct lf_monitor *);
	void (*stop)(struct lf_monitor *);
	int (*subscribe)(struct lf_monitor *, const void *addr, size_t len, void *hmem_info);
	void (*unsubscribe)(struct lf_monitor *, const void *addr, size_t len, void *hmem_info);
	bool (*valid)(struct lf_monitor *, const struct lf_entry_head *info,
		      struct lf_entry_head *entry);
};
extern struct lf_monitor *memhooks_monitor, *uffd_monitor;
extern pthread_mutex_t mm_lock;
extern pthread_rwlock_t mm_list_rwlock;
void ofi_mem_init(void); /* page sizes (the uffd monitor needs them) */
void ofi_monitors_init(void);
void ofi_monitor_init(struct lf_monitor *);
void ofi_monitor_cleanup(struct lf_monitor *);
int ofi_monitor_subscribe_no_op(struct lf_monitor *, const void *, size_t, void *);
void ofi_monitor_unsubscribe_no_op(struct lf_monitor *, const void *, size_t, void *);
extern char __executable_start[], etext[];

static struct lf_monitor *mon;
static struct lf_list cache_node;
static size_t page;
static atomic_uint_fast64_t next_token = 1, stale, hits, misses, notifies;
/* Stale hits by the change made to the buffer just before (0 to 5 as in worker(), 6: none
 * in this iteration, i.e. the first lookup of an iteration). */
static atomic_uint_fast64_t stale_after[7];
static _Thread_local int last_change = 6;
static const char *mode;
static int no_raw; /* "noraw": the raw-system-call change goes through libc instead */
static int threads;

#include "cache_harness.h"

static struct entry entries[MAX_ENTRIES];

static void report(int hang)
{
	char line[512];
	unsigned long a[7];
	for (int i = 0; i < 7; i++)
		a[i] = (unsigned long)stale_after[i];
	int n = snprintf(line, sizeof line,
			 "mode=%s%s threads=%d stale=%lu hits=%lu misses=%lu notified=%lu hang=%d "
			 "stale_after=libc_munmap:%lu,raw_munmap:%lu,map_fixed:%lu,dontneed:%lu,"
			 "mremap:%lu,munmap_reuse:%lu,none:%lu\n",
			 mode, no_raw ? "-noraw" : "", threads, (unsigned long)stale, (unsigned long)hits,
			 (unsigned long)misses, (unsigned long)notifies, hang, a[0], a[1], a[2], a[3],
			 a[4], a[5], a[6]);
	CHECK(n > 0 && (size_t)n < sizeof line);
	CHECK(write(1, line, (size_t)n) == n);
}

static void watchdog(int sig)
{
	(void)sig;
	report(1);
	_exit(0);
}

/* libfabric's notify, with mm_list_rwlock (read) and mm_lock already held by the monitor:
 * drop every overlapping entry. */
void __wrap_ofi_mr_cache_notify(void *cache, const void *addr, size_t len);
void __wrap_ofi_mr_cache_notify(void *cache, const void *addr, size_t len)
{
	(void)cache; /* derived from cache_node's address: never dereferenced */
	atomic_fetch_add(&notifies, 1);
	for (size_t i = 0; i < MAX_ENTRIES; i++)
		if (overlaps(&entries[i], (uintptr_t)addr, len))
			entries[i].used = 0;
}

static bool valid(const struct entry *e)
{
	if (!mon)
		return true;
	struct lf_entry_head h = {.iov = {(void *)e->addr, e->len}};
	return mon->valid(mon, &h, &h);
}

static void lookup(uintptr_t a, size_t l)
{
	pthread_mutex_lock(&mm_lock);
	for (size_t i = 0; i < MAX_ENTRIES; i++) {
		struct entry *e = &entries[i];
		if (!e->used || e->addr > a || e->addr + e->len < a + l)
			continue;
		if (valid(e)) {
			size_t first = (a - e->addr) / page;
			for (size_t p = 0; p < l / page; p++)
				if (e->tokens[first + p] != *tok(a, p)) {
					atomic_fetch_add(&stale, 1);
					atomic_fetch_add(&stale_after[last_change], 1);
					break;
				}
			atomic_fetch_add(&hits, 1);
			pthread_mutex_unlock(&mm_lock);
			return;
		}
		e->used = 0;
		break;
	}
	pthread_mutex_unlock(&mm_lock);
	atomic_fetch_add(&misses, 1);
	struct entry n = {.used = 1, .addr = a, .len = l};
	for (size_t p = 0; p < l / page; p++)
		n.tokens[p] = *tok(a, p);
	pthread_mutex_lock(&mm_lock);
	if (mon) {
		int ret = mon->subscribe(mon, (void *)a, l, NULL);
		if (ret) {
			fprintf(stderr, "subscribe: %d\n", ret);
			exit(1);
		}
	}
	size_t free_slot = MAX_ENTRIES;
	for (size_t i = 0; i < MAX_ENTRIES; i++) {
		if (overlaps(&entries[i], a, l))
			entries[i].used = 0;
		if (!entries[i].used && free_slot == MAX_ENTRIES)
			free_slot = i;
	}
	CHECK(free_slot < MAX_ENTRIES);
	entries[free_slot] = n;
	pthread_mutex_unlock(&mm_lock);
}

static void note_change(int change) { last_change = change; }

static int raw_syscalls(void) { return !no_raw; }

static int in_text(const void *f)
{
	return (const char *)f >= __executable_start && (const char *)f < etext;
}

/* What can be verified of the declared layout. Before start: init is libfabric's
 * ofi_monitor_init, start and stop are functions in this program's text (libfabric.a's
 * code is linked into it), the list is initialized (empty: it points to itself), the
 * interface is FI_HMEM_SYSTEM (0), and subscribe, unsubscribe and valid are not set yet
 * (1.17's monitors set them in start). */
static void check_before_start(struct lf_monitor *m)
{
	CHECK(m != NULL);
	CHECK(m->init == ofi_monitor_init && m->cleanup == ofi_monitor_cleanup);
	CHECK(in_text((const void *)m->start) && in_text((const void *)m->stop));
	CHECK(m->list.next == &m->list && m->list.prev == &m->list);
	CHECK(m->iface == 0);
	CHECK(!m->subscribe || m->subscribe == ofi_monitor_subscribe_no_op);
}

/* After start: subscribe, unsubscribe and valid are functions in the text, and not the
 * no-op ones a stopped monitor has. */
static void check_after_start(struct lf_monitor *m)
{
	CHECK(in_text((const void *)m->subscribe) && in_text((const void *)m->unsubscribe));
	CHECK(in_text((const void *)m->valid));
	CHECK(m->subscribe != ofi_monitor_subscribe_no_op);
	CHECK(m->unsubscribe != ofi_monitor_unsubscribe_no_op);
}

int main(int argc, char **argv)
{
	mode = argc > 1 ? argv[1] : "memhooks";
	threads = argc > 2 ? atoi(argv[2]) : 4;
	iterations = argc > 3 ? atol(argv[3]) : 20000;
	int timeout = argc > 4 ? atoi(argv[4]) : 20;
	no_raw = argc > 5 && !strcmp(argv[5], "noraw");
	page = (size_t)sysconf(_SC_PAGESIZE);
	ofi_mem_init(); /* what libfabric's initialization does first */
	ofi_monitors_init();
	if (!strcmp(mode, "memhooks"))
		mon = memhooks_monitor;
	else if (!strcmp(mode, "lfuffd"))
		mon = uffd_monitor;
	else
		CHECK(!strcmp(mode, "none"));
	if (mon) {
		check_before_start(mon);
		int ret = mon->start(mon);
		if (ret) {
			printf("SKIPPED: libfabric's %s monitor does not start here: %d\n", mode, ret);
			return 0;
		}
		check_after_start(mon);
		/* One "cache" on the monitor's list (what ofi_monitors_add_cache does). */
		pthread_rwlock_wrlock(&mm_list_rwlock);
		cache_node.next = &mon->list;
		cache_node.prev = mon->list.prev;
		mon->list.prev->next = &cache_node;
		mon->list.prev = &cache_node;
		pthread_rwlock_unlock(&mm_list_rwlock);
	}
	signal(SIGALRM, watchdog);
	alarm((unsigned)timeout);
	pthread_t t[64];
	CHECK(threads > 0 && threads <= 64);
	for (int i = 0; i < threads; i++)
		CHECK(pthread_create(&t[i], NULL, worker, (void *)(uintptr_t)(i + 1)) == 0);
	for (int i = 0; i < threads; i++)
		pthread_join(t[i], NULL);
	alarm(0);
	report(0);
	/* (The monitor is not stopped: memhooks cannot undo its patches, and a stopped uffd
	 * monitor leaves the registrations.) */
	return 0;
}
