/* fusion.api._kernels: the Python bindings of the compositions (compose.h), and nothing else;
 * those of the per-vector, blend, changed-entry and outlier compositions are in bindings.c.
 *
 * Buffers arrive as integer addresses with dtype codes; fusion/api/kernels.py checks their sizes
 * and keeps their owners alive. Each binding fills a composition's job, runs it with the GIL
 * released and turns its result into Python values.
 */
#include "bindings.h"

static int check_dtype(long dt) {
    if (dt >= DT_F32 && dt <= DT_BF16) return 1;
    PyErr_SetString(PyExc_ValueError, "unsupported dtype code");
    return 0;
}

static int parse_dtype(PyObject *o, int *dt) {
    long v = PyLong_AsLong(o);
    if ((v == -1 && PyErr_Occurred()) || !check_dtype(v)) return 0;
    *dt = (int)v;
    return 1;
}

/* out: an address; inputs: a sequence of (address, dtype code) pairs, at least min_inputs */
static int parse_job(job_t *job, PyObject *out, int out_dt, long long n, PyObject *inputs, int min_inputs,
              int threads, int release) {
    PyObject *seq;
    Py_ssize_t i, count;
    job->out = PyLong_AsVoidPtr(out);
    if (PyErr_Occurred() || !check_dtype(out_dt)) return 0;
    job->out_dt = out_dt;
    job->release = release;
    if (!(seq = PySequence_Fast(inputs, "inputs must be a sequence"))) return 0;
    count = PySequence_Fast_GET_SIZE(seq);
    if (count < min_inputs || count > MAX_INPUTS) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "between %d and %d inputs are supported", min_inputs, MAX_INPUTS);
        return 0;
    }
    job->nin = (int)count;
    for (i = 0; i < count; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 2) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_TypeError, "each input must be an (address, dtype) pair");
            return 0;
        }
        job->in[i] = PyLong_AsVoidPtr(PyTuple_GET_ITEM(item, 0));
        if (PyErr_Occurred() || !parse_dtype(PyTuple_GET_ITEM(item, 1), &job->dt[i])) {
            Py_DECREF(seq);
            return 0;
        }
    }
    Py_DECREF(seq);
    job_split(job, n, threads);
    return 1;
}

int parse_floats(PyObject *o, float *dst, int count, const char *what) {
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

/* None, or a sequence of `count` addresses of n-byte bool buffers */
static int parse_masks(PyObject *o, unsigned char **dst, int count) {
    PyObject *seq;
    Py_ssize_t i;
    if (o == Py_None) return 1;
    if (!(seq = PySequence_Fast(o, "masks must be a sequence of addresses"))) return 0;
    if (PySequence_Fast_GET_SIZE(seq) != count) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "expected %d mask buffers", count);
        return 0;
    }
    for (i = 0; i < count; i++) {
        dst[i] = (unsigned char *)PyLong_AsVoidPtr(PySequence_Fast_GET_ITEM(seq, i));
        if (PyErr_Occurred()) {
            Py_DECREF(seq);
            return 0;
        }
    }
    Py_DECREF(seq);
    return 1;
}

/* One tuple per model: (mode, rescale, a, b, seed, density, epsilon), a and b being TOPK's
 * (k, 0), BAND's (skip + keep, skip), RANDOM's (threshold, 0); seed, density and epsilon are
 * RANDOM's and RANKED's. */
static int parse_sparsifier(sparsifier *sp, PyObject *params, int nmodels) {
    PyObject *seq;
    Py_ssize_t i;
    if (!(seq = PySequence_Fast(params, "sparsification parameters must be a sequence"))) return 0;
    if (PySequence_Fast_GET_SIZE(seq) != nmodels) {
        Py_DECREF(seq);
        PyErr_Format(PyExc_ValueError, "expected sparsification parameters for %d models", nmodels);
        return 0;
    }
    sp->nmodels = nmodels;
    for (i = 0; i < nmodels; i++) {
        PyObject *item = PySequence_Fast_GET_ITEM(seq, i);
        int mode, rescale;
        long long a, b;
        unsigned long long seed;
        if (!PyTuple_Check(item) || !PyArg_ParseTuple(item, "ipLLKdd", &mode, &rescale, &a, &b, &seed,
                                                       &sp->density[i], &sp->epsilon[i])) {
            Py_DECREF(seq);
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "each model's sparsification is a 7-tuple");
            return 0;
        }
        if (mode < SPARSIFY_NONE || mode > SPARSIFY_RANKED || a < 0 || b < 0 ||
            (mode == SPARSIFY_RANDOM && a > (1LL << 24))) {
            Py_DECREF(seq);
            PyErr_SetString(PyExc_ValueError, "bad sparsification parameters");
            return 0;
        }
        sp->mode[i] = mode;
        sp->rescale[i] = rescale;
        sp->k[i] = a;
        sp->skip[i] = b;
        sp->threshold[i] = (uint32_t)a;
        sp->seed[i] = (uint64_t)seed;
    }
    Py_DECREF(seq);
    return 1;
}

/* A composition's job: large (per-thread tables), so zeroed pages from mmap. */
void *new_job(size_t size, PyObject *out, int out_dt, long long n, PyObject *inputs, int min_inputs, int threads,
              int release) {
    job_t *job = (job_t *)zalloc(size);
    if (!job) return PyErr_NoMemory();
    if (!parse_job(job, out, out_dt, n, inputs, min_inputs, threads, release)) {
        zfree(job, size);
        return NULL;
    }
    return job;
}

PyObject *result(int64_t bad) {
    if (bad < 0) return PyErr_NoMemory();
    return PyLong_FromLongLong(bad);
}

/* weighted_sum(out, out_dtype, n, inputs, weights, has_base, scale, normalize, divisor, threads,
 * release) → non-finite count */
static PyObject *py_weighted_sum(PyObject *self, PyObject *args) {
    int out_dt, has_base, normalize, threads, release;
    long long n;
    PyObject *out, *inputs, *weights;
    double scale, divisor;
    sum_job *s;
    int64_t bad;
    if (!PyArg_ParseTuple(args, "OiLOOpdpdip", &out, &out_dt, &n, &inputs, &weights, &has_base, &scale,
                          &normalize, &divisor, &threads, &release))
        return NULL;
    if (!(s = (sum_job *)new_job(sizeof(sum_job), out, out_dt, n, inputs, has_base ? 2 : 1, threads, release)))
        return NULL;
    if (!parse_floats(weights, s->w + has_base, s->job.nin - has_base, "weights")) {
        zfree(s, sizeof(sum_job));
        return NULL;
    }
    s->has_base = has_base;
    s->scale = (float)scale;
    s->normalize = normalize;
    s->divisor = (float)divisor;
    Py_BEGIN_ALLOW_THREADS
    bad = weighted_sum_run(s);
    Py_END_ALLOW_THREADS
    zfree(s, sizeof(sum_job));
    return result(bad);
}

/* sparse_merge(out, out_dtype, n, inputs, weights, sparsifiers, first, (outer, length, inner),
 * elect, normalize, scale, divisor, threads, release, masks) → (non-finite count, [rescale factor
 * or None per model]) */
static PyObject *py_sparse_merge(PyObject *self, PyObject *args) {
    int out_dt, elect, normalize, threads, release, i;
    long long n, outer, length, inner;
    unsigned long long first;
    PyObject *out, *inputs, *weights, *params, *masks, *factors, *value = NULL;
    double scale, divisor;
    sparse_job *s;
    int64_t bad;
    if (!PyArg_ParseTuple(args, "OiLOOOK(LLL)ppddipO", &out, &out_dt, &n, &inputs, &weights, &params, &first,
                          &outer, &length, &inner, &elect, &normalize, &scale, &divisor, &threads, &release,
                          &masks))
        return NULL;
    if (outer < 0 || length < 0 || inner < 1 || outer * length * inner != n || length > 0xffffffffLL) {
        PyErr_SetString(PyExc_ValueError, "the rows do not cover the tensor");
        return NULL;
    }
    if (!(s = (sparse_job *)new_job(sizeof(sparse_job), out, out_dt, n, inputs, 2, threads, release))) return NULL;
    if (!parse_floats(weights, s->w, s->job.nin - 1, "weights") ||
        !parse_sparsifier(&s->sp, params, s->job.nin - 1) ||
        !parse_masks(masks, s->mask, s->job.nin - 1)) {
        zfree(s, sizeof(sparse_job));
        return NULL;
    }
    s->sp.first = (uint64_t)first;
    s->sp.outer = outer, s->sp.length = length, s->sp.inner = inner;
    s->elect = elect;
    s->normalize = normalize;
    s->scale = (float)scale;
    s->divisor = (float)divisor;
    Py_BEGIN_ALLOW_THREADS
    bad = sparse_merge_run(s);
    Py_END_ALLOW_THREADS
    if (bad < 0) {
        zfree(s, sizeof(sparse_job));
        return PyErr_NoMemory();
    }
    if ((factors = PyList_New(s->job.nin - 1))) {
        for (i = 0; i < s->job.nin - 1; i++) {
            PyObject *f = s->sp.scaled[i] ? PyFloat_FromDouble(s->sp.factor[i]) : Py_NewRef(Py_None);
            if (!f) break;
            PyList_SET_ITEM(factors, i, f);
        }
        if (i == s->job.nin - 1) value = Py_BuildValue("(LN)", (long long)bad, factors);
        else Py_DECREF(factors);
    }
    zfree(s, sizeof(sparse_job));
    return value;
}

/* variance_merge(out, out_dtype, n, inputs, fraction, mask_deltas, scale, threads, release, mask)
 * → (non-finite count, [Σ(δᵢ⊙S)² per model]) */
static PyObject *py_variance_merge(PyObject *self, PyObject *args) {
    int out_dt, mask_deltas, threads, release, i, nm;
    long long n;
    PyObject *out, *inputs, *mask, *energies, *value = NULL;
    double fraction, scale;
    variance_job *v;
    int64_t bad;
    if (!PyArg_ParseTuple(args, "OiLOdpdipO", &out, &out_dt, &n, &inputs, &fraction, &mask_deltas, &scale,
                          &threads, &release, &mask))
        return NULL;
    if (!(v = (variance_job *)new_job(sizeof(variance_job), out, out_dt, n, inputs, 2, threads, release))) return NULL;
    if (!parse_masks(mask, &v->mask, 1)) {
        zfree(v, sizeof(variance_job));
        return NULL;
    }
    v->fraction = fraction;
    v->mask_deltas = mask_deltas;
    v->scale = (float)scale;
    Py_BEGIN_ALLOW_THREADS
    bad = variance_merge_run(v);
    Py_END_ALLOW_THREADS
    nm = v->job.nin - 1;
    if (bad < 0) {
        zfree(v, sizeof(variance_job));
        return PyErr_NoMemory();
    }
    if ((energies = PyList_New(nm))) {
        for (i = 0; i < nm; i++) {
            PyObject *f = PyFloat_FromDouble(v->energy_out[i]);
            if (!f) break;
            PyList_SET_ITEM(energies, i, f);
        }
        if (i == nm) value = Py_BuildValue("(LN)", (long long)bad, energies);
        else Py_DECREF(energies);
    }
    zfree(v, sizeof(variance_job));
    return value;
}

/* topk_mask(key, dtype, n, k, mask, threads): the exact top-k mask of a key buffer */
static PyObject *py_topk_mask(PyObject *self, PyObject *args) {
    int dt, threads, rc;
    long long n, k;
    PyObject *key, *mask;
    const void *kp;
    unsigned char *mp;
    if (!PyArg_ParseTuple(args, "OiLLOi", &key, &dt, &n, &k, &mask, &threads)) return NULL;
    kp = PyLong_AsVoidPtr(key);
    mp = (unsigned char *)PyLong_AsVoidPtr(mask);
    if (PyErr_Occurred() || !check_dtype(dt)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    rc = topk_mask_run(kp, dt, n, k, mp, threads);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* convert(src, src_dtype, dst, dst_dtype, n, threads) */
static PyObject *py_convert(PyObject *self, PyObject *args) {
    PyObject *src, *dst;
    int sdt, ddt, threads;
    long long n;
    const void *s;
    void *d;
    if (!PyArg_ParseTuple(args, "OiOiLi", &src, &sdt, &dst, &ddt, &n, &threads)) return NULL;
    s = PyLong_AsVoidPtr(src);
    d = PyLong_AsVoidPtr(dst);
    if (PyErr_Occurred() || !check_dtype(sdt) || !check_dtype(ddt)) return NULL;
    Py_BEGIN_ALLOW_THREADS
    convert_run(s, sdt, d, ddt, n, threads);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* address(obj): where the bytes of a buffer-protocol object start (read-only ones too); the
 * caller keeps obj alive while the address is used */
static PyObject *py_address(PyObject *self, PyObject *obj) {
    Py_buffer view;
    PyObject *value;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0) return NULL;
    value = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return value;
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
    {"weighted_sum", py_weighted_sum, METH_VARARGS, "Weighted sum of inputs, with or without a base."},
    {"sparse_merge", py_sparse_merge, METH_VARARGS, "Sparsify task vectors, then elect signs or sum them."},
    {"variance_merge", py_variance_merge, METH_VARARGS, "Select by variance, weight by energy, erase signs."},
    {"gram", py_gram, METH_VARARGS, "Float64 Gram matrix of the inputs, per vector."},
    {"combination", py_combination, METH_VARARGS, "Float32 linear combination of the inputs, per vector."},
    {"distance_blend", py_distance_blend, METH_VARARGS, "Blend toward another input by t over the distance."},
    {"changed_mean", py_changed_mean, METH_VARARGS, "Mean of the changes over the models that make them."},
    {"change_counts", py_change_counts, METH_VARARGS, "Each model's shared and unique changed entries."},
    {"outlier_merge", py_outlier_merge, METH_VARARGS, "Keep the changes of outlying KL importance."},
    {"topk_mask", py_topk_mask, METH_VARARGS, "Exact top-k mask of a key buffer."},
    {"convert", py_convert, METH_VARARGS, "Convert between bf16, fp16 and fp32 buffers."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "fusion.api._kernels",
                                    "Compiled merge building blocks (see fusion.api.kernels).", -1, methods,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) { return PyModule_Create(&module); }
