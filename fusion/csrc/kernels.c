/* Compiled merge kernels: task arithmetic / linear, TIES and SCE over raw tensor buffers.
 *
 * Inputs are bf16, fp16 or fp32 buffers (typically read-only memory maps of safetensors files),
 * the output is a buffer of the output dtype. Every value is computed in float32 in exactly the
 * order of the torch reference (fusion/default_plugins/), so results agree bit for bit with it
 * up to the order of SCE's float64 sums of squares; the last step rounds to nearest even as
 * torch's cast does. Build with -ffp-contract=off: a fused multiply-add is used only where the
 * reference uses one (Tensor.add_ with alpha), through fmaf().
 *
 * Top-k selection is a radix select over order-preserving 32-bit patterns of the float keys: one
 * histogram of the high 16 bits, one of the low 16 bits inside the bucket that holds the k-th key,
 * then the ties at the k-th key are kept in flat-index order. Work is split into one contiguous
 * range per thread; the ranges stay fixed across the passes of one call, so each thread knows how
 * many ties precede its range. No pass allocates anything proportional to the tensor.
 *
 * Threads are plain pthreads started with the GIL released.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && !defined(__APPLE__) && !defined(FUSION_PORTABLE)
/* Compile the hot loops for AVX-512 and AVX2 machines too (wider vectors; fmaf() is one
 * instruction with FMA, a library call without); the loader picks the best the CPU runs.
 * -DFUSION_PORTABLE builds the baseline only. */
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

enum { DT_F32 = 0, DT_F16 = 1, DT_BF16 = 2 };
#define MAX_INPUTS 64
#define MAX_THREADS 256
#define BLOCK 512
#define RELEASE_EVERY (1 << 18) /* elements between two page releases of a thread's range */
#define HI16_MAX ((int64_t)1 << 28)  /* SCE keeps its keys' high bits up to this many elements */

/* ------------------------------------------------------------------------------------------ */
/* Conversions (exact; round to nearest even; NaN stays NaN) */

static inline float bits_f32(uint32_t u) { float f; memcpy(&f, &u, 4); return f; }
static inline uint32_t f32_bits(float f) { uint32_t u; memcpy(&u, &f, 4); return u; }

static inline float bf16_to_f32(uint16_t h) { return bits_f32((uint32_t)h << 16); }

static inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f), r = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? (u >> 16) | 0x40u : r); /* NaN stays quiet NaN */
}

static inline float f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1fu, m = h & 0x3ffu;
    if (e == 0x1f) return bits_f32(sign | 0x7f800000u | (m << 13));
    if (e) return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
    return bits_f32(sign | f32_bits((float)m * 5.9604644775390625e-8f)); /* m · 2^-24, exact */
}

static inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_bits(f), sign = (u >> 16) & 0x8000u, a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return (uint16_t)(sign | 0x7e00u | ((a >> 13) & 0x3ffu));
    if (a >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* ≥ 65520 rounds to infinity */
    if (a >= 0x38800000u) {                                   /* a normal half */
        uint32_t h = (((a >> 23) - 112u) << 10) | ((a & 0x7fffffu) >> 13), rest = a & 0x1fffu;
        if (rest > 0x1000u || (rest == 0x1000u && (h & 1u))) h++; /* a carry into the exponent is right */
        return (uint16_t)(sign | h);
    }
    /* subnormal half: round |f|·2^24 (exact product) to an integer, ties to even, by adding 2^23 */
    float scaled = bits_f32(a) * 16777216.0f;
    volatile float big = scaled + 8388608.0f; /* volatile: keep the rounding step */
    return (uint16_t)(sign | (uint32_t)(big - 8388608.0f));
}

static inline float load1(const void *p, int dt, int64_t i) {
    switch (dt) {
    case DT_BF16: return bf16_to_f32(((const uint16_t *)p)[i]);
    case DT_F16: return f16_to_f32(((const uint16_t *)p)[i]);
    default: return ((const float *)p)[i];
    }
}

static inline __attribute__((always_inline)) void load_block(float *dst, const void *p, int dt, int64_t off, int m) {
    int j;
    if (dt == DT_F32) {
        memcpy(dst, (const float *)p + off, (size_t)m * 4);
    } else if (dt == DT_BF16) {
        const uint16_t *s = (const uint16_t *)p + off;
        for (j = 0; j < m; j++) dst[j] = bits_f32((uint32_t)s[j] << 16);
    } else {
        const uint16_t *s = (const uint16_t *)p + off;
        for (j = 0; j < m; j++) dst[j] = f16_to_f32(s[j]);
    }
}

/* Store a block in the output dtype; return how many stored values are not finite. */
static inline __attribute__((always_inline)) int64_t store_block(void *p, int dt, int64_t off, const float *src, int m) {
    int64_t bad = 0;
    int j;
    if (dt == DT_F32) {
        float *d = (float *)p + off;
        for (j = 0; j < m; j++) {
            d[j] = src[j];
            bad += (f32_bits(src[j]) & 0x7f800000u) == 0x7f800000u;
        }
    } else if (dt == DT_BF16) {
        uint16_t *d = (uint16_t *)p + off;
        for (j = 0; j < m; j++) {
            uint16_t h = f32_to_bf16(src[j]);
            d[j] = h;
            bad += (h & 0x7f80u) == 0x7f80u;
        }
    } else {
        uint16_t *d = (uint16_t *)p + off;
        for (j = 0; j < m; j++) {
            uint16_t h = f32_to_f16(src[j]);
            d[j] = h;
            bad += (h & 0x7c00u) == 0x7c00u;
        }
    }
    return bad;
}

static inline int dt_size(int dt) { return dt == DT_F32 ? 4 : 2; }

/* Order-preserving key: a > b as floats ⇔ key(a) > key(b) as integers; -0.0 equals 0.0 and
 * every NaN equals every other NaN and ranks above +inf, as fusion.selection.topk_mask has it. */
static inline uint32_t order_key(float f) {
    uint32_t u = f32_bits(f), mag = u & 0x7fffffffu;
    uint32_t k = (u >> 31) && mag ? ~u : (mag | 0x80000000u);
    return mag > 0x7f800000u ? 0xffc00000u : k;
}

/* The key of |x|: order_key(fabsf(x)) */
static inline uint32_t abs_key(float f) {
    uint32_t mag = f32_bits(f) & 0x7fffffffu;
    return mag > 0x7f800000u ? 0xffc00000u : (mag | 0x80000000u);
}

/* ------------------------------------------------------------------------------------------ */
/* Threads */

typedef struct job job_t;
typedef void (*pass_fn)(job_t *, int tid);

typedef struct {
    job_t *job;
    int tid;
    pass_fn fn;
} worker_arg;

static void *worker_main(void *p) {
    worker_arg *a = (worker_arg *)p;
    a->fn(a->job, a->tid);
    return NULL;
}

static int run_threads(job_t *job, int nth, pass_fn fn) {
    pthread_t th[MAX_THREADS];
    worker_arg args[MAX_THREADS];
    int started = 0, t;
    for (t = 0; t < nth; t++) args[t] = (worker_arg){job, t, fn};
    for (t = 1; t < nth; t++) {
        if (pthread_create(&th[t], NULL, worker_main, &args[t]) != 0) break;
        started = t;
    }
    /* threads that could not start are run here, in turn */
    for (t = started + 1; t < nth; t++) fn(job, t);
    fn(job, 0);
    for (t = 1; t <= started; t++) pthread_join(th[t], NULL);
    return 0;
}

/* ------------------------------------------------------------------------------------------ */
/* Selection state: keep exactly k positions, the largest keys, ties in flat-index order */

typedef struct {
    int64_t k;
    int mode;           /* 0: keep none, 1: keep all, 2: by threshold */
    uint32_t bucket;    /* high 16 bits of the k-th key */
    uint32_t T;         /* the k-th key */
    uint64_t need;      /* how many keys equal to T are kept, in index order */
    int64_t above_hi;   /* keys in buckets above `bucket` */
    int nth;            /* threads the tables below were made for */
    uint32_t *hist_hi;  /* [nth][65536] */
    uint32_t *hist_lo;  /* [nth][65536] */
    uint64_t tie_start[MAX_THREADS];
    uint32_t tl;        /* low 16 bits of T */
    int all_ties;       /* every key equal to T is kept */
} selector;

/* keep[j] for a block of keys; *ties counts the keys equal to T seen so far in this range. */
static inline __attribute__((always_inline)) void sel_block(const selector *s, const uint32_t *key, int m, unsigned char *keep, uint64_t *ties) {
    uint32_t T = s->T;
    uint64_t c = *ties;
    int j;
    if (m <= 0) return;
    if (s->mode != 2) {
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

struct job {
    int64_t n;
    int nth;
    int nin;                     /* inputs, base first when there is one */
    const void *in[MAX_INPUTS];
    int dt[MAX_INPUTS];
    void *out;
    int out_dt;
    int release;
    int64_t lo[MAX_THREADS + 1]; /* thread t works on [lo[t], lo[t+1]) */
    int64_t bad[MAX_THREADS];    /* non-finite outputs per thread */
    /* parameters */
    int kind;                    /* KIND_* below */
    float w[MAX_INPUTS];
    float lam, divisor;
    int normalize, scope_all, select;
    selector *sel;               /* one per model (TIES) or one (SCE) */
    int nsel;
    int pass;
    uint64_t nonzero[MAX_THREADS];
    double energy[MAX_THREADS][MAX_INPUTS];
    double *elo;                 /* SCE: [thread][low 16 bits][model] energies inside the bucket */
    float eta[MAX_INPUTS];
    unsigned char *mask[MAX_INPUTS]; /* optional: selection masks written by the final pass */
    uint16_t *hi16;              /* SCE: the high 16 bits of every key, kept after the first pass */
};

enum { KIND_LINEAR, KIND_TASK, KIND_TIES, KIND_SCE, KIND_SELECT };
enum { PASS_HI, PASS_LO, PASS_ENERGY, PASS_MERGE };

/* Drop the pages of [lo, upto) of every input from this process: they are read-only maps of files,
 * so the data stays in the page cache and resident memory stays flat on huge tensors. */
static void release_upto(job_t *job, int tid, int64_t upto) {
    long page = sysconf(_SC_PAGESIZE);
    int i;
    if (!job->release) return;
    for (i = 0; i < job->nin; i++) {
        uintptr_t a = (uintptr_t)job->in[i] + (uintptr_t)(job->lo[tid] * dt_size(job->dt[i]));
        uintptr_t b = (uintptr_t)job->in[i] + (uintptr_t)(upto * dt_size(job->dt[i]));
        a = (a + page - 1) & ~(uintptr_t)(page - 1);
        b &= ~(uintptr_t)(page - 1);
        if (b > a) madvise((void *)a, b - a, MADV_DONTNEED);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Elementwise: linear and task arithmetic, exactly as the reference orders them */

HOT static void pass_elementwise(job_t *job, int tid) {
    float buf[2][BLOCK], acc[BLOCK];
    int64_t pos, next_release = job->lo[tid] + RELEASE_EVERY, bad = 0;
    int has_base = job->kind == KIND_TASK, first = has_base ? 1 : 0, i, j;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = (int)(job->lo[tid + 1] - pos < BLOCK ? job->lo[tid + 1] - pos : BLOCK);
        float *b = buf[0], *t = buf[1];
        if (has_base) load_block(b, job->in[0], job->dt[0], pos, m);
        for (i = first; i < job->nin; i++) {
            float w = job->w[i];
            load_block(t, job->in[i], job->dt[i], pos, m);
            if (has_base)
                for (j = 0; j < m; j++) t[j] = t[j] - b[j];
            if (i == first)
                for (j = 0; j < m; j++) acc[j] = t[j] * w;
            else
                for (j = 0; j < m; j++) acc[j] = fmaf(t[j], w, acc[j]);
        }
        if (job->normalize)
            for (j = 0; j < m; j++) acc[j] = acc[j] / job->divisor;
        if (has_base)
            for (j = 0; j < m; j++) acc[j] = fmaf(acc[j], job->lam, b[j]);
        bad += store_block(job->out, job->out_dt, pos, acc, m);
        if (pos + m >= next_release) {
            release_upto(job, tid, pos + m);
            next_release = pos + m + RELEASE_EVERY;
        }
    }
    job->bad[tid] = bad;
}

/* ------------------------------------------------------------------------------------------ */
/* Keys: TIES ranks |θᵢ − θ₀| per model, SCE the float32 population variance of the deltas */

/* v = (1/N)·Σᵢ (δᵢ − μ)², μ = (1/N)·Σᵢ δᵢ in float64, models in order, rounded to float32. */
static inline __attribute__((always_inline)) void variance_block(float (*d)[BLOCK], int nmodels, int m, float *v) {
    double s[BLOCK], q[BLOCK];
    int i, j;
    for (j = 0; j < m; j++) s[j] = 0.0, q[j] = 0.0;
    for (i = 0; i < nmodels; i++)
        for (j = 0; j < m; j++) s[j] = s[j] + (double)d[i][j];
    for (j = 0; j < m; j++) s[j] = s[j] / nmodels; /* the mean */
    for (i = 0; i < nmodels; i++)
        for (j = 0; j < m; j++) {
            double c = (double)d[i][j] - s[j];
            q[j] = q[j] + c * c;
        }
    for (j = 0; j < m; j++) v[j] = (float)(q[j] / nmodels);
}

/* The deltas of a block: d[i] = θᵢ − θ₀ for the models i = 0..N-1 (inputs 1..N). */
static inline __attribute__((always_inline)) void delta_block(job_t *job, int64_t pos, int m, float *b, float (*d)[BLOCK]) {
    int i, j;
    load_block(b, job->in[0], job->dt[0], pos, m);
    for (i = 1; i < job->nin; i++) {
        load_block(d[i - 1], job->in[i], job->dt[i], pos, m);
        for (j = 0; j < m; j++) d[i - 1][j] = d[i - 1][j] - b[j];
    }
}

/* SCE's keys of a block after the first pass, from the kept high bits: exact where those equal
 * the bucket of the k-th key, elsewhere only ordered right against it (all ones above, 0 below),
 * which is all the later passes compare. The variance is computed as variance_block does. */
static inline __attribute__((always_inline)) void cached_keys(job_t *job, int64_t pos, int m,
                                                              float (*d)[BLOCK], uint32_t *key) {
    const uint16_t *h = job->hi16 + pos;
    uint32_t bucket = job->sel->bucket;
    int i, j, nmodels = job->nin - 1;
    for (j = 0; j < m; j++) key[j] = h[j] > bucket ? 0xffffffffu : 0u;
    for (j = 0; j < m; j++)
        if (h[j] == bucket) {
            double s = 0.0, q = 0.0, mean;
            for (i = 0; i < nmodels; i++) s = s + (double)d[i][j];
            mean = s / nmodels;
            for (i = 0; i < nmodels; i++) {
                double c = (double)d[i][j] - mean;
                q = q + c * c;
            }
            key[j] = order_key((float)(q / nmodels));
        }
}

/* The selection keys of a block: one row per selector. */
static inline __attribute__((always_inline)) void key_block(job_t *job, int64_t pos, int m, float *b, float (*d)[BLOCK], uint32_t (*key)[BLOCK]) {
    int s, j;
    if (job->kind == KIND_SELECT) {
        load_block(d[0], job->in[0], job->dt[0], pos, m);
        for (j = 0; j < m; j++) key[0][j] = order_key(d[0][j]);
    } else if (job->kind == KIND_TIES) {
        delta_block(job, pos, m, b, d);
        for (s = 0; s < job->nsel; s++)
            for (j = 0; j < m; j++) key[s][j] = abs_key(d[s][j]);
    } else if (job->hi16 && job->pass != PASS_HI) {
        delta_block(job, pos, m, b, d);
        cached_keys(job, pos, m, d, key[0]);
    } else {
        float v[BLOCK];
        delta_block(job, pos, m, b, d);
        variance_block(d, job->nin - 1, m, v);
        for (j = 0; j < m; j++) key[0][j] = order_key(v[j]);
    }
}

/* Σⱼ x², x = d[j] where keep(j): eight partial sums, so that the loop vectorizes. */
static inline __attribute__((always_inline)) double sum_squares(const float *d, const unsigned char *keep,
                                                                const uint32_t *key, uint32_t above, int m) {
    double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0}, e = 0.0;
    int j = 0, u;
    for (; j + 8 <= m; j += 8)
        for (u = 0; u < 8; u++) {
            int on = keep ? keep[j + u] : (key[j + u] >> 16) > above;
            double x = on ? (double)d[j + u] : 0.0;
            acc[u] += x * x;
        }
    for (; j < m; j++) {
        int on = keep ? keep[j] : (key[j] >> 16) > above;
        double x = on ? (double)d[j] : 0.0;
        e += x * x;
    }
    for (u = 0; u < 8; u++) e += acc[u];
    return e;
}

/* A pass over the keys only: high-bit histograms (plus the count of non-zero keys), or low-bit
 * histograms of the keys in each selector's bucket. */
HOT static void pass_keys(job_t *job, int tid) {
    float b[BLOCK], d[MAX_INPUTS][BLOCK];
    uint32_t key[MAX_INPUTS][BLOCK];
    uint32_t *hist[MAX_INPUTS], bucket[MAX_INPUTS];
    int active[MAX_INPUTS], nactive = 0;
    int64_t pos, next_release = job->lo[tid] + RELEASE_EVERY;
    uint64_t nonzero = 0;
    double above_energy[MAX_INPUTS];
    int s, i, j, a, nmodels = job->nin - 1;
    for (i = 0; i < nmodels; i++) above_energy[i] = 0.0;
    for (s = 0; s < job->nsel; s++) {
        selector *sel = &job->sel[s];
        if (sel->mode != 2) continue;
        hist[nactive] = (job->pass == PASS_HI ? sel->hist_hi : sel->hist_lo) + (size_t)tid * 65536;
        bucket[nactive] = sel->bucket;
        active[nactive++] = s;
    }
    for (pos = job->lo[tid]; nactive && pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = (int)(job->lo[tid + 1] - pos < BLOCK ? job->lo[tid + 1] - pos : BLOCK);
        key_block(job, pos, m, b, d, key);
        if (job->pass == PASS_HI) {
            for (a = 0; a < nactive; a++) {
                const uint32_t *k = key[active[a]];
                uint32_t *h = hist[a];
                for (j = 0; j < m; j++) h[k[j] >> 16]++;
            }
            if (job->kind != KIND_TIES)
                for (j = 0; j < m; j++) nonzero += key[0][j] != 0x80000000u;
            if (job->hi16)
                for (j = 0; j < m; j++) job->hi16[pos + j] = (uint16_t)(key[0][j] >> 16);
        } else {
            for (a = 0; a < nactive; a++) {
                const uint32_t *k = key[active[a]];
                uint32_t *h = hist[a], hi = bucket[a];
                for (j = 0; j < m; j++)
                    if ((k[j] >> 16) == hi) h[k[j] & 0xffffu]++;
            }
            if (job->elo) {
                /* SCE's energies come with this pass: the keys above the bucket are selected
                 * whatever the threshold; inside it, they are summed per low 16 bits */
                const uint32_t *k = key[0];
                uint32_t hi = bucket[0];
                double *elo = job->elo + (size_t)tid * 65536 * nmodels;
                for (i = 0; i < nmodels; i++) above_energy[i] += sum_squares(d[i], NULL, k, hi, m);
                for (j = 0; j < m; j++)
                    if ((k[j] >> 16) == hi) {
                        double *row = elo + (size_t)(k[j] & 0xffffu) * nmodels;
                        for (i = 0; i < nmodels; i++) row[i] += (double)d[i][j] * (double)d[i][j];
                    }
            }
        }
        if (pos + m >= next_release) {
            release_upto(job, tid, pos + m);
            next_release = pos + m + RELEASE_EVERY;
        }
    }
    job->nonzero[tid] = nonzero;
    if (job->elo)
        for (i = 0; i < nmodels; i++) job->energy[tid][i] = above_energy[i];
}

/* ------------------------------------------------------------------------------------------ */
/* The final passes, written as loops over a block so that the compiler vectorizes them */

HOT static void pass_ties(job_t *job, int tid) {
    float b[BLOCK], d[MAX_INPUTS][BLOCK], sum[BLOCK], total[BLOCK], divisor[BLOCK], r[BLOCK];
    uint32_t key[BLOCK];
    unsigned char keep[BLOCK];
    uint64_t ties[MAX_INPUTS];
    int64_t pos, next_release = job->lo[tid] + RELEASE_EVERY, bad = 0;
    int i, j, nmodels = job->nin - 1;
    for (i = 0; i < nmodels; i++) ties[i] = job->sel[i].tie_start[tid];
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = (int)(job->lo[tid + 1] - pos < BLOCK ? job->lo[tid + 1] - pos : BLOCK);
        delta_block(job, pos, m, b, d);
        for (j = 0; j < m; j++) sum[j] = 0.0f, total[j] = 0.0f, divisor[j] = 0.0f;
        /* trim, then weigh: x = w·δ̂ (in place); s is elected by Σ x */
        for (i = 0; i < nmodels; i++) {
            float w = job->w[i], *x = d[i];
            for (j = 0; j < m; j++) key[j] = abs_key(x[j]);
            sel_block(&job->sel[i], key, m, keep, &ties[i]);
            if (job->mask[i]) memcpy(job->mask[i] + pos, keep, (size_t)m);
            for (j = 0; j < m; j++) x[j] = w * (keep[j] ? x[j] : 0.0f);
            for (j = 0; j < m; j++) sum[j] = sum[j] + x[j];
        }
        /* disjoint merge: sign(x) = s, where sign(0) = sign(NaN) = 0 never agrees */
        for (i = 0; i < nmodels; i++) {
            float w = job->w[i], *x = d[i];
            for (j = 0; j < m; j++) {
                int agrees = sum[j] >= 0.0f ? x[j] > 0.0f : x[j] < 0.0f;
                total[j] = total[j] + (agrees ? x[j] : 0.0f);
                divisor[j] = divisor[j] + (agrees ? w : 0.0f);
            }
        }
        if (job->normalize)
            for (j = 0; j < m; j++) total[j] = total[j] / (divisor[j] == 0.0f ? 1.0f : divisor[j]);
        for (j = 0; j < m; j++) r[j] = b[j] + job->lam * total[j];
        bad += store_block(job->out, job->out_dt, pos, r, m);
        if (pos + m >= next_release) {
            release_upto(job, tid, pos + m);
            next_release = pos + m + RELEASE_EVERY;
        }
    }
    job->bad[tid] = bad;
}

HOT static void pass_sce(job_t *job, int tid) {
    float b[BLOCK], d[MAX_INPUTS][BLOCK], v[BLOCK], sum[BLOCK], total[BLOCK], divisor[BLOCK], r[BLOCK];
    uint32_t key[BLOCK];
    unsigned char keep[BLOCK];
    double energy[MAX_INPUTS];
    uint64_t ties = job->sel->tie_start[tid];
    int64_t pos, next_release = job->lo[tid] + RELEASE_EVERY, bad = 0;
    int i, j, nmodels = job->nin - 1, merge = job->pass == PASS_MERGE;
    for (i = 0; i < nmodels; i++) energy[i] = 0.0;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = (int)(job->lo[tid + 1] - pos < BLOCK ? job->lo[tid + 1] - pos : BLOCK);
        delta_block(job, pos, m, b, d);
        if (job->select) {
            if (job->hi16) {
                cached_keys(job, pos, m, d, key);
            } else {
                variance_block(d, nmodels, m, v);
                for (j = 0; j < m; j++) key[j] = order_key(v[j]);
            }
            sel_block(job->sel, key, m, keep, &ties);
        } else {
            memset(keep, 1, (size_t)m);
        }
        if (!merge) {
            /* energies Σ(δᵢ⊙S)²: the square of a float32 is exact in float64 */
            for (i = 0; i < nmodels; i++) energy[i] += sum_squares(d[i], keep, NULL, 0, m);
        } else {
            if (job->mask[0]) memcpy(job->mask[0] + pos, keep, (size_t)m);
            if (job->select && job->scope_all)
                for (i = 0; i < nmodels; i++)
                    for (j = 0; j < m; j++) d[i][j] = keep[j] ? d[i][j] : 0.0f;
            for (j = 0; j < m; j++) sum[j] = 0.0f, total[j] = 0.0f, divisor[j] = 0.0f;
            for (i = 0; i < nmodels; i++)
                for (j = 0; j < m; j++) sum[j] = sum[j] + d[i][j];
            for (i = 0; i < nmodels; i++) {
                float eta = job->eta[i], *x = d[i];
                for (j = 0; j < m; j++) {
                    int agrees = sum[j] >= 0.0f ? x[j] > 0.0f : x[j] < 0.0f;
                    total[j] = total[j] + (agrees ? eta * x[j] : 0.0f);
                    divisor[j] = divisor[j] + (agrees ? eta : 0.0f);
                }
            }
            for (j = 0; j < m; j++)
                r[j] = b[j] + job->lam * (total[j] / (divisor[j] == 0.0f ? 1.0f : divisor[j]));
            bad += store_block(job->out, job->out_dt, pos, r, m);
        }
        if (pos + m >= next_release) {
            release_upto(job, tid, pos + m);
            next_release = pos + m + RELEASE_EVERY;
        }
    }
    if (merge) job->bad[tid] = bad;
    else for (i = 0; i < nmodels; i++) job->energy[tid][i] = energy[i];
}

/* SCE: add to e[] the energies of the first `quota` keys equal to T in thread t's range. */
HOT static void tie_energy(job_t *job, int t, uint64_t quota, double *e) {
    float b[BLOCK], d[MAX_INPUTS][BLOCK], v[BLOCK];
    int64_t pos;
    int i, j, nmodels = job->nin - 1;
    for (pos = job->lo[t]; quota && pos < job->lo[t + 1]; pos += BLOCK) {
        int m = (int)(job->lo[t + 1] - pos < BLOCK ? job->lo[t + 1] - pos : BLOCK);
        delta_block(job, pos, m, b, d);
        variance_block(d, nmodels, m, v);
        for (j = 0; j < m && quota; j++)
            if (order_key(v[j]) == job->sel->T) {
                quota--;
                for (i = 0; i < nmodels; i++) e[i] += (double)d[i][j] * (double)d[i][j];
            }
    }
}

HOT static void pass_select(job_t *job, int tid) {
    float v[BLOCK];
    uint32_t key[BLOCK];
    uint64_t ties = job->sel->tie_start[tid];
    int64_t pos;
    int j;
    for (pos = job->lo[tid]; pos < job->lo[tid + 1]; pos += BLOCK) {
        int m = (int)(job->lo[tid + 1] - pos < BLOCK ? job->lo[tid + 1] - pos : BLOCK);
        load_block(v, job->in[0], job->dt[0], pos, m);
        for (j = 0; j < m; j++) key[j] = order_key(v[j]);
        sel_block(job->sel, key, m, job->mask[0] + pos, &ties);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Driving a selection: k → threshold, from the histograms of the passes */

/* Zeroed tables straight from the kernel: their pages are only materialized where counted, and
 * never cleared by hand (calloc would clear them once malloc reuses freed memory). */
static void *zalloc(size_t bytes) {
    void *p = mmap(NULL, bytes ? bytes : 1, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    return p == MAP_FAILED ? NULL : p;
}

static void zfree(void *p, size_t bytes) {
    if (p) munmap(p, bytes ? bytes : 1);
}

static int sel_alloc(selector *s, int nth) {
    s->nth = nth;
    s->hist_hi = (uint32_t *)zalloc((size_t)nth * 65536 * 4);
    s->hist_lo = (uint32_t *)zalloc((size_t)nth * 65536 * 4);
    return s->hist_hi && s->hist_lo;
}

static void sel_free(selector *s) {
    zfree(s->hist_hi, (size_t)s->nth * 65536 * 4);
    zfree(s->hist_lo, (size_t)s->nth * 65536 * 4);
    s->hist_hi = s->hist_lo = NULL;
}

static void sel_set_k(selector *s, int64_t k, int64_t n) {
    s->k = k;
    s->mode = k <= 0 ? 0 : (k >= n ? 1 : 2);
}

/* After PASS_HI: the bucket of the k-th largest key. Returns 1 when a PASS_LO is needed. */
static int sel_after_hi(selector *s, int nth) {
    int64_t above = 0, t;
    int b;
    if (s->mode != 2) return 0;
    for (b = 65535; b >= 0; b--) {
        int64_t c = 0;
        for (t = 0; t < nth; t++) c += s->hist_hi[(size_t)t * 65536 + b];
        if (above + c >= s->k) break;
        above += c;
    }
    s->bucket = (uint32_t)b;
    s->above_hi = above;
    return 1;
}

/* After PASS_LO: the k-th key and where each thread's ties start. */
static void sel_after_lo(selector *s, int nth) {
    int64_t above = s->above_hi, c = 0, t;
    int b;
    for (b = 65535; b >= 0; b--) {
        c = 0;
        for (t = 0; t < nth; t++) c += s->hist_lo[(size_t)t * 65536 + b];
        if (above + c >= s->k) break;
        above += c;
    }
    s->T = (s->bucket << 16) | (uint32_t)b;
    s->tl = (uint32_t)b;
    s->need = (uint64_t)(s->k - above);
    s->all_ties = s->need == (uint64_t)c;
    if (s->all_ties) { /* every tie is kept: keep key ≥ T, no counting (T > 0 as k < n) */
        s->T -= 1;
        s->need = 0;
    }
    for (t = 0, c = 0; t < nth; t++) {
        s->tie_start[t] = (uint64_t)c;
        c += s->hist_lo[(size_t)t * 65536 + b];
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Python glue */

static int parse_dtype(PyObject *o, int *dt) {
    long v = PyLong_AsLong(o);
    if (v == -1 && PyErr_Occurred()) return 0;
    if (v < DT_F32 || v > DT_BF16) {
        PyErr_SetString(PyExc_ValueError, "unsupported dtype code");
        return 0;
    }
    *dt = (int)v;
    return 1;
}

/* inputs: a sequence of (address, dtype code) pairs */
static int parse_inputs(job_t *job, PyObject *inputs) {
    PyObject *seq = PySequence_Fast(inputs, "inputs must be a sequence");
    Py_ssize_t i, n;
    if (!seq) return 0;
    n = PySequence_Fast_GET_SIZE(seq);
    if (n < 1 || n > MAX_INPUTS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "between 1 and %d inputs are supported", MAX_INPUTS);
        return 0;
    }
    job->nin = (int)n;
    for (i = 0; i < n; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        PyObject *addr, *dt;
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "each input must be an (address, dtype) pair");
            return 0;
        }
        addr = PyTuple_GET_ITEM(item, 0);
        dt = PyTuple_GET_ITEM(item, 1);
        job->in[i] = PyLong_AsVoidPtr(addr);
        if (PyErr_Occurred() || !parse_dtype(dt, &job->dt[i])) {
            Py_DECREF(seq);
            return 0;
        }
    }
    Py_DECREF(seq);
    return 1;
}

static int parse_floats(PyObject *o, float *dst, int count, const char *what) {
    PyObject *seq = PySequence_Fast(o, "expected a sequence of numbers");
    Py_ssize_t i;
    if (!seq) return 0;
    if (PySequence_Fast_GET_SIZE(seq) != count) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "%s: expected %d values", what, count);
        return 0;
    }
    for (i = 0; i < count; i++) {
        /* a Python float scalar meets a float32 tensor as a float32 value, as in torch */
        dst[i] = (float)PyFloat_AsDouble(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            return 0;
        }
    }
    Py_DECREF(seq);
    return 1;
}

static int parse_masks(job_t *job, PyObject *o, int count) {
    PyObject *seq;
    Py_ssize_t i;
    if (o == Py_None) return 1;
    seq = PySequence_Fast(o, "masks must be a sequence of addresses");
    if (!seq) return 0;
    if (PySequence_Fast_GET_SIZE(seq) != count) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "expected %d mask buffers", count);
        return 0;
    }
    for (i = 0; i < count; i++) {
        job->mask[i] = (unsigned char *)PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            return 0;
        }
    }
    Py_DECREF(seq);
    return 1;
}

/* Split [0, n) into one range per thread; small tensors get fewer threads. */
static void split(job_t *job, int threads) {
    int64_t per_thread_min = 1 << 16;
    int t, nth = threads < 1 ? 1 : (threads > MAX_THREADS ? MAX_THREADS : threads);
    if (job->n / per_thread_min + 1 < nth) nth = (int)(job->n / per_thread_min + 1);
    /* each thread's histogram counts are 32-bit */
    while (nth < MAX_THREADS && job->n / nth >= ((int64_t)1 << 32) - 1) nth++;
    job->nth = nth;
    for (t = 0; t <= nth; t++) job->lo[t] = job->n / nth * t + (job->n % nth) * t / nth;
    job->lo[nth] = job->n;
}

static int64_t total_bad(job_t *job) {
    int64_t s = 0;
    int t;
    for (t = 0; t < job->nth; t++) s += job->bad[t];
    return s;
}

/* A job is large (per-thread tables): zeroed pages from mmap cost nothing until touched. */
static job_t *new_job(void) {
    job_t *job = (job_t *)zalloc(sizeof(job_t));
    if (!job) PyErr_NoMemory();
    return job;
}

static void free_job(job_t *job) { zfree(job, sizeof(job_t)); }

/* elementwise(kind, out, out_dtype, n, inputs, weights, lam, normalize, divisor, threads, release) */
static PyObject *py_elementwise(PyObject *self, PyObject *args) {
    int kind, out_dt, normalize, threads, release;
    long long n;
    PyObject *out, *inputs, *weights;
    double lam, divisor;
    job_t *job;
    int64_t bad;
    if (!PyArg_ParseTuple(args, "iOiLOOdpdip", &kind, &out, &out_dt, &n, &inputs, &weights, &lam,
                          &normalize, &divisor, &threads, &release))
        return NULL;
    if (!(job = new_job())) return NULL;
    job->kind = kind ? KIND_TASK : KIND_LINEAR;
    job->out = PyLong_AsVoidPtr(out);
    if (PyErr_Occurred() || !parse_inputs(job, inputs) || !parse_floats(weights, job->w, job->nin, "weights")) {
        free_job(job);
        return NULL;
    }
    if (job->kind == KIND_TASK && job->nin < 2) {
        free_job(job);
        PyErr_SetString(PyExc_ValueError, "task arithmetic needs a base and at least one model");
        return NULL;
    }
    job->out_dt = out_dt;
    job->n = n;
    job->lam = (float)lam;
    job->normalize = normalize;
    job->divisor = (float)divisor;
    job->release = release;
    split(job, threads);
    Py_BEGIN_ALLOW_THREADS
    run_threads(job, job->nth, pass_elementwise);
    Py_END_ALLOW_THREADS
    bad = total_bad(job);
    free_job(job);
    return PyLong_FromLongLong(bad);
}

/* Run the two histogram passes of every selector that needs them. */
static void select_thresholds(job_t *job) {
    int s, need_lo = 0;
    job->pass = PASS_HI;
    run_threads(job, job->nth, pass_keys);
    for (s = 0; s < job->nsel; s++) need_lo |= sel_after_hi(&job->sel[s], job->nth);
    if (need_lo) {
        job->pass = PASS_LO;
        run_threads(job, job->nth, pass_keys);
        for (s = 0; s < job->nsel; s++)
            if (job->sel[s].mode == 2) sel_after_lo(&job->sel[s], job->nth);
    }
}

/* ties(out, out_dtype, n, inputs, weights, ks, lam, normalize, threads, release, masks) */
static PyObject *py_ties(PyObject *self, PyObject *args) {
    int out_dt, normalize, threads, release, s, ok = 1;
    long long n;
    PyObject *out, *inputs, *weights, *ks, *masks, *kseq;
    double lam;
    job_t *job;
    selector *sels;
    int64_t bad;
    if (!PyArg_ParseTuple(args, "OiLOOOdpipO", &out, &out_dt, &n, &inputs, &weights, &ks, &lam,
                          &normalize, &threads, &release, &masks))
        return NULL;
    if (!(job = new_job())) return NULL;
    job->out = PyLong_AsVoidPtr(out);
    if (PyErr_Occurred() || !parse_inputs(job, inputs)) {
        free_job(job);
        return NULL;
    }
    if (job->nin < 2 || !parse_floats(weights, job->w, job->nin - 1, "weights") ||
        !parse_masks(job, masks, job->nin - 1)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "TIES needs a base and at least one model");
        free_job(job);
        return NULL;
    }
    job->kind = KIND_TIES;
    job->out_dt = out_dt;
    job->n = n;
    job->lam = (float)lam;
    job->normalize = normalize;
    job->release = release;
    job->nsel = job->nin - 1;
    split(job, threads);
    sels = (selector *)calloc((size_t)job->nsel, sizeof(selector));
    kseq = PySequence_Fast(ks, "ks must be a sequence");
    if (!sels || !kseq || PySequence_Fast_GET_SIZE(kseq) != job->nsel) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "one k per model is needed");
        Py_XDECREF(kseq);
        free(sels);
        free_job(job);
        return NULL;
    }
    for (s = 0; s < job->nsel && ok; s++) {
        long long k = PyLong_AsLongLong(PySequence_Fast_GET_ITEM(kseq, s));
        if (PyErr_Occurred()) ok = 0;
        sel_set_k(&sels[s], k, n);
        if (sels[s].mode == 2 && !sel_alloc(&sels[s], job->nth)) {
            PyErr_NoMemory();
            ok = 0;
        }
    }
    Py_DECREF(kseq);
    job->sel = sels;
    if (ok) {
        Py_BEGIN_ALLOW_THREADS
        select_thresholds(job);
        for (s = 0; s < job->nsel; s++) sel_free(&sels[s]);
        job->pass = PASS_MERGE;
        run_threads(job, job->nth, pass_ties);
        Py_END_ALLOW_THREADS
    }
    for (s = 0; s < job->nsel; s++) sel_free(&sels[s]);
    bad = total_bad(job);
    free(sels);
    free_job(job);
    if (!ok) return NULL;
    return PyLong_FromLongLong(bad);
}

/* sce(out, out_dtype, n, inputs, tau, scope_all, lam, threads, release, masks) → (bad, energies) */
static PyObject *py_sce(PyObject *self, PyObject *args) {
    int out_dt, scope_all, threads, release, i, t, ok = 1;
    long long n;
    PyObject *out, *inputs, *masks, *energies = NULL, *result = NULL;
    double tau, lam, e[MAX_INPUTS], total = 0.0;
    int energy_done;
    double tie_e[MAX_INPUTS];
    selector sel;
    job_t *job;
    if (!PyArg_ParseTuple(args, "OiLOdpdipO", &out, &out_dt, &n, &inputs, &tau, &scope_all, &lam,
                          &threads, &release, &masks))
        return NULL;
    if (!(job = new_job())) return NULL;
    memset(&sel, 0, sizeof(sel));
    job->out = PyLong_AsVoidPtr(out);
    if (PyErr_Occurred() || !parse_inputs(job, inputs)) {
        free_job(job);
        return NULL;
    }
    if (job->nin < 2 || !parse_masks(job, masks, 1)) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "SCE needs a base and at least one model");
        free_job(job);
        return NULL;
    }
    job->kind = KIND_SCE;
    job->out_dt = out_dt;
    job->n = n;
    job->lam = (float)lam;
    job->scope_all = scope_all;
    job->release = release;
    job->select = tau < 1.0;
    job->sel = &sel;
    job->nsel = 1;
    split(job, threads);
    if (job->select && !sel_alloc(&sel, job->nth)) {
        sel_free(&sel);
        free_job(job);
        return PyErr_NoMemory();
    }
    /* 2 bytes per element spare recomputing the float64 variance in the later passes */
    if (job->select && n > 0 && n <= HI16_MAX) job->hi16 = (uint16_t *)zalloc((size_t)n * 2);
    Py_BEGIN_ALLOW_THREADS
    if (job->select) {
        uint64_t nonzero = 0;
        int64_t k;
        double product;
        sel.mode = 2; /* count the keys first; k depends on how many are non-zero */
        job->pass = PASS_HI;
        run_threads(job, job->nth, pass_keys);
        for (t = 0; t < job->nth; t++) nonzero += job->nonzero[t];
        /* k = floor(τ · count_nonzero(v)), the float64 product of fusion.selection.topk_count */
        product = floor(tau * (double)nonzero);
        k = product < 0 ? 0 : (product > (double)nonzero ? (int64_t)nonzero : (int64_t)product);
        sel_set_k(&sel, k, n);
        if (sel_after_hi(&sel, job->nth)) {
            job->elo = job->nin - 1 <= 8 ? (double *)zalloc((size_t)job->nth * 65536 * (job->nin - 1) * 8) : NULL;
            job->pass = PASS_LO;
            run_threads(job, job->nth, pass_keys);
            sel_after_lo(&sel, job->nth);
        }
    } else {
        sel.mode = 1;
    }
    energy_done = sel.mode == 0 || (sel.mode == 2 && job->elo);
    if (!energy_done) {
        job->pass = PASS_ENERGY;
        run_threads(job, job->nth, pass_sce);
    }
    for (i = 0; i < MAX_INPUTS; i++) tie_e[i] = 0.0;
    if (sel.mode == 2 && job->elo) {
        /* ties at T: each thread's are all kept, none, or (one thread) the first few */
        int nm = job->nin - 1;
        for (t = 0; t < job->nth; t++) {
            uint64_t count = sel.hist_lo[(size_t)t * 65536 + sel.tl];
            uint64_t kept = sel.all_ties ? count
                            : (sel.need > sel.tie_start[t] ? sel.need - sel.tie_start[t] : 0);
            if (kept >= count)
                for (i = 0; i < nm; i++) tie_e[i] += job->elo[((size_t)t * 65536 + sel.tl) * nm + i];
            else if (kept)
                tie_energy(job, t, kept, tie_e);
        }
    }
    Py_END_ALLOW_THREADS
    /* η from the energies exactly as the reference's Python arithmetic */
    for (i = 0; i < job->nin - 1; i++) {
        e[i] = 0.0;
        if (sel.mode == 0) continue; /* nothing selected */
        for (t = 0; t < job->nth; t++) e[i] += job->energy[t][i];
        if (energy_done) { /* the selected part of the bucket: low bits above those of T, then T */
            uint32_t lo;
            int nm = job->nin - 1;
            for (t = 0; t < job->nth; t++)
                for (lo = sel.tl + 1; lo < 65536; lo++) e[i] += job->elo[((size_t)t * 65536 + lo) * nm + i];
            e[i] += tie_e[i];
        }
        total = total + e[i];
    }
    zfree(job->elo, (size_t)job->nth * 65536 * (job->nin - 1) * 8);
    job->elo = NULL;
    for (i = 0; i < job->nin - 1; i++)
        job->eta[i] = (float)(total == 0.0 ? 1.0 / (job->nin - 1) : e[i] / total);
    Py_BEGIN_ALLOW_THREADS
    job->pass = PASS_MERGE;
    run_threads(job, job->nth, pass_sce);
    Py_END_ALLOW_THREADS
    energies = PyList_New(job->nin - 1);
    for (i = 0; energies && i < job->nin - 1; i++) {
        PyObject *f = PyFloat_FromDouble(e[i]);
        if (!f) ok = 0;
        else PyList_SET_ITEM(energies, i, f);
    }
    if (energies && ok) result = Py_BuildValue("(LN)", (long long)total_bad(job), energies);
    else Py_XDECREF(energies);
    sel_free(&sel);
    if (job->hi16) zfree(job->hi16, (size_t)n * 2);
    free_job(job);
    return result;
}

/* select(key, dtype, n, k, mask, threads): the exact top-k mask of a float key buffer */
static PyObject *py_select(PyObject *self, PyObject *args) {
    int dt, threads;
    long long n, k;
    PyObject *key, *mask;
    selector sel;
    job_t *job;
    if (!PyArg_ParseTuple(args, "OiLLOi", &key, &dt, &n, &k, &mask, &threads)) return NULL;
    if (!(job = new_job())) return NULL;
    memset(&sel, 0, sizeof(sel));
    job->in[0] = PyLong_AsVoidPtr(key);
    job->mask[0] = (unsigned char *)PyLong_AsVoidPtr(mask);
    if (PyErr_Occurred()) {
        free_job(job);
        return NULL;
    }
    job->nin = 1;
    job->dt[0] = dt;
    job->n = n;
    job->kind = KIND_SELECT;
    job->sel = &sel;
    job->nsel = 1;
    split(job, threads);
    sel_set_k(&sel, k, n);
    if (sel.mode == 2 && !sel_alloc(&sel, job->nth)) {
        sel_free(&sel);
        free_job(job);
        return PyErr_NoMemory();
    }
    Py_BEGIN_ALLOW_THREADS
    if (sel.mode == 2) select_thresholds(job);
    run_threads(job, job->nth, pass_select);
    Py_END_ALLOW_THREADS
    sel_free(&sel);
    free_job(job);
    Py_RETURN_NONE;
}

/* convert(src, src_dtype, dst, dst_dtype, n): the casts the kernels use, for testing */
static PyObject *py_convert(PyObject *self, PyObject *args) {
    PyObject *src, *dst;
    int sdt, ddt;
    long long n, i;
    const void *s;
    void *d;
    if (!PyArg_ParseTuple(args, "OiOiL", &src, &sdt, &dst, &ddt, &n)) return NULL;
    s = PyLong_AsVoidPtr(src);
    d = PyLong_AsVoidPtr(dst);
    if (PyErr_Occurred()) return NULL;
    for (i = 0; i < n; i++) {
        float f = load1(s, sdt, i);
        store_block(d, ddt, i, &f, 1);
    }
    Py_RETURN_NONE;
}

/* address(obj): where the bytes of a buffer-protocol object start (read-only ones too); the
 * caller keeps obj alive while the address is used */
static PyObject *py_address(PyObject *self, PyObject *obj) {
    Py_buffer view;
    PyObject *result;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    result = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return result;
}

/* empty(nbytes): an uninitialized bytearray (the kernels overwrite every byte) */
static PyObject *py_empty(PyObject *self, PyObject *arg) {
    Py_ssize_t n = PyLong_AsSsize_t(arg);
    if (n == -1 && PyErr_Occurred()) return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "a size cannot be negative");
        return NULL;
    }
    return PyByteArray_FromStringAndSize(NULL, n);
}

static PyMethodDef methods[] = {
    {"address", py_address, METH_O, "The address of a buffer's bytes."},
    {"empty", py_empty, METH_O, "An uninitialized bytearray."},
    {"elementwise", py_elementwise, METH_VARARGS, "Linear / task arithmetic over raw buffers."},
    {"ties", py_ties, METH_VARARGS, "TIES over raw buffers."},
    {"sce", py_sce, METH_VARARGS, "SCE over raw buffers."},
    {"select", py_select, METH_VARARGS, "Exact top-k mask of a key buffer."},
    {"convert", py_convert, METH_VARARGS, "Convert between bf16, fp16 and fp32 buffers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fusion.api._kernels",
                                    "Compiled merge kernels (see fusion.kernels).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
