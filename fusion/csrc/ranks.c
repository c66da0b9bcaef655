/* DELLA's ranked drop (sparsify.h, SPARSIFY_RANKED): within each row of a task vector, the
 * entries' ranks by |δ|, keep probabilities from the ranks, and one draw per entry.
 *
 * A row is `length` entries `inner` apart (fusion.api.sparsify.row_layout). Its entries are
 * ranked by a stable LSD radix sort of their magnitude keys, fed from the last entry to the
 * first, so that equal magnitudes rank the lower index higher, as the reference's stable
 * descending sort does; a digit that every key of the row shares costs no pass. The rank r
 * (0 for the smallest) gives pⱼ = (d − ε) + (r / (L − 1))·2ε in float64, in the reference's
 * order of operations, and the entry is kept iff its draw u = draw24(…)·2⁻²⁴ < pⱼ (u < d − ε
 * keeps it whatever its rank, u ≥ d + ε drops it, so pⱼ is needed only in between). The keep
 * flags go into a bitmap per model, read by the merge pass, and into the exact L1 tables.
 *
 * Rows are split among the threads; a thread writes the interior bytes of its rows' bitmap
 * directly and the bytes it may share with another row atomically.
 */
#include "l1.h"
#include "sparsify.h"

#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

typedef struct {
    const job_t *job;
    sparsifier *sp;
    int64_t *l1;      /* [thread][model][2 · L1_SIZE] */
    int nth;
    int oom;
} rank_pass;

/* Sort (key, index) pairs ascending by key, stably, through tmp; the result is in a or tmp
 * (returned). */
static uint64_t *radix_sort(uint64_t *a, uint64_t *tmp, int64_t len) {
    int64_t count[256], j;
    int shift, b;
    for (shift = 32; shift < 64; shift += 8) {
        uint64_t *t;
        memset(count, 0, sizeof(count));
        for (j = 0; j < len; j++) count[(a[j] >> shift) & 0xff]++;
        if (count[(a[0] >> shift) & 0xff] == len) continue; /* every key shares this digit */
        for (b = 0, j = 0; b < 256; b++) {
            int64_t c = count[b];
            count[b] = j;
            j += c;
        }
        for (j = 0; j < len; j++) tmp[count[(a[j] >> shift) & 0xff]++] = a[j];
        t = a, a = tmp, tmp = t;
    }
    return a;
}

INLINE void set_bit(unsigned char *bits, int64_t f, int atomic) {
    unsigned char b = (unsigned char)(1u << (f & 7));
    if (atomic) __atomic_fetch_or(&bits[f >> 3], b, __ATOMIC_RELAXED);
    else bits[f >> 3] |= b;
}

/* Drop this process's pages of input `in` over elements [from, upto) (read-only file maps only). */
static void release_span(const job_t *job, int in, int64_t from, int64_t upto) {
    long page = sysconf(_SC_PAGESIZE);
    uintptr_t a = (uintptr_t)job->in[in] + (uintptr_t)(from * dt_size(job->dt[in]));
    uintptr_t b = (uintptr_t)job->in[in] + (uintptr_t)(upto * dt_size(job->dt[in]));
    a = (a + page - 1) & ~(uintptr_t)(page - 1);
    b &= ~(uintptr_t)(page - 1);
    if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
}

/* One row of `length` entries `inner` apart from flat index `first`, of input `in`, widened */
static void load_row(float *dst, const job_t *job, int in, int64_t first, int64_t length, int64_t inner) {
    int64_t a;
    if (inner == 1)
        for (a = 0; a < length; a += BLOCK)
            load_block(dst + a, job->in[in], job->dt[in], first + a, (int)(length - a < BLOCK ? length - a : BLOCK));
    else
        for (a = 0; a < length; a++) load_block(dst + a, job->in[in], job->dt[in], first + a * inner, 1);
}

/* keep[] of one row of model i's task vector delta[] */
INLINE void rank_row(const sparsifier *sp, int i, const float *delta, int64_t L, int64_t first, int64_t inner,
                     uint64_t *pairs, unsigned char *keep) {
    double lo = sp->density[i] - sp->epsilon[i], span = 2 * sp->epsilon[i], hi = lo + span;
    uint64_t *sorted;
    int64_t j;
    for (j = 0; j < L; j++) /* from the last entry, so that equal keys keep the higher index first */
        pairs[j] = ((uint64_t)abs_key(delta[L - 1 - j]) << 32) | (uint64_t)(L - 1 - j);
    sorted = L > 1 ? radix_sort(pairs, pairs + L, L) : pairs;
    for (j = 0; j < L; j++) { /* j: the rank from the smallest */
        int64_t e = (int64_t)(sorted[j] & 0xffffffffu);
        double u = (double)draw24(sp->seed[i], sp->first + (uint64_t)(first + e * inner)) * 0x1p-24;
        int k;
        if (L == 1) k = u < sp->density[i];
        else if (u < lo) k = 1;
        else if (u >= hi) k = 0;
        else k = u < lo + ((double)j / (double)(L - 1)) * span;
        keep[e] = (unsigned char)k;
    }
}

HOT static void pass_rank(void *p, int tid) {
    rank_pass *rp = (rank_pass *)p;
    const job_t *job = rp->job;
    sparsifier *sp = rp->sp;
    int64_t L = sp->length, inner = sp->inner, rows = sp->outer * inner, one = L > 0 ? L : 1;
    int64_t r0 = rows * tid / rp->nth, r1 = rows * (tid + 1) / rp->nth, row, j, released = r0 * L;
    uint64_t *pairs = (uint64_t *)malloc((size_t)one * 16);
    float *base = (float *)malloc((size_t)one * 4), *delta = (float *)malloc((size_t)one * 4);
    unsigned char *keep = (unsigned char *)malloc((size_t)one);
    int i;
    if (!pairs || !base || !delta || !keep) {
        rp->oom = 1;
        free(pairs), free(base), free(delta), free(keep);
        return;
    }
    for (row = r0; row < r1; row++) {
        int64_t first = (row / inner) * L * inner + row % inner; /* flat index of the row's entry 0 */
        load_row(base, job, 0, first, L, inner);
        for (i = 0; i < sp->nmodels; i++) {
            if (sp->mode[i] != SPARSIFY_RANKED) continue;
            load_row(delta, job, i + 1, first, L, inner);
            for (j = 0; j < L; j++) delta[j] = delta[j] - base[j];
            rank_row(sp, i, delta, L, first, inner, pairs, keep);
            for (j = 0; j < L; j++)
                if (keep[j]) {
                    int64_t f = first + j * inner;
                    /* the bytes a row may share with another are written atomically */
                    set_bit(sp->bits[i], f, inner != 1 || (f >> 3) == (first >> 3) ||
                                                (f >> 3) == ((first + L - 1) >> 3));
                }
            if (sp->rescale[i]) l1_add(rp->l1 + ((size_t)tid * sp->nmodels + i) * 2 * L1_SIZE, delta, keep, (int)L);
        }
        if (job->release && inner == 1 && (row + 1) * L - released >= RELEASE_EVERY) {
            for (i = 0; i < job->nin; i++)
                if (i == 0 || sp->mode[i - 1] == SPARSIFY_RANKED) release_span(job, i, released, (row + 1) * L);
            released = (row + 1) * L;
        }
    }
    free(pairs), free(base), free(delta), free(keep);
}

int ranked_prepare(const job_t *job, sparsifier *sp, int64_t *l1) {
    rank_pass rp = {job, sp, l1, job->nth, 0};
    int i, any = 0;
    sp->bits_bytes = (size_t)((job->n + 7) / 8);
    for (i = 0; i < sp->nmodels; i++)
        if (sp->mode[i] == SPARSIFY_RANKED) {
            any = 1;
            if (!(sp->bits[i] = (unsigned char *)zalloc(sp->bits_bytes))) return -1;
        }
    if (!any) return 0;
    run_threads(&rp, job, pass_rank);
    return rp.oom ? -1 : 0;
}
