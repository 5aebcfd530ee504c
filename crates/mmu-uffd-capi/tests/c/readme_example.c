#define _GNU_SOURCE
#include <errno.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>

#include <mmu_uffd.h>

/* A registrar: here the key is just a counter; a real one registers with a device. */
static int reg(void *user, void *addr, size_t len, uint64_t *key_out) {
    (void)addr, (void)len;
    *key_out = ++*(uint64_t *)user;
    return 0;
}
static void dereg(void *user, uint64_t key) { (void)user, (void)key; }

int main(void) {
    mmu_uffd_monitor *monitor;
    int rc = mmu_uffd_monitor_new(NULL, &monitor);
    if (rc < 0) {
        printf("SKIPPED: no monitor (%d): %s\n", rc, mmu_uffd_last_error());
        return 0;
    }
    uint64_t keys = 0;
    mmu_uffd_registrar registrar = {.reg = reg, .dereg = dereg, .user = &keys};
    mmu_uffd_cache *cache;
    if (mmu_uffd_cache_new(monitor, NULL, &registrar, &cache) < 0) return 1;

    size_t len = 1 << 20;
    char *buf = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    mmu_uffd_reg *a, *b;
    if (mmu_uffd_cache_get(cache, buf, len, &a) < 0) return 1;  /* miss: registers */
    if (mmu_uffd_cache_get(cache, buf, 4096, &b) < 0) return 1; /* hit: same key */
    int same = mmu_uffd_reg_key(a) == mmu_uffd_reg_key(b);
    munmap(buf, len);
    int stale = mmu_uffd_reg_is_valid(a); /* false: the unmap invalidated it */
    mmu_uffd_reg_put(a);
    mmu_uffd_reg_put(b);
    mmu_uffd_cache_free(cache);
    mmu_uffd_monitor_free(monitor);
    printf("%s\n", same && !stale ? "OK" : "FAILED");
    return same && !stale ? 0 : 1;
}
