/* The #[repr(C)] structs of src/libfabric.rs against rdma/fabric.h and rdma/fi_ext.h:
 * compiled against the installed headers, so a layout change fails the build. The Rust
 * side declares the same fields in the same order with pointer-sized members only; these
 * are the offsets it assumes (LP64). */
#include <stddef.h>
#include "libfabric_common.h"

#define P sizeof(void *)
_Static_assert(sizeof(size_t) == P, "size_t is pointer-sized");
_Static_assert(FI_CLASS_MEM_MONITOR == 23, "FI_CLASS_MEM_MONITOR (src/libfabric.rs)");
_Static_assert(offsetof(struct fid, fclass) == 0, "fid.fclass");
_Static_assert(offsetof(struct fid, context) == P, "fid.context");
_Static_assert(offsetof(struct fid, ops) == 2 * P, "fid.ops");
_Static_assert(sizeof(struct fid) == 3 * P, "struct fid");
_Static_assert(offsetof(struct fi_ops, close) == P, "fi_ops.close");
_Static_assert(offsetof(struct fi_ops, bind) == 2 * P, "fi_ops.bind");
_Static_assert(sizeof(struct fi_ops) == 7 * P, "struct fi_ops");
_Static_assert(offsetof(struct fi_ops_mem_monitor, start) == P, "start");
_Static_assert(offsetof(struct fi_ops_mem_monitor, stop) == 2 * P, "stop");
_Static_assert(offsetof(struct fi_ops_mem_monitor, subscribe) == 3 * P, "subscribe");
_Static_assert(offsetof(struct fi_ops_mem_monitor, unsubscribe) == 4 * P, "unsubscribe");
_Static_assert(offsetof(struct fi_ops_mem_monitor, valid) == 5 * P, "valid");
_Static_assert(sizeof(struct fi_ops_mem_monitor) == 6 * P, "struct fi_ops_mem_monitor");
_Static_assert(offsetof(struct fi_ops_mem_notify, notify) == P, "notify");
_Static_assert(sizeof(struct fi_ops_mem_notify) == 2 * P, "struct fi_ops_mem_notify");
_Static_assert(offsetof(struct fid_mem_monitor, export_ops) == 3 * P, "export_ops");
_Static_assert(offsetof(struct fid_mem_monitor, import_ops) == 4 * P, "import_ops");
_Static_assert(sizeof(struct fid_mem_monitor) == 5 * P, "struct fid_mem_monitor");

int main(void)
{
	/* And what the library filled in, seen through the header's types. */
	struct fid_mem_monitor *m = NULL;
	int ret = mmu_uffd_fi_monitor_new(&m);
	if (ret == -ENOSYS) {
		printf("SKIPPED: %s\n", mmu_uffd_last_error());
		return 0;
	}
	CHECK(ret == 0 && m);
	CHECK(m->fid.fclass == FI_CLASS_MEM_MONITOR);
	CHECK(m->export_ops && m->export_ops->size == sizeof(struct fi_ops_mem_monitor));
	CHECK(m->export_ops->start && m->export_ops->stop && m->export_ops->subscribe &&
	      m->export_ops->unsubscribe && m->export_ops->valid);
	CHECK(m->import_ops == NULL);
	CHECK(mmu_uffd_fi_import() == -EBUSY); /* handed to this test instead */
	printf("layout ok\n");
	return 0;
}
