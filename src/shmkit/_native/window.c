/* Bounds-checked windows into shared buffers, and timeout conversion. */
#include "native.h"

#include <time.h>

int shmkit_window_get(PyObject *obj, Py_ssize_t offset, Py_ssize_t len, Py_ssize_t align,
                      int writable, shmkit_window *out)
{
    if (PyObject_GetBuffer(obj, &out->view, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return -1;
    if (offset < 0 || len < 0 || offset > out->view.len || len > out->view.len - offset) {
        PyErr_Format(PyExc_IndexError, "offset %zd + length %zd is outside the %zd-byte buffer",
                     offset, len, out->view.len);
        PyBuffer_Release(&out->view);
        return -1;
    }
    out->ptr = (char *)out->view.buf + offset;
    if (align > 1 && ((uintptr_t)out->ptr & (uintptr_t)(align - 1)) != 0) {
        PyErr_Format(PyExc_ValueError, "offset %zd is not %zd-byte aligned", offset, align);
        PyBuffer_Release(&out->view);
        return -1;
    }
    return 0;
}

void shmkit_window_release(shmkit_window *w)
{
    PyBuffer_Release(&w->view);
}

int64_t shmkit_monotonic_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

int64_t shmkit_timeout_ns(PyObject *timeout)
{
    if (timeout == NULL || timeout == Py_None)
        return -1;
    double seconds = PyFloat_AsDouble(timeout);
    if (seconds == -1.0 && PyErr_Occurred())
        return -2;
    if (!(seconds >= 0)) {
        PyErr_SetString(PyExc_ValueError, "timeout must be None or a number >= 0");
        return -2;
    }
    if (seconds > 1e9) /* ~31 years: treat as forever rather than overflow */
        return -1;
    return (int64_t)(seconds * 1e9);
}

static PyObject *py_buffer_address(PyObject *self, PyObject *obj)
{
    Py_buffer view;
    (void)self;
    if (PyObject_GetBuffer(obj, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *addr = PyLong_FromVoidPtr(view.buf);
    PyBuffer_Release(&view);
    return addr;
}

static PyMethodDef window_methods[] = {
    {"buffer_address", py_buffer_address, METH_O,
     "buffer_address(obj) -> int: where obj's buffer is mapped in this process (for inspection)."},
    {NULL, NULL, 0, NULL},
};

int shmkit_init_window(PyObject *module)
{
    return PyModule_AddFunctions(module, window_methods);
}
