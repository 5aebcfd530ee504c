/* CHECK(cond): the C tests' and benches' assertion. Unlike assert(), it stays in
 * optimized builds and reports the file and line before exiting with status 1. */
#ifndef MMU_UFFD_CHECK_H
#define MMU_UFFD_CHECK_H
#include <stdio.h>
#include <stdlib.h>

#define CHECK(cond)                                                                          \
	do {                                                                                 \
		if (!(cond)) {                                                               \
			fprintf(stderr, "%s:%d: check failed: %s\n", __FILE__, __LINE__, #cond); \
			exit(1);                                                             \
		}                                                                            \
	} while (0)
#endif
