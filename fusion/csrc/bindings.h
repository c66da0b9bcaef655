/* What the two binding files share (module.c, bindings.c): the argument parsers and the
 * bindings bindings.c defines for module.c's method table. */
#ifndef FUSION_BINDINGS_H
#define FUSION_BINDINGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "compose.h"

/* A composition of `size` bytes whose first member is its job (zeroed pages from mmap), the job
 * filled from out (an address) and inputs (a sequence of (address, dtype code) pairs, at least
 * min_inputs); NULL with a Python error set. */
void *new_job(size_t size, PyObject *out, int out_dt, long long n, PyObject *inputs, int min_inputs, int threads,
              int release);
/* count numbers of a sequence o, rounded to float32 */
int parse_floats(PyObject *o, float *dst, int count, const char *what);
/* A non-finite count as a Python int (MemoryError for -1) */
PyObject *result(int64_t bad);

PyObject *py_gram(PyObject *self, PyObject *args);
PyObject *py_combination(PyObject *self, PyObject *args);
PyObject *py_distance_blend(PyObject *self, PyObject *args);
PyObject *py_changed_mean(PyObject *self, PyObject *args);
PyObject *py_change_counts(PyObject *self, PyObject *args);
PyObject *py_outlier_merge(PyObject *self, PyObject *args);

#endif
