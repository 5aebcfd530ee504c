/* The load-time import: a program that links libfabric only (not mmu_uffd), run with
 * LD_PRELOAD of the library.
 *
 *   libfabric_preload preload   expects MMU_UFFD_FI_IMPORT=1 and the preload: libfabric
 *                               refuses a second monitor (-FI_EBUSY): ours was imported
 *   libfabric_preload plain     without them: libfabric accepts this program's monitor */
#include <string.h>
#include <rdma/fabric.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_ext.h>
#include <stdio.h>
#include <stdlib.h>

#include "libfabric_dummy_monitor.h"

int main(int argc, char **argv)
{
	const char *mode = argc > 1 ? argv[1] : "plain";
	getinfo();
	int ret = import_dummy();
	printf("second monitor: %d\n", ret);
	if (ret != (!strcmp(mode, "preload") ? -FI_EBUSY : 0)) {
		fprintf(stderr, "unexpected result for %s\n", mode);
		return 1;
	}
	printf("%s ok\n", mode);
	return 0;
}
