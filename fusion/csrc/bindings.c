/* The bindings of the vector, blend, changed-entry and outlier compositions (compose.h), for
 * module.c's method table: each fills a composition's job, runs it with the GIL released and
 * turns its result into Python values. */
#include "bindings.h"

/* gram(inputs, has_base, rows, cols, columns, out, threads, release): the float64 Gram matrix of
 * every vector into out ([vectors][nv][nv] doubles) */
PyObject *py_gram(PyObject *self, PyObject *args) {
    int has_base, columns, threads, release, rc;
    long long rows, cols;
    PyObject *inputs, *out;
    gram_job *g;
    if (!PyArg_ParseTuple(args, "OpLLpOip", &inputs, &has_base, &rows, &cols, &columns, &out, &threads,
                          &release))
        return NULL;
    /* the job's own output is unused: the sums go to g->out */
    if (!(g = (gram_job *)new_job(sizeof(gram_job), out, DT_F32, rows * cols, inputs, has_base ? 2 : 1, threads,
                                  release)))
        return NULL;
    g->out = (double *)g->job.out;
    g->has_base = has_base;
    g->nv = g->job.nin - (has_base ? 1 : 0);
    g->columns = columns;
    g->rows = rows;
    g->cols = cols;
    Py_BEGIN_ALLOW_THREADS
    rc = gram_run(g, threads);
    Py_END_ALLOW_THREADS
    zfree(g, sizeof(gram_job));
    if (rc < 0) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* combination(out, out_dtype, inputs, has_base, rows, cols, columns, coef, threads, release)
 * → non-finite count; coef: [input][vector] floats */
PyObject *py_combination(PyObject *self, PyObject *args) {
    int out_dt, has_base, columns, threads, release;
    long long rows, cols;
    PyObject *out, *inputs, *coef;
    combination_job *c;
    int64_t bad;
    if (!PyArg_ParseTuple(args, "OiOpLLpOip", &out, &out_dt, &inputs, &has_base, &rows, &cols, &columns, &coef,
                          &threads, &release))
        return NULL;
    if (!(c = (combination_job *)new_job(sizeof(combination_job), out, out_dt, rows * cols, inputs,
                                         has_base ? 2 : 1, threads, release)))
        return NULL;
    c->coef = (const float *)PyLong_AsVoidPtr(coef);
    if (PyErr_Occurred()) {
        zfree(c, sizeof(combination_job));
        return NULL;
    }
    c->has_base = has_base;
    c->columns = columns;
    c->rows = rows;
    c->cols = cols;
    c->vectors = columns ? cols : rows;
    Py_BEGIN_ALLOW_THREADS
    bad = combination_run(c);
    Py_END_ALLOW_THREADS
    zfree(c, sizeof(combination_job));
    return result(bad);
}

/* distance_blend(out, out_dtype, n, inputs, t, threads, release) → non-finite count */
PyObject *py_distance_blend(PyObject *self, PyObject *args) {
    int out_dt, threads, release;
    long long n;
    PyObject *out, *inputs;
    double t;
    blend_job *s;
    int64_t bad;
    if (!PyArg_ParseTuple(args, "OiLOdip", &out, &out_dt, &n, &inputs, &t, &threads, &release)) return NULL;
    if (!(s = (blend_job *)new_job(sizeof(blend_job), out, out_dt, n, inputs, 2, threads, release))) return NULL;
    if (s->job.nin != 2) {
        zfree(s, sizeof(blend_job));
        PyErr_SetString(PyExc_ValueError, "the distance blend takes a base and one other input");
        return NULL;
    }
    s->t = (float)t;
    Py_BEGIN_ALLOW_THREADS
    bad = distance_blend_run(s);
    Py_END_ALLOW_THREADS
    zfree(s, sizeof(blend_job));
    return result(bad);
}

/* changed_mean(out, out_dtype, n, inputs, eps, scales or None, threads, release) → non-finite
 * count */
PyObject *py_changed_mean(PyObject *self, PyObject *args) {
    int out_dt, threads, release;
    long long n;
    PyObject *out, *inputs, *scales;
    double eps;
    changes_job *s;
    int64_t bad;
    if (!PyArg_ParseTuple(args, "OiLOdOip", &out, &out_dt, &n, &inputs, &eps, &scales, &threads, &release))
        return NULL;
    if (!(s = (changes_job *)new_job(sizeof(changes_job), out, out_dt, n, inputs, 2, threads, release))) return NULL;
    if (scales != Py_None && !parse_floats(scales, s->scale, s->job.nin - 1, "scales")) {
        zfree(s, sizeof(changes_job));
        return NULL;
    }
    s->eps = (float)eps;
    s->scaled = scales != Py_None;
    Py_BEGIN_ALLOW_THREADS
    bad = changed_mean_run(s);
    Py_END_ALLOW_THREADS
    zfree(s, sizeof(changes_job));
    return result(bad);
}

/* change_counts(n, inputs, eps, threads, release) → ([shared per model], [unique per model]) */
PyObject *py_change_counts(PyObject *self, PyObject *args) {
    int threads, release, i, nm;
    long long n;
    PyObject *inputs, *shared_list, *unique_list, *nowhere;
    double eps;
    changes_job *s;
    int64_t shared[MAX_INPUTS], unique[MAX_INPUTS];
    if (!PyArg_ParseTuple(args, "LOdip", &n, &inputs, &eps, &threads, &release)) return NULL;
    /* nothing is written: the job's output is address 0 */
    if (!(nowhere = PyLong_FromLong(0))) return NULL;
    s = (changes_job *)new_job(sizeof(changes_job), nowhere, DT_F32, n, inputs, 2, threads, release);
    Py_DECREF(nowhere);
    if (!s) return NULL;
    s->eps = (float)eps;
    Py_BEGIN_ALLOW_THREADS
    change_counts_run(s, shared, unique);
    Py_END_ALLOW_THREADS
    nm = s->job.nin - 1;
    zfree(s, sizeof(changes_job));
    shared_list = PyList_New(nm);
    unique_list = PyList_New(nm);
    if (!shared_list || !unique_list) {
        Py_XDECREF(shared_list);
        Py_XDECREF(unique_list);
        return NULL;
    }
    for (i = 0; i < nm; i++) {
        PyObject *a = PyLong_FromLongLong(shared[i]), *b = PyLong_FromLongLong(unique[i]);
        if (!a || !b) { /* out of memory: no list with a NULL item may escape */
            Py_XDECREF(a);
            Py_XDECREF(b);
            Py_DECREF(shared_list);
            Py_DECREF(unique_list);
            return NULL;
        }
        PyList_SET_ITEM(shared_list, i, a);
        PyList_SET_ITEM(unique_list, i, b);
    }
    return Py_BuildValue("(NN)", shared_list, unique_list);
}

/* outlier_merge(out, out_dtype, inputs, rows, cols, threads, release) → non-finite count */
PyObject *py_outlier_merge(PyObject *self, PyObject *args) {
    int out_dt, threads, release;
    long long rows, cols;
    PyObject *out, *inputs;
    outlier_job *s;
    int64_t bad;
    if (!PyArg_ParseTuple(args, "OiOLLip", &out, &out_dt, &inputs, &rows, &cols, &threads, &release)) return NULL;
    if (!(s = (outlier_job *)new_job(sizeof(outlier_job), out, out_dt, rows * cols, inputs, 2, threads, release)))
        return NULL;
    if (s->job.nin != 2) {
        zfree(s, sizeof(outlier_job));
        PyErr_SetString(PyExc_ValueError, "the outlier merge takes a base and one other input");
        return NULL;
    }
    s->rows = rows;
    s->cols = cols;
    Py_BEGIN_ALLOW_THREADS
    bad = outlier_merge_run(s, threads);
    Py_END_ALLOW_THREADS
    zfree(s, sizeof(outlier_job));
    return result(bad);
}

