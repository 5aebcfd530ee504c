/* The monitor's operations one by one, deterministically (one thread plays libfabric):
 * subscribe/valid/notify after munmap, madvise and mremap; a re-subscription while a
 * notify is pending stays invalid until the notify was delivered; unsubscribe inside
 * notify, late, twice, or of something never subscribed; nothing notified before start
 * or after stop; notify never runs on the thread that unmapped. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdatomic.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>
#include "libfabric_common.h"

static struct fid_mem_monitor *mon;
static atomic_int notified, unsub_inside, block_notify;
static atomic_uintptr_t last_addr;
static pthread_t main_thread;
static pthread_mutex_t mm_lock = PTHREAD_MUTEX_INITIALIZER;

static void notify(struct fid_mem_monitor *m, const void *addr, size_t len)
{
	CHECK(m == mon);
	CHECK(!pthread_equal(pthread_self(), main_thread));
	while (atomic_load(&block_notify))
		usleep(100);
	pthread_mutex_lock(&mm_lock); /* like libfabric's mm_lock */
	atomic_store(&last_addr, (uintptr_t)addr);
	if (atomic_load(&unsub_inside))
		m->export_ops->unsubscribe(m, addr, len); /* 2.1+ does this */
	pthread_mutex_unlock(&mm_lock);
	atomic_fetch_add(&notified, 1);
}

static struct fi_ops_mem_notify notify_ops = {.size = sizeof(notify_ops), .notify = notify};

/* Waits until at least n notifications were delivered and none is pending; returns the
 * count. */
static int wait_notified(int n)
{
	for (int i = 0; i < 5000 && atomic_load(&notified) < n; i++)
		usleep(1000);
	CHECK(atomic_load(&notified) >= n);
	uint64_t pending = 1;
	for (int i = 0; i < 5000 && pending; i++) {
		mmu_uffd_fi_notified(&pending);
		if (pending)
			usleep(1000);
	}
	CHECK(pending == 0);
	return atomic_load(&notified);
}

static char *map(size_t len)
{
	char *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(p != MAP_FAILED);
	memset(p, 1, len);
	return p;
}

int main(void)
{
	size_t pg = (size_t)sysconf(_SC_PAGESIZE);
	main_thread = pthread_self();
	int ret = mmu_uffd_fi_monitor_new(&mon);
	if (ret == -ENOSYS) {
		printf("SKIPPED: %s\n", mmu_uffd_last_error());
		return 0;
	}
	CHECK(ret == 0);
	struct fi_ops_mem_monitor *ops = mon->export_ops;
	mon->import_ops = &notify_ops;

	/* Before start: events are not notified (libfabric is not ready for them). */
	char *a = map(2 * pg);
	CHECK(ops->subscribe(mon, a + 10, pg) == 0); /* unaligned: pages a..a+2pg */
	CHECK(ops->valid(mon, a + 10, pg));
	CHECK(!ops->valid(mon, a, pg)); /* never subscribed: no vouching */
	CHECK(munmap(a, 2 * pg) == 0);
	CHECK(!ops->valid(mon, a + 10, pg)); /* right after munmap returned */
	usleep(20000);
	CHECK(atomic_load(&notified) == 0);

	CHECK(ops->start(mon) == 0);

	/* munmap: invalid at once, notified later, on another thread. */
	char *b = map(4 * pg);
	CHECK(ops->subscribe(mon, b, 4 * pg) == 0);
	CHECK(ops->subscribe(mon, b, 4 * pg) == 0); /* a second cache: idempotent */
	CHECK(ops->valid(mon, b, 4 * pg));
	CHECK(munmap(b + pg, pg) == 0);
	CHECK(!ops->valid(mon, b, 4 * pg));
	CHECK(wait_notified(1) == 1);
	CHECK(atomic_load(&last_addr) == (uintptr_t)(b + pg)); /* the unmapped part */
	CHECK(!ops->valid(mon, b, 4 * pg));

	/* madvise(DONTNEED) and mremap. */
	char *c = map(pg);
	CHECK(ops->subscribe(mon, c, pg) == 0);
	CHECK(madvise(c, pg, MADV_DONTNEED) == 0);
	CHECK(!ops->valid(mon, c, pg));
	CHECK(wait_notified(2) == 2);
	char *d = map(pg);
	CHECK(ops->subscribe(mon, d, pg) == 0);
	char *moved = mremap(d, pg, 2 * pg, MREMAP_MAYMOVE);
	CHECK(moved != MAP_FAILED);
	CHECK(!ops->valid(mon, d, pg));
	CHECK(wait_notified(3) == 3);

	/* A new registration of the same pages while the old one's notify is pending stays
	 * invalid until libfabric has removed the old entries. */
	char *e = map(pg);
	CHECK(ops->subscribe(mon, e, pg) == 0);
	atomic_store(&block_notify, 1);
	CHECK(madvise(e, pg, MADV_DONTNEED) == 0);
	CHECK(ops->subscribe(mon, e, pg) == 0); /* the new entry */
	CHECK(!ops->valid(mon, e, pg));
	atomic_store(&block_notify, 0);
	/* (The madvise's event may still have been applying when the new entry subscribed:
	 * then it invalidated that one too, and there is a fifth notification.) */
	int n = wait_notified(4);
	CHECK(n <= 5);
	CHECK(ops->subscribe(mon, e, pg) == 0);
	CHECK(ops->valid(mon, e, pg)); /* every notification delivered: valid again */

	/* unsubscribe: inside notify (2.1+), late, twice, never subscribed. */
	atomic_store(&unsub_inside, 1);
	CHECK(madvise(e, pg, MADV_DONTNEED) == 0);
	n = wait_notified(n + 1);
	ops->unsubscribe(mon, e, pg);
	ops->unsubscribe(mon, e, pg);
	ops->unsubscribe(mon, (void *)(uintptr_t)0x1000, pg);
	char *f = map(pg);
	CHECK(ops->subscribe(mon, f, pg) == 0);
	ops->unsubscribe(mon, f, pg);
	CHECK(!ops->valid(mon, f, pg)); /* no subscription left: not vouched for */

	/* After stop: nothing is notified, nothing is valid. */
	char *g = map(pg);
	CHECK(ops->subscribe(mon, g, pg) == 0);
	ops->stop(mon);
	CHECK(!ops->valid(mon, g, pg));
	CHECK(munmap(g, pg) == 0);
	usleep(20000);
	uint64_t pending = 1;
	for (int i = 0; i < 5000 && pending; i++) {
		mmu_uffd_fi_notified(&pending);
		if (pending)
			usleep(1000);
	}
	CHECK(atomic_load(&notified) == n);

	/* Bad arguments. */
	CHECK(ops->subscribe(mon, NULL, 0) == -EINVAL);
	CHECK(!ops->valid(mon, f, 0));
	printf("ops ok\n");
	return 0;
}
