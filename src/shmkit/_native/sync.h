/* Private declarations shared by mutex.c and sync.c: the robust mutex and the common base of
 * every synchronisation object type.
 *
 * Every structure here lives in shared memory written by other processes: each field is
 * untrusted. Any value must lead to "owned by a live task" (wait until the timeout), "free",
 * "owner dead" (recover) or an error; never to a crash, an unbounded hang, or a read or write
 * outside the object's own bytes.
 */
#ifndef SHMKIT_SYNC_H
#define SHMKIT_SYNC_H

#include "native.h"

/* ---- the robust mutex ------------------------------------------------------------------ */

/* The 24 bytes of a Mutex (also the first 24 bytes of a Condition and of an RWLock).
 *
 *   offset  field        meaning
 *   0       word         0 = free; otherwise the owner's kernel thread id (bits 0..29) and
 *                        SHMKIT_MUTEX_WAITERS (bit 31) when someone may sleep in futex(2)
 *   4       recovered    non-zero: the holder took the lock from a dead owner
 *   8       owner_pid    process id (tgid) of the holder, for inspection only
 *   12      waiters      threads sleeping in acquire, for inspection only (a waiter that died
 *                        while counted leaves it too high; nothing depends on it)
 *   16      owner_start  low 32 bits of the holder thread's start time (clock ticks since
 *                        boot, never 0), or 0 = not known; tells a reused thread id from the
 *                        dead owner. Zeroed before the word is released or taken over.
 *   20      reserved
 */
typedef struct {
    _Atomic uint32_t word;
    _Atomic uint32_t recovered;
    _Atomic uint32_t owner_pid;
    _Atomic uint32_t waiters;
    _Atomic uint32_t owner_start;
    uint32_t reserved;
} shmkit_mutex_t;

#define SHMKIT_MUTEX_SIZE 24
#define SHMKIT_MUTEX_WAITERS (1u << 31)
#define SHMKIT_MUTEX_OWNER_MASK (~SHMKIT_MUTEX_WAITERS)

/* Results of shmkit_mutex_lock besides the negative errnos. */
#define SHMKIT_LOCK_ACQUIRED 0
#define SHMKIT_LOCK_RECOVERED 1

/* Sleep slices: every bounded sleep re-checks owner liveness and signals. They start short
 * (a dead owner is noticed within milliseconds) and grow so that a long wait costs nothing. */
#define SHMKIT_SLICE_MIN_NS (2 * 1000 * 1000LL)
#define SHMKIT_SLICE_MAX_NS (50 * 1000 * 1000LL)

/* The first part of a spin holds the GIL (a hand-off from another process takes well under a
 * microsecond); the rest of `spin_ns` spins with the GIL released, so that the thread that will
 * release or signal may be one of this process's. */
#define SHMKIT_SPIN_WITH_GIL_NS 2000

/* How long waits of one object spin before sleeping, adapted to what spinning achieves.
 *
 * A spin that ends with the hand-off (the other side was running on another core) costs well
 * under a microsecond instead of a futex sleep and wake-up; a spin that ends in a sleep anyway
 * (the other side was not running: more busy threads than cores) burns CPU the other side may
 * need. So the budget halves after SHMKIT_SPIN_FAILS_TO_SHRINK spins in a row failed (down to
 * SHMKIT_SPIN_FLOOR_NS; one failure proves little, and costs a wake-up either way), grows to
 * four times the observed wait after one that succeeded, and now and then a wait spins the whole
 * `max_ns` to notice when spinning pays again: every SHMKIT_SPIN_PROBE_EVERY-th wait, an
 * interval that doubles (up to 64 times) while such probes keep failing. Per object, per
 * process; only touched with the GIL held. All-zero except max_ns and budget_ns is a valid
 * start. */
typedef struct {
    int64_t max_ns;       /* spin_ns as configured; 0 = never spin */
    int64_t budget_ns;    /* what the next wait spins */
    uint32_t waits;
    uint32_t probe_shift; /* probes come every SHMKIT_SPIN_PROBE_EVERY << probe_shift waits */
    uint32_t fails;       /* spins in a row that ended without the hand-off */
} shmkit_spin;

#define SHMKIT_SPIN_FLOOR_NS 1000
#define SHMKIT_SPIN_FAILS_TO_SHRINK 3
#define SHMKIT_SPIN_PROBE_EVERY 16

/* Acquire `m` for the calling thread. Call with the GIL held; it is released while sleeping.
 * `deadline_ns` is monotonic (-1 = forever, a past value = try once). `spin` bounds the
 * busy-wait before sleeping. Returns SHMKIT_LOCK_ACQUIRED, SHMKIT_LOCK_RECOVERED (the previous
 * owner was dead; the `recovered` field is now set), -ETIMEDOUT, -EDEADLK (this thread holds
 * it already) or -EINTR (a signal handler raised: the Python exception is set). */
int shmkit_mutex_lock(shmkit_mutex_t *m, int64_t deadline_ns, shmkit_spin *spin);

/* Take `m` if it is free right now: one compare-and-swap, no sleep, no liveness check.
 * 1 when taken (like SHMKIT_LOCK_ACQUIRED), 0 otherwise. */
int shmkit_mutex_trylock(shmkit_mutex_t *m);

/* Release `m` held by the calling thread. `clear_recovered` = 0 keeps the recovered flag (an
 * RWLock reader borrowing the writer mutex must not hide a dead writer). Returns 0, or -EPERM
 * when the calling thread is not the owner (nothing is changed then). */
int shmkit_mutex_unlock(shmkit_mutex_t *m, int clear_recovered);

/* This process's id, cached (reset in a forked child): getpid(2) is a real syscall. */
uint32_t shmkit_getpid_cached(void);

/* The low 32 bits of the calling thread's start time (never 0), cached per thread. */
uint32_t shmkit_thread_start(void);

/* Whether task `tid` runs and, when `start` is not 0, is the incarnation that started at
 * `start` (so a reused thread id counts as dead). When the start time cannot be read the task
 * counts as alive. Only for values that cannot change during the check (reader slots of an
 * RWLock, read by the writer that holds the mutex). */
int shmkit_task_alive_since(uint32_t tid, uint32_t start);

/* ---- the base of every synchronisation object -------------------------------------------- */

/* A C object bound to `size` bytes at an offset of a writable buffer. It holds one buffer
 * export for its whole life (so the mapping cannot be closed under it) and keeps a raw
 * pointer; `busy` counts calls that use the pointer with the GIL released, so that detaching
 * (which drops the export) is refused while a thread is blocked inside. */
typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *mem;
    Py_ssize_t size;
    int busy;
    unsigned busy_epoch; /* shmkit_fork_epoch when `busy` was last counted */
    shmkit_spin spin;
} shmkit_syncobj;

/* Bumped in a forked child. A thread of the parent that was blocked inside a call (counted
 * in some object's `busy`) does not exist in the child, so a count made before the fork means
 * nothing there: SHMKIT_BUSY reads it as 0 and the next SHMKIT_BUSY_ENTER starts it over.
 * Without this, close() would fail as busy forever in the child. Every use holds the GIL. */
extern unsigned shmkit_fork_epoch;

#define SHMKIT_BUSY_ENTER(obj)                                                                 \
    do {                                                                                       \
        if ((obj)->busy_epoch != shmkit_fork_epoch) {                                          \
            (obj)->busy_epoch = shmkit_fork_epoch;                                             \
            (obj)->busy = 0;                                                                   \
        }                                                                                      \
        (obj)->busy++;                                                                         \
    } while (0)
#define SHMKIT_BUSY_LEAVE(obj)                                                                 \
    do {                                                                                       \
        if ((obj)->busy_epoch == shmkit_fork_epoch && (obj)->busy > 0)                         \
            (obj)->busy--;                                                                     \
    } while (0)
#define SHMKIT_BUSY(obj) ((obj)->busy_epoch == shmkit_fork_epoch ? (obj)->busy : 0)

/* Attach to `size` bytes at `offset` of `buffer`, aligned to `align`. 0 or -1 (exception). */
int shmkit_syncobj_attach(shmkit_syncobj *self, PyObject *buffer, Py_ssize_t offset,
                          Py_ssize_t size, Py_ssize_t align);
void shmkit_syncobj_dealloc(PyObject *self);

/* Raise the exception the Python subclass builds for `code` (its `_error(code)` method), or a
 * RuntimeError naming the code when there is no such method. Returns NULL for convenience. */
PyObject *shmkit_sync_error(PyObject *self, const char *code);

/* Check that the object is attached; raise its "closed" error otherwise. 0 or -1. */
static inline int shmkit_syncobj_check(shmkit_syncobj *self)
{
    if (self->mem != NULL)
        return 0;
    shmkit_sync_error((PyObject *)self, "closed");
    return -1;
}

/* Parse threading-style (blocking=True, timeout=None) from a vectorcall. `timeout` None or -1
 * means forever. Stores a monotonic deadline (-1 forever, 0 = do not wait). 0 or -1. */
int shmkit_parse_blocking(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                          int64_t *deadline_ns);
/* Parse a single optional (timeout=None) from a vectorcall into a deadline. 0 or -1. */
int shmkit_parse_timeout(PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                         const char *fname, int64_t *deadline_ns);

/* Sleep at most one slice while *word == expected, without the GIL, then run signal handlers.
 * `*slice_ns` grows after each slice that ran out. Returns 2 when a futex wake-up arrived, 1 when
 * the word already differed (or a signal without a Python exception), 0 when the slice ran out, -ETIMEDOUT when the deadline has passed (no sleep), or -EINTR with
 * the Python exception set. */
int shmkit_sleep_slice(_Atomic uint32_t *word, uint32_t expected, int64_t deadline_ns,
                       int64_t *slice_ns);

/* Spin as `spin` allows (and never past the deadline) while *word == expected, the GIL held for
 * the first SHMKIT_SPIN_WITH_GIL_NS only. 1 if it changed. Callers count themselves `busy`. */
int shmkit_spin_while(_Atomic uint32_t *word, uint32_t expected, int64_t deadline_ns,
                      shmkit_spin *spin);

/* What every object type offers: `spin_ns` (read/write), `_spin_budget_ns`, `_attached`, and
 * `_detach()`. */
PyObject *shmkit_syncobj_get_spin(PyObject *op, void *closure);
PyObject *shmkit_syncobj_get_budget(PyObject *op, void *closure);
int shmkit_syncobj_set_spin(PyObject *op, PyObject *value, void *closure);
PyObject *shmkit_syncobj_attached(PyObject *op, void *closure);
PyObject *shmkit_syncobj_detach(PyObject *op, PyObject *unused);

#define SHMKIT_SYNCOBJ_GETSET                                                                  \
    {"spin_ns", shmkit_syncobj_get_spin, shmkit_syncobj_set_spin,                              \
     "Longest a blocking call spins before it sleeps, in ns (0 = never spin).", NULL},         \
    {"_spin_budget_ns", shmkit_syncobj_get_budget, NULL,                                       \
     "What the next wait spins (adapts between 1 us and spin_ns).", NULL},                     \
    {"_attached", shmkit_syncobj_attached, NULL, "Whether the object still holds its memory.", \
     NULL},
#define SHMKIT_SYNCOBJ_METHODS                                                                 \
    {"_detach", shmkit_syncobj_detach, METH_NOARGS,                                            \
     "_detach() -> bool: drop the memory; False while a call blocks inside."},

#endif
