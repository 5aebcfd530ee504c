/* The import into the installed libfabric.
 *
 *   libfabric_import import    fi_getinfo, import (0), import again (-FI_EBUSY)
 *   libfabric_import early     import before any fi_getinfo (0), then fi_getinfo
 *   libfabric_import refused   expects FI_MR_CACHE_MONITOR in the environment: -EPERM
 */
#include <string.h>
#include "libfabric_common.h"

#include "libfabric_dummy_monitor.h"

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
