/* The whole-tensor steps of the sparsifiers (sparsify.h): the top-k thresholds of TOPK and
 * BAND (select.h's counting passes over |δᵢ|), DELLA's ranked bitmaps (ranks.c), and the exact L1
 * norms of the models to rescale (l1.h), all before the merge pass. */
#include "l1.h"
#include "sparsify.h"
#include "sums.h"

/* |δᵢ| of every model, one row per model */
HOT static void magnitude_keys(void *arg, int64_t pos, int m, uint32_t (*key)[BLOCK]) {
    const job_t *job = (const job_t *)arg;
    float b[BLOCK], d[MAX_INPUTS][BLOCK];
    int i, j;
    delta_block(job, pos, m, b, d);
    for (i = 0; i < job->nin - 1; i++)
        for (j = 0; j < m; j++) key[i][j] = abs_key(d[i][j]);
}

typedef struct {
    const job_t *job;
    const sparsifier *sp;
    wide *l1; /* [thread][model][all, kept] */
} l1_pass;

/* The L1 tables of the models rescaled here (DELLA's come from its own pass). */
HOT static void pass_l1(void *p, int tid) {
    l1_pass *lp = (l1_pass *)p;
    const job_t *job = lp->job;
    const sparsifier *sp = lp->sp;
    float b[BLOCK], d[MAX_INPUTS][BLOCK];
    unsigned char keep[BLOCK];
    sparsify_cursor cursor;
    int64_t pos, next = job->lo[tid] + RELEASE_EVERY;
    int i;
    sparsify_start(sp, tid, &cursor);
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = block_len(job, tid, pos);
        delta_block(job, pos, m, b, d);
        for (i = 0; i < sp->nmodels; i++) {
            if (!sp->rescale[i] || sp->mode[i] == SPARSIFY_RANKED) continue;
            sparsify_block(sp, i, d[i], pos, m, keep, &cursor);
            wide *acc = lp->l1 + ((size_t)tid * sp->nmodels + i) * 2;
            l1_block(acc, acc + 1, d[i], keep, m);
        }
        release_step(job, tid, pos + m, &next);
    }
}

/* The rescale factors from the threads' L1 sums */
static void set_factors(const job_t *job, sparsifier *sp, const wide *l1) {
    int i, t;
    for (i = 0; i < sp->nmodels; i++) {
        wide all, kept;
        double before, after;
        sp->scaled[i] = 0;
        if (!sp->rescale[i]) continue;
        memset(&all, 0, sizeof(all));
        memset(&kept, 0, sizeof(kept));
        for (t = 0; t < job->nth; t++) {
            wide_merge(&all, &l1[((size_t)t * sp->nmodels + i) * 2]);
            wide_merge(&kept, &l1[((size_t)t * sp->nmodels + i) * 2 + 1]);
        }
        before = wide_value(&all);
        after = wide_value(&kept);
        if (before >= 1e-7 && after >= 1e-7) {
            sp->scaled[i] = 1;
            sp->factor[i] = (float)(before / after);
        }
    }
}

int sparsify_prepare(const job_t *job, sparsifier *sp) {
    int i, nsel = 0, any_l1 = 0, rc = 0;
    size_t l1_bytes = (size_t)job->nth * (size_t)sp->nmodels * 2 * sizeof(wide);
    wide *l1 = NULL;
    for (i = 0; i < sp->nmodels; i++) {
        sp->sel_row[i] = sp->sel_row[sp->nmodels + i] = i;
        if (sp->mode[i] == SPARSIFY_TOPK || sp->mode[i] == SPARSIFY_BAND) {
            sel_set_k(&sp->sel[i], sp->k[i], job->n);
            nsel += sp->sel[i].mode == SEL_THRESHOLD;
        }
        if (sp->mode[i] == SPARSIFY_BAND) {
            sel_set_k(&sp->sel[sp->nmodels + i], sp->skip[i], job->n);
            nsel += sp->sel[sp->nmodels + i].mode == SEL_THRESHOLD;
        }
        any_l1 |= sp->rescale[i];
    }
    if (nsel && select_thresholds(job, sp->sel, 2 * sp->nmodels, sp->sel_row, magnitude_keys, (void *)job) != 0)
        return -1;
    if (any_l1 && !(l1 = (wide *)zalloc(l1_bytes))) return -1;
    if (ranked_prepare(job, sp, l1) != 0) rc = -1;
    for (i = 0; i < sp->nmodels; i++)
        if (sp->rescale[i] && sp->mode[i] != SPARSIFY_RANKED) {
            l1_pass lp = {job, sp, l1};
            run_threads(&lp, job, pass_l1);
            break;
        }
    if (l1) {
        set_factors(job, sp, l1);
        zfree(l1, l1_bytes);
    }
    return rc;
}

void sparsify_free(sparsifier *sp) {
    int i;
    for (i = 0; i < sp->nmodels; i++) {
        zfree(sp->bits[i], sp->bits_bytes);
        sp->bits[i] = NULL;
    }
}
