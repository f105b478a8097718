/* Sequentially consistent atomics on aligned words inside shared buffers.
 *
 * Loads are acquire, stores release and read-modify-writes seq_cst: a value published with
 * store_* is seen together with every write made before it (the header's state word relies on
 * this). Every access goes through a bounds- and alignment-checked window. */
#include "native.h"

/* Parse (buffer, offset, *ints) from a fastcall vector and open a window of `size` bytes. */
static int atomic_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, Py_ssize_t size,
                       int writable, shmkit_window *w, long long *vals)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "expected %zd arguments, got %zd", want, nargs);
        return -1;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[1]);
    if (offset == -1 && PyErr_Occurred())
        return -1;
    for (Py_ssize_t i = 2; i < nargs; i++) {
        vals[i - 2] = PyLong_AsLongLong(args[i]);
        if (vals[i - 2] == -1 && PyErr_Occurred()) {
            /* u64 values above 2**63 arrive as unsigned */
            PyErr_Clear();
            unsigned long long u = PyLong_AsUnsignedLongLong(args[i]);
            if (u == (unsigned long long)-1 && PyErr_Occurred())
                return -1;
            if (size == 4) {
                PyErr_Format(PyExc_OverflowError, "value %llu does not fit in 32 bits", u);
                return -1;
            }
            vals[i - 2] = (long long)u;
        }
    }
    /* A 32-bit word takes a u32 or an i32 (so add_u32(..., -1) decrements); anything wider
     * would be silently truncated. */
    if (size == 4) {
        for (Py_ssize_t i = 2; i < nargs; i++) {
            if (vals[i - 2] < -(1LL << 31) || vals[i - 2] > (long long)UINT32_MAX) {
                PyErr_Format(PyExc_OverflowError, "value %lld does not fit in 32 bits",
                             vals[i - 2]);
                return -1;
            }
        }
    }
    return shmkit_window_get(args[0], offset, size, size, writable, w);
}

#define SHMKIT_ATOMIC_FUNCS(BITS, CTYPE, TOPY)                                                   \
    static PyObject *py_load_##BITS(PyObject *self, PyObject *const *args, Py_ssize_t nargs)     \
    {                                                                                            \
        shmkit_window w;                                                                         \
        (void)self;                                                                              \
        if (atomic_args(args, nargs, 2, sizeof(CTYPE), 0, &w, NULL) < 0)                         \
            return NULL;                                                                         \
        CTYPE v = atomic_load_explicit((_Atomic CTYPE *)w.ptr, memory_order_acquire);            \
        shmkit_window_release(&w);                                                               \
        return TOPY(v);                                                                          \
    }                                                                                            \
    static PyObject *py_store_##BITS(PyObject *self, PyObject *const *args, Py_ssize_t nargs)    \
    {                                                                                            \
        shmkit_window w;                                                                         \
        long long v[1];                                                                          \
        (void)self;                                                                              \
        if (atomic_args(args, nargs, 3, sizeof(CTYPE), 1, &w, v) < 0)                            \
            return NULL;                                                                         \
        atomic_store_explicit((_Atomic CTYPE *)w.ptr, (CTYPE)v[0], memory_order_release);        \
        shmkit_window_release(&w);                                                               \
        Py_RETURN_NONE;                                                                          \
    }                                                                                            \
    static PyObject *py_add_##BITS(PyObject *self, PyObject *const *args, Py_ssize_t nargs)      \
    {                                                                                            \
        shmkit_window w;                                                                         \
        long long v[1];                                                                          \
        (void)self;                                                                              \
        if (atomic_args(args, nargs, 3, sizeof(CTYPE), 1, &w, v) < 0)                            \
            return NULL;                                                                         \
        CTYPE old = atomic_fetch_add((_Atomic CTYPE *)w.ptr, (CTYPE)v[0]);                       \
        shmkit_window_release(&w);                                                               \
        return TOPY(old);                                                                        \
    }                                                                                            \
    static PyObject *py_exchange_##BITS(PyObject *self, PyObject *const *args, Py_ssize_t nargs) \
    {                                                                                            \
        shmkit_window w;                                                                         \
        long long v[1];                                                                          \
        (void)self;                                                                              \
        if (atomic_args(args, nargs, 3, sizeof(CTYPE), 1, &w, v) < 0)                            \
            return NULL;                                                                         \
        CTYPE old = atomic_exchange((_Atomic CTYPE *)w.ptr, (CTYPE)v[0]);                        \
        shmkit_window_release(&w);                                                               \
        return TOPY(old);                                                                        \
    }                                                                                            \
    static PyObject *py_cas_##BITS(PyObject *self, PyObject *const *args, Py_ssize_t nargs)      \
    {                                                                                            \
        shmkit_window w;                                                                         \
        long long v[2];                                                                          \
        (void)self;                                                                              \
        if (atomic_args(args, nargs, 4, sizeof(CTYPE), 1, &w, v) < 0)                            \
            return NULL;                                                                         \
        CTYPE expected = (CTYPE)v[0];                                                            \
        int ok = atomic_compare_exchange_strong((_Atomic CTYPE *)w.ptr, &expected, (CTYPE)v[1]); \
        shmkit_window_release(&w);                                                               \
        return Py_BuildValue("(NN)", PyBool_FromLong(ok), TOPY(expected));                      \
    }

static PyObject *u32_to_py(uint32_t v) { return PyLong_FromUnsignedLong(v); }
static PyObject *u64_to_py(uint64_t v) { return PyLong_FromUnsignedLongLong(v); }
static PyObject *i64_to_py(int64_t v) { return PyLong_FromLongLong(v); }

SHMKIT_ATOMIC_FUNCS(u32, uint32_t, u32_to_py)
SHMKIT_ATOMIC_FUNCS(u64, uint64_t, u64_to_py)
SHMKIT_ATOMIC_FUNCS(i64, int64_t, i64_to_py)

#define SHMKIT_ATOMIC_ENTRIES(BITS)                                                                  \
    {"load_" #BITS, (PyCFunction)(void (*)(void))py_load_##BITS, METH_FASTCALL,                      \
     "load_" #BITS "(buffer, offset): acquire-load the aligned word at offset."},                    \
    {"store_" #BITS, (PyCFunction)(void (*)(void))py_store_##BITS, METH_FASTCALL,                    \
     "store_" #BITS "(buffer, offset, value): release-store value."},                                \
    {"add_" #BITS, (PyCFunction)(void (*)(void))py_add_##BITS, METH_FASTCALL,                        \
     "add_" #BITS "(buffer, offset, delta) -> old: atomic fetch-and-add (wraps)."},                  \
    {"exchange_" #BITS, (PyCFunction)(void (*)(void))py_exchange_##BITS, METH_FASTCALL,              \
     "exchange_" #BITS "(buffer, offset, value) -> old: atomic swap."},                              \
    {"cas_" #BITS, (PyCFunction)(void (*)(void))py_cas_##BITS, METH_FASTCALL,                        \
     "cas_" #BITS "(buffer, offset, expected, desired) -> (swapped, value seen)."},

static PyMethodDef atomic_methods[] = {
    SHMKIT_ATOMIC_ENTRIES(u32)
    SHMKIT_ATOMIC_ENTRIES(u64)
    SHMKIT_ATOMIC_ENTRIES(i64)
    {NULL, NULL, 0, NULL},
};

int shmkit_init_atomic(PyObject *module)
{
    return PyModule_AddFunctions(module, atomic_methods);
}
