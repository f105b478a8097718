/* Semaphore, Event, the sequence counter of a Condition, Barrier, RWLock and the atomics: the
 * C cores of the classes in shmkit/sync.py. The robust mutex and the object base are in
 * mutex.c.
 *
 * Conventions shared by every type here:
 * - All waits are shared futex waits on a 32-bit word, cut into slices (shmkit_sleep_slice)
 *   so that signal handlers run and nothing written by another process can make a wait last
 *   past its deadline; a short bounded spin comes first.
 * - Waiter counts are only a hint that lets the waking side skip the futex syscall: a waiter
 *   that dies leaves the count too high, which costs a syscall per wake-up and nothing else.
 *   The "count, then re-check" on the waiting side and "change, then read count" on the waking
 *   side are both sequentially consistent, so at least one of them sees the other (Dekker).
 * - Values read from shared memory are untrusted: each is range-checked before it is used as
 *   an index or a loop bound.
 */
#include "sync.h"

#include <errno.h>
#include <limits.h>

#define WAKE_ALL INT_MAX

/* Make the type, add it to the module under `name`. */
static int add_type(PyObject *module, PyTypeObject *type, const char *name)
{
    if (PyType_Ready(type) < 0)
        return -1;
    Py_INCREF(type);
    if (PyModule_AddObject(module, name, (PyObject *)type) < 0) {
        Py_DECREF(type);
        return -1;
    }
    return 0;
}

/* Parse tp_init arguments (buffer, offset, spin_ns=-1) and attach. */
static int attach_args(PyObject *op, PyObject *args, PyObject *kwargs, Py_ssize_t size,
                       Py_ssize_t align)
{
    static char *kwlist[] = {"buffer", "offset", "spin_ns", NULL};
    PyObject *buffer;
    Py_ssize_t offset;
    long long spin_ns = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|L", kwlist, &buffer, &offset, &spin_ns))
        return -1;
    ((shmkit_syncobj *)op)->spin.max_ns = spin_ns;
    return shmkit_syncobj_attach((shmkit_syncobj *)op, buffer, offset, size, align);
}

#define CHECK(op)                                              \
    do {                                                       \
        if (shmkit_syncobj_check((shmkit_syncobj *)(op)) < 0) \
            return NULL;                                       \
    } while (0)

#define SYNCOBJ(op) ((shmkit_syncobj *)(op))

#define SYNC_TYPE(var, pyname, doc, init, methods, getset)  \
    static PyTypeObject var = {                             \
        PyVarObject_HEAD_INIT(NULL, 0)                      \
        .tp_name = "shmkit._native." pyname,                \
        .tp_doc = doc,                                      \
        .tp_basicsize = sizeof(shmkit_syncobj),             \
        .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE, \
        .tp_new = PyType_GenericNew,                        \
        .tp_init = init,                                    \
        .tp_dealloc = shmkit_syncobj_dealloc,               \
        .tp_methods = methods,                              \
        .tp_getset = getset,                                \
    }

/* ==== Semaphore ============================================================================
 *
 *   offset  field      meaning
 *   0       value      permits available; waiters sleep on it while it is 0
 *   4       waiters    threads sleeping in acquire (hint)
 *   8       max_value  release() may not raise value above this (0 = SEM_LIMIT)
 *   12      reserved
 */
typedef struct {
    _Atomic uint32_t value;
    _Atomic uint32_t waiters;
    _Atomic uint32_t max_value;
    uint32_t reserved;
} sem_t_;

#define SEM_SIZE 16
#define SEM_LIMIT 0x7fffffffu
#define SEM(op) ((sem_t_ *)SYNCOBJ(op)->mem)

static int sem_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return attach_args(op, args, kwargs, SEM_SIZE, 4);
}

/* Take one permit if there is one. Acquire: pairs with the release's RMW. */
static inline int sem_try(sem_t_ *s)
{
    uint32_t v = atomic_load_explicit(&s->value, memory_order_relaxed);
    while (v > 0) {
        if (atomic_compare_exchange_weak_explicit(&s->value, &v, v - 1, memory_order_acquire,
                                                  memory_order_relaxed))
            return 1;
    }
    return 0;
}

static PyObject *sem_acquire(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    int64_t deadline = -1;
    if ((nargs != 0 || kwnames != NULL) && shmkit_parse_blocking(args, nargs, kwnames, &deadline) < 0)
        return NULL;
    CHECK(op); /* after parsing: converting arguments may run Python code, even close() */
    sem_t_ *s = SEM(op);
    if (sem_try(s))
        Py_RETURN_TRUE;
    if (deadline == 0)
        Py_RETURN_FALSE;
    shmkit_syncobj *self = SYNCOBJ(op);
    SHMKIT_BUSY_ENTER(self);
    int64_t slice = SHMKIT_SLICE_MIN_NS;
    int counted = 0, spun = 0, rc;
    for (;;) {
        if (sem_try(s)) {
            rc = 1;
            break;
        }
        if (!spun) {
            spun = 1;
            shmkit_spin_while(&s->value, 0, deadline, &self->spin);
            continue;
        }
        if (!counted) { /* count ourselves, then re-check before sleeping */
            atomic_fetch_add(&s->waiters, 1);
            counted = 1;
            continue;
        }
        int r = shmkit_sleep_slice(&s->value, 0, deadline, &slice);
        if (r == -ETIMEDOUT) {
            rc = 0;
            break;
        }
        if (r == -EINTR) {
            rc = -1;
            break;
        }
    }
    if (counted)
        atomic_fetch_sub(&s->waiters, 1);
    SHMKIT_BUSY_LEAVE(self);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

static PyObject *sem_release(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    long n = 1;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "release() takes at most 1 argument");
        return NULL;
    }
    if (nargs == 1) {
        n = PyLong_AsLong(args[0]);
        if (n == -1 && PyErr_Occurred())
            return NULL;
        if (n < 1) {
            PyErr_SetString(PyExc_ValueError, "n must be one or more");
            return NULL;
        }
    }
    CHECK(op);
    sem_t_ *s = SEM(op);
    uint32_t limit = atomic_load_explicit(&s->max_value, memory_order_relaxed);
    if (limit == 0 || limit > SEM_LIMIT)
        limit = SEM_LIMIT;
    uint32_t v = atomic_load_explicit(&s->value, memory_order_relaxed);
    do {
        if (v > limit || (unsigned long)n > limit - v)
            return shmkit_sync_error(op, "sem_overflow");
    } while (!atomic_compare_exchange_weak(&s->value, &v, v + (uint32_t)n));
    if (atomic_load(&s->waiters) > 0)
        shmkit_futex_wake(&s->value, n > WAKE_ALL ? WAKE_ALL : (int)n);
    Py_RETURN_NONE;
}

static PyObject *sem_enter(PyObject *op, PyObject *unused)
{
    (void)unused;
    PyObject *r = sem_acquire(op, NULL, 0, NULL);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_INCREF(op);
    return op;
}

static PyObject *sem_exit(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    (void)args;
    (void)nargs;
    PyObject *r = sem_release(op, NULL, 0);
    if (r == NULL)
        return NULL;
    Py_DECREF(r);
    Py_RETURN_FALSE;
}

static PyObject *sem_get_value(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_load_explicit(&SEM(op)->value, memory_order_relaxed));
}

static PyObject *sem_get_max(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    uint32_t m = atomic_load_explicit(&SEM(op)->max_value, memory_order_relaxed);
    if (m == 0 || m > SEM_LIMIT)
        Py_RETURN_NONE;
    return PyLong_FromUnsignedLong(m);
}

static PyObject *sem_get_waiters(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_load_explicit(&SEM(op)->waiters, memory_order_relaxed));
}

static PyMethodDef sem_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))sem_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=None) -> bool"},
    {"release", (PyCFunction)(void (*)(void))sem_release, METH_FASTCALL, "release(n=1)"},
    {"__enter__", sem_enter, METH_NOARGS, "Acquire, waiting as long as it takes."},
    {"__exit__", (PyCFunction)(void (*)(void))sem_exit, METH_FASTCALL, "Release."},
    SHMKIT_SYNCOBJ_METHODS
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sem_getset[] = {
    {"value", sem_get_value, NULL, "Permits available now.", NULL},
    {"max_value", sem_get_max, NULL, "Upper bound for release(), or None.", NULL},
    {"waiters", sem_get_waiters, NULL, "Threads sleeping in acquire (approximate).", NULL},
    SHMKIT_SYNCOBJ_GETSET
    {NULL, NULL, NULL, NULL, NULL},
};

SYNC_TYPE(SemaphoreType, "Semaphore", "Semaphore(buffer, offset, spin_ns=-1): C core.", sem_init,
          sem_methods, sem_getset);

/* ==== Event ================================================================================
 *
 *   offset  field    meaning
 *   0       flag     0 clear, anything else set; waiters sleep on it while it is 0
 *   4       waiters  threads sleeping in wait (hint)
 */
typedef struct {
    _Atomic uint32_t flag;
    _Atomic uint32_t waiters;
} event_t_;

#define EVENT_SIZE 8
#define EVENT(op) ((event_t_ *)SYNCOBJ(op)->mem)

static int event_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return attach_args(op, args, kwargs, EVENT_SIZE, 4);
}

static PyObject *event_set(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    event_t_ *e = EVENT(op);
    /* seq_cst exchange, then read the waiter count: see the file comment. Only the 0 -> set
     * transition can have sleepers (they sleep only while the flag is 0). */
    if (atomic_exchange(&e->flag, 1) == 0 && atomic_load(&e->waiters) > 0)
        shmkit_futex_wake(&e->flag, WAKE_ALL);
    Py_RETURN_NONE;
}

static PyObject *event_clear(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    atomic_store_explicit(&EVENT(op)->flag, 0, memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *event_is_set(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    return PyBool_FromLong(atomic_load_explicit(&EVENT(op)->flag, memory_order_acquire) != 0);
}

static PyObject *event_wait(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                            PyObject *kwnames)
{
    CHECK(op);
    event_t_ *e = EVENT(op);
    if (atomic_load_explicit(&e->flag, memory_order_acquire) != 0)
        Py_RETURN_TRUE;
    int64_t deadline = -1;
    if ((nargs != 0 || kwnames != NULL) &&
        shmkit_parse_timeout(args, nargs, kwnames, "wait", &deadline) < 0)
        return NULL;
    CHECK(op); /* again: parsing may have run Python code */
    e = EVENT(op);
    if (deadline == 0)
        Py_RETURN_FALSE;
    shmkit_syncobj *self = SYNCOBJ(op);
    SHMKIT_BUSY_ENTER(self);
    int64_t slice = SHMKIT_SLICE_MIN_NS;
    int counted = 0, rc;
    shmkit_spin_while(&e->flag, 0, deadline, &self->spin);
    for (;;) {
        if (atomic_load(&e->flag) != 0) {
            rc = 1;
            break;
        }
        if (!counted) {
            atomic_fetch_add(&e->waiters, 1);
            counted = 1;
            continue;
        }
        int r = shmkit_sleep_slice(&e->flag, 0, deadline, &slice);
        if (r == 2) { /* woken by set(): signalled even if cleared again since (as threading) */
            rc = 1;
            break;
        }
        if (r == -ETIMEDOUT) {
            rc = 0;
            break;
        }
        if (r == -EINTR) {
            rc = -1;
            break;
        }
    }
    if (counted)
        atomic_fetch_sub(&e->waiters, 1);
    SHMKIT_BUSY_LEAVE(self);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

static PyObject *event_get_waiters(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_load_explicit(&EVENT(op)->waiters, memory_order_relaxed));
}

static PyMethodDef event_methods[] = {
    {"set", event_set, METH_NOARGS, "set(): set the flag and wake every waiter."},
    {"clear", event_clear, METH_NOARGS, "clear(): reset the flag."},
    {"is_set", event_is_set, METH_NOARGS, "is_set() -> bool"},
    {"wait", (PyCFunction)(void (*)(void))event_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait(timeout=None) -> bool"},
    SHMKIT_SYNCOBJ_METHODS
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef event_getset[] = {
    {"waiters", event_get_waiters, NULL, "Threads sleeping in wait (approximate).", NULL},
    SHMKIT_SYNCOBJ_GETSET
    {NULL, NULL, NULL, NULL, NULL},
};

SYNC_TYPE(EventType, "Event", "Event(buffer, offset, spin_ns=-1): C core.", event_init,
          event_methods, event_getset);

/* ==== CondSeq: the notification counter of a Condition ======================================
 *
 *   offset  field    meaning (offsets relative to the CondSeq, i.e. Condition + 24)
 *   0       seq      bumped by every notify; waiters sleep while it still holds what they saw
 *   4       waiters  threads sleeping in wait (hint)
 *
 * No per-waiter state: a waiter that dies leaves nothing behind but a high waiter count.
 */
typedef struct {
    _Atomic uint32_t seq;
    _Atomic uint32_t waiters;
} condseq_t_;

#define CONDSEQ_SIZE 8
#define CONDSEQ(op) ((condseq_t_ *)SYNCOBJ(op)->mem)

static int condseq_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return attach_args(op, args, kwargs, CONDSEQ_SIZE, 4);
}

static PyObject *condseq_seq(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_load(&CONDSEQ(op)->seq));
}

/* _wait(seq, timeout=None) -> bool: sleep until the counter moves past `seq` (True) or the
 * deadline passes (False). */
static PyObject *condseq_wait(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                              PyObject *kwnames)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "_wait() needs the sequence number");
        return NULL;
    }
    unsigned long seen = PyLong_AsUnsignedLong(args[0]);
    if (seen == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    int64_t deadline = -1;
    if (shmkit_parse_timeout(args + 1, nargs - 1, kwnames, "_wait", &deadline) < 0)
        return NULL;
    CHECK(op);
    condseq_t_ *c = CONDSEQ(op);
    shmkit_syncobj *self = SYNCOBJ(op);
    SHMKIT_BUSY_ENTER(self);
    atomic_fetch_add(&c->waiters, 1);
    int64_t slice = SHMKIT_SLICE_MIN_NS;
    int rc;
    shmkit_spin_while(&c->seq, (uint32_t)seen, deadline, &self->spin);
    for (;;) {
        if (atomic_load(&c->seq) != (uint32_t)seen) {
            rc = 1;
            break;
        }
        int r = shmkit_sleep_slice(&c->seq, (uint32_t)seen, deadline, &slice);
        if (r == 2) {
            rc = 1;
            break;
        }
        if (r == -ETIMEDOUT) {
            rc = 0;
            break;
        }
        if (r == -EINTR) {
            rc = -1;
            break;
        }
    }
    atomic_fetch_sub(&c->waiters, 1);
    SHMKIT_BUSY_LEAVE(self);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

static PyObject *condseq_notify(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    long n = 1;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "_notify() takes at most 1 argument");
        return NULL;
    }
    if (nargs == 1) {
        n = PyLong_AsLong(args[0]);
        if (n == -1 && PyErr_Occurred())
            return NULL;
    }
    CHECK(op);
    if (n <= 0)
        Py_RETURN_NONE;
    condseq_t_ *c = CONDSEQ(op);
    atomic_fetch_add(&c->seq, 1);
    if (atomic_load(&c->waiters) > 0)
        shmkit_futex_wake(&c->seq, n > WAKE_ALL ? WAKE_ALL : (int)n);
    Py_RETURN_NONE;
}

static PyObject *condseq_get_waiters(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_load_explicit(&CONDSEQ(op)->waiters, memory_order_relaxed));
}

static PyMethodDef condseq_methods[] = {
    {"_seq", condseq_seq, METH_NOARGS, "_seq() -> int: the notification counter."},
    {"_wait", (PyCFunction)(void (*)(void))condseq_wait, METH_FASTCALL | METH_KEYWORDS,
     "_wait(seq, timeout=None) -> bool: sleep until the counter differs from seq."},
    {"_notify", (PyCFunction)(void (*)(void))condseq_notify, METH_FASTCALL,
     "_notify(n=1): bump the counter and wake up to n sleepers."},
    SHMKIT_SYNCOBJ_METHODS
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef condseq_getset[] = {
    {"waiters", condseq_get_waiters, NULL, "Threads sleeping in wait (approximate).", NULL},
    SHMKIT_SYNCOBJ_GETSET
    {NULL, NULL, NULL, NULL, NULL},
};

SYNC_TYPE(CondSeqType, "CondSeq", "CondSeq(buffer, offset, spin_ns=-1): C core of Condition.",
          condseq_init, condseq_methods, condseq_getset);

/* ==== AtomicInt: one signed 64-bit integer ================================================= */

#define AINT(op) ((_Atomic int64_t *)SYNCOBJ(op)->mem)

static int aint_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return attach_args(op, args, kwargs, 8, 8);
}

static int one_i64(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *fname,
                   int64_t *out)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd argument%s (%zd given)", fname, want,
                     want == 1 ? "" : "s", nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) {
        long long v = PyLong_AsLongLong(args[i]);
        if (v == -1 && PyErr_Occurred())
            return -1;
        out[i] = v;
    }
    return 0;
}

static PyObject *aint_load(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    return PyLong_FromLongLong(atomic_load_explicit(AINT(op), memory_order_acquire));
}

static PyObject *aint_store(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t v;
    if (one_i64(args, nargs, 1, "store", &v) < 0)
        return NULL;
    CHECK(op);
    atomic_store_explicit(AINT(op), v, memory_order_release);
    Py_RETURN_NONE;
}

static PyObject *aint_add(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t d = 1;
    if (nargs != 0 && one_i64(args, nargs, 1, "add", &d) < 0)
        return NULL;
    CHECK(op);
    /* Unsigned arithmetic: wraps around like the hardware instead of C's signed overflow. */
    uint64_t old = (uint64_t)atomic_fetch_add((_Atomic uint64_t *)AINT(op), (uint64_t)d);
    return PyLong_FromLongLong((int64_t)old);
}

static PyObject *aint_exchange(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t v;
    if (one_i64(args, nargs, 1, "exchange", &v) < 0)
        return NULL;
    CHECK(op);
    return PyLong_FromLongLong(atomic_exchange(AINT(op), v));
}

static PyObject *aint_cas(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    int64_t v[2];
    if (one_i64(args, nargs, 2, "compare_exchange", v) < 0)
        return NULL;
    CHECK(op);
    int64_t expected = v[0];
    int ok = atomic_compare_exchange_strong(AINT(op), &expected, v[1]);
    return Py_BuildValue("(NL)", PyBool_FromLong(ok), (long long)expected);
}

static PyObject *aint_get_value(PyObject *op, void *closure)
{
    (void)closure;
    return aint_load(op, NULL);
}

static int aint_set_value(PyObject *op, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "value cannot be deleted");
        return -1;
    }
    PyObject *r = aint_store(op, &value, 1);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyMethodDef aint_methods[] = {
    {"load", aint_load, METH_NOARGS, "load() -> int (acquire)"},
    {"store", (PyCFunction)(void (*)(void))aint_store, METH_FASTCALL, "store(value) (release)"},
    {"add", (PyCFunction)(void (*)(void))aint_add, METH_FASTCALL,
     "add(delta=1) -> int: the value before adding (wraps around at 64 bits)"},
    {"exchange", (PyCFunction)(void (*)(void))aint_exchange, METH_FASTCALL,
     "exchange(value) -> int: the previous value"},
    {"compare_exchange", (PyCFunction)(void (*)(void))aint_cas, METH_FASTCALL,
     "compare_exchange(expected, desired) -> (swapped, value seen)"},
    SHMKIT_SYNCOBJ_METHODS
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef aint_getset[] = {
    {"value", aint_get_value, aint_set_value, "The value (load/store).", NULL},
    SHMKIT_SYNCOBJ_GETSET
    {NULL, NULL, NULL, NULL, NULL},
};

SYNC_TYPE(AtomicIntType, "AtomicInt", "AtomicInt(buffer, offset, spin_ns=-1): C core.", aint_init,
          aint_methods, aint_getset);

/* ==== AtomicU32: a 32-bit word with futex wait/notify ========================================
 *
 *   offset  field    meaning
 *   0       value    the word
 *   4       waiters  threads sleeping in wait (hint: notify skips the syscall when 0)
 */
typedef struct {
    _Atomic uint32_t value;
    _Atomic uint32_t waiters;
} au32_t_;

#define AU32(op) ((au32_t_ *)SYNCOBJ(op)->mem)

static int au32_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return attach_args(op, args, kwargs, 8, 4);
}

/* A Python int in [-2**32, 2**32) taken modulo 2**32 (negative deltas for add). */
static int u32_arg(PyObject *obj, int allow_negative, uint32_t *out)
{
    long long v = PyLong_AsLongLong(obj);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v > (long long)UINT32_MAX || v < (allow_negative ? -(long long)UINT32_MAX : 0)) {
        PyErr_Format(PyExc_OverflowError, "%lld does not fit in an unsigned 32-bit word", v);
        return -1;
    }
    *out = (uint32_t)v;
    return 0;
}

static int u32_args(PyObject *const *args, Py_ssize_t nargs, Py_ssize_t want, const char *fname,
                    uint32_t *out)
{
    if (nargs != want) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd argument%s (%zd given)", fname, want,
                     want == 1 ? "" : "s", nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        if (u32_arg(args[i], 0, &out[i]) < 0)
            return -1;
    return 0;
}

static PyObject *au32_load(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_load_explicit(&AU32(op)->value, memory_order_acquire));
}

static PyObject *au32_store(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t v;
    if (u32_args(args, nargs, 1, "store", &v) < 0)
        return NULL;
    CHECK(op);
    atomic_store(&AU32(op)->value, v);
    Py_RETURN_NONE;
}

static PyObject *au32_add(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t d = 1;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "add() takes at most 1 argument");
        return NULL;
    }
    if (nargs == 1 && u32_arg(args[0], 1, &d) < 0)
        return NULL;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_fetch_add(&AU32(op)->value, d));
}

static PyObject *au32_exchange(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t v;
    if (u32_args(args, nargs, 1, "exchange", &v) < 0)
        return NULL;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_exchange(&AU32(op)->value, v));
}

static PyObject *au32_cas(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    uint32_t v[2];
    if (u32_args(args, nargs, 2, "compare_exchange", v) < 0)
        return NULL;
    CHECK(op);
    uint32_t expected = v[0];
    int ok = atomic_compare_exchange_strong(&AU32(op)->value, &expected, v[1]);
    return Py_BuildValue("(Nk)", PyBool_FromLong(ok), (unsigned long)expected);
}

static PyObject *au32_wait(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "wait() missing required argument 'expected'");
        return NULL;
    }
    uint32_t expected;
    if (u32_arg(args[0], 0, &expected) < 0)
        return NULL;
    int64_t deadline = -1;
    if (shmkit_parse_timeout(args + 1, nargs - 1, kwnames, "wait", &deadline) < 0)
        return NULL;
    CHECK(op);
    au32_t_ *a = AU32(op);
    if (atomic_load(&a->value) != expected)
        Py_RETURN_TRUE;
    if (deadline == 0)
        Py_RETURN_FALSE;
    shmkit_syncobj *self = SYNCOBJ(op);
    SHMKIT_BUSY_ENTER(self);
    atomic_fetch_add(&a->waiters, 1);
    int64_t slice = SHMKIT_SLICE_MIN_NS;
    int rc;
    shmkit_spin_while(&a->value, expected, deadline, &self->spin);
    for (;;) {
        if (atomic_load(&a->value) != expected) {
            rc = 1;
            break;
        }
        int r = shmkit_sleep_slice(&a->value, expected, deadline, &slice);
        if (r == 2) {
            rc = 1;
            break;
        }
        if (r == -ETIMEDOUT) {
            rc = 0;
            break;
        }
        if (r == -EINTR) {
            rc = -1;
            break;
        }
    }
    atomic_fetch_sub(&a->waiters, 1);
    SHMKIT_BUSY_LEAVE(self);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

static PyObject *au32_notify(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    long n = 1;
    if (nargs > 1) {
        PyErr_SetString(PyExc_TypeError, "notify() takes at most 1 argument");
        return NULL;
    }
    if (nargs == 1) {
        n = PyLong_AsLong(args[0]);
        if (n == -1 && PyErr_Occurred())
            return NULL;
        if (n < 1) {
            PyErr_SetString(PyExc_ValueError, "n must be one or more");
            return NULL;
        }
    }
    CHECK(op);
    au32_t_ *a = AU32(op);
    /* The notifier changed the value (seq_cst) before this load; see the file comment. */
    if (atomic_load(&a->waiters) == 0)
        return PyLong_FromLong(0);
    int woken = shmkit_futex_wake(&a->value, n > WAKE_ALL ? WAKE_ALL : (int)n);
    return PyLong_FromLong(woken < 0 ? 0 : woken);
}

static PyObject *au32_get_value(PyObject *op, void *closure)
{
    (void)closure;
    return au32_load(op, NULL);
}

static int au32_set_value(PyObject *op, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "value cannot be deleted");
        return -1;
    }
    PyObject *r = au32_store(op, &value, 1);
    if (r == NULL)
        return -1;
    Py_DECREF(r);
    return 0;
}

static PyObject *au32_get_waiters(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_load_explicit(&AU32(op)->waiters, memory_order_relaxed));
}

static PyMethodDef au32_methods[] = {
    {"load", au32_load, METH_NOARGS, "load() -> int (acquire)"},
    {"store", (PyCFunction)(void (*)(void))au32_store, METH_FASTCALL, "store(value)"},
    {"add", (PyCFunction)(void (*)(void))au32_add, METH_FASTCALL,
     "add(delta=1) -> int: the value before adding (modulo 2**32)"},
    {"exchange", (PyCFunction)(void (*)(void))au32_exchange, METH_FASTCALL,
     "exchange(value) -> int: the previous value"},
    {"compare_exchange", (PyCFunction)(void (*)(void))au32_cas, METH_FASTCALL,
     "compare_exchange(expected, desired) -> (swapped, value seen)"},
    {"wait", (PyCFunction)(void (*)(void))au32_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait(expected, timeout=None) -> bool: sleep while the value equals expected"},
    {"notify", (PyCFunction)(void (*)(void))au32_notify, METH_FASTCALL,
     "notify(n=1) -> int: wake up to n waiters; returns how many woke"},
    SHMKIT_SYNCOBJ_METHODS
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef au32_getset[] = {
    {"value", au32_get_value, au32_set_value, "The value (load/store).", NULL},
    {"waiters", au32_get_waiters, NULL, "Threads sleeping in wait (approximate).", NULL},
    SHMKIT_SYNCOBJ_GETSET
    {NULL, NULL, NULL, NULL, NULL},
};

SYNC_TYPE(AtomicU32Type, "AtomicU32", "AtomicU32(buffer, offset, spin_ns=-1): C core.", au32_init,
          au32_methods, au32_getset);

/* ==== Barrier ==============================================================================
 *
 *   offset  field       meaning
 *   0       parties     how many must arrive (1..BARRIER_MAX_PARTIES)
 *   4       state       count (bits 0..15) | generation (bits 16..29) | RESET (30) | BROKEN (31);
 *                       waiters sleep on it
 *   8       waiters     threads sleeping in wait (hint)
 *   12      completer   kernel thread id of the last party of the round now completing (it
 *                       runs the action, then starts the next generation); 0 = none or not
 *                       known yet
 *   16      timeout_ns  default timeout of wait() in ns; all ones = none (u64)
 *   24      completer_start  that thread's start time (as a Mutex's owner_start), 0 = unknown
 *   28      reserved
 *
 * One word carries count and generation so that an arrival is a single compare-and-swap that
 * also names the generation it joined. The last arrival moves the count to `parties`
 * ("completing"), runs the action, then starts the next generation with count 0. A waiter
 * whose generation moved on has passed, unless the move was reset() (RESET set and the
 * generation exactly one further). A timeout, abort() or a failing action sets BROKEN, which
 * stays until reset(); arrivals at a broken barrier fail at once.
 *
 * A party that dies after arriving changes nothing, unless it was the last one: then nobody
 * would ever start the next generation. So the last party records itself in `completer`, and a
 * waiter whose sleep slice ran out while the round is still completing checks that this thread
 * still runs; if it died, the waiter breaks the barrier (every party gets BrokenBarrierError,
 * as after a timeout) instead of waiting forever. completer is cleared before the generation
 * moves on (and by reset()), so a waiter never judges a later round by an earlier completer.
 */
typedef struct {
    _Atomic uint32_t parties;
    _Atomic uint32_t state;
    _Atomic uint32_t waiters;
    _Atomic uint32_t completer;
    _Atomic uint64_t timeout_ns;
    _Atomic uint32_t completer_start;
    uint32_t reserved;
} barrier_t_;

#define BARRIER_SIZE 32
_Static_assert(sizeof(barrier_t_) == BARRIER_SIZE, "the Barrier layout changed");
#define BARRIER_MAX_PARTIES 32767u
#define B_COUNT_MASK 0xffffu
#define B_GEN_SHIFT 16
#define B_GEN_MASK (0x3fffu << B_GEN_SHIFT)
#define B_RESET (1u << 30)
#define B_BROKEN (1u << 31)
#define BARRIER(op) ((barrier_t_ *)SYNCOBJ(op)->mem)

static inline uint32_t next_gen(uint32_t state)
{
    return ((state & B_GEN_MASK) + (1u << B_GEN_SHIFT)) & B_GEN_MASK;
}

static int barrier_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    return attach_args(op, args, kwargs, BARRIER_SIZE, 8);
}

static void barrier_wake(barrier_t_ *b)
{
    if (atomic_load(&b->waiters) > 0)
        shmkit_futex_wake(&b->state, WAKE_ALL);
}

/* _arrive() -> (index, ticket, last): join the current generation. The last party (`last`
 * True, index parties - 1 as counted here, whatever `parties` reads later) must call
 * _complete(ticket). Index -1: the round is completing (more threads than parties); wait with
 * _await(ticket) for it to end, then arrive again. Raises the "broken" or "corrupt" error. */
static PyObject *barrier_arrive(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    barrier_t_ *b = BARRIER(op);
    uint32_t parties = atomic_load(&b->parties);
    if (parties == 0 || parties > BARRIER_MAX_PARTIES)
        return shmkit_sync_error(op, "corrupt");
    uint32_t v = atomic_load(&b->state);
    for (;;) {
        if (v & B_BROKEN)
            return shmkit_sync_error(op, "broken");
        uint32_t count = v & B_COUNT_MASK;
        if (count == parties) /* the last party is running the action: next round */
            return Py_BuildValue("(ikO)", -1, (unsigned long)(v & ~B_COUNT_MASK & ~B_BROKEN),
                                 Py_False);
        if (count > parties) { /* impossible: damaged memory */
            atomic_fetch_or(&b->state, B_BROKEN);
            barrier_wake(b);
            return shmkit_sync_error(op, "corrupt");
        }
        if (count + 1 < parties) {
            if (atomic_compare_exchange_weak(&b->state, &v, v + 1))
                return Py_BuildValue("(kkO)", (unsigned long)count,
                                     (unsigned long)(v & ~B_COUNT_MASK & ~B_BROKEN), Py_False);
            continue;
        }
        if (atomic_compare_exchange_weak(&b->state, &v, v + 1)) {
            /* The last party: say who completes (start first: waiters read the tid, then the
             * start). Dying before these stores leaves completer 0: waiters then rely on
             * their timeout, as before this field existed. */
            atomic_store(&b->completer_start, shmkit_thread_start());
            atomic_store(&b->completer, shmkit_gettid());
            /* The ticket of the last party is the exact state it made: _complete moves on
             * from that value only. */
            return Py_BuildValue("(kkO)", (unsigned long)count, (unsigned long)(v + 1), Py_True);
        }
    }
}

/* _complete(ticket) -> bool: the last party starts the next generation and wakes everyone.
 * False when the barrier broke or was reset meanwhile; if the state of its round was changed
 * any other way (damaged memory), it breaks the barrier so that no waiter is left behind. */
static PyObject *barrier_complete(PyObject *op, PyObject *arg)
{
    unsigned long t = PyLong_AsUnsignedLong(arg);
    if (t == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    CHECK(op);
    barrier_t_ *b = BARRIER(op);
    uint32_t ticket = (uint32_t)t, expected = ticket;
    /* Forget the completer before the generation moves on (see the layout comment). */
    atomic_store(&b->completer, 0);
    /* seq_cst (so also release): pairs with the waiters' loads of the state; writes before
     * the barrier are visible after it. */
    int ok = atomic_compare_exchange_strong(&b->state, &expected, next_gen(ticket));
    while (!ok && (expected & B_GEN_MASK) == (ticket & B_GEN_MASK) && !(expected & B_BROKEN)) {
        /* Still our round, not broken, yet not the state we made: damaged. Break it. */
        if (atomic_compare_exchange_weak(&b->state, &expected, expected | B_BROKEN))
            break;
    }
    barrier_wake(b);
    return PyBool_FromLong(ok);
}

/* The round named by `now` is completing (all parties arrived) and its completer died: 1. */
static int barrier_completer_dead(barrier_t_ *b, uint32_t now)
{
    uint32_t parties = atomic_load(&b->parties);
    if ((now & B_COUNT_MASK) != (parties & B_COUNT_MASK) || parties == 0)
        return 0;
    uint32_t tid = atomic_load(&b->completer);
    if (tid == 0)
        return 0;
    uint32_t start = atomic_load(&b->completer_start);
    /* Still the same round and completer after the reads: then the verdict is about them. */
    if (atomic_load(&b->state) != now || atomic_load(&b->completer) != tid)
        return 0;
    return !shmkit_task_alive_since(tid, start);
}

/* 0 = passed, 1 = broken, -1 = still our generation. */
static int barrier_verdict(uint32_t ticket, uint32_t now)
{
    if ((now & B_GEN_MASK) != (ticket & B_GEN_MASK)) {
        if ((now & B_RESET) && (now & B_GEN_MASK) == next_gen(ticket))
            return 1;
        return 0;
    }
    return (now & B_BROKEN) ? 1 : -1;
}

/* _await(ticket, timeout=None) -> int: 0 passed, 1 broken, 2 this call timed out and broke it. */
static PyObject *barrier_await(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    if (nargs < 1) {
        PyErr_SetString(PyExc_TypeError, "_await() needs the ticket");
        return NULL;
    }
    unsigned long t = PyLong_AsUnsignedLong(args[0]);
    if (t == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    uint32_t ticket = (uint32_t)t;
    int64_t deadline = -1;
    if (shmkit_parse_timeout(args + 1, nargs - 1, kwnames, "_await", &deadline) < 0)
        return NULL;
    CHECK(op);
    barrier_t_ *b = BARRIER(op);
    shmkit_syncobj *self = SYNCOBJ(op);
    SHMKIT_BUSY_ENTER(self);
    int64_t slice = SHMKIT_SLICE_MIN_NS;
    int counted = 0, spun = 0, rc;
    for (;;) {
        uint32_t now = atomic_load(&b->state);
        int verdict = barrier_verdict(ticket, now);
        if (verdict >= 0) {
            rc = verdict;
            break;
        }
        if (deadline >= 0 && shmkit_monotonic_ns() >= deadline) {
            if (atomic_compare_exchange_strong(&b->state, &now, now | B_BROKEN)) {
                barrier_wake(b);
                rc = 2;
                break;
            }
            continue;
        }
        if (!spun) {
            spun = 1;
            shmkit_spin_while(&b->state, now, deadline, &self->spin);
            continue;
        }
        if (!counted) {
            atomic_fetch_add(&b->waiters, 1);
            counted = 1;
            continue;
        }
        int r = shmkit_sleep_slice(&b->state, now, deadline, &slice);
        if (r == -EINTR) {
            rc = -1;
            break;
        }
        /* A whole slice without a wake-up: is the round stuck behind a dead completer? */
        if (r == 0 && barrier_completer_dead(b, now) &&
            atomic_compare_exchange_strong(&b->state, &now, now | B_BROKEN)) {
            barrier_wake(b);
            rc = 1;
            break;
        }
    }
    if (counted)
        atomic_fetch_sub(&b->waiters, 1);
    SHMKIT_BUSY_LEAVE(self);
    if (rc < 0)
        return NULL;
    return PyLong_FromLong(rc);
}

static PyObject *barrier_abort(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    barrier_t_ *b = BARRIER(op);
    atomic_fetch_or(&b->state, B_BROKEN);
    barrier_wake(b);
    Py_RETURN_NONE;
}

static PyObject *barrier_reset(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    barrier_t_ *b = BARRIER(op);
    atomic_store(&b->completer, 0); /* a dead completer of the abandoned round */
    uint32_t v = atomic_load(&b->state);
    while (!atomic_compare_exchange_weak(&b->state, &v, next_gen(v) | B_RESET))
        ;
    barrier_wake(b);
    Py_RETURN_NONE;
}

static PyObject *barrier_get_parties(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyLong_FromUnsignedLong(atomic_load(&BARRIER(op)->parties));
}

static PyObject *barrier_get_n_waiting(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    uint32_t v = atomic_load(&BARRIER(op)->state);
    uint32_t parties = atomic_load(&BARRIER(op)->parties);
    uint32_t count = v & B_COUNT_MASK;
    return PyLong_FromUnsignedLong((v & B_BROKEN) ? 0 : count >= parties ? 0 : count);
}

static PyObject *barrier_get_broken(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyBool_FromLong((atomic_load(&BARRIER(op)->state) & B_BROKEN) != 0);
}

static PyObject *barrier_get_timeout_ns(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyLong_FromUnsignedLongLong(atomic_load(&BARRIER(op)->timeout_ns));
}

static PyMethodDef barrier_methods[] = {
    {"_arrive", barrier_arrive, METH_NOARGS, "_arrive() -> (index, ticket, last)"},
    {"_complete", barrier_complete, METH_O, "_complete(ticket) -> bool"},
    {"_await", (PyCFunction)(void (*)(void))barrier_await, METH_FASTCALL | METH_KEYWORDS,
     "_await(ticket, timeout=None) -> 0 passed, 1 broken, 2 timed out (and broke it)"},
    {"abort", barrier_abort, METH_NOARGS, "abort(): break the barrier for every party."},
    {"reset", barrier_reset, METH_NOARGS, "reset(): start over with no party waiting."},
    SHMKIT_SYNCOBJ_METHODS
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef barrier_getset[] = {
    {"parties", barrier_get_parties, NULL, "How many parties must arrive.", NULL},
    {"n_waiting", barrier_get_n_waiting, NULL, "Parties waiting in the current generation.", NULL},
    {"broken", barrier_get_broken, NULL, "Whether the barrier is broken.", NULL},
    {"_timeout_ns", barrier_get_timeout_ns, NULL, "Default timeout in ns (all ones: none).", NULL},
    SHMKIT_SYNCOBJ_GETSET
    {NULL, NULL, NULL, NULL, NULL},
};

SYNC_TYPE(BarrierType, "Barrier", "Barrier(buffer, offset, spin_ns=-1): C core.", barrier_init,
          barrier_methods, barrier_getset);

/* ==== RWLock ===============================================================================
 *
 *   offset       field           meaning
 *   0            mutex (24)      a robust Mutex: held by a writer for its whole write section,
 *                                and briefly by a reader while it registers in a slot
 *   24           slots           number of reader slots (fixed when created)
 *   28           drain           bumped by a reader leaving while a writer waits; the writer
 *                                sleeps on it
 *   32           writer_waiting  1 while a writer holds the mutex and waits for readers to leave
 *   36           reserved
 *   40 + 16*i    slot i          { tid, count, start, reserved }: `count` read holds of the
 *                                kernel thread `tid` that started at `start` (as owner_start)
 *
 * A reader registers under the mutex, so no reader can enter while a writer holds it (writers
 * are preferred); only a thread that already reads counts a further read without the mutex
 * (rw_reenter), since the writer holding the mutex waits for that thread. Leaving needs no lock: the reader decrements its slot and, if a writer is
 * waiting, bumps `drain`. The writer, holding the mutex, waits until every count is 0; each
 * time a sleep slice runs out it clears slots whose thread is dead (or whose id now belongs to
 * another thread: tid and start are only written under the mutex, which the writer holds, so
 * one look is enough). A writer that dies is a dead mutex owner: the next reader or writer
 * recovers the mutex. A reader that recovers it leaves `recovered` set (the data may be
 * half-written) until a writer calls mark_consistent() or releases the write lock.
 */
typedef struct {
    _Atomic uint32_t tid;
    _Atomic uint32_t count;
    _Atomic uint32_t start;
    uint32_t reserved;
} rw_slot_t_;

typedef struct {
    shmkit_mutex_t mutex;
    _Atomic uint32_t slots;
    _Atomic uint32_t drain;
    _Atomic uint32_t writer_waiting;
    uint32_t reserved;
    rw_slot_t_ slot[];
} rwlock_t_;

typedef struct {
    shmkit_syncobj base;
    uint32_t nslots; /* from the creator, checked at attach: never re-read from shared memory */
    uint32_t hint;   /* the slot this object used last */
} rwlock_obj;

#define RW_HEADER 40
#define RW_SLOT_SIZE 16
#define RW_MAX_SLOTS 65536u
#define RW(op) ((rwlock_t_ *)SYNCOBJ(op)->mem)
#define RWOBJ(op) ((rwlock_obj *)(op))

static int rwlock_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"buffer", "offset", "slots", "spin_ns", NULL};
    PyObject *buffer;
    Py_ssize_t offset;
    unsigned int slots;
    long long spin_ns = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OnI|L", kwlist, &buffer, &offset, &slots,
                                     &spin_ns))
        return -1;
    if (slots == 0 || slots > RW_MAX_SLOTS) {
        PyErr_Format(PyExc_ValueError, "slots must be within 1..%u", RW_MAX_SLOTS);
        return -1;
    }
    SYNCOBJ(op)->spin.max_ns = spin_ns;
    if (shmkit_syncobj_attach(SYNCOBJ(op), buffer, offset, RW_HEADER + RW_SLOT_SIZE * (Py_ssize_t)slots, 4) < 0)
        return -1;
    RWOBJ(op)->nslots = slots;
    RWOBJ(op)->hint = 0;
    return 0;
}

/* Under the mutex: the slot to count this thread's read in, or -1 when the table is full. */
static long rw_pick_slot(rwlock_obj *self, rwlock_t_ *rw, uint32_t tid, uint32_t start)
{
    uint32_t n = self->nslots;
    uint32_t h = self->hint < n ? self->hint : 0;
    if (atomic_load(&rw->slot[h].tid) == tid && atomic_load(&rw->slot[h].start) == start)
        return h;
    long free_slot = -1;
    for (uint32_t i = 0; i < n; i++) {
        uint32_t t = atomic_load(&rw->slot[i].tid), c = atomic_load(&rw->slot[i].count);
        if (t == tid) {
            if (atomic_load(&rw->slot[i].start) == start)
                return i;
            /* Our id, an earlier thread's slot: that thread is dead. */
            atomic_store(&rw->slot[i].count, 0);
            c = 0;
        }
        if (free_slot < 0 && c == 0)
            free_slot = i;
    }
    if (free_slot >= 0)
        return free_slot;
    /* Full: reclaim the slot of a thread that died holding a read lock. */
    for (uint32_t i = 0; i < n; i++) {
        uint32_t c = atomic_load(&rw->slot[i].count);
        if (c != 0 &&
            !shmkit_task_alive_since(atomic_load(&rw->slot[i].tid), atomic_load(&rw->slot[i].start)) &&
            atomic_compare_exchange_strong(&rw->slot[i].count, &c, 0))
            return i;
    }
    return -1;
}

static PyObject *rw_lock_result(PyObject *op, int rc)
{
    if (rc == -ETIMEDOUT)
        Py_RETURN_FALSE;
    if (rc == -EDEADLK)
        return shmkit_sync_error(op, "deadlock");
    return NULL;
}

/* Change this thread's read count in slot i by `delta` (+1 or -1), provided the slot is this
 * thread's and counts at least one read. 1 done (*old = the count before), 0 the slot is not
 * ours, -1 it is ours but counts nothing.
 *
 * Without the mutex, so the order of the loads matters: the count first, then tid and start.
 * A slot counting 0 can be handed to another thread (rw_pick_slot, under the mutex), which
 * writes tid and start before raising the count; so a count above 0 seen before our own
 * identity is ours. And while it is ours and above 0 nobody else changes it (rw_pick_slot
 * takes only slots counting 0 or of dead threads, rw_drain clears only dead ones), so the
 * compare-and-swap from it cannot succeed on someone else's count. */
static int rw_slot_adjust(rwlock_t_ *rw, uint32_t i, uint32_t tid, uint32_t start, int delta,
                          uint32_t *old)
{
    uint32_t c = atomic_load(&rw->slot[i].count);
    for (;;) {
        if (atomic_load(&rw->slot[i].tid) != tid || atomic_load(&rw->slot[i].start) != start)
            return 0;
        if (c == 0 || (delta > 0 && c == UINT32_MAX))
            return -1;
        if (atomic_compare_exchange_weak(&rw->slot[i].count, &c, c + (uint32_t)delta)) {
            *old = c;
            return 1;
        }
    }
}

/* The slots in the order this object looks at them: its hint first. */
#define RW_SCAN_ORDER(k, h) ((k) == 0 ? (h) : ((k) <= (h) ? (k) - 1 : (k)))

/* A read hold this thread already has: count it again without the mutex. Needed because a
 * writer waits for readers while holding the mutex, so a recursive read that queued for the
 * mutex behind it would wait for itself (a writer cannot be inside its write section while
 * this thread's read is counted). A thread has at most one slot with its identity. 1 when
 * counted, 0 when this thread reads nothing. */
static int rw_reenter(rwlock_obj *self, rwlock_t_ *rw, uint32_t tid, uint32_t start)
{
    uint32_t n = self->nslots, old;
    uint32_t h = self->hint < n ? self->hint : 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = RW_SCAN_ORDER(k, h);
        if (atomic_load_explicit(&rw->slot[i].tid, memory_order_relaxed) != tid)
            continue; /* cheap filter; rw_slot_adjust checks in the right order */
        int r = rw_slot_adjust(rw, i, tid, start, +1, &old);
        if (r == 1)
            self->hint = i;
        if (r != 0)
            return r == 1;
    }
    return 0;
}

static PyObject *rwlock_acquire_read(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                     PyObject *kwnames)
{
    int64_t deadline = -1;
    if ((nargs != 0 || kwnames != NULL) && shmkit_parse_blocking(args, nargs, kwnames, &deadline) < 0)
        return NULL;
    CHECK(op); /* after parsing: converting arguments may run Python code, even close() */
    rwlock_t_ *rw = RW(op);
    rwlock_obj *self = RWOBJ(op);
    uint32_t tid = shmkit_gettid(), start = shmkit_thread_start();
    /* Mutex free: register under it (a recursive read too: no writer drains meanwhile).
     * Otherwise a writer may be draining, waiting for this thread's reads: count a recursive
     * read without the mutex, and only queue for the mutex when this thread reads nothing
     * (then nothing of ours can keep the writer waiting). */
    if (!shmkit_mutex_trylock(&rw->mutex)) {
        if (rw_reenter(self, rw, tid, start))
            Py_RETURN_TRUE;
        SHMKIT_BUSY_ENTER(&self->base);
        int rc = shmkit_mutex_lock(&rw->mutex, deadline, &self->base.spin);
        SHMKIT_BUSY_LEAVE(&self->base);
        if (rc < 0)
            return rw_lock_result(op, rc);
    }
    long i = rw_pick_slot(self, rw, tid, start);
    if (i < 0) {
        shmkit_mutex_unlock(&rw->mutex, 0);
        return shmkit_sync_error(op, "readers_full");
    }
    if (atomic_load(&rw->slot[i].tid) != tid || atomic_load(&rw->slot[i].start) != start) {
        atomic_store(&rw->slot[i].tid, tid);
        atomic_store(&rw->slot[i].start, start);
    }
    atomic_fetch_add(&rw->slot[i].count, 1);
    self->hint = (uint32_t)i;
    /* Keep `recovered`: a reader that took the mutex from a dead writer does not repair. */
    shmkit_mutex_unlock(&rw->mutex, 0);
    Py_RETURN_TRUE;
}

static PyObject *rwlock_release_read(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    rwlock_t_ *rw = RW(op);
    rwlock_obj *self = RWOBJ(op);
    uint32_t tid = shmkit_gettid(), start = shmkit_thread_start(), n = self->nslots, old;
    uint32_t h = self->hint < n ? self->hint : 0;
    for (uint32_t k = 0; k < n; k++) {
        uint32_t i = RW_SCAN_ORDER(k, h);
        if (atomic_load_explicit(&rw->slot[i].tid, memory_order_relaxed) != tid)
            continue; /* cheap filter; rw_slot_adjust checks in the right order */
        int r = rw_slot_adjust(rw, i, tid, start, -1, &old);
        if (r == 0)
            continue;
        if (r < 0)
            break;
        /* seq_cst decrement, then read writer_waiting: pairs with the writer's store of
         * writer_waiting before it scans the counts. */
        if (old == 1 && atomic_load(&rw->writer_waiting) != 0) {
            atomic_fetch_add(&rw->drain, 1);
            shmkit_futex_wake(&rw->drain, WAKE_ALL);
        }
        return Py_NewRef(Py_None);
    }
    return shmkit_sync_error(op, "read_not_owned");
}

/* Holding the mutex: wait until no slot counts a read. 1 drained, 0 timeout, -EDEADLK this
 * thread reads, -EINTR exception. */
static int rw_drain(rwlock_obj *self, rwlock_t_ *rw, int64_t deadline)
{
    uint32_t tid = shmkit_gettid(), start = shmkit_thread_start(), n = self->nslots;
    int64_t slice = SHMKIT_SLICE_MIN_NS;
    int check_alive = 0, final = 0;
    atomic_store(&rw->writer_waiting, 1);
    for (;;) {
        uint32_t d = atomic_load(&rw->drain);
        uint32_t readers = 0;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t c = atomic_load(&rw->slot[i].count);
            if (c == 0)
                continue;
            uint32_t t = atomic_load(&rw->slot[i].tid), ts = atomic_load(&rw->slot[i].start);
            if (t == tid && ts == start)
                return -EDEADLK;
            if ((t == tid || (check_alive && !shmkit_task_alive_since(t, ts))) &&
                atomic_compare_exchange_strong(&rw->slot[i].count, &c, 0))
                continue; /* a dead reader (or an earlier thread with our id) */
            readers++;
        }
        if (readers == 0)
            return 1;
        if (final)
            return 0;
        check_alive = 0;
        if (deadline >= 0 && shmkit_monotonic_ns() >= deadline) {
            final = check_alive = 1; /* one last look, reclaiming dead readers, then give up */
            continue;
        }
        int r = shmkit_sleep_slice(&rw->drain, d, deadline, &slice);
        if (r == -EINTR)
            return -EINTR;
        if (r == 0)
            check_alive = 1;
    }
}

static PyObject *rwlock_acquire_write(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                                      PyObject *kwnames)
{
    int64_t deadline = -1;
    if ((nargs != 0 || kwnames != NULL) && shmkit_parse_blocking(args, nargs, kwnames, &deadline) < 0)
        return NULL;
    CHECK(op); /* after parsing: converting arguments may run Python code, even close() */
    rwlock_t_ *rw = RW(op);
    rwlock_obj *self = RWOBJ(op);
    SHMKIT_BUSY_ENTER(&self->base);
    int rc = shmkit_mutex_lock(&rw->mutex, deadline, &self->base.spin);
    if (rc < 0) { /* -EDEADLK here: this thread writes already */
        SHMKIT_BUSY_LEAVE(&self->base);
        return rw_lock_result(op, rc);
    }
    int d = rw_drain(self, rw, deadline);
    atomic_store(&rw->writer_waiting, 0);
    if (d <= 0) /* no write section happened: leave `recovered` as it was */
        shmkit_mutex_unlock(&rw->mutex, 0);
    SHMKIT_BUSY_LEAVE(&self->base);
    if (d == -EDEADLK) /* this thread reads */
        return shmkit_sync_error(op, "read_then_write");
    if (d <= 0)
        return rw_lock_result(op, d == 0 ? -ETIMEDOUT : d);
    Py_RETURN_TRUE;
}

static PyObject *rwlock_release_write(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    if (shmkit_mutex_unlock(&RW(op)->mutex, 1) < 0)
        return shmkit_sync_error(op, "write_not_owned");
    Py_RETURN_NONE;
}

static PyObject *rwlock_mark_consistent(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    shmkit_mutex_t *m = &RW(op)->mutex;
    if ((atomic_load(&m->word) & SHMKIT_MUTEX_OWNER_MASK) != shmkit_gettid())
        return shmkit_sync_error(op, "write_not_owned");
    atomic_store(&m->recovered, 0);
    Py_RETURN_NONE;
}

static PyObject *rwlock_is_writer(PyObject *op, PyObject *unused)
{
    (void)unused;
    CHECK(op);
    uint32_t v = atomic_load(&RW(op)->mutex.word);
    return PyBool_FromLong((v & SHMKIT_MUTEX_OWNER_MASK) == shmkit_gettid());
}

static PyObject *rwlock_get_recovered(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyBool_FromLong(atomic_load(&RW(op)->mutex.recovered) != 0);
}

static PyObject *rwlock_get_readers(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    unsigned long long total = 0;
    for (uint32_t i = 0; i < RWOBJ(op)->nslots; i++)
        total += atomic_load(&RW(op)->slot[i].count);
    return PyLong_FromUnsignedLongLong(total);
}

static PyObject *rwlock_get_writer_pid(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    shmkit_mutex_t *m = &RW(op)->mutex;
    if ((atomic_load(&m->word) & SHMKIT_MUTEX_OWNER_MASK) == 0)
        return PyLong_FromLong(0);
    return PyLong_FromUnsignedLong(atomic_load(&m->owner_pid));
}

static PyObject *rwlock_get_slots(PyObject *op, void *closure)
{
    (void)closure;
    CHECK(op);
    return PyLong_FromUnsignedLong(RWOBJ(op)->nslots);
}

static PyMethodDef rwlock_methods[] = {
    {"acquire_read", (PyCFunction)(void (*)(void))rwlock_acquire_read,
     METH_FASTCALL | METH_KEYWORDS, "acquire_read(blocking=True, timeout=None) -> bool"},
    {"release_read", rwlock_release_read, METH_NOARGS, "release_read()"},
    {"acquire_write", (PyCFunction)(void (*)(void))rwlock_acquire_write,
     METH_FASTCALL | METH_KEYWORDS, "acquire_write(blocking=True, timeout=None) -> bool"},
    {"release_write", rwlock_release_write, METH_NOARGS, "release_write()"},
    {"mark_consistent", rwlock_mark_consistent, METH_NOARGS,
     "mark_consistent(): the writer repaired the data; clear `recovered`."},
    {"_is_writer", rwlock_is_writer, METH_NOARGS, "_is_writer() -> bool: this thread writes."},
    SHMKIT_SYNCOBJ_METHODS
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef rwlock_getset[] = {
    {"recovered", rwlock_get_recovered, NULL,
     "True from a writer's death until a writer repairs (mark_consistent or release_write).", NULL},
    {"readers", rwlock_get_readers, NULL, "Read holds counted now.", NULL},
    {"writer_pid", rwlock_get_writer_pid, NULL, "Process id of the writer (0: none).", NULL},
    {"max_readers", rwlock_get_slots, NULL, "Reader slots: threads that can read at once.", NULL},
    SHMKIT_SYNCOBJ_GETSET
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RWLockType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._native.RWLock",
    .tp_doc = "RWLock(buffer, offset, slots, spin_ns=-1): C core of shmkit.RWLock.",
    .tp_basicsize = sizeof(rwlock_obj),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = rwlock_init,
    .tp_dealloc = shmkit_syncobj_dealloc,
    .tp_methods = rwlock_methods,
    .tp_getset = rwlock_getset,
};

int shmkit_init_sync(PyObject *module)
{
    if (add_type(module, &SemaphoreType, "Semaphore") < 0 || add_type(module, &EventType, "Event") < 0 ||
        add_type(module, &CondSeqType, "CondSeq") < 0 || add_type(module, &AtomicIntType, "AtomicInt") < 0 ||
        add_type(module, &AtomicU32Type, "AtomicU32") < 0 || add_type(module, &BarrierType, "Barrier") < 0 ||
        add_type(module, &RWLockType, "RWLock") < 0)
        return -1;
    if (PyModule_AddIntConstant(module, "SEMAPHORE_SIZE", SEM_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "SEMAPHORE_VALUE_MAX", SEM_LIMIT) < 0 ||
        PyModule_AddIntConstant(module, "EVENT_SIZE", EVENT_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "CONDSEQ_SIZE", CONDSEQ_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "BARRIER_SIZE", BARRIER_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "BARRIER_MAX_PARTIES", BARRIER_MAX_PARTIES) < 0 ||
        PyModule_AddIntConstant(module, "RWLOCK_HEADER_SIZE", RW_HEADER) < 0 ||
        PyModule_AddIntConstant(module, "RWLOCK_SLOT_SIZE", RW_SLOT_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "RWLOCK_MAX_SLOTS", RW_MAX_SLOTS) < 0)
        return -1;
    return 0;
}
