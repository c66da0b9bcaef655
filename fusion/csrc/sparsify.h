/* Per-model sparsification of task vectors: which entries of each δᵢ = θᵢ − θ₀ a merge keeps,
 * and the factor that rescales the kept ones to δᵢ's L1 norm. The rules are those of
 * fusion.api.sparsify, mask for mask:
 *   - TOPK (TIES): the kᵢ entries of largest |δᵢ|, ties at the kᵢ-th to the lower index;
 *   - BAND (breadcrumbs): the largest kᵢ minus the largest skipᵢ, by the same order;
 *   - RANDOM (DARE): entry j iff draw24(seedᵢ, first + j) < thresholdᵢ (draws.h);
 *   - RANKED (DELLA): entry j iff its draw is below pⱼ = (dᵢ − εᵢ) + 2εᵢ·ρⱼ, ρⱼ its normalised
 *     rank of |δᵢ| within its row (ranks.c);
 *   - NONE: every entry.
 * A sparsifier has whole-tensor steps (sparsify_prepare: the top-k thresholds by the counting
 * passes of select.h, DELLA's ranks, the rescale sums) and a block step (sparsify_block: keep[j]
 * for one model's entries, from a per-thread cursor), so a merge that composes with it
 * (sparse_merge.c) only ever sees keep[] and the factors.
 */
#ifndef FUSION_SPARSIFY_H
#define FUSION_SPARSIFY_H

#include "draws.h"
#include "select.h"

enum { SPARSIFY_NONE = 0, SPARSIFY_TOPK = 1, SPARSIFY_BAND = 2, SPARSIFY_RANDOM = 3, SPARSIFY_RANKED = 4 };

typedef struct {
    int nmodels;
    int mode[MAX_INPUTS];            /* SPARSIFY_*, per model */
    int64_t k[MAX_INPUTS];           /* TOPK: entries kept; BAND: skip + kept */
    int64_t skip[MAX_INPUTS];        /* BAND: the largest entries dropped */
    uint64_t seed[MAX_INPUTS];       /* RANDOM, RANKED: the model's stream */
    uint32_t threshold[MAX_INPUTS];  /* RANDOM: keep iff the draw is below it */
    double density[MAX_INPUTS], epsilon[MAX_INPUTS]; /* RANKED */
    uint64_t first;                  /* the draws' index of element 0 */
    int64_t outer, length, inner;    /* RANKED: rows of `length` entries, `inner` apart */
    int rescale[MAX_INPUTS];         /* rescale this model's kept entries */
    /* set by sparsify_prepare */
    int scaled[MAX_INPUTS];          /* the factor applies (both L1 norms ≥ 1e-7) */
    float factor[MAX_INPUTS];        /* Σ|δᵢ| / Σ|mᵢ⊙δᵢ| rounded to float32 */
    selector sel[2 * MAX_INPUTS];    /* TOPK, BAND: the kᵢ threshold at [i], BAND's skip at [nmodels + i] */
    int sel_row[2 * MAX_INPUTS];     /* the model each selector ranks */
    unsigned char *bits[MAX_INPUTS]; /* RANKED: keep bitmaps (bit j of byte j/8) */
    size_t bits_bytes;
} sparsifier;

/* The whole-tensor steps, over the job's base (in[0]) and models (in[1..]). Returns 0, or -1
 * when out of memory. */
int sparsify_prepare(const job_t *job, sparsifier *sp);
/* Frees what sparsify_prepare allocated. */
void sparsify_free(sparsifier *sp);

/* DELLA's keep bitmaps and the L1 sums of the ranked models (ranks.c); l1 is
 * [thread][model][all, kept] (l1.h), zeroed. Returns 0, or -1 when out of memory. */
int ranked_prepare(const job_t *job, sparsifier *sp, void *l1);

/* A thread's cursors: how many keys equal to each selector's threshold precede its range. */
typedef struct {
    uint64_t ties[2 * MAX_INPUTS];
} sparsify_cursor;

INLINE void sparsify_start(const sparsifier *sp, int tid, sparsify_cursor *c) {
    int i;
    for (i = 0; i < 2 * sp->nmodels; i++) c->ties[i] = sp->sel[i].mode == SEL_THRESHOLD ? sp->sel[i].tie_start[tid] : 0;
}

/* keep[j] for the entries x[0..m) at positions pos.. of model i's task vector, in flat order
 * within a thread. */
INLINE void sparsify_block(const sparsifier *sp, int i, const float *x, int64_t pos, int m, unsigned char *keep,
                           sparsify_cursor *c) {
    uint32_t key[BLOCK];
    unsigned char drop[BLOCK];
    int j;
    switch (sp->mode[i]) {
    case SPARSIFY_TOPK:
    case SPARSIFY_BAND:
        for (j = 0; j < m; j++) key[j] = abs_key(x[j]);
        sel_block(&sp->sel[i], key, m, keep, &c->ties[i]);
        if (sp->mode[i] == SPARSIFY_BAND) {
            sel_block(&sp->sel[sp->nmodels + i], key, m, drop, &c->ties[sp->nmodels + i]);
            for (j = 0; j < m; j++) keep[j] = keep[j] & !drop[j];
        }
        break;
    case SPARSIFY_RANDOM:
        draw_below(sp->seed[i], sp->first + (uint64_t)pos, sp->threshold[i], m, keep);
        break;
    case SPARSIFY_RANKED:
        for (j = 0; j < m; j++) keep[j] = (sp->bits[i][(pos + j) >> 3] >> ((pos + j) & 7)) & 1;
        break;
    default:
        memset(keep, 1, (size_t)m);
    }
}

#endif
