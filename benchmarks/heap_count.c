/* Live heap bytes of a process, counted at every malloc and free: LD_PRELOAD it, then read the counters through
 * ctypes (`_record.HeapBytes`). It wraps glibc's allocator (the `__libc_*` entry points, so no dlsym at start-up)
 * and counts each block's usable size when it is handed out and when it is freed, from every thread. torch's CPU
 * tensors come from posix_memalign, so every tensor's bytes are in the count; so is everything else malloc hands
 * out, but not the libraries' code and data, thread stacks, or Python's small-object arenas (mmap'd by Python).
 *
 *     gcc -O2 -shared -fPIC -o heap_count.so heap_count.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <malloc.h>
#include <stdatomic.h>
#include <stddef.h>

extern void *__libc_malloc(size_t size);
extern void __libc_free(void *ptr);
extern void *__libc_calloc(size_t count, size_t size);
extern void *__libc_realloc(void *ptr, size_t size);
extern void *__libc_memalign(size_t alignment, size_t size);

static _Atomic long long live_bytes;
static _Atomic long long peak_bytes;

static void counted(void *ptr) {
    if (ptr == NULL) return;
    long long size = (long long)malloc_usable_size(ptr);
    long long now = atomic_fetch_add(&live_bytes, size) + size;
    long long peak = atomic_load(&peak_bytes);
    while (now > peak && !atomic_compare_exchange_weak(&peak_bytes, &peak, now)) {
    }
}

static void uncounted(void *ptr) {
    if (ptr != NULL) atomic_fetch_sub(&live_bytes, (long long)malloc_usable_size(ptr));
}

void *malloc(size_t size) {
    void *ptr = __libc_malloc(size);
    counted(ptr);
    return ptr;
}

void free(void *ptr) {
    uncounted(ptr);
    __libc_free(ptr);
}

void *calloc(size_t count, size_t size) {
    void *ptr = __libc_calloc(count, size);
    counted(ptr);
    return ptr;
}

void *realloc(void *old, size_t size) {
    long long old_size = old == NULL ? 0 : (long long)malloc_usable_size(old);
    void *ptr = __libc_realloc(old, size);
    if (ptr != NULL || (old != NULL && size == 0)) atomic_fetch_sub(&live_bytes, old_size);  /* moved or freed */
    counted(ptr);
    return ptr;
}

void *memalign(size_t alignment, size_t size) {
    void *ptr = __libc_memalign(alignment, size);
    counted(ptr);
    return ptr;
}

int posix_memalign(void **out, size_t alignment, size_t size) {
    if (alignment % sizeof(void *) != 0 || (alignment & (alignment - 1)) != 0) return EINVAL;
    void *ptr = __libc_memalign(alignment, size);
    if (ptr == NULL) return ENOMEM;
    counted(ptr);
    *out = ptr;
    return 0;
}

void *aligned_alloc(size_t alignment, size_t size) { return memalign(alignment, size); }

void *valloc(size_t size) { return memalign(4096, size); }

long long heap_live_bytes(void) { return atomic_load(&live_bytes); }

long long heap_peak_bytes(void) { return atomic_load(&peak_bytes); }

/* Start a new peak from what is live now. */
void heap_reset_peak(void) { atomic_store(&peak_bytes, atomic_load(&live_bytes)); }
