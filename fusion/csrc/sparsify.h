/* Per-model sparsification of task vectors: which entries of each δᵢ = θᵢ − θ₀ a merge keeps.
 *
 * A sparsifier has a whole-tensor step (sparsify_prepare: e.g. the top-k thresholds, found by
 * the counting passes of select.h) and a block step (sparsify_block: keep[j] for one model's
 * entries, in any thread, from a per-thread cursor). A merge that composes with it
 * (sparse_merge.c) only ever sees keep[]. New modes slot in here:
 *   - random drop with rescale (DARE): keep with probability 1 − pᵢ from a counter-based
 *     generator of (seed, model, position), so that any thread can draw any block, and rescale
 *     the kept entries by 1/(1 − pᵢ);
 *   - a magnitude band (breadcrumbs): two selectors per model, drop the top βᵢ and keep the
 *     next γᵢ by |δᵢ|;
 *   - rank-based drop probabilities (DELLA): keep probabilities from the rank of |δᵢ|.
 */
#ifndef FUSION_SPARSIFY_H
#define FUSION_SPARSIFY_H

#include "select.h"

enum { SPARSIFY_NONE = 0, SPARSIFY_TOPK = 1 };

typedef struct {
    int mode;                  /* SPARSIFY_*, the same for every model */
    int nmodels;
    int64_t k[MAX_INPUTS];     /* TOPK: kᵢ entries of δᵢ kept, the largest |δᵢ| */
    selector sel[MAX_INPUTS];  /* TOPK: the threshold on |δᵢ| */
} sparsifier;

/* The whole-tensor step, over the job's base (in[0]) and models (in[1..]). Returns 0, or -1
 * when out of memory. */
int sparsify_prepare(const job_t *job, sparsifier *sp);

/* Where thread tid's cursor for model i starts. */
INLINE uint64_t sparsify_cursor(const sparsifier *sp, int i, int tid) {
    return sp->mode == SPARSIFY_TOPK ? sp->sel[i].tie_start[tid] : 0;
}

/* keep[j] for the entries x[0..m) of model i's task vector, in flat order within a thread. */
INLINE void sparsify_block(const sparsifier *sp, int i, const float *x, int m, unsigned char *keep,
                           uint64_t *cursor) {
    uint32_t key[BLOCK];
    int j;
    if (sp->mode == SPARSIFY_TOPK) {
        for (j = 0; j < m; j++) key[j] = abs_key(x[j]);
        sel_block(&sp->sel[i], key, m, keep, cursor);
    } else {
        memset(keep, 1, (size_t)m);
    }
}

#endif
