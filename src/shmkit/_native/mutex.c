/* The robust process-shared mutex, and the base every synchronisation object type shares.
 *
 * Why not glibc's PTHREAD_MUTEX_ROBUST or the kernel robust list: both keep a linked list
 * whose pointers live in the shared lock itself, and the kernel (at thread exit) and glibc (at
 * unlock) write through them. A process scribbling on the segment could aim those writes
 * anywhere in our address space (DESIGN invariant 1). Instead the lock word holds the owner's
 * kernel thread id (and owner_start its start time), and a waiter that has slept one slice asks
 * whether that task still runs and is the same task (shmkit_task_alive and /proc: zombies count
 * as dead, and so does a new task that reused a dead owner's id). A dead owner's lock is taken
 * over with a compare-and-swap from the exact dead value, so exactly one waiter recovers it,
 * and the new holder is told through the `recovered` field. Any value in the word is therefore either
 * "free", "owned by a live task" (wait, up to the timeout) or "owned by a dead or impossible
 * task" (recover): never a crash or a hang without end.
 *
 * All users of one lock must share a pid namespace: thread ids from another namespace mean
 * nothing here (an unknown id counts as dead).
 */
#include "sync.h"

#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define SHMKIT_DEFAULT_SPIN_NS 20000

/* ---- process id cache -------------------------------------------------------------------- */

static uint32_t cached_pid;
unsigned shmkit_fork_epoch;

static void forget_me(void);

/* In a forked child (pthread_atfork): new ids, and calls of the parent's other threads are
 * not under way here (see SHMKIT_BUSY). */
static void forget_ids(void)
{
    cached_pid = 0;
    forget_me();
    shmkit_fork_epoch++;
}

uint32_t shmkit_getpid_cached(void)
{
    uint32_t pid = __atomic_load_n(&cached_pid, __ATOMIC_RELAXED);
    if (pid == 0) {
        pid = (uint32_t)getpid();
        __atomic_store_n(&cached_pid, pid, __ATOMIC_RELAXED);
    }
    return pid;
}

/* ---- thread start times: telling a reused thread id from the dead owner ------------------ */

/* Field 22 (starttime) of a /proc stat file. 1 and *start (low 32 bits, never 0) on success, 0
 * when the task is gone, -1 when it cannot be read or parsed. */
static int read_start(const char *path, uint32_t *start)
{
    char buf[512];
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return errno == ENOENT || errno == ESRCH ? 0 : -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return n == 0 ? 0 : (errno == ESRCH ? 0 : -1);
    buf[n] = '\0';
    /* The command name (field 2) may hold spaces and ')': count fields after the last ')'. */
    char *p = strrchr(buf, ')');
    if (p == NULL)
        return -1;
    p++;
    for (int field = 2; field < 22; field++) {
        p = strchr(p, ' ');
        if (p == NULL)
            return -1;
        p++;
    }
    char *end;
    unsigned long long ticks = strtoull(p, &end, 10);
    if (end == p)
        return -1;
    *start = (uint32_t)ticks ? (uint32_t)ticks : 1;
    return 1;
}

/* This thread's identity, cached in one thread-local (one TLS lookup on the hot path): its
 * kernel thread id and start time. Zeroed in a forked child, where the only thread is the
 * one that forked; new threads start zeroed. */
static __thread struct {
    uint32_t tid, start;
} me;

static void forget_me(void)
{
    me.tid = me.start = 0;
}

static uint32_t learn_me(void)
{
    uint32_t s;
    me.start = read_start("/proc/thread-self/stat", &s) == 1 ? s : 0;
    me.tid = shmkit_gettid();
    return me.tid;
}

static inline uint32_t my_tid(void)
{
    uint32_t tid = me.tid;
    return tid != 0 ? tid : learn_me();
}

uint32_t shmkit_thread_start(void)
{
    my_tid();
    return me.start;
}

int shmkit_task_alive_since(uint32_t tid, uint32_t start)
{
    if (!shmkit_task_alive(tid))
        return 0;
    if (start == 0)
        return 1;
    char path[48];
    uint32_t now;
    snprintf(path, sizeof path, "/proc/%u/stat", tid);
    int rc = read_start(path, &now);
    return rc < 0 ? 1 : rc == 1 && now == start;
}

/* ---- the lock itself --------------------------------------------------------------------- */

/* Take a free word (owner part 0). Acquire ordering: the holder sees everything the previous
 * holder wrote before its release exchange in shmkit_mutex_unlock. */
static inline int take(shmkit_mutex_t *m, uint32_t *seen, uint32_t desired)
{
    return atomic_compare_exchange_strong_explicit(&m->word, seen, desired, memory_order_acquire,
                                                   memory_order_relaxed);
}

static inline void note_owner(shmkit_mutex_t *m, int recovered)
{
    /* Relaxed: inspection and incarnation fields, ordered before the unlock's release
     * exchange anyway. */
    atomic_store_explicit(&m->owner_start, me.start, memory_order_relaxed); /* set by my_tid() */
    atomic_store_explicit(&m->owner_pid, shmkit_getpid_cached(), memory_order_relaxed);
    if (recovered)
        atomic_store_explicit(&m->recovered, 1, memory_order_relaxed);
}

/* Is the owner named by `v` gone? Called after a sleep slice ran out (and once at the
 * deadline). A dead or impossible task is gone at once. A live task whose start time differs
 * from owner_start is a new task that reused the dead owner's id; since owner_start is
 * written just after the word, one snapshot could mix two holders, so that verdict needs the
 * same (word, owner_start) on two checks in a row, a slice apart. A holder's owner_start is
 * never stale for longer than it takes to store it: unlock and take-over zero it first. */
static int owner_gone(shmkit_mutex_t *m, uint32_t v, uint32_t suspect[2])
{
    uint32_t owner = v & SHMKIT_MUTEX_OWNER_MASK;
    if (!shmkit_task_alive(owner))
        return 1;
    /* Acquire, then read owner_start: whoever made the word `v` (an unlock's release
     * exchange followed by a take, or a take-over's seq_cst CAS) zeroed the previous owner's
     * start before, so we see 0 or the current owner's own value, never an older owner's. */
    uint32_t start = 0;
    if (atomic_load_explicit(&m->word, memory_order_acquire) == v)
        start = atomic_load(&m->owner_start);
    if (start == 0 || shmkit_task_alive_since(owner, start) || atomic_load(&m->word) != v) {
        suspect[0] = suspect[1] = 0;
        return 0;
    }
    if (suspect[0] == v && suspect[1] == start)
        return 1;
    suspect[0] = v;
    suspect[1] = start;
    return 0;
}

/* Take over from the dead owner named by `v`: exactly one waiter wins the compare-and-swap. */
static int take_over(shmkit_mutex_t *m, uint32_t *v, uint32_t tid)
{
    /* Forget the dead owner's start first, so nobody pairs it with the new owner's id. If
     * the word has moved on meanwhile this may zero a live holder's value: that only makes
     * its incarnation "not known", and the take below then fails. */
    uint32_t start = atomic_load(&m->owner_start);
    if (start != 0)
        atomic_compare_exchange_strong(&m->owner_start, &start, 0);
    /* seq_cst (not just acquire as in take()): publishes the zeroing above with the word. */
    return atomic_compare_exchange_strong(&m->word, v, tid | SHMKIT_MUTEX_WAITERS);
}

/* How long this wait may spin (see shmkit_spin). */
static int64_t spin_plan(shmkit_spin *s)
{
    if (s->max_ns <= 0)
        return 0;
    if ((++s->waits % ((uint32_t)SHMKIT_SPIN_PROBE_EVERY << s->probe_shift)) == 0 ||
        s->budget_ns > s->max_ns)
        return s->max_ns;
    return s->budget_ns;
}

/* Learn from a spin of `plan` ns that ended after `elapsed` ns, with the hand-off (`ok`) or
 * without. */
static void spin_learn(shmkit_spin *s, int64_t plan, int ok, int64_t elapsed)
{
    int64_t floor = s->max_ns < SHMKIT_SPIN_FLOOR_NS ? s->max_ns : SHMKIT_SPIN_FLOOR_NS;
    if (plan == s->max_ns && s->budget_ns < s->max_ns) /* a probe */
        s->probe_shift = ok ? 0 : s->probe_shift < 6 ? s->probe_shift + 1 : 6;
    if (ok) {
        s->fails = 0;
        if (4 * elapsed > s->budget_ns)
            s->budget_ns = 4 * elapsed < s->max_ns ? 4 * elapsed : s->max_ns;
    } else if (++s->fails >= SHMKIT_SPIN_FAILS_TO_SHRINK) {
        s->fails = 0;
        s->budget_ns = s->budget_ns / 2 > floor ? s->budget_ns / 2 : floor;
    }
}

/* Spin while *word == expected until `end` (monotonic ns). 1 when it changed. Touches no
 * Python object: may run without the GIL. */
static int spin_until(_Atomic uint32_t *word, uint32_t expected, int64_t end)
{
    for (unsigned i = 1;; i++) {
        shmkit_cpu_relax();
        if (atomic_load_explicit(word, memory_order_acquire) != expected)
            return 1;
        if ((i & 7) == 0 && shmkit_monotonic_ns() >= end) /* a pause is ~10-50 ns */
            return 0;
    }
}

/* The end of a spin of `spin_ns` that must not pass the deadline, and the end of its first
 * part, spent holding the GIL. */
static void spin_window(int64_t deadline_ns, int64_t spin_ns, int64_t *gil_end, int64_t *end)
{
    int64_t now = shmkit_monotonic_ns();
    *end = now + spin_ns;
    if (deadline_ns > 0 && deadline_ns < *end)
        *end = deadline_ns;
    *gil_end = now + SHMKIT_SPIN_WITH_GIL_NS < *end ? now + SHMKIT_SPIN_WITH_GIL_NS : *end;
}

/* Spin until `end` trying to take the lock. 1 when taken. May run without the GIL. */
static int spin_take(shmkit_mutex_t *m, uint32_t tid, int64_t end)
{
    for (unsigned i = 1;; i++) {
        uint32_t v = atomic_load_explicit(&m->word, memory_order_relaxed);
        if ((v & SHMKIT_MUTEX_OWNER_MASK) == 0) {
            /* Keep a WAITERS bit we find: others may be asleep. */
            if (take(m, &v, tid | (v & SHMKIT_MUTEX_WAITERS)))
                return 1;
            continue;
        }
        shmkit_cpu_relax();
        if ((i & 7) == 0 && shmkit_monotonic_ns() >= end) /* a pause is ~10-50 ns */
            return 0;
    }
}

/* Spin before sleeping: the holder is usually about to release, and a futex sleep plus
 * wake-up costs tens of microseconds. The first part holds the GIL (cheap, and enough for a
 * hand-off from another process); the rest runs without it, so that a holder in this process,
 * which may need the GIL to reach its release, is not held up (it gets no GIL-holding part at
 * all). 1 when the lock was taken. */
static int spin_phase(shmkit_mutex_t *m, uint32_t tid, int64_t deadline_ns, shmkit_spin *spin)
{
    int64_t plan = spin_plan(spin);
    if (plan <= 0)
        return 0;
    int64_t gil_end, end, started = shmkit_monotonic_ns();
    spin_window(deadline_ns, plan, &gil_end, &end);
    if (atomic_load_explicit(&m->owner_pid, memory_order_relaxed) == shmkit_getpid_cached())
        gil_end = 0;
    int took = gil_end > 0 && spin_take(m, tid, gil_end);
    if (!took && shmkit_monotonic_ns() < end) {
        Py_BEGIN_ALLOW_THREADS
        took = spin_take(m, tid, end);
        Py_END_ALLOW_THREADS
    }
    spin_learn(spin, plan, took, shmkit_monotonic_ns() - started);
    return took;
}

static int lock_slow(shmkit_mutex_t *m, uint32_t tid, uint32_t v, int64_t deadline_ns,
                     shmkit_spin *spin)
{
    if ((v & SHMKIT_MUTEX_OWNER_MASK) == tid)
        return -EDEADLK;

    if (deadline_ns != 0 && spin_phase(m, tid, deadline_ns, spin)) {
        note_owner(m, 0);
        return SHMKIT_LOCK_ACQUIRED;
    }

    int64_t slice = SHMKIT_SLICE_MIN_NS;
    int counted = 0, check_owner = 0, rc;
    uint32_t suspect[2] = {0, 0};
    for (;;) {
        v = atomic_load_explicit(&m->word, memory_order_relaxed);
        uint32_t owner = v & SHMKIT_MUTEX_OWNER_MASK;
        if (owner == 0) {
            /* We may have slept: others may still sleep, so keep the WAITERS bit set. */
            if (take(m, &v, tid | SHMKIT_MUTEX_WAITERS)) {
                rc = SHMKIT_LOCK_ACQUIRED;
                break;
            }
            continue;
        }
        if (owner == tid) { /* only a scribbled word can name us here */
            rc = -EDEADLK;
            break;
        }
        int out_of_time = deadline_ns >= 0 && shmkit_monotonic_ns() >= deadline_ns;
        if (check_owner || out_of_time) {
            check_owner = 0;
            if (owner_gone(m, v, suspect)) {
                /* From the exact dead value: if another waiter recovered first, this fails. */
                if (take_over(m, &v, tid)) {
                    rc = SHMKIT_LOCK_RECOVERED;
                    break;
                }
                continue;
            }
        }
        if (out_of_time) {
            rc = -ETIMEDOUT;
            break;
        }
        if (!(v & SHMKIT_MUTEX_WAITERS)) {
            if (!atomic_compare_exchange_strong(&m->word, &v, v | SHMKIT_MUTEX_WAITERS))
                continue;
            v |= SHMKIT_MUTEX_WAITERS;
        }
        if (!counted) {
            atomic_fetch_add_explicit(&m->waiters, 1, memory_order_relaxed);
            counted = 1;
        }
        int s = shmkit_sleep_slice(&m->word, v, deadline_ns, &slice);
        if (s == -EINTR) {
            rc = -EINTR;
            break;
        }
        if (s == 0) /* a whole slice without a wake-up: is the owner still there? */
            check_owner = 1;
    }
    if (counted)
        atomic_fetch_sub_explicit(&m->waiters, 1, memory_order_relaxed);
    if (rc >= 0)
        note_owner(m, rc == SHMKIT_LOCK_RECOVERED);
    return rc;
}

int shmkit_mutex_lock(shmkit_mutex_t *m, int64_t deadline_ns, shmkit_spin *spin)
{
    uint32_t tid = my_tid();
    uint32_t v = 0;
    if (take(m, &v, tid)) {
        note_owner(m, 0);
        return SHMKIT_LOCK_ACQUIRED;
    }
    return lock_slow(m, tid, v, deadline_ns, spin);
}

int shmkit_mutex_trylock(shmkit_mutex_t *m)
{
    uint32_t v = 0;
    if (!take(m, &v, my_tid()))
        return 0;
    note_owner(m, 0);
    return 1;
}

int shmkit_mutex_unlock(shmkit_mutex_t *m, int clear_recovered)
{
    uint32_t v = atomic_load_explicit(&m->word, memory_order_relaxed);
    if ((v & SHMKIT_MUTEX_OWNER_MASK) != my_tid())
        return -EPERM;
    if (clear_recovered && atomic_load_explicit(&m->recovered, memory_order_relaxed) != 0)
        atomic_store_explicit(&m->recovered, 0, memory_order_relaxed);
    atomic_store_explicit(&m->owner_pid, 0, memory_order_relaxed);
    atomic_store_explicit(&m->owner_start, 0, memory_order_relaxed);
    /* Release: pairs with the acquire CAS in take(); everything written while holding the lock
     * is visible to the next holder. The exchange also picks up a WAITERS bit set meanwhile. */
    v = atomic_exchange_explicit(&m->word, 0, memory_order_release);
    if (v & SHMKIT_MUTEX_WAITERS)
        shmkit_futex_wake(&m->word, 1);
    return 0;
}

/* ---- the common object base -------------------------------------------------------------- */

int shmkit_syncobj_attach(shmkit_syncobj *self, PyObject *buffer, Py_ssize_t offset,
                          Py_ssize_t size, Py_ssize_t align)
{
    if (self->mem != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this object is already attached to memory");
        return -1;
    }
    shmkit_window w;
    if (shmkit_window_get(buffer, offset, size, align, 1, &w) < 0)
        return -1;
    self->view = w.view;
    self->mem = w.ptr;
    self->size = size;
    self->busy = 0;
    self->busy_epoch = shmkit_fork_epoch;
    if (self->spin.max_ns < 0)
        self->spin.max_ns = SHMKIT_DEFAULT_SPIN_NS;
    self->spin.budget_ns = self->spin.max_ns;
    self->spin.waits = self->spin.probe_shift = self->spin.fails = 0;
    return 0;
}

static void syncobj_release(shmkit_syncobj *self)
{
    if (self->mem != NULL) {
        self->mem = NULL;
        PyBuffer_Release(&self->view);
    }
}

void shmkit_syncobj_dealloc(PyObject *op)
{
    shmkit_syncobj *self = (shmkit_syncobj *)op;
    /* Static base type: for Python subclasses subtype_dealloc drops the type reference. */
    syncobj_release(self);
    Py_TYPE(op)->tp_free(op);
}

PyObject *shmkit_sync_error(PyObject *self, const char *code)
{
    PyObject *exc = PyObject_CallMethod(self, "_error", "s", code);
    if (exc == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_AttributeError))
            return NULL;
        PyErr_Clear();
        PyErr_Format(PyExc_RuntimeError, "shmkit synchronisation error: %s", code);
        return NULL;
    }
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else
        PyErr_Format(PyExc_TypeError, "_error(%s) did not return an exception", code);
    Py_DECREF(exc);
    return NULL;
}

static int kw_is(PyObject *key, const char *name)
{
    return PyUnicode_Check(key) && PyUnicode_CompareWithASCIIString(key, name) == 0;
}

/* Relative timeout from a Python value: -1 forever (None, or -1 when allow_minus_one), else ns.
 * Returns -2 with an exception on a bad value. */
static int64_t relative_ns(PyObject *timeout, int allow_minus_one)
{
    if (timeout == NULL || timeout == Py_None)
        return -1;
    double seconds = PyFloat_AsDouble(timeout);
    if (seconds == -1.0 && PyErr_Occurred())
        return -2;
    if (allow_minus_one && seconds == -1.0)
        return -1;
    if (!(seconds >= 0)) {
        PyErr_SetString(PyExc_ValueError, allow_minus_one
                        ? "timeout must be None, -1 or a number of seconds >= 0"
                        : "timeout must be None or a number of seconds >= 0");
        return -2;
    }
    if (seconds > 1e9) /* ~31 years: forever rather than an overflow */
        return -1;
    return (int64_t)(seconds * 1e9);
}

static int64_t deadline_from(int64_t relative)
{
    if (relative < 0)
        return -1;
    if (relative == 0)
        return 0;
    return shmkit_monotonic_ns() + relative;
}

int shmkit_parse_blocking(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                          int64_t *deadline_ns)
{
    PyObject *blocking = NULL, *timeout = NULL;
    if (nargs > 2) {
        PyErr_Format(PyExc_TypeError, "acquire() takes at most 2 arguments (%zd given)", nargs);
        return -1;
    }
    if (nargs >= 1)
        blocking = args[0];
    if (nargs >= 2)
        timeout = args[1];
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        PyObject **slot = kw_is(key, "blocking") ? &blocking : kw_is(key, "timeout") ? &timeout : NULL;
        if (slot == NULL) {
            PyErr_Format(PyExc_TypeError, "acquire() got an unexpected keyword argument '%S'", key);
            return -1;
        }
        if (*slot != NULL) {
            PyErr_Format(PyExc_TypeError, "acquire() got multiple values for argument '%S'", key);
            return -1;
        }
        *slot = args[nargs + i];
    }
    int block = 1;
    if (blocking != NULL && (block = PyObject_IsTrue(blocking)) < 0)
        return -1;
    int64_t rel = relative_ns(timeout, 1);
    if (rel == -2)
        return -1;
    if (!block) {
        if (rel >= 0) {
            PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
            return -1;
        }
        *deadline_ns = 0;
        return 0;
    }
    *deadline_ns = deadline_from(rel);
    return 0;
}

int shmkit_parse_timeout(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                         const char *fname, int64_t *deadline_ns)
{
    PyObject *timeout = NULL;
    if (nargs > 1) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most 1 argument (%zd given)", fname, nargs);
        return -1;
    }
    if (nargs == 1)
        timeout = args[0];
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t i = 0; i < nkw; i++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, i);
        if (!kw_is(key, "timeout") || timeout != NULL) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected or repeated keyword argument '%S'",
                         fname, key);
            return -1;
        }
        timeout = args[nargs + i];
    }
    int64_t rel = relative_ns(timeout, 0);
    if (rel == -2)
        return -1;
    *deadline_ns = deadline_from(rel);
    return 0;
}

int shmkit_sleep_slice(_Atomic uint32_t *word, uint32_t expected, int64_t deadline_ns,
                       int64_t *slice_ns)
{
    int64_t slice = *slice_ns;
    if (deadline_ns >= 0) {
        int64_t left = deadline_ns - shmkit_monotonic_ns();
        if (left <= 0)
            return -ETIMEDOUT;
        if (left < slice)
            slice = left;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = shmkit_futex_wait(word, expected, slice);
    Py_END_ALLOW_THREADS
    /* Ctrl-C: the handler only runs here, in the main thread, between slices. */
    if (PyErr_CheckSignals() < 0)
        return -EINTR;
    if (rc == -ETIMEDOUT) {
        *slice_ns = *slice_ns * 2 > SHMKIT_SLICE_MAX_NS ? SHMKIT_SLICE_MAX_NS : *slice_ns * 2;
        return 0;
    }
    if (rc == 0)
        return 2;
    if (rc == -EAGAIN || rc == -EINTR)
        return 1;
    errno = -rc;
    PyErr_SetFromErrno(PyExc_OSError);
    return -EINTR;
}

int shmkit_spin_while(_Atomic uint32_t *word, uint32_t expected, int64_t deadline_ns,
                      shmkit_spin *spin)
{
    if (atomic_load_explicit(word, memory_order_acquire) != expected)
        return 1;
    if (deadline_ns == 0)
        return 0;
    int64_t plan = spin_plan(spin);
    if (plan <= 0)
        return 0;
    int64_t gil_end, end, started = shmkit_monotonic_ns();
    spin_window(deadline_ns, plan, &gil_end, &end);
    int changed = spin_until(word, expected, gil_end);
    if (!changed && shmkit_monotonic_ns() < end) {
        Py_BEGIN_ALLOW_THREADS
        changed = spin_until(word, expected, end);
        Py_END_ALLOW_THREADS
    }
    spin_learn(spin, plan, changed, shmkit_monotonic_ns() - started);
    return changed;
}

PyObject *shmkit_syncobj_get_spin(PyObject *op, void *closure)
{
    (void)closure;
    return PyLong_FromLongLong(((shmkit_syncobj *)op)->spin.max_ns);
}

PyObject *shmkit_syncobj_get_budget(PyObject *op, void *closure)
{
    (void)closure;
    return PyLong_FromLongLong(((shmkit_syncobj *)op)->spin.budget_ns);
}

int shmkit_syncobj_set_spin(PyObject *op, PyObject *value, void *closure)
{
    (void)closure;
    if (value == NULL) {
        PyErr_SetString(PyExc_AttributeError, "spin_ns cannot be deleted");
        return -1;
    }
    long long v = PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > 1000000000LL) {
        PyErr_SetString(PyExc_ValueError, "spin_ns must be between 0 and 1_000_000_000");
        return -1;
    }
    shmkit_spin *spin = &((shmkit_syncobj *)op)->spin;
    spin->max_ns = spin->budget_ns = v;
    spin->waits = spin->probe_shift = spin->fails = 0;
    return 0;
}

/* ---- the Mutex type ---------------------------------------------------------------------- */

#define MUTEX(self) ((shmkit_mutex_t *)((shmkit_syncobj *)(self))->mem)

static int mutex_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"buffer", "offset", "spin_ns", NULL};
    PyObject *buffer;
    Py_ssize_t offset;
    long long spin_ns = -1;
    shmkit_syncobj *self = (shmkit_syncobj *)op;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|L", kwlist, &buffer, &offset, &spin_ns))
        return -1;
    self->spin.max_ns = spin_ns;
    return shmkit_syncobj_attach(self, buffer, offset, SHMKIT_MUTEX_SIZE, 4);
}

/* The end of every acquire: translate the lock result into True/False or an exception. */
static PyObject *mutex_result(PyObject *op, int rc)
{
    if (rc >= 0)
        Py_RETURN_TRUE;
    if (rc == -ETIMEDOUT)
        Py_RETURN_FALSE;
    if (rc == -EDEADLK)
        return shmkit_sync_error(op, "deadlock");
    return NULL; /* -EINTR: the exception is set */
}

static PyObject *mutex_lock_call(PyObject *op, int64_t deadline_ns)
{
    shmkit_syncobj *self = (shmkit_syncobj *)op;
    SHMKIT_BUSY_ENTER(self);
    int rc = shmkit_mutex_lock(MUTEX(op), deadline_ns, &self->spin);
    SHMKIT_BUSY_LEAVE(self);
    return mutex_result(op, rc);
}

static PyObject *mutex_acquire(PyObject *op, PyObject *const *args, Py_ssize_t nargs,
                               PyObject *kwnames)
{
    int64_t deadline = -1;
    if ((nargs != 0 || kwnames != NULL) && shmkit_parse_blocking(args, nargs, kwnames, &deadline) < 0)
        return NULL;
    /* After parsing: converting arguments may run Python code, which may even close us. */
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    /* Fast path inline: one compare-and-swap, no clock read, no GIL release. */
    uint32_t v = 0;
    if (take(MUTEX(op), &v, my_tid())) {
        note_owner(MUTEX(op), 0);
        Py_RETURN_TRUE;
    }
    return mutex_lock_call(op, deadline);
}

static PyObject *mutex_enter(PyObject *op, PyObject *unused)
{
    (void)unused;
    shmkit_syncobj *self = (shmkit_syncobj *)op;
    if (shmkit_syncobj_check(self) < 0)
        return NULL;
    uint32_t v = 0;
    if (!take(MUTEX(op), &v, my_tid())) {
        PyObject *r = mutex_lock_call(op, -1);
        if (r == NULL)
            return NULL;
        Py_DECREF(r); /* forever: only True can come back */
    } else {
        note_owner(MUTEX(op), 0);
    }
    Py_INCREF(op);
    return op;
}

static PyObject *mutex_release(PyObject *op, PyObject *unused)
{
    (void)unused;
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    if (shmkit_mutex_unlock(MUTEX(op), 1) < 0)
        return shmkit_sync_error(op, "not_owned");
    Py_RETURN_NONE;
}

static PyObject *mutex_exit(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    (void)args;
    (void)nargs;
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    if (shmkit_mutex_unlock(MUTEX(op), 1) < 0)
        return shmkit_sync_error(op, "not_owned");
    Py_RETURN_FALSE;
}

static PyObject *mutex_locked(PyObject *op, PyObject *unused)
{
    (void)unused;
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    uint32_t v = atomic_load_explicit(&MUTEX(op)->word, memory_order_relaxed);
    return PyBool_FromLong((v & SHMKIT_MUTEX_OWNER_MASK) != 0);
}

static PyObject *mutex_is_owned(PyObject *op, PyObject *unused)
{
    (void)unused;
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    uint32_t v = atomic_load_explicit(&MUTEX(op)->word, memory_order_relaxed);
    return PyBool_FromLong((v & SHMKIT_MUTEX_OWNER_MASK) == my_tid());
}

static PyObject *mutex_mark_consistent(PyObject *op, PyObject *unused)
{
    (void)unused;
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    shmkit_mutex_t *m = MUTEX(op);
    uint32_t v = atomic_load_explicit(&m->word, memory_order_relaxed);
    if ((v & SHMKIT_MUTEX_OWNER_MASK) != my_tid())
        return shmkit_sync_error(op, "not_owned");
    atomic_store_explicit(&m->recovered, 0, memory_order_relaxed);
    Py_RETURN_NONE;
}

PyObject *shmkit_syncobj_detach(PyObject *op, PyObject *unused)
{
    (void)unused;
    shmkit_syncobj *self = (shmkit_syncobj *)op;
    if (SHMKIT_BUSY(self) > 0)
        Py_RETURN_FALSE;
    syncobj_release(self);
    Py_RETURN_TRUE;
}

PyObject *shmkit_syncobj_attached(PyObject *op, void *closure)
{
    (void)closure;
    return PyBool_FromLong(((shmkit_syncobj *)op)->mem != NULL);
}

static PyObject *mutex_get_recovered(PyObject *op, void *closure)
{
    (void)closure;
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    return PyBool_FromLong(atomic_load_explicit(&MUTEX(op)->recovered, memory_order_relaxed) != 0);
}

static PyObject *mutex_get_owner_tid(PyObject *op, void *closure)
{
    (void)closure;
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    uint32_t v = atomic_load_explicit(&MUTEX(op)->word, memory_order_relaxed);
    return PyLong_FromUnsignedLong(v & SHMKIT_MUTEX_OWNER_MASK);
}

static PyObject *mutex_get_owner_pid(PyObject *op, void *closure)
{
    (void)closure;
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(atomic_load_explicit(&MUTEX(op)->owner_pid, memory_order_relaxed));
}

static PyObject *mutex_get_waiters(PyObject *op, void *closure)
{
    (void)closure;
    if (shmkit_syncobj_check((shmkit_syncobj *)op) < 0)
        return NULL;
    return PyLong_FromUnsignedLong(atomic_load_explicit(&MUTEX(op)->waiters, memory_order_relaxed));
}

static PyMethodDef mutex_methods[] = {
    {"acquire", (PyCFunction)(void (*)(void))mutex_acquire, METH_FASTCALL | METH_KEYWORDS,
     "acquire(blocking=True, timeout=None) -> bool"},
    {"release", mutex_release, METH_NOARGS, "release()"},
    {"__enter__", mutex_enter, METH_NOARGS, "Acquire, waiting as long as it takes."},
    {"__exit__", (PyCFunction)(void (*)(void))mutex_exit, METH_FASTCALL, "Release."},
    {"locked", mutex_locked, METH_NOARGS, "locked() -> bool: some thread holds it."},
    {"_is_owned", mutex_is_owned, METH_NOARGS, "_is_owned() -> bool: the calling thread holds it."},
    {"mark_consistent", mutex_mark_consistent, METH_NOARGS,
     "mark_consistent(): clear `recovered` (the holder repaired the protected data)."},
    SHMKIT_SYNCOBJ_METHODS
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef mutex_getset[] = {
    {"recovered", mutex_get_recovered, NULL,
     "True while the holder took the lock over from an owner that died holding it.", NULL},
    {"owner_tid", mutex_get_owner_tid, NULL, "Kernel thread id of the holder (0 when free).", NULL},
    {"owner_pid", mutex_get_owner_pid, NULL, "Process id of the holder (0 when free).", NULL},
    {"waiters", mutex_get_waiters, NULL, "Threads sleeping in acquire (approximate).", NULL},
    SHMKIT_SYNCOBJ_GETSET
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject MutexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._native.Mutex",
    .tp_doc = "Mutex(buffer, offset, spin_ns=-1): the C core of shmkit.Mutex.",
    .tp_basicsize = sizeof(shmkit_syncobj),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_new = PyType_GenericNew,
    .tp_init = mutex_init,
    .tp_dealloc = shmkit_syncobj_dealloc,
    .tp_methods = mutex_methods,
    .tp_getset = mutex_getset,
};

static PyObject *py_task_alive_since(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "task_alive_since(tid, start) takes 2 arguments");
        return NULL;
    }
    unsigned long tid = PyLong_AsUnsignedLong(args[0]);
    if (tid == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long start = PyLong_AsUnsignedLong(args[1]);
    if (start == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (tid > UINT32_MAX || start > UINT32_MAX)
        Py_RETURN_FALSE;
    return PyBool_FromLong(shmkit_task_alive_since((uint32_t)tid, (uint32_t)start));
}

static PyObject *py_thread_start(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLong(shmkit_thread_start());
}

static PyMethodDef mutex_functions[] = {
    {"task_alive_since", (PyCFunction)(void (*)(void))py_task_alive_since, METH_FASTCALL,
     "task_alive_since(tid, start) -> bool: tid runs and (start != 0) started at `start`."},
    {"thread_start", py_thread_start, METH_NOARGS,
     "thread_start() -> int: low 32 bits of this thread's start time (clock ticks, never 0)."},
    {NULL, NULL, 0, NULL},
};

int shmkit_init_mutex(PyObject *module)
{
    if (PyModule_AddFunctions(module, mutex_functions) < 0)
        return -1;
    if (pthread_atfork(NULL, NULL, forget_ids) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return -1;
    }
    if (PyType_Ready(&MutexType) < 0)
        return -1;
    Py_INCREF(&MutexType);
    if (PyModule_AddObject(module, "Mutex", (PyObject *)&MutexType) < 0) {
        Py_DECREF(&MutexType);
        return -1;
    }
    return PyModule_AddIntConstant(module, "MUTEX_SIZE", SHMKIT_MUTEX_SIZE);
}
