/* Exact top-k selection by radix select over order keys (common.h).
 *
 * k positions are kept: those with the largest keys, ties at the k-th key in flat-index order
 * (fusion.api.selection.topk_mask). One pass counts the high 16 bits of every key; the bucket
 * that holds the k-th key is found from the counts; a second pass counts the low 16 bits of the
 * keys in that bucket, which gives the k-th key T exactly. Both tables are per thread, so the
 * counts of the ties at T in each thread's range say how many precede it: a thread can then
 * keep its share of the ties without seeing the others. Nothing proportional to the tensor is
 * allocated.
 */
#ifndef FUSION_SELECT_H
#define FUSION_SELECT_H

#include "common.h"

/* memset() fills a block's keep flags with SEL_NONE / SEL_ALL directly: they must be 0 and 1. */
enum { SEL_NONE = 0, SEL_ALL = 1, SEL_THRESHOLD = 2 };

typedef struct {
    int64_t k;
    int mode;           /* SEL_*: k = 0, k ≥ n, or a threshold to find */
    uint32_t bucket;    /* high 16 bits of the k-th key */
    uint32_t T;         /* the k-th key (minus one when every tie at it is kept) */
    uint32_t tl;        /* low 16 bits of the k-th key */
    uint64_t need;      /* how many keys equal to T are kept, in index order */
    int all_ties;       /* every key equal to the k-th is kept: keep key > T, no counting */
    int64_t above_hi;   /* keys in buckets above `bucket` */
    int nth;            /* threads the tables below were made for */
    uint32_t *hist_hi;  /* [nth][65536] */
    uint32_t *hist_lo;  /* [nth][65536] */
    uint64_t tie_start[MAX_THREADS]; /* keys equal to T before thread t's range */
} selector;

void sel_set_k(selector *s, int64_t k, int64_t n);
/* The two count tables; 0 when out of memory. */
int sel_alloc(selector *s, int nth);
void sel_free(selector *s);
/* After the high-bit pass: the bucket of the k-th key; 1 when a low-bit pass is needed. */
int sel_after_hi(selector *s, int nth);
/* After the low-bit pass: the k-th key, and where each thread's ties start. */
void sel_after_lo(selector *s, int nth);

/* This thread's count table for the high-bit or the low-bit pass */
INLINE uint32_t *sel_table(const selector *s, int low, int tid) {
    return (low ? s->hist_lo : s->hist_hi) + (size_t)tid * 65536;
}

INLINE void count_high(uint32_t *h, const uint32_t *key, int m) {
    int j;
    for (j = 0; j < m; j++) h[key[j] >> 16]++;
}

INLINE void count_low(uint32_t *h, uint32_t bucket, const uint32_t *key, int m) {
    int j;
    for (j = 0; j < m; j++)
        if ((key[j] >> 16) == bucket) h[key[j] & 0xffffu]++;
}

/* keep[j] for a block of keys, once the threshold is known; *ties counts the keys equal to T
 * seen so far in this thread's range (start it at tie_start[tid]). */
INLINE void sel_block(const selector *s, const uint32_t *key, int m, unsigned char *keep, uint64_t *ties) {
    uint32_t T = s->T;
    uint64_t c = *ties;
    int j;
    if (m <= 0) return;
    if (s->mode != SEL_THRESHOLD) {
        memset(keep, s->mode, (size_t)m);
        return;
    }
    for (j = 0; j < m; j++) keep[j] = key[j] > T;
    if (c < s->need) { /* some ties at T are still to be kept, in index order */
        for (j = 0; j < m && c < s->need; j++)
            if (key[j] == T) {
                keep[j] = 1;
                c++;
            }
        *ties = c;
    }
}

/* The keys of a block of positions [pos, pos + m): one row per selector. */
typedef void (*keys_fn)(void *arg, int64_t pos, int m, uint32_t (*key)[BLOCK]);

/* Find the threshold of every selector in SEL_THRESHOLD mode (k already set) with the passes
 * above, keys given by keys(arg, ...) on job's ranges; the count tables are freed again.
 * Returns 0, or -1 when out of memory. */
int select_thresholds(const job_t *job, selector *sel, int nsel, keys_fn keys, void *arg);

/* mask = topk_mask(key, k) over n keys of dtype dt. Returns 0, or -1 when out of memory. */
int topk_mask_run(const void *key, int dt, int64_t n, int64_t k, unsigned char *mask, int threads);

#endif
