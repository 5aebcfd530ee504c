/* Shared by libfabric_import.c and libfabric_preload.c: fi_getinfo (which loads the
 * providers), and a do-nothing monitor of the program's own, imported directly: what a
 * second importer sees. */
#ifndef LIBFABRIC_DUMMY_MONITOR_H
#define LIBFABRIC_DUMMY_MONITOR_H
#include <stdbool.h>
#include <stdio.h>
#include <rdma/fabric.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_ext.h>

static void getinfo(void)
{
	struct fi_info *info = NULL;
	int ret = fi_getinfo(FI_VERSION(1, 13), NULL, NULL, 0, NULL, &info);
	printf("fi_getinfo: %d (%s)\n", ret, ret ? fi_strerror(-ret) : "providers found");
	if (info)
		fi_freeinfo(info);
}

static int dummy_start(struct fid_mem_monitor *m) { (void)m; return 0; }
static void dummy_stop(struct fid_mem_monitor *m) { (void)m; }
static int dummy_subscribe(struct fid_mem_monitor *m, const void *a, size_t l)
{
	(void)m; (void)a; (void)l;
	return 0;
}
static void dummy_unsubscribe(struct fid_mem_monitor *m, const void *a, size_t l)
{
	(void)m; (void)a; (void)l;
}
static bool dummy_valid(struct fid_mem_monitor *m, const void *a, size_t l)
{
	(void)m; (void)a; (void)l;
	return false;
}

/* A monitor of our own, imported directly: what a second importer sees. */
static int import_dummy(void)
{
	static struct fi_ops_mem_monitor ops = {
		.size = sizeof(struct fi_ops_mem_monitor),
		.start = dummy_start,
		.stop = dummy_stop,
		.subscribe = dummy_subscribe,
		.unsubscribe = dummy_unsubscribe,
		.valid = dummy_valid,
	};
	static struct fid_mem_monitor mon;
	mon.fid.fclass = FI_CLASS_MEM_MONITOR;
	mon.export_ops = &ops;
	return fi_import(FI_VERSION(1, 13), "mr_cache", NULL, 0, 0, &mon.fid, NULL);
}

#endif
