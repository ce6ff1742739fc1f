/* LD_PRELOAD shim for bench/copies.sh: counts the bytes a process moves with memcpy and
 * memmove (the calls that go through libc: Rust's copies of buffers and of large
 * futures, and C libraries' such as zstd's), in total and in calls of at least
 * MEMCOPY_MIN bytes (default 4096), and appends the counts to the file MEMCOPY_OUT when
 * the process exits. It does not see bytes written by a loop of their own (zstd's
 * decoder producing its output) or copied by the kernel (socket and file I/O). */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

static void *(*real_memcpy)(void *, const void *, size_t);
static void *(*real_memmove)(void *, const void *, size_t);
static _Atomic unsigned long big_calls, big_bytes, all_bytes;
static size_t min_len = 4096;

__attribute__((constructor)) static void init(void) {
    real_memcpy = dlsym(RTLD_NEXT, "memcpy");
    real_memmove = dlsym(RTLD_NEXT, "memmove");
    const char *m = getenv("MEMCOPY_MIN");
    if (m) min_len = strtoul(m, 0, 10);
}

static void count(size_t n) {
    atomic_fetch_add_explicit(&all_bytes, n, memory_order_relaxed);
    if (n >= min_len) {
        atomic_fetch_add_explicit(&big_calls, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&big_bytes, n, memory_order_relaxed);
    }
}

/* Before `init` has run (the dynamic loader's own early calls), copy by hand. */
void *memcpy(void *d, const void *s, size_t n) {
    count(n);
    if (!real_memcpy) {
        char *dd = d;
        const char *ss = s;
        while (n--) *dd++ = *ss++;
        return d;
    }
    return real_memcpy(d, s, n);
}

void *memmove(void *d, const void *s, size_t n) {
    count(n);
    if (!real_memmove) {
        char *dd = d;
        const char *ss = s;
        if (dd < ss)
            while (n--) *dd++ = *ss++;
        else
            while (n--) dd[n] = ss[n];
        return d;
    }
    return real_memmove(d, s, n);
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("MEMCOPY_OUT");
    FILE *o = path ? fopen(path, "a") : stderr;
    if (!o) return;
    fprintf(o, "big_calls=%lu big_bytes=%lu all_bytes=%lu\n", big_calls, big_bytes, all_bytes);
    if (path) fclose(o);
}
