/* Private declarations shared by bcast.c (Broadcast) and latest.c (Latest).
 *
 * Both need the Python exception classes of shmkit.errors (handed in once by broadcast.py
 * through `bcast_set_errors`, so that C raises exactly the classes users catch), an
 * argument parser for METH_FASTCALL methods, and the cached process id.
 */
#ifndef SHMKIT_BCAST_H
#define SHMKIT_BCAST_H

#include "native.h"

/* Exception classes from shmkit.errors (strong references; NULL until set). */
typedef struct {
    PyObject *corrupt;     /* CorruptSegmentError */
    PyObject *lagged;      /* LaggedError(message, missed) */
    PyObject *evicted;     /* EvictedError */
    PyObject *empty;       /* Empty */
    PyObject *full;        /* Full */
    PyObject *closed;      /* QueueClosed */
    PyObject *too_large;   /* MessageTooLargeError */
    PyObject *pub_exists;  /* PublisherExistsError */
    PyObject *limit;       /* ResourceLimitError(errno, message, name) */
    PyObject *timeout;     /* WaitTimeoutError */
} shmkit_bcast_errors_t;

extern shmkit_bcast_errors_t shmkit_bcast_errors;

/* The class to raise: `cls` once broadcast.py handed it in, RuntimeError before that. */
static inline PyObject *shmkit_bcast_exc(PyObject *cls)
{
    return cls != NULL ? cls : PyExc_RuntimeError;
}

/* Parse a METH_FASTCALL|METH_KEYWORDS call: up to `n` parameters called `names`, given by
 * position or keyword; the first `required` are mandatory. Absent ones are left NULL in
 * `out` (borrowed references). Sets TypeError and returns -1 on a bad call. */
int shmkit_bcast_parse(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames, const char *const *names, int n, int required,
                       PyObject **out);

/* A Python timeout (None or seconds) in ns: -1 = forever. Returns -1 with an exception set on
 * a bad value, else 0. */
int shmkit_bcast_timeout(PyObject *timeout, int64_t *timeout_ns);

/* This process's id, cached (reset in a forked child). */
uint32_t shmkit_bcast_getpid(void);

int shmkit_init_latest(PyObject *module);

#endif
