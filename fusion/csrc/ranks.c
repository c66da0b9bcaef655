/* DELLA's ranked drop (sparsify.h, SPARSIFY_RANKED): within each row of a task vector, the
 * entries' ranks by |δ|, a keep probability per rank, and one draw per entry.
 *
 * A row is `length` entries `inner` apart (fusion.api.sparsify.row_layout). Its entries are
 * ranked by a stable LSD radix sort of their magnitude keys, fed from the last entry to the
 * first, so that equal magnitudes rank the lower index higher, as the reference's stable
 * descending sort does; a byte that every key of the row shares costs no pass. Rank r (0 for the
 * smallest) has pᵣ = (d − ε) + (r / (L − 1))·2ε in float64, in the reference's order of
 * operations, and since a draw D is an integer, D·2⁻²⁴ < pᵣ ⟺ D < ceil(pᵣ·2²⁴): so each rank gets
 * an integer threshold once per call and the entry of rank r is kept iff its draw is below
 * thresholdᵣ. The keep flags go into a bitmap per model, read by the merge pass, and into the
 * exact L1 sums (l1.h).
 *
 * Rows are split among the threads; a thread writes the whole bytes of its rows' bitmap directly
 * and the bytes it may share with another row atomically.
 */
#include "l1.h"
#include "sparsify.h"

#include <stdlib.h>

typedef struct {
    const job_t *job;
    sparsifier *sp;
    wide *l1;                   /* [thread][model][all, kept] */
    uint32_t *thr[MAX_INPUTS];  /* per model: the draw threshold of each rank */
    int nth;
    int oom;
} rank_pass;

/* Sort (key, index) pairs ascending by key (the high 32 bits), stably, through tmp: an LSD radix
 * sort over only the key bits that differ within the row (task vectors of bf16 models leave the
 * low mantissa bits zero and span few exponents), in as few passes of at most 8 bits (11 on long
 * rows) as they need. Each pass moves the two halves of the row at once, the second half's
 * entries of a digit placed after the first half's: two independent chains of counter updates
 * instead of one, which runs of equal digits would otherwise serialize. Returns a or tmp,
 * whichever holds the result. */
static uint64_t *radix_sort(uint64_t *a, uint64_t *tmp, int64_t len) {
    int32_t first[2048], second[2048];
    uint32_t k0 = (uint32_t)(a[0] >> 32), diff = 0, mask;
    int64_t j, half = len / 2;
    int lo, width, passes, bits, d, b;
    for (j = 1; j < len; j++) diff |= (uint32_t)(a[j] >> 32) ^ k0;
    if (!diff) return a; /* equal keys: the input order is the stable order */
    lo = __builtin_ctz(diff);
    width = 32 - __builtin_clz(diff) - lo;
    bits = len >= 4096 ? 11 : 8;
    passes = (width + bits - 1) / bits;
    bits = (width + passes - 1) / passes; /* the same digit size for every pass */
    mask = (1u << bits) - 1;
    for (d = 0; d < passes; d++) {
        int shift = 32 + lo + d * bits;
        int32_t sum = 0;
        uint64_t *t;
        memset(first, 0, sizeof(int32_t) * ((size_t)mask + 1));
        memset(second, 0, sizeof(int32_t) * ((size_t)mask + 1));
        for (j = 0; j < half; j++) {
            first[(a[j] >> shift) & mask]++;
            second[(a[half + j] >> shift) & mask]++;
        }
        if (len & 1) second[(a[len - 1] >> shift) & mask]++;
        for (b = 0; b <= (int)mask; b++) {
            int32_t n1 = first[b], n2 = second[b];
            first[b] = sum;
            second[b] = sum + n1;
            sum += n1 + n2;
        }
        for (j = 0; j < half; j++) {
            uint64_t x = a[j], y = a[half + j];
            tmp[first[(x >> shift) & mask]++] = x;
            tmp[second[(y >> shift) & mask]++] = y;
        }
        if (len & 1) tmp[second[(a[len - 1] >> shift) & mask]++] = a[len - 1];
        t = a, a = tmp, tmp = t;
    }
    return a;
}

INLINE void set_bit(unsigned char *bits, int64_t f, int atomic) {
    unsigned char b = (unsigned char)(1u << (f & 7));
    if (atomic) __atomic_fetch_or(&bits[f >> 3], b, __ATOMIC_RELAXED);
    else bits[f >> 3] |= b;
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

/* keep[] of one row of model i's task vector delta[]: rank the entries, and keep entry e of rank
 * j iff its draw is below thr[j] */
INLINE void rank_row(const sparsifier *sp, int i, const float *delta, int64_t L, int64_t first, int64_t inner,
                     const uint32_t *thr, uint64_t *pairs, uint32_t *draws, unsigned char *keep) {
    uint64_t *sorted, at = sp->first + (uint64_t)first;
    int64_t j;
    for (j = 0; j < L; j++) draws[j] = draw24(sp->seed[i], at + (uint64_t)(j * inner));
    for (j = 0; j < L; j++) /* from the last entry, so that equal keys keep the higher index first */
        pairs[j] = ((uint64_t)abs_key(delta[L - 1 - j]) << 32) | (uint64_t)(L - 1 - j);
    sorted = L > 1 ? radix_sort(pairs, pairs + L, L) : pairs;
    for (j = 0; j < L; j++) { /* j: the rank from the smallest */
        uint32_t e = (uint32_t)sorted[j];
        keep[e] = draws[e] < thr[j];
    }
}

/* Model i's row of keep flags into its bitmap: whole bytes where the row has them to itself,
 * atomically where it may share one with another row (inner = 1); bit by bit otherwise. */
INLINE void store_bits(unsigned char *bits, const unsigned char *keep, int64_t L, int64_t first, int64_t inner) {
    int64_t j = 0, f;
    if (inner != 1) {
        for (j = 0; j < L; j++)
            if (keep[j]) set_bit(bits, first + j * inner, 1);
        return;
    }
    for (; j < L && ((first + j) & 7); j++)
        if (keep[j]) set_bit(bits, first + j, 1);
    for (; j + 8 <= L; j += 8) {
        unsigned char byte = 0;
        int q;
        for (q = 0; q < 8; q++) byte |= (unsigned char)((keep[j + q] != 0) << q);
        f = first + j;
        bits[f >> 3] = byte;
    }
    for (; j < L; j++)
        if (keep[j]) set_bit(bits, first + j, 1);
}

HOT static void pass_rank(void *p, int tid) {
    rank_pass *rp = (rank_pass *)p;
    const job_t *job = rp->job;
    sparsifier *sp = rp->sp;
    int64_t L = sp->length, inner = sp->inner, rows = sp->outer * inner, one = L > 0 ? L : 1;
    int64_t r0 = rows * tid / rp->nth, r1 = rows * (tid + 1) / rp->nth, row, j, released = r0 * L;
    uint64_t *pairs = (uint64_t *)malloc((size_t)one * 16);
    float *base = (float *)malloc((size_t)one * 4), *delta = (float *)malloc((size_t)one * 4);
    uint32_t *draws = (uint32_t *)malloc((size_t)one * 4);
    unsigned char *keep = (unsigned char *)malloc((size_t)one);
    int i;
    if (!pairs || !base || !delta || !draws || !keep) {
        rp->oom = 1;
        free(pairs), free(base), free(delta), free(draws), free(keep);
        return;
    }
    for (row = r0; row < r1; row++) {
        int64_t first = (row / inner) * L * inner + row % inner; /* flat index of the row's entry 0 */
        load_row(base, job, 0, first, L, inner);
        for (i = 0; i < sp->nmodels; i++) {
            if (sp->mode[i] != SPARSIFY_RANKED) continue;
            load_row(delta, job, i + 1, first, L, inner);
            for (j = 0; j < L; j++) delta[j] = delta[j] - base[j];
            rank_row(sp, i, delta, L, first, inner, rp->thr[i], pairs, draws, keep);
            store_bits(sp->bits[i], keep, L, first, inner);
            if (sp->rescale[i]) {
                wide *acc = rp->l1 + ((size_t)tid * sp->nmodels + i) * 2;
                int64_t a;
                for (a = 0; a < L; a += BLOCK)
                    l1_block(acc, acc + 1, delta + a, keep + a, (int)(L - a < BLOCK ? L - a : BLOCK));
            }
        }
        if (job->release && inner == 1 && (row + 1) * L - released >= RELEASE_EVERY) {
            for (i = 0; i < job->nin; i++)
                if (i == 0 || sp->mode[i - 1] == SPARSIFY_RANKED) release_span(job, i, released, (row + 1) * L);
            released = (row + 1) * L;
        }
    }
    free(pairs), free(base), free(delta), free(draws), free(keep);
}

/* thr[j] = ceil(pⱼ·2²⁴) for pⱼ = (d − ε) + (j / (L − 1))·2ε (d for L = 1), clamped to [0, 2²⁴]:
 * an integer draw D is below it iff D·2⁻²⁴ < pⱼ, the reference's float64 test. */
static void rank_thresholds(uint32_t *thr, double density, double epsilon, int64_t L) {
    double lo = density - epsilon, span = 2 * epsilon;
    int64_t j;
    for (j = 0; j < L; j++) {
        double p = L == 1 ? density : lo + ((double)j / (double)(L - 1)) * span, t = ceil(p * 0x1p24);
        thr[j] = t <= 0 ? 0u : t >= 0x1p24 ? (1u << 24) : (uint32_t)t;
    }
}

int ranked_prepare(const job_t *job, sparsifier *sp, void *l1) {
    rank_pass rp;
    int i, any = 0, rc = 0;
    memset(&rp, 0, sizeof(rp));
    rp.job = job, rp.sp = sp, rp.l1 = (wide *)l1, rp.nth = job->nth;
    sp->bits_bytes = (size_t)((job->n + 7) / 8);
    for (i = 0; i < sp->nmodels; i++)
        if (sp->mode[i] == SPARSIFY_RANKED) {
            any = 1;
            sp->bits[i] = (unsigned char *)zalloc(sp->bits_bytes);
            rp.thr[i] = (uint32_t *)malloc((size_t)(sp->length > 0 ? sp->length : 1) * 4);
            if (!sp->bits[i] || !rp.thr[i]) rc = -1;
            else rank_thresholds(rp.thr[i], sp->density[i], sp->epsilon[i], sp->length);
        }
    if (any && rc == 0) {
        run_threads(&rp, job, pass_rank);
        if (rp.oom) rc = -1;
    }
    for (i = 0; i < sp->nmodels; i++) free(rp.thr[i]);
    return rc;
}
