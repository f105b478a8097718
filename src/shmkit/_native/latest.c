/* Latest: the newest value of some state, written by any process, read by many without
 * ever blocking the writer (issue 5, "latest value").
 *
 * Layout (offsets from the start of the segment):
 *
 *   0     typed header (layout.py, 128 bytes)
 *   128   control line (lt_ctrl, 64 bytes)
 *   192   `slots` buffers of `stride` bytes: a 64-byte slot header (lt_slot) then the value
 *
 * Value number n (1, 2, ...) goes to buffer n % slots. The writer marks the buffer odd
 * (seq = 2n + 1), copies, marks it even (seq = 2n + 2), then publishes n in `latest`. A reader
 * reads `latest`, copies buffer n % slots and checks that its seq was 2n + 2 before and after
 * the copy (seqlock); otherwise it retries with the newer `latest`. A reader can only be
 * disturbed when the writers complete `slots - 1` further values during one copy, and a
 * writer killed at any instruction leaves `latest` on a complete value.
 *
 * Writers take a small lock (the holder's thread id in `writer`); a holder that died is
 * detected with shmkit_task_alive and the lock is taken from it. Readers take no lock.
 *
 * Within a process: get, set and wait may release the GIL while they hold raw pointers into
 * the mapping, so each counts itself in `busy`; close() wakes them, waits for them to leave
 * (they raise ValueError) and only then releases the mapping.
 */
#include "native.h"
#include "bcast.h"

#include <errno.h>
#include <limits.h>
#include <sched.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "Latest waits on the low half of a u64: little-endian only"
#endif

#define LT_MAGIC 0x5453544cu /* "LTST" */
#define LT_VERSION 1u
#define LT_CTRL_OFFSET 128
#define LT_SLOTS_OFFSET 192
#define LT_SLOT_HDR 64
#define LT_MAX_SLOTS 64u
#define LT_CHECK_NS (1000 * 1000LL)
#define LT_POLL_NS (5 * 1000 * 1000LL)

typedef struct {
    uint32_t magic, version;
    uint64_t max_size;
    uint32_t slots, reserved0;
    uint64_t stride;
    _Atomic uint64_t latest;     /* number of the newest complete value (0: none yet) */
    _Atomic uint32_t writer;     /* thread id holding the write lock, 0 = free */
    _Atomic uint32_t writer_pid; /* its process, for inspection */
    _Atomic uint32_t wake;       /* 1: a reader may sleep on the low half of latest */
    uint32_t reserved1;
    _Atomic uint64_t steals;     /* write locks taken from dead writers */
} lt_ctrl;

_Static_assert(sizeof(lt_ctrl) == 64, "Latest control line");

typedef struct {
    _Atomic uint64_t seq; /* 2n + 1 while value n is written, 2n + 2 once complete */
    _Atomic uint64_t len;
    _Atomic uint64_t written_ns;
    uint64_t reserved[5];
} lt_slot;

_Static_assert(sizeof(lt_slot) == LT_SLOT_HDR, "Latest slot header");

typedef struct {
    PyObject_HEAD
    Py_buffer buf;
    int have_buf, writable;
    lt_ctrl *c;
    char *slots;
    uint64_t max_size, stride;
    uint32_t nslots;
    PyObject *name, *label;
    PyObject *weakrefs;
    int busy;          /* calls in progress in this process (they may release the GIL) */
    int closing;       /* close() is waiting for them */
    uint32_t busy_pid; /* the process `busy` counts in: a forked child starts from zero */
} LtObj;

/* The Latest objects whose calls this thread is inside (more than one only when a signal
 * handler calls into a Latest while a call waits): close() from there must not wait for
 * itself. */
#define LT_NEST 8
static __thread LtObj *lt_inside[LT_NEST];
static __thread int lt_depth;

static uint64_t lt_stride(uint64_t max_size)
{
    return LT_SLOT_HDR + ((max_size + 63) & ~(uint64_t)63);
}

static void lt_corrupt(LtObj *o, const char *why)
{
    PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.corrupt),
                 "latest value %U is corrupt: %s; remove it with `shmkit rm %U` and create it "
                 "again",
                 o->label, why, o->name);
}

static int lt_check(LtObj *o)
{
    if (!o->have_buf) {
        PyErr_Format(PyExc_ValueError, "latest value %U is closed; open it again",
                     o->label != NULL ? o->label : Py_None);
        return -1;
    }
    return 0;
}

/* Start a call that may release the GIL: the mapping stays until lt_leave. */
static int lt_enter(LtObj *o)
{
    if (lt_check(o) < 0)
        return -1;
    uint32_t me = shmkit_bcast_getpid();
    if (o->busy_pid != me) { /* counted by threads of the parent, which do not exist here */
        o->busy_pid = me;
        o->busy = 0;
        o->closing = 0;
    }
    if (o->closing) {
        PyErr_Format(PyExc_ValueError, "latest value %U is being closed", o->label);
        return -1;
    }
    o->busy++;
    if (lt_depth < LT_NEST)
        lt_inside[lt_depth] = o;
    lt_depth++;
    return 0;
}

static void lt_leave(LtObj *o)
{
    o->busy--;
    lt_depth--;
}

/* After re-taking the GIL inside a call: did close() start meanwhile? */
static int lt_closed_meanwhile(LtObj *o)
{
    if (!o->closing)
        return 0;
    PyErr_Format(PyExc_ValueError,
                 "latest value %U was closed by another thread during this call", o->label);
    return 1;
}

static void lt_release(LtObj *o)
{
    if (o->have_buf) {
        PyBuffer_Release(&o->buf);
        o->have_buf = 0;
    }
    o->c = NULL;
    o->slots = NULL;
}

static void lt_dealloc(PyObject *self)
{
    LtObj *o = (LtObj *)self;
    if (o->weakrefs != NULL)
        PyObject_ClearWeakRefs(self);
    lt_release(o);
    Py_CLEAR(o->name);
    Py_CLEAR(o->label);
    Py_TYPE(self)->tp_free(self);
}

static PyObject *lt_attach(PyObject *self, PyObject *args)
{
    LtObj *o = (LtObj *)self;
    PyObject *buffer, *name, *label;
    unsigned long long max_size, slots;
    int writable;
    if (o->have_buf) {
        PyErr_SetString(PyExc_RuntimeError, "already attached");
        return NULL;
    }
    if (!PyArg_ParseTuple(args, "OKKUUp", &buffer, &max_size, &slots, &name, &label, &writable))
        return NULL;
    if (slots < 2 || slots > LT_MAX_SLOTS || max_size > (1ULL << 48)) {
        PyErr_SetString(PyExc_ValueError, "impossible Latest geometry");
        return NULL;
    }
    Py_INCREF(name);
    Py_XSETREF(o->name, name);
    Py_INCREF(label);
    Py_XSETREF(o->label, label);
    if (PyObject_GetBuffer(buffer, &o->buf, writable ? PyBUF_WRITABLE : PyBUF_SIMPLE) < 0)
        return NULL;
    o->have_buf = 1;
    uint64_t stride = lt_stride(max_size);
    if ((uint64_t)o->buf.len < LT_SLOTS_OFFSET + stride * slots ||
        ((uintptr_t)o->buf.buf & 63) != 0) {
        lt_release(o);
        PyErr_SetString(PyExc_ValueError, "buffer too small or misaligned for this Latest");
        return NULL;
    }
    o->c = (lt_ctrl *)((char *)o->buf.buf + LT_CTRL_OFFSET);
    o->slots = (char *)o->buf.buf + LT_SLOTS_OFFSET;
    o->max_size = max_size;
    o->stride = stride;
    o->nslots = (uint32_t)slots;
    o->writable = writable;
    if (o->c->magic != LT_MAGIC || o->c->version != LT_VERSION || o->c->max_size != max_size ||
        o->c->slots != slots || o->c->stride != stride) {
        lt_corrupt(o, "its control block disagrees with its header");
        lt_release(o);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* Take the write lock: 0 taken, 1 deadline passed, -1 exception (signal). */
static int lt_lock(LtObj *o, int64_t deadline)
{
    lt_ctrl *c = o->c;
    uint32_t me = shmkit_gettid();
    int64_t last_check = 0;
    for (unsigned i = 0;; i++) {
        uint32_t holder = 0;
        if (atomic_compare_exchange_weak(&c->writer, &holder, me))
            break;
        if (holder == me)
            break; /* ids are unique on the machine: a previous call of ours, cut short */
        if (i < 200) {
            shmkit_cpu_relax();
            continue;
        }
        int64_t now = shmkit_monotonic_ns();
        if (now - last_check >= LT_CHECK_NS) {
            last_check = now;
            if (holder != 0 && !shmkit_task_alive(holder) &&
                atomic_compare_exchange_strong(&c->writer, &holder, me)) {
                atomic_fetch_add(&c->steals, 1);
                break;
            }
        }
        if (deadline >= 0 && now >= deadline)
            return 1;
        Py_BEGIN_ALLOW_THREADS
        sched_yield();
        Py_END_ALLOW_THREADS
        if (PyErr_CheckSignals() < 0 || lt_closed_meanwhile(o))
            return -1;
    }
    atomic_store_explicit(&c->writer_pid, shmkit_bcast_getpid(), memory_order_relaxed);
    return 0;
}

static const char *const set_names[] = {"data", "timeout"};

PyDoc_STRVAR(lt_set_doc,
"set(data, timeout=None)\n--\n\n"
"Make data (bytes-like) the newest value. Readers are never waited for; the call waits only\n"
"for another writer in the middle of its own copy (timeout bounds that wait).\n\n"
"Raises:\n"
"    MessageTooLargeError: data is larger than max_size.\n"
"    WaitTimeoutError: another writer held the write lock past the timeout.");

static PyObject *lt_set(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                        PyObject *kwnames)
{
    LtObj *o = (LtObj *)self;
    PyObject *a[2];
    int64_t timeout_ns = -1, deadline = -1;
    if (kwnames == NULL && nargs == 1) {
        a[0] = args[0];
    } else if (shmkit_bcast_parse("set", args, nargs, kwnames, set_names, 2, 1, a) < 0 ||
               shmkit_bcast_timeout(a[1], &timeout_ns) < 0) {
        return NULL;
    }
    if (timeout_ns >= 0)
        deadline = shmkit_monotonic_ns() + timeout_ns;
    if (lt_check(o) < 0)
        return NULL;
    if (!o->writable) {
        PyErr_Format(PyExc_PermissionError,
                     "latest value %U was opened read-only; open it writable to set it", o->label);
        return NULL;
    }
    Py_buffer view;
    if (PyObject_GetBuffer(a[0], &view, PyBUF_SIMPLE) < 0) {
        PyErr_Format(PyExc_TypeError, "data must be a bytes-like object, not %.100s",
                     Py_TYPE(a[0])->tp_name);
        return NULL;
    }
    if ((uint64_t)view.len > o->max_size) {
        PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.too_large),
                     "value of %zd bytes exceeds max_size (%llu bytes) of latest value %U; "
                     "create it with a larger max_size",
                     view.len, (unsigned long long)o->max_size, o->label);
        PyBuffer_Release(&view);
        return NULL;
    }
    if (lt_enter(o) < 0) {
        PyBuffer_Release(&view);
        return NULL;
    }
    int rc = lt_lock(o, deadline);
    if (rc != 0) {
        if (rc == 1)
            PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.timeout),
                         "cannot set latest value %U: another writer (tid %u) held it past the "
                         "timeout",
                         o->label, atomic_load(&o->c->writer));
        lt_leave(o);
        PyBuffer_Release(&view);
        return NULL;
    }
    lt_ctrl *c = o->c;
    uint64_t n = atomic_load_explicit(&c->latest, memory_order_acquire) + 1;
    lt_slot *sl = (lt_slot *)(o->slots + (n % o->nslots) * o->stride);
    /* release: readers that see the odd seq also see the latest we read (it moved past
     * this buffer's previous value) */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&sl->seq, 2 * n + 1, memory_order_relaxed);
    /* seqlock writer: the odd seq is visible before any byte of the new value */
    atomic_thread_fence(memory_order_release);
    atomic_store_explicit(&sl->len, (uint64_t)view.len, memory_order_relaxed);
    /* memmove: the value may be a view of this very segment */
    memmove((char *)sl + LT_SLOT_HDR, view.buf, (size_t)view.len);
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    atomic_store_explicit(&sl->written_ns, (uint64_t)ts.tv_sec * 1000000000u + ts.tv_nsec,
                          memory_order_relaxed);
    atomic_store_explicit(&sl->seq, 2 * n + 2, memory_order_release);
    atomic_store_explicit(&c->latest, n, memory_order_release);
    atomic_store_explicit(&c->writer, 0, memory_order_release);
    PyBuffer_Release(&view);
    /* wake readers sleeping in wait(): they raise the flag, then re-read latest */
    atomic_thread_fence(memory_order_seq_cst);
    if (atomic_load_explicit(&c->wake, memory_order_relaxed) != 0 &&
        atomic_exchange(&c->wake, 0) != 0)
        shmkit_futex_wake((_Atomic uint32_t *)&c->latest, INT_MAX);
    lt_leave(o);
    Py_RETURN_NONE;
}

/* Copy the newest value: 1 got it (*version, *out), 0 nothing set yet, -1 exception. */
static int lt_read(LtObj *o, uint64_t *version, PyObject **out)
{
    lt_ctrl *c = o->c;
    int stuck = 0;
    int64_t started = 0;
    for (unsigned attempt = 1;; attempt++) {
        uint64_t n = atomic_load_explicit(&c->latest, memory_order_acquire);
        if (n == 0)
            return 0;
        lt_slot *sl = (lt_slot *)(o->slots + (n % o->nslots) * o->stride);
        uint64_t s1 = atomic_load_explicit(&sl->seq, memory_order_acquire);
        if (s1 == 2 * n + 2) {
            uint64_t len = atomic_load_explicit(&sl->len, memory_order_relaxed);
            if (len <= o->max_size) {
                PyObject *obj = PyBytes_FromStringAndSize((char *)sl + LT_SLOT_HDR,
                                                          (Py_ssize_t)len);
                if (obj == NULL)
                    return -1;
                /* acquire: the copy completes before seq is checked again */
                atomic_thread_fence(memory_order_acquire);
                if (atomic_load_explicit(&sl->seq, memory_order_relaxed) == s1) {
                    *version = n;
                    *out = obj;
                    return 1;
                }
                Py_DECREF(obj);
            } else if (atomic_load_explicit(&sl->seq, memory_order_acquire) == s1 &&
                       atomic_load_explicit(&c->latest, memory_order_acquire) == n) {
                lt_corrupt(o, "the newest value's length exceeds max_size");
                return -1;
            }
            stuck = 0;
        } else if (atomic_load_explicit(&c->latest, memory_order_acquire) == n) {
            /* value n was complete before latest said n; only a newer value may reuse its
             * buffer, and that needs latest to move on: a stable mismatch is damage */
            if (++stuck >= 3) {
                lt_corrupt(o, "its newest value is not in the buffer that should hold it");
                return -1;
            }
        }
        if ((attempt & 63) == 0) {
            int64_t now = shmkit_monotonic_ns();
            if (started == 0)
                started = now;
            else if (now - started > 5 * 1000000000LL) {
                PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.timeout),
                             "could not read a complete value of latest value %U for 5 s: the "
                             "writers replaced every buffer during each copy; create it with "
                             "more slots",
                             o->label);
                return -1;
            }
            if (PyErr_CheckSignals() < 0)
                return -1;
            Py_BEGIN_ALLOW_THREADS
            sched_yield();
            Py_END_ALLOW_THREADS
            if (lt_closed_meanwhile(o))
                return -1;
        }
    }
}

static int lt_raise_unset(LtObj *o)
{
    PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.empty),
                 "latest value %U has not been set yet", o->label);
    return -1;
}

PyDoc_STRVAR(lt_get_doc,
"get() -> bytes\n--\n\n"
"The newest complete value. Never blocks the writer and never returns a torn value.\n\n"
"Raises:\n"
"    Empty: no value has been set yet.");

static PyObject *lt_get(PyObject *self, PyObject *unused)
{
    LtObj *o = (LtObj *)self;
    (void)unused;
    if (lt_enter(o) < 0)
        return NULL;
    uint64_t v;
    PyObject *out;
    int rc = lt_read(o, &v, &out);
    lt_leave(o);
    if (rc == 0)
        lt_raise_unset(o);
    return rc == 1 ? out : NULL;
}

static PyObject *lt_get_versioned(PyObject *self, PyObject *unused)
{
    LtObj *o = (LtObj *)self;
    (void)unused;
    if (lt_enter(o) < 0)
        return NULL;
    uint64_t v;
    PyObject *out;
    int rc = lt_read(o, &v, &out);
    lt_leave(o);
    if (rc == 0)
        return lt_raise_unset(o), NULL;
    if (rc < 0)
        return NULL;
    return Py_BuildValue("(KN)", (unsigned long long)v, out);
}

static PyObject *lt_wait(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                         PyObject *kwnames)
{
    LtObj *o = (LtObj *)self;
    static const char *const names[] = {"version", "timeout"};
    PyObject *a[2];
    int64_t timeout_ns, deadline = -1;
    if (shmkit_bcast_parse("wait", args, nargs, kwnames, names, 2, 1, a) < 0 ||
        shmkit_bcast_timeout(a[1], &timeout_ns) < 0)
        return NULL;
    if (timeout_ns >= 0)
        deadline = shmkit_monotonic_ns() + timeout_ns;
    unsigned long long after = PyLong_AsUnsignedLongLong(a[0]);
    if (after == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (lt_enter(o) < 0)
        return NULL;
    PyObject *result = NULL;
    lt_ctrl *c = o->c;
    _Atomic uint32_t *word = (_Atomic uint32_t *)&c->latest;
    for (;;) {
        uint64_t n = atomic_load_explicit(&c->latest, memory_order_acquire);
        if (n > after) {
            result = PyLong_FromUnsignedLongLong(n);
            break;
        }
        int64_t now = shmkit_monotonic_ns();
        if (deadline >= 0 && now >= deadline) {
            PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.timeout),
                         "latest value %U got no value newer than version %llu before the "
                         "timeout",
                         o->label, after);
            break;
        }
        int rc;
        if (o->writable) {
            atomic_exchange(&c->wake, 1);
            /* seq_cst fence: the flag is visible before latest is read again (pairs with the
             * fence in lt_set); the exchange alone does not order a later acquire load on
             * weakly ordered CPUs, which would lose the wake-up */
            atomic_thread_fence(memory_order_seq_cst);
            uint64_t again = atomic_load_explicit(&c->latest, memory_order_acquire);
            rc = again > after ? 1 : shmkit_wait_u32(word, (uint32_t)again, deadline, -1);
        } else {
            /* read-only mapping: we cannot count ourselves, so poll in short sleeps */
            int64_t until = now + LT_POLL_NS;
            if (deadline >= 0 && until > deadline)
                until = deadline;
            rc = shmkit_wait_u32(word, (uint32_t)n, until, -1);
        }
        if (rc < 0 || lt_closed_meanwhile(o))
            break;
    }
    lt_leave(o);
    return result;
}

static PyObject *lt_close(PyObject *self, PyObject *unused)
{
    LtObj *o = (LtObj *)self;
    (void)unused;
    if (!o->have_buf)
        Py_RETURN_NONE;
    if (o->busy_pid != shmkit_bcast_getpid())
        o->busy = 0; /* counted by threads of the parent, which do not exist in this child */
    for (int i = 0; i < lt_depth && i < LT_NEST; i++) {
        if (lt_inside[i] == o) {
            PyErr_Format(PyExc_RuntimeError,
                         "cannot close latest value %U from inside one of its own calls (a "
                         "signal handler?); close it after that call returns",
                         o->label);
            return NULL;
        }
    }
    /* Other threads are inside calls holding pointers into the mapping: wake them (waiters
     * sleep on latest; the wake-up is repeated because one may be about to sleep) and wait
     * until they have left, raising ValueError. */
    if (o->busy > 0) {
        o->closing = 1;
        while (o->busy > 0) {
            shmkit_futex_wake((_Atomic uint32_t *)&o->c->latest, INT_MAX);
            Py_BEGIN_ALLOW_THREADS
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
            Py_END_ALLOW_THREADS
            if (PyErr_CheckSignals() < 0) {
                o->closing = 0;
                return NULL;
            }
        }
        o->closing = 0;
    }
    lt_release(o);
    Py_RETURN_NONE;
}

static PyObject *lt_get_version(PyObject *self, void *closure)
{
    LtObj *o = (LtObj *)self;
    (void)closure;
    if (lt_check(o) < 0)
        return NULL;
    return PyLong_FromUnsignedLongLong(atomic_load_explicit(&o->c->latest, memory_order_acquire));
}

static PyObject *lt_get_closed(PyObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(!((LtObj *)self)->have_buf);
}

static PyMethodDef lt_methods[] = {
    {"set", (PyCFunction)(void (*)(void))lt_set, METH_FASTCALL | METH_KEYWORDS, lt_set_doc},
    {"get", lt_get, METH_NOARGS, lt_get_doc},
    {"get_versioned", lt_get_versioned, METH_NOARGS,
     "get_versioned() -> (version, bytes)\n--\n\nThe newest value and its version (values "
     "written so far, counting this one).\n\nRaises:\n    Empty: no value has been set yet."},
    {"wait", (PyCFunction)(void (*)(void))lt_wait, METH_FASTCALL | METH_KEYWORDS,
     "wait(version, timeout=None) -> int\n--\n\nWait until a value newer than version is set; "
     "return the newest version.\n\nRaises:\n    WaitTimeoutError: none before the timeout."},
    {"_attach", lt_attach, METH_VARARGS,
     "Internal: _attach(buffer, max_size, slots, name, label, writable)."},
    {"_close", lt_close, METH_NOARGS, "Internal: release the mapping."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef lt_getset[] = {
    {"version", lt_get_version, NULL, "Number of values set so far (0: none).", NULL},
    {"closed", lt_get_closed, NULL, "Whether this object was closed.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject LtType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._native.LatestCore",
    .tp_basicsize = sizeof(LtObj),
    .tp_dealloc = lt_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "C core of shmkit.broadcast.Latest.",
    .tp_methods = lt_methods,
    .tp_getset = lt_getset,
    .tp_new = PyType_GenericNew,
    .tp_weaklistoffset = offsetof(LtObj, weakrefs),
};

static PyObject *py_latest_format(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *buffer;
    unsigned long long max_size, slots;
    if (!PyArg_ParseTuple(args, "OKK", &buffer, &max_size, &slots))
        return NULL;
    if (slots < 2 || slots > LT_MAX_SLOTS || max_size > (1ULL << 48)) {
        PyErr_SetString(PyExc_ValueError, "impossible Latest geometry");
        return NULL;
    }
    uint64_t stride = lt_stride(max_size);
    shmkit_window w;
    if (shmkit_window_get(buffer, 0, (Py_ssize_t)(LT_SLOTS_OFFSET + stride * slots), 64, 1, &w) <
        0)
        return NULL;
    lt_ctrl *c = (lt_ctrl *)(w.ptr + LT_CTRL_OFFSET);
    memset(c, 0, sizeof *c);
    c->magic = LT_MAGIC;
    c->version = LT_VERSION;
    c->max_size = max_size;
    c->slots = (uint32_t)slots;
    c->stride = stride;
    shmkit_window_release(&w);
    Py_RETURN_NONE;
}

static PyMethodDef latest_functions[] = {
    {"latest_format", py_latest_format, METH_VARARGS,
     "latest_format(buffer, max_size, slots)\n--\n\nInternal: write the control line of a new "
     "Latest."},
    {NULL, NULL, 0, NULL},
};

int shmkit_init_latest(PyObject *module)
{
    if (PyType_Ready(&LtType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "LatestCore", (PyObject *)&LtType) < 0)
        return -1;
    return PyModule_AddFunctions(module, latest_functions);
}
