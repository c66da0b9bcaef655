/* Fan-out of one pass over plain pthreads, and page release on read-only file maps.
 *
 * module.c releases the GIL around a whole kernel, so these threads never touch Python. Each
 * thread owns one contiguous range, fixed for every pass of a call: a selection's later passes
 * rely on it to know how many ties at the k-th key precede a range.
 */
#include "common.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

void *zalloc(size_t bytes) {
    /* calloc would clear the memory by hand once malloc reuses freed blocks */
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

void zfree(void *p, size_t bytes) {
    if (p) munmap(p, bytes ? bytes : 1);
}

int useful_threads(int threads, int64_t parts, int64_t n) {
    /* below this many elements per thread, starting a thread costs more than it saves */
    const int64_t per_thread_min = 1 << 16;
    int64_t nth = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (nth > parts) nth = parts;
    if (nth > n / per_thread_min + 1) nth = n / per_thread_min + 1;
    return nth < 1 ? 1 : (int)nth;
}

void split_even(int64_t *lo, int64_t n, int nth) {
    int t;
    for (t = 0; t <= nth; t++) lo[t] = n / nth * t + (n % nth) * t / nth;
}

void job_split(job_t *job, int64_t n, int threads) {
    int nth = useful_threads(threads, n, n);
    job->n = n;
    /* each thread's histogram counts are 32-bit */
    while (nth < MAX_THREADS && n / nth >= ((int64_t)1 << 32) - 1) nth++;
    job->nth = nth;
    split_even(job->lo, n, nth);
}

typedef struct {
    void *arg;
    int tid;
    pass_fn fn;
} worker_arg;

static void *worker_main(void *p) {
    worker_arg *a = (worker_arg *)p;
    a->fn(a->arg, a->tid);
    return NULL;
}

void run_threads(void *arg, const job_t *job, pass_fn fn) {
    pthread_t th[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    int started = 0, t, nth = job->nth;
    for (t = 0; t < nth; t++) args[t] = (worker_arg){arg, t, fn};
    for (t = 1; t < nth; t++) {
        if (pthread_create(&th[t], NULL, worker_main, &args[t]) != 0) break;
        started = t;
    }
    /* the ranges of threads that could not start are done here, in turn: same result */
    for (t = started + 1; t < nth; t++) fn(arg, t);
    fn(arg, 0);
    for (t = 1; t <= started; t++) pthread_join(th[t], NULL);
}

/* The inputs are read-only maps of files: dropping their pages from this process keeps the
 * data in the page cache and resident memory flat on huge tensors. */
void release_span(const job_t *job, int in, int64_t from, int64_t upto) {
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)job->in[in] + (uintptr_t)(from * dt_size(job->dt[in]));
    uintptr_t b = (uintptr_t)job->in[in] + (uintptr_t)(upto * dt_size(job->dt[in]));
    a = (a + page - 1) & ~(uintptr_t)(page - 1);
    b &= ~(uintptr_t)(page - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

void release_upto(const job_t *job, int tid, int64_t upto) {
    int i;
    if (!job->release) return;
    for (i = 0; i < job->nin; i++) release_span(job, i, job->lo[tid], upto);
}

int64_t run_stores(void *arg, const job_t *job, pass_fn fn) {
    int64_t bad = 0;
    int t;
    run_threads(arg, job, fn);
    for (t = 0; t < job->nth; t++) bad += job->bad[t];
    return bad;
}
