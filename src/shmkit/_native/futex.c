/* Shared (not private) futex wait/wake, and the spin-then-sleep wait that every blocking
 * shmkit call is built on. See futex(2): FUTEX_WAIT sleeps only while *word == expected, so a
 * wake-up between our check and the syscall is never lost. */
#include "native.h"

#include <errno.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

/* Waits in the main thread are cut into slices so that Ctrl-C is seen promptly: signals are
 * handled by the main thread only, and the kernel may deliver SIGINT to another thread. */
#define SHMKIT_MAIN_SLICE_NS (50 * 1000 * 1000LL)

static unsigned long main_thread_ident;
static int64_t default_spin_ns = 20000;

int shmkit_futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t timeout_ns)
{
    struct timespec ts, *tsp = NULL;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000;
        ts.tv_nsec = timeout_ns % 1000000000;
        tsp = &ts;
    }
    long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAIT, expected, tsp, NULL, 0);
    if (rc == 0)
        return 0;
    if (errno == EAGAIN || errno == ETIMEDOUT || errno == EINTR)
        return -errno;
    return -errno;
}

int shmkit_futex_wake(_Atomic uint32_t *word, int n)
{
    long rc = syscall(SYS_futex, (uint32_t *)word, FUTEX_WAKE, n, NULL, NULL, 0);
    return rc < 0 ? -errno : (int)rc;
}

int shmkit_wait_u32(_Atomic uint32_t *word, uint32_t expected, int64_t deadline_ns, int64_t spin_ns)
{
    if (spin_ns < 0)
        spin_ns = default_spin_ns;
    /* Spin first: a cross-core wake-up costs tens of microseconds, a spin round well under one. */
    if (spin_ns > 0) {
        int64_t spin_end = shmkit_monotonic_ns() + spin_ns;
        for (unsigned i = 1;; i++) {
            if (atomic_load_explicit(word, memory_order_acquire) != expected)
                return 1;
            shmkit_cpu_relax();
            if ((i & 63) == 0 && shmkit_monotonic_ns() >= spin_end)
                break;
        }
    }
    int in_main = PyThread_get_thread_ident() == main_thread_ident;
    for (;;) {
        if (atomic_load_explicit(word, memory_order_acquire) != expected)
            return 1;
        int64_t slice = -1;
        if (deadline_ns >= 0) {
            slice = deadline_ns - shmkit_monotonic_ns();
            if (slice <= 0)
                return 0;
        }
        if (in_main && (slice < 0 || slice > SHMKIT_MAIN_SLICE_NS))
            slice = SHMKIT_MAIN_SLICE_NS;
        int rc;
        Py_BEGIN_ALLOW_THREADS
        rc = shmkit_futex_wait(word, expected, slice);
        Py_END_ALLOW_THREADS
        if (rc == 0 || rc == -EAGAIN)
            return 1;
        if (rc == -EINTR || rc == -ETIMEDOUT) {
            if (PyErr_CheckSignals() < 0)
                return -1;
            continue;
        }
        errno = -rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
}

PyDoc_STRVAR(futex_wait_doc,
"futex_wait(buffer, offset, expected, timeout=None, spin_ns=-1) -> bool\n\n"
"Wait until the aligned u32 at offset no longer holds expected or a wake-up arrives.\n"
"Spins spin_ns first (-1: the default). Returns False on timeout. Releases the GIL.");

static PyObject *py_futex_wait(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"buffer", "offset", "expected", "timeout", "spin_ns", NULL};
    PyObject *buffer, *timeout = Py_None;
    Py_ssize_t offset;
    unsigned long expected;
    long long spin_ns = -1;
    (void)self;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "Onk|OL", kwlist, &buffer, &offset, &expected,
                                     &timeout, &spin_ns))
        return NULL;
    int64_t timeout_ns = shmkit_timeout_ns(timeout);
    if (timeout_ns == -2)
        return NULL;
    shmkit_window w;
    if (shmkit_window_get(buffer, offset, 4, 4, 0, &w) < 0)
        return NULL;
    int64_t deadline = timeout_ns < 0 ? -1 : shmkit_monotonic_ns() + timeout_ns;
    int rc = shmkit_wait_u32((_Atomic uint32_t *)w.ptr, (uint32_t)expected, deadline, spin_ns);
    shmkit_window_release(&w);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

PyDoc_STRVAR(futex_wake_doc,
"futex_wake(buffer, offset, n) -> int\n\nWake up to n waiters on the u32 at offset.");

static PyObject *py_futex_wake(PyObject *self, PyObject *args)
{
    PyObject *buffer;
    Py_ssize_t offset;
    int n;
    (void)self;
    if (!PyArg_ParseTuple(args, "Oni", &buffer, &offset, &n))
        return NULL;
    shmkit_window w;
    if (shmkit_window_get(buffer, offset, 4, 4, 0, &w) < 0)
        return NULL;
    int rc = shmkit_futex_wake((_Atomic uint32_t *)w.ptr, n);
    shmkit_window_release(&w);
    if (rc < 0) {
        errno = -rc;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(rc);
}

static PyObject *py_set_spin_ns(PyObject *self, PyObject *arg)
{
    (void)self;
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred())
        return NULL;
    if (v < 0 || v > 1000000000LL) {
        PyErr_SetString(PyExc_ValueError, "spin_ns must be between 0 and 1e9");
        return NULL;
    }
    default_spin_ns = v;
    Py_RETURN_NONE;
}

static PyObject *py_get_spin_ns(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromLongLong(default_spin_ns);
}

static PyMethodDef futex_methods[] = {
    {"futex_wait", (PyCFunction)(void (*)(void))py_futex_wait, METH_VARARGS | METH_KEYWORDS, futex_wait_doc},
    {"futex_wake", py_futex_wake, METH_VARARGS, futex_wake_doc},
    {"set_spin_ns", py_set_spin_ns, METH_O, "Set the default spin time (ns) before a wait sleeps."},
    {"get_spin_ns", py_get_spin_ns, METH_NOARGS, "The default spin time (ns) before a wait sleeps."},
    {NULL, NULL, 0, NULL},
};

int shmkit_init_futex(PyObject *module)
{
    main_thread_ident = PyThread_get_thread_ident();
    return PyModule_AddFunctions(module, futex_methods);
}
