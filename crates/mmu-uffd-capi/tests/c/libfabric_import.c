/* The import into the installed libfabric.
 *
 *   libfabric_import import    fi_getinfo, import (0), import again (-FI_EBUSY)
 *   libfabric_import early     import before any fi_getinfo (0), then fi_getinfo
 *   libfabric_import refused   expects FI_MR_CACHE_MONITOR in the environment: -EPERM
 */
#include <string.h>
#include "libfabric_common.h"

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

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "import";
	int ret;
	if (!strcmp(mode, "refused")) {
		CHECK(getenv("FI_MR_CACHE_MONITOR"));
		getinfo();
		ret = mmu_uffd_fi_import();
		printf("import: %d (%s)\n", ret, mmu_uffd_last_error());
		CHECK(ret == -EPERM);
		CHECK(strstr(mmu_uffd_last_error(), "FI_MR_CACHE_MONITOR"));
	} else {
		if (strcmp(mode, "early"))
			getinfo();
		ret = mmu_uffd_fi_import();
		printf("import: %d (%s)\n", ret, ret ? mmu_uffd_last_error() : "ok");
		if (ret == -ENOSYS) {
			printf("SKIPPED: userfaultfd unavailable\n");
			return 0;
		}
		CHECK(ret == 0);
		if (!strcmp(mode, "early"))
			getinfo();
		ret = mmu_uffd_fi_import();
		printf("import again: %d (%s)\n", ret, mmu_uffd_last_error());
		CHECK(ret == -FI_EBUSY);
		ret = import_dummy();
		printf("another monitor: %d\n", ret);
		CHECK(ret == -FI_EBUSY);
	}
	printf("%s ok\n", mode);
	return 0;
}
