/* The compositions module.c and bindings.c bind: what each computes, its parameters, its entry point.
 *
 * Each is a struct whose first member is the job (common.h): the bindings fill it from Python, the
 * entry point runs every pass on the job's threads and returns the number of non-finite values
 * written (or -1 when out of memory). The entry points take no Python locks and call no Python.
 */
#ifndef FUSION_COMPOSE_H
#define FUSION_COMPOSE_H

#include "common.h"
#include "sparsify.h"

/* The weighted sum: out = base + scale·S, or scale·S without a base, with
 * S = Σᵢ wᵢ(θᵢ − base) divided by `divisor` when normalize; summed in model order with one fused
 * multiply-add per model, as Tensor.add_(t, alpha=w) does. */
typedef struct {
    job_t job;             /* the base, when there is one, is in[0] */
    int has_base;
    float w[MAX_INPUTS];   /* per input; w[0] is unused with a base */
    float scale, divisor;
    int normalize;
} sum_job;

int64_t weighted_sum_run(sum_job *s);

/* The sparse merge: the task-arithmetic family (TIES, DARE, breadcrumbs, DELLA, with or without
 * the sign election):
 *   δ̂ᵢ = sparsify(θᵢ − θ₀) (sparsify.h), times its rescale factor where one applies;
 *   with elect: xᵢ = wᵢ·δ̂ᵢ; s = +1 where Σ xᵢ ≥ 0, else −1; mᵢ = [sign(xᵢ) = s];
 *     out = θ₀ + scale · Σ mᵢxᵢ / D, with D = Σ mᵢwᵢ (0 → 1) when normalize, else D = 1;
 *   without: S = Σ wᵢδ̂ᵢ, summed as the weighted sum sums (a product, then fused multiply-adds),
 *     divided by `divisor` when normalize; out = θ₀ + scale·S by one more;
 *   and NaN wherever some δᵢ is not finite. */
typedef struct {
    job_t job;                       /* base in[0], models in[1..] */
    sparsifier sp;
    float w[MAX_INPUTS];             /* per model */
    float scale, divisor;
    int elect, normalize;
    unsigned char *mask[MAX_INPUTS]; /* optional: receive each model's keep mask */
} sparse_job;

int64_t sparse_merge_run(sparse_job *s);

/* The variance-selected merge (SCE):
 *   select S, the top floor(fraction · count_nonzero(v)) positions of the float32 population
 *   variance v of the δᵢ across models (all positions when fraction ≥ 1);
 *   ηᵢ = Σ(δᵢ⊙S)² / Σⱼ Σ(δⱼ⊙S)² (uniform when that is 0);
 *   δ̃ᵢ = δᵢ⊙S when mask_deltas, else δᵢ; s = +1 where Σ δ̃ᵢ ≥ 0, else −1; mᵢ = [sign(δ̃ᵢ) = s];
 *   out = θ₀ + scale · Σ ηᵢmᵢδ̃ᵢ / Σ ηᵢmᵢ (0 → 1). */
typedef struct {
    job_t job;                /* base in[0], models in[1..] */
    double fraction;
    int mask_deltas;
    float scale;
    unsigned char *mask;      /* optional: receives S */
    double energy_out[MAX_INPUTS]; /* Σ(δᵢ⊙S)², set by the run */
    /* the passes' own state */
    selector sel;
    int select, pass;
    float eta[MAX_INPUTS];
    uint64_t nonzero[MAX_THREADS];
    double energy[MAX_THREADS][MAX_INPUTS];
    double *elo;              /* [thread][low 16 bits][model] energies inside the k-th bucket */
    uint16_t *hi16;           /* the high 16 bits of every key, kept after the first pass */
} variance_job;

int64_t variance_merge_run(variance_job *v);

/* Tensors as vectors (fusion.api.vectors): the tensor is a row-major rows × cols matrix whose
 * vectors are its rows (the whole tensor: one row of n) or, with `columns`, its columns; xᵢ is
 * input i, or input i − base with a base. */
typedef struct {
    job_t job;                      /* the base in[0] when has_base, then the nv inputs */
    int has_base, nv, columns;
    int64_t rows, cols;
    double *out;                    /* [vectors][nv][nv]: xᵢ·xⱼ over each vector, in float64 */
    /* the passes' own state */
    int64_t vectors, unit_len, unit_lo[MAX_THREADS + 1];
    double *sums;
    size_t sums_bytes;
} gram_job;

/* Fill out (0, or -1 when out of memory); the sums' order does not depend on `threads`. */
int gram_run(gram_job *s, int threads);

/* out = Σᵢ cᵢ·xᵢ per vector, + base with a base, in float32: each product and each sum rounded,
 * the models in order, then the base added. */
typedef struct {
    job_t job;                      /* the base in[0] when has_base, then the inputs */
    int has_base, columns;
    int64_t rows, cols, vectors;
    const float *coef;              /* [input][vector] */
} combination_job;

int64_t combination_run(combination_job *s);

/* The distance blend (nearswap): per element w = clamp(t / max(|θ₀ − θ₁|, 1e-6), 0, 1) and
 * out = w·θ₁ + (1 − w)·θ₀. */
typedef struct {
    job_t job;                      /* θ₀ in[0], θ₁ in[1] */
    float t;
} blend_job;

int64_t distance_blend_run(blend_job *s);

/* Changed entries (RAM): νᵢ = |θᵢ − θ₀| > eps, c = Σ νᵢ per entry;
 *   out = θ₀ + Σᵢ νᵢδᵢ / max(c, 1), or with `scaled`, νᵢδᵢ·scale[i] where c = 1;
 * and per model the number of its changed entries that others change too (shared) or not. */
typedef struct {
    job_t job;                      /* base in[0], models in[1..] */
    float eps;
    int scaled;
    float scale[MAX_INPUTS];        /* per model, for its entries no other model changes */
    /* the counting pass's own state */
    int64_t shared[MAX_THREADS][MAX_INPUTS], unique[MAX_THREADS][MAX_INPUTS];
} changes_job;

int64_t changed_mean_run(changes_job *s);
void change_counts_run(changes_job *s, int64_t *shared, int64_t *unique);

/* The outlier-change merge (arcee_fusion), the tensor a rows × cols matrix:
 *   KL(row) = Σ p·log(p/q), p = softmax(θ₁'s row) + 1e-8, q = softmax(θ₀'s row) + 1e-8 (float64,
 *   rounded to float32); I = |θ₁ − θ₀|·KL(row); Q₁, Q₂, Q₃ the importances of rank ⌊q·(n−1)⌋;
 *   out = θ₀ + (θ₁ − θ₀)·[I ≥ Q₂ + 1.5·(Q₃ − Q₁)]. */
typedef struct {
    job_t job;                      /* θ₀ in[0], θ₁ in[1] */
    int64_t rows, cols;
    /* the passes' own state */
    job_t rows_job;                 /* the divergence pass: whole rows per thread */
    int64_t row_lo[MAX_THREADS + 1];
    float *kl, threshold;
    size_t kl_bytes, scratch_bytes;
    double *scratch[MAX_THREADS];
    uint32_t *hist, bucket[3];      /* the quartile search's count tables and buckets */
    size_t hist_bytes;
    int pass, nbuckets;
} outlier_job;

int64_t outlier_merge_run(outlier_job *s, int threads);

/* dst = src converted to dst's dtype, as the kernels store every result. */
void convert_run(const void *src, int src_dt, void *dst, int dst_dt, int64_t n, int threads);

#endif
