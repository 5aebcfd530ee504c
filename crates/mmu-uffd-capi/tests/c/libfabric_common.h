/* Declarations shared by the libfabric tests: the library's libfabric entry points
 * (mmu_uffd_fi_import is in mmu_uffd.h; the other two are test-only exports). */
#ifndef LIBFABRIC_COMMON_H
#define LIBFABRIC_COMMON_H
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <rdma/fabric.h>
#include <rdma/fi_errno.h>
#include <rdma/fi_ext.h>

int mmu_uffd_fi_import(void);
int mmu_uffd_fi_monitor_new(struct fid_mem_monitor **out);
uint64_t mmu_uffd_fi_notified(uint64_t *pending);
const char *mmu_uffd_last_error(void);

#include "check.h"
#endif
