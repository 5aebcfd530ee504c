/* What the C API costs per call, side by side in one run (one thread, nothing else
 * changing the memory): medians over ROUNDS rounds of BATCH calls each.
 *
 *   hit + put, default      mmu_uffd_cache_get of a cached page, then mmu_uffd_reg_put
 *   hit + put, no reuse     the same with reuse_check = false
 *   miss + put              64 one-page buffers in turn through a 16-entry cache (every
 *                           lookup misses and evicts; the memory is watched beforehand and
 *                           stays watched: the registrar does nothing but count)
 *   libfabric valid         the import monitor's valid() on a subscribed page (what
 *                           libfabric's cache calls on every hit)
 *   getppid                 an empty system call, the floor
 *
 * Prints the library it runs against, then one line per measurement: "name median_ns
 * p10_ns p90_ns". */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <rdma/fabric.h>
#include <rdma/fi_ext.h>

#include <mmu_uffd.h>

int mmu_uffd_fi_monitor_new(struct fid_mem_monitor **out);

#include "check.h"

#define ROUNDS 201
#define BATCH 1000
#define NBUFS 64
#define CAPACITY 16

static uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int cmp(const void *a, const void *b)
{
	double x = *(const double *)a, y = *(const double *)b;
	return (x > y) - (x < y);
}

static void print(const char *name, double *per_call)
{
	qsort(per_call, ROUNDS, sizeof *per_call, cmp);
	printf("%s %.1f %.1f %.1f\n", name, per_call[ROUNDS / 2], per_call[ROUNDS / 10],
	       per_call[ROUNDS - 1 - ROUNDS / 10]);
}

static int reg(void *user, void *addr, size_t len, uint64_t *key_out)
{
	(void)addr, (void)len;
	*key_out = ++*(uint64_t *)user;
	return 0;
}

static void dereg(void *user, uint64_t key) { (void)user, (void)key; }

static void notify(struct fid_mem_monitor *m, const void *addr, size_t len)
{
	(void)m, (void)addr, (void)len;
}

static struct fi_ops_mem_notify notify_ops = {
	.size = sizeof(struct fi_ops_mem_notify),
	.notify = notify,
};

static double rounds[ROUNDS];

static void hits(const mmu_uffd_cache *cache, const char *buf, const char *name)
{
	mmu_uffd_reg *r;
	CHECK(mmu_uffd_cache_get(cache, buf, 4096, &r) == 0); /* the miss */
	mmu_uffd_reg_put(r);
	for (int k = 0; k < ROUNDS; k++) {
		uint64_t t0 = now_ns();
		for (int i = 0; i < BATCH; i++) {
			CHECK(mmu_uffd_cache_get(cache, buf, 4096, &r) == 0);
			mmu_uffd_reg_put(r);
		}
		rounds[k] = (double)(now_ns() - t0) / BATCH;
	}
	print(name, rounds);
}

int main(void)
{
	size_t page = (size_t)sysconf(_SC_PAGESIZE);
	CHECK(page == 4096);
	Dl_info where;
	CHECK(dladdr((void *)mmu_uffd_cache_get, &where) && where.dli_fname);
	printf("library: %s\n", where.dli_fname);
	mmu_uffd_monitor *monitor;
	int rc = mmu_uffd_monitor_new(NULL, &monitor);
	if (rc < 0) {
		printf("SKIPPED: no monitor (%d): %s\n", rc, mmu_uffd_last_error());
		return 0;
	}
	uint64_t keys = 0;
	mmu_uffd_registrar registrar = {.reg = reg, .dereg = dereg, .user = &keys};
	char *buf = mmap(NULL, (2 * NBUFS + 1) * page, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	CHECK(buf != MAP_FAILED);
	memset(buf, 1, (2 * NBUFS + 1) * page);

	/* Hits: the default configuration, then without the reuse check. */
	mmu_uffd_cache_config config = mmu_uffd_cache_config_default();
	mmu_uffd_cache *cache;
	CHECK(mmu_uffd_cache_new(monitor, &config, &registrar, &cache) == 0);
	hits(cache, buf, "hit+put(default)");
	mmu_uffd_cache_free(cache);
	config.reuse_check = false;
	CHECK(mmu_uffd_cache_new(monitor, &config, &registrar, &cache) == 0);
	hits(cache, buf, "hit+put(reuse_check=false)");
	mmu_uffd_cache_free(cache);

	/* Misses: NBUFS one-page buffers (every other page: entries never merge) through a
	 * CAPACITY-entry cache, in turn: each lookup misses and evicts the oldest entry. */
	config = mmu_uffd_cache_config_default();
	config.capacity = CAPACITY;
	CHECK(mmu_uffd_cache_new(monitor, &config, &registrar, &cache) == 0);
	CHECK(mmu_uffd_monitor_watch(monitor, buf, (2 * NBUFS + 1) * page) == 0);
	mmu_uffd_reg *r;
	for (int b = 0; b < NBUFS; b++) { /* warm up */
		CHECK(mmu_uffd_cache_get(cache, buf + 2 * b * page, page, &r) == 0);
		mmu_uffd_reg_put(r);
	}
	mmu_uffd_cache_stats s0, s1;
	mmu_uffd_monitor_stats m0, m1;
	CHECK(mmu_uffd_cache_get_stats(cache, &s0) == 0);
	CHECK(mmu_uffd_monitor_get_stats(monitor, &m0) == 0);
	int next = 0;
	for (int k = 0; k < ROUNDS; k++) {
		uint64_t t0 = now_ns();
		for (int i = 0; i < BATCH; i++) {
			CHECK(mmu_uffd_cache_get(cache, buf + 2 * next * page, page, &r) == 0);
			mmu_uffd_reg_put(r);
			next = (next + 1) % NBUFS;
		}
		rounds[k] = (double)(now_ns() - t0) / BATCH;
	}
	CHECK(mmu_uffd_cache_get_stats(cache, &s1) == 0);
	CHECK(mmu_uffd_monitor_get_stats(monitor, &m1) == 0);
	print("miss+put(64bufs,16entries)", rounds);
	printf("miss-rounds: hits=%lu misses=%lu evictions=%lu watch_registrations=%lu\n",
	       (unsigned long)(s1.hits - s0.hits), (unsigned long)(s1.misses - s0.misses),
	       (unsigned long)(s1.evictions - s0.evictions),
	       (unsigned long)(m1.watch_registrations - m0.watch_registrations));
	mmu_uffd_cache_free(cache);

	/* libfabric's valid() on a hit, through the import monitor. */
	struct fid_mem_monitor *mon;
	rc = mmu_uffd_fi_monitor_new(&mon);
	if (rc == 0) {
		/* (Memory of its own: the import monitor has its own userfaultfd.) */
		char *fbuf = mmap(NULL, page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
				  -1, 0);
		CHECK(fbuf != MAP_FAILED);
		fbuf[0] = 1;
		mon->import_ops = &notify_ops;
		CHECK(mon->export_ops->start(mon) == 0);
		CHECK(mon->export_ops->subscribe(mon, fbuf, page) == 0);
		for (int k = 0; k < ROUNDS; k++) {
			uint64_t t0 = now_ns();
			for (int i = 0; i < BATCH; i++)
				CHECK(mon->export_ops->valid(mon, fbuf, page));
			rounds[k] = (double)(now_ns() - t0) / BATCH;
		}
		print("libfabric-valid", rounds);
		mon->export_ops->stop(mon);
	} else {
		printf("libfabric-valid: not measured (%d: %s)\n", rc, mmu_uffd_last_error());
	}

	/* The floor: an empty system call. */
	for (int k = 0; k < ROUNDS; k++) {
		uint64_t t0 = now_ns();
		for (int i = 0; i < BATCH; i++)
			CHECK(syscall(SYS_getppid) > 0);
		rounds[k] = (double)(now_ns() - t0) / BATCH;
	}
	print("getppid", rounds);
	mmu_uffd_monitor_free(monitor);
	return 0;
}
