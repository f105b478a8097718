/* Broadcast: one publisher, many subscribers, every subscriber reads every message.
 *
 * The hot paths (publish, receive) are methods of two C types, BcastPublisher and
 * BcastSubscriber, which broadcast.py subclasses. Each object holds a Py_buffer export of the
 * segment for its whole life, so the mapping cannot go away under a raw pointer.
 *
 * Shared memory layout (offsets from the start of the segment; see broadcast.py for the
 * table users read):
 *
 *   0     typed header (layout.py, 128 bytes)
 *   128   control block (bc_ctrl, 384 bytes, six 64-byte lines: geometry, publisher, head,
 *         tail, intent, spare)
 *   512   subscriber table: max_subscribers slots of 64 bytes (bc_slot)
 *   R     the ring: `capacity` bytes of records, R = 512 + 64 * max_subscribers
 *
 * Records are {u64 seq, u32 len, u32 flags} followed by len payload bytes, padded to 16
 * bytes. Positions are byte counts since creation (never wrapped); offset = pos % capacity.
 * A record never wraps: when it does not fit before the end of the ring, a padding record
 * (flags = PAD) fills the rest and the message starts at offset 0.
 *
 * Protocol (one writer: the publisher):
 * - head: records below `head_pos` are complete. The publisher writes a record, then the
 *   head pair {seq, pos} (double-buffered so readers get both values consistently), then
 *   the `head_pos` word with a release store. A record is never visible before it is whole,
 *   so a publisher killed at any instruction never delivers a torn message.
 * - tail: the oldest retained record. The publisher moves the tail (pair, then `tail_pos`)
 *   BEFORE it overwrites the space, with a release fence in between. A subscriber copies a
 *   record, then (acquire fence) checks that `tail_pos` has not passed it; if it has, the
 *   copy is discarded and the subscriber jumps to the tail pair, learning from the sequence
 *   numbers exactly how many messages it missed (seqlock-style validation: no torn reads).
 * - overwrite policy: the tail moves as far as the next record needs; nobody waits.
 * - block policy: the tail never passes the read position of an active subscriber. Before
 *   choosing a new tail the publisher stores how far it may go (`intent_pos`, never past the
 *   published head), then (seq_cst fence) scans the slots, moves the tail, and lowers the
 *   intent to the new tail (the round is over). A joining subscriber stores its slot, then
 *   (seq_cst fence) reads the intent, and when it is above its start it reads its start again
 *   (the tail once the round is over, or the head, which is at or past the intent) and
 *   repeats. Either the publisher sees the joiner or the joiner sees the intent
 *   (store-buffering with fences on both sides), so no message the joiner needs is ever
 *   freed. A subscriber that is dead or makes no progress for longer than the grace period
 *   while the publisher waits on it is evicted.
 * - wake-ups: a sleeper raises a flag (`wake_subs`, `pub_waiting`) before re-checking and
 *   sleeping, and the other side checks the flag after a seq_cst fence and clears it by
 *   exchange before waking: nobody makes a system call when nobody sleeps, each sleep costs
 *   one wake-up, and no wake-up is lost. A sleeper killed with its flag up costs one spurious
 *   wake-up, not a permanent slowdown.
 *
 * Everything read from the segment is untrusted: every cursor, length and offset is checked
 * against this process's own copy of the geometry before use. Local state (our cursor, the
 * geometry) is trusted; what does not match it is either an overwrite in progress (the tail
 * tells) or corruption, reported as CorruptSegmentError.
 */
#include "native.h"
#include "bcast.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define BC_MAGIC 0x54534342u /* "BCST" little-endian */
#define BC_VERSION 1u
#define BC_CTRL_OFFSET 128
#define BC_CTRL_SIZE 384
#define BC_TABLE_OFFSET (BC_CTRL_OFFSET + BC_CTRL_SIZE)
#define BC_SLOT_SIZE 64
#define BC_REC_HDR 16
#define BC_FLAG_PAD 1u
#define BC_MAX_SUBSCRIBERS 4096u
#define BC_MIN_CAPACITY 128u
/* Positions count bytes since creation. Any position read from the segment above this limit
 * is damage, so that position arithmetic (pos + record size, pos + capacity) can never wrap a
 * u64. A publisher reaches it after 4 EiB, and then refuses to publish. */
#define BC_POS_LIMIT (1ULL << 62)
/* A joining block-policy subscriber retries this many times while the publisher is in the
 * middle of moving the tail (see sub_attach). */
#define BC_JOIN_TRIES 1000

/* Publisher waits: sleep slices (so a dead or stalled subscriber is noticed) and how often
 * subscriber liveness is checked (task_alive reads /proc). */
#define BC_SLICE_MIN_NS (1000 * 1000LL)
#define BC_SLICE_MAX_NS (50 * 1000 * 1000LL)
#define BC_CHECK_NS (2 * 1000 * 1000LL)
#define BC_DEFAULT_SPIN_NS 20000

enum { BC_FREE = 0, BC_JOINING = 1, BC_ACTIVE = 2, BC_EVICTED = 3 };
enum { BC_OVERWRITE = 0, BC_BLOCK = 1 };

/* ---- shared structures --------------------------------------------------------------- */

typedef struct {
    _Atomic uint64_t seq, pos;
} bc_pair_slot;

/* A {seq, pos} pair with one writer: the writer fills s[(idx + 1) & 1], then publishes
 * idx + 1 (release). Readers read idx, the slot, and idx again. A writer killed midway leaves
 * idx on a complete slot. */
typedef struct {
    _Atomic uint64_t idx;
    bc_pair_slot s[2];
} bc_pair;

typedef struct {
    /* line 0: geometry, written once by the creator (an untrusted copy of header.params) */
    uint32_t magic, version;
    uint64_t capacity, max_message;
    uint32_t max_subscribers, policy;
    uint64_t grace_ns, ring_offset, table_offset, reserved0;
    /* line 1: the publisher role */
    _Atomic uint64_t pub_word;     /* holder pid << 32 | claim generation; pid 0 = none */
    _Atomic uint64_t pub_start;    /* holder's start time (clock ticks), for inspection */
    _Atomic uint64_t pub_claims;   /* times the role was claimed */
    _Atomic uint64_t takeovers;    /* claims that took the role from a dead holder */
    _Atomic uint32_t ended;        /* 1: the stream ended (subscribers drain, then stop) */
    _Atomic uint32_t pub_waiting;  /* 1: the publisher sleeps waiting for room (block) */
    _Atomic uint64_t pub_wait_pos; /* ... until every active subscriber reaches this */
    _Atomic uint32_t space_event;  /* futex: bumped to wake the publisher */
    _Atomic uint32_t sub_high;     /* slots [0, sub_high) have been used */
    _Atomic uint64_t evictions;    /* subscribers evicted or reclaimed */
    /* line 2: head (written by the publisher, read by every subscriber) */
    _Atomic uint64_t head_pos;
    _Atomic uint32_t head_event;   /* futex: bumped to wake subscribers */
    _Atomic uint32_t wake_subs;    /* 1: a subscriber may sleep on head_event */
    bc_pair head;                  /* {next seq, head_pos} */
    _Atomic uint64_t published_bytes;
    /* line 3: tail, the oldest retained record */
    _Atomic uint64_t tail_pos;
    bc_pair tail;                  /* {seq of the oldest record, tail_pos} */
    uint64_t reserved3[2];
    /* line 4: block policy: how far the publisher is about to move the tail */
    _Atomic uint64_t intent_pos;
    uint64_t reserved4[7];
    /* line 5: spare */
    uint64_t reserved5[8];
} bc_ctrl;

_Static_assert(sizeof(bc_ctrl) == BC_CTRL_SIZE, "control block size");
_Static_assert(offsetof(bc_ctrl, pub_word) == 64, "publisher line");
_Static_assert(offsetof(bc_ctrl, head_pos) == 128, "head line");
_Static_assert(offsetof(bc_ctrl, tail_pos) == 192, "tail line");
_Static_assert(offsetof(bc_ctrl, intent_pos) == 256, "intent line");

typedef struct {
    _Atomic uint64_t word;       /* pid << 32 | generation (24 bits) << 8 | state */
    _Atomic uint64_t read_pos;   /* next record to read (a record boundary) */
    _Atomic uint64_t read_seq;   /* sequence number of the next message */
    _Atomic uint64_t drops;      /* messages missed (overwrite policy) */
    _Atomic uint64_t start_seq;  /* first sequence number after joining */
    _Atomic uint64_t proc_start; /* owner's start time (clock ticks), for inspection */
    _Atomic uint64_t joined_ns;  /* CLOCK_REALTIME at join, for inspection */
    _Atomic uint32_t waiting;    /* 1 while asleep in receive (for inspection) */
    _Atomic uint32_t tid;        /* thread that subscribed, for inspection */
} bc_slot;

_Static_assert(sizeof(bc_slot) == BC_SLOT_SIZE, "slot size");

typedef struct {
    _Atomic uint64_t seq;
    _Atomic uint32_t len;
    _Atomic uint32_t flags;
} bc_rec;

_Static_assert(sizeof(bc_rec) == BC_REC_HDR, "record header size");

static inline uint64_t slot_word(uint32_t pid, uint32_t gen, uint32_t state)
{
    return ((uint64_t)pid << 32) | ((uint64_t)(gen & 0xFFFFFFu) << 8) | (state & 0xFFu);
}
#define W_PID(w) ((uint32_t)((w) >> 32))
#define W_GEN(w) ((uint32_t)(((w) >> 8) & 0xFFFFFFu))
#define W_STATE(w) ((uint32_t)((w)&0xFFu))

static inline uint64_t rec_size(uint64_t len)
{
    return (BC_REC_HDR + len + 15) & ~(uint64_t)15;
}

#define LOAD(p, mo) atomic_load_explicit((p), memory_order_##mo)
#define STORE(p, v, mo) atomic_store_explicit((p), (v), memory_order_##mo)

/* ---- shared helpers (errors, arguments, pid) ------------------------------------------ */

shmkit_bcast_errors_t shmkit_bcast_errors;

static uint32_t cached_pid;

static void forget_pid(void)
{
    cached_pid = 0;
}

uint32_t shmkit_bcast_getpid(void)
{
    if (cached_pid == 0)
        cached_pid = (uint32_t)getpid();
    return cached_pid;
}

int shmkit_bcast_parse(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                       PyObject *kwnames, const char *const *names, int n, int required,
                       PyObject **out)
{
    for (int i = 0; i < n; i++)
        out[i] = NULL;
    if (nargs > n) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %d arguments (%zd given)", fname, n,
                     nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++)
        out[i] = args[i];
    Py_ssize_t nkw = kwnames == NULL ? 0 : PyTuple_GET_SIZE(kwnames);
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        int found = 0;
        for (int i = 0; i < n; i++) {
            if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                if (out[i] != NULL) {
                    PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'",
                                 fname, names[i]);
                    return -1;
                }
                out[i] = args[nargs + k];
                found = 1;
                break;
            }
        }
        if (!found) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'", fname,
                         key);
            return -1;
        }
    }
    for (int i = 0; i < required; i++) {
        if (out[i] == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[i]);
            return -1;
        }
    }
    return 0;
}

int shmkit_bcast_timeout(PyObject *timeout, int64_t *timeout_ns)
{
    if (timeout != NULL && PyLong_CheckExact(timeout)) { /* skip the float conversion */
        long long sec = PyLong_AsLongLong(timeout);
        if (sec >= 0 && sec < 1000000000LL) {
            *timeout_ns = sec * 1000000000LL;
            return 0;
        }
        PyErr_Clear();
    }
    int64_t ns = shmkit_timeout_ns(timeout);
    if (ns == -2)
        return -1;
    *timeout_ns = ns;
    return 0;
}

/* A timeout turned into a monotonic deadline only when a call actually has to wait: the
 * clock is not read on the fast path. */
typedef struct {
    int64_t timeout_ns; /* -1: forever, 0: do not wait */
    int64_t at;         /* -2 until computed, then -1 or the deadline */
} bc_deadline;

static inline bc_deadline dl_make(int64_t timeout_ns)
{
    bc_deadline d = {timeout_ns, -2};
    return d;
}

static int64_t dl_at(bc_deadline *d)
{
    if (d->at == -2)
        d->at = d->timeout_ns < 0 ? -1 : shmkit_monotonic_ns() + d->timeout_ns;
    return d->at;
}

static int dl_passed(bc_deadline *d)
{
    if (d->timeout_ns < 0)
        return 0;
    return d->timeout_ns == 0 || shmkit_monotonic_ns() >= dl_at(d);
}

static int64_t realtime_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* ---- the double-buffered pairs ------------------------------------------------------- */

/* Read a consistent {seq, pos}. Returns -1 when the writer keeps changing it for a million
 * rounds (only possible when something scribbles on it). */
static int pair_read(bc_pair *p, uint64_t *seq, uint64_t *pos)
{
    for (int i = 0; i < 1000000; i++) {
        uint64_t idx = LOAD(&p->idx, acquire);
        bc_pair_slot *s = &p->s[idx & 1];
        uint64_t sq = LOAD(&s->seq, relaxed);
        uint64_t ps = LOAD(&s->pos, relaxed);
        /* acquire: the slot loads complete before idx is checked again */
        atomic_thread_fence(memory_order_acquire);
        if (LOAD(&p->idx, relaxed) == idx) {
            *seq = sq;
            *pos = ps;
            return 0;
        }
        shmkit_cpu_relax();
    }
    return -1;
}

static void pair_write(bc_pair *p, uint64_t *local_idx, uint64_t seq, uint64_t pos)
{
    uint64_t n = *local_idx + 1;
    bc_pair_slot *s = &p->s[n & 1];
    /* release: the previous idx store is visible before we rewrite the slot it made stale */
    atomic_thread_fence(memory_order_release);
    STORE(&s->seq, seq, relaxed);
    STORE(&s->pos, pos, relaxed);
    STORE(&p->idx, n, release); /* pairs with the acquire in pair_read */
    *local_idx = n;
}

/* ---- the mapping shared by both object types ------------------------------------------ */

typedef struct {
    uint64_t cap, max_msg, grace_ns;
    uint32_t max_subs;
    int policy;
} bc_geom;

typedef struct {
    Py_buffer buf;
    int have_buf;
    bc_ctrl *c;
    bc_slot *table;
    char *ring;
    bc_geom g;
    PyObject *name;  /* the segment name, for `shmkit rm NAME` hints */
    PyObject *label; /* "'name' (backend)" as every message names it */
} bc_map;

static void raise_corrupt(bc_map *m, const char *why)
{
    PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.corrupt),
                 "broadcast %U is corrupt: %s; remove it with `shmkit rm %U` and create it again",
                 m->label, why, m->name);
}

/* Check the geometry handed in by Python (already validated against header.params) against
 * the buffer and the control block, and set the pointers. */
static int map_open(bc_map *m, PyObject *buffer, bc_geom g, PyObject *name, PyObject *label)
{
    Py_INCREF(name);
    Py_INCREF(label);
    Py_XSETREF(m->name, name); /* a retried _attach replaces those of the failed one */
    Py_XSETREF(m->label, label);
    if (g.max_subs == 0 || g.max_subs > BC_MAX_SUBSCRIBERS || g.cap < BC_MIN_CAPACITY ||
        g.cap % 64 != 0 || g.cap > (UINT64_MAX >> 8) || g.max_msg > g.cap / 2 - BC_REC_HDR ||
        (g.policy != BC_OVERWRITE && g.policy != BC_BLOCK)) {
        PyErr_SetString(PyExc_ValueError, "impossible broadcast geometry");
        return -1;
    }
    if (PyObject_GetBuffer(buffer, &m->buf, PyBUF_WRITABLE) < 0)
        return -1;
    m->have_buf = 1;
    uint64_t ring_off = BC_TABLE_OFFSET + (uint64_t)BC_SLOT_SIZE * g.max_subs;
    if ((uint64_t)m->buf.len < ring_off + g.cap || ((uintptr_t)m->buf.buf & 63) != 0) {
        PyErr_SetString(PyExc_ValueError, "buffer too small or misaligned for this broadcast");
        return -1;
    }
    char *base = (char *)m->buf.buf;
    m->c = (bc_ctrl *)(base + BC_CTRL_OFFSET);
    m->table = (bc_slot *)(base + BC_TABLE_OFFSET);
    m->ring = base + ring_off;
    m->g = g;
    bc_ctrl *c = m->c;
    if (c->magic != BC_MAGIC || c->version != BC_VERSION || c->capacity != g.cap ||
        c->max_message != g.max_msg || c->max_subscribers != g.max_subs ||
        c->policy != (uint32_t)g.policy || c->ring_offset != ring_off ||
        c->table_offset != BC_TABLE_OFFSET) {
        raise_corrupt(m, "its control block disagrees with its header");
        return -1;
    }
    return 0;
}

static void map_close(bc_map *m)
{
    if (m->have_buf) {
        PyBuffer_Release(&m->buf);
        m->have_buf = 0;
    }
    m->c = NULL;
    m->table = NULL;
    m->ring = NULL;
}

static int parse_geom(PyObject *args, PyObject **buffer, bc_geom *g, PyObject **name,
                      PyObject **label, PyObject **rest_out, Py_ssize_t nrest)
{
    Py_ssize_t n = PyTuple_GET_SIZE(args);
    if (n != 8 + nrest) {
        PyErr_Format(PyExc_TypeError, "_attach expects %zd arguments", 8 + nrest);
        return -1;
    }
    *buffer = PyTuple_GET_ITEM(args, 0);
    unsigned long long v[5];
    for (int i = 0; i < 5; i++) {
        v[i] = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(args, 1 + i));
        if (v[i] == (unsigned long long)-1 && PyErr_Occurred())
            return -1;
    }
    g->cap = v[0];
    g->max_msg = v[1];
    g->max_subs = v[2] > UINT32_MAX ? 0 : (uint32_t)v[2];
    g->policy = v[3] > 1 ? -1 : (int)v[3];
    g->grace_ns = v[4];
    *name = PyTuple_GET_ITEM(args, 6);
    *label = PyTuple_GET_ITEM(args, 7);
    if (!PyUnicode_Check(*name) || !PyUnicode_Check(*label)) {
        PyErr_SetString(PyExc_TypeError, "name and label must be str");
        return -1;
    }
    for (Py_ssize_t i = 0; i < nrest; i++)
        rest_out[i] = PyTuple_GET_ITEM(args, 8 + i);
    return 0;
}

/* ---- object lock: one call at a time per object, across threads ------------------------ */

/* A busy flag read and written only with the GIL held (every method holds it except while
 * sleeping), so taking it costs two plain stores. A thread that finds it busy (another one
 * sleeps inside a call) polls with the GIL released; that contention is rare. The flag also
 * records the process: in a child forked while a thread of the parent was inside a call,
 * that thread does not exist, so the flag is stale and is ignored (or close() would wait
 * forever). */
typedef struct {
    int busy;
    uint32_t pid;
    unsigned long owner;
} bc_lock;

/* 1 acquired, 0 deadline passed, -1 exception (signal, or re-entry from the same thread). */
static int lock_acquire(bc_lock *l, bc_deadline *dl, const char *what)
{
    unsigned long me = PyThread_get_thread_ident();
    if (l->busy && l->pid != shmkit_bcast_getpid())
        l->busy = 0; /* held by a thread of the parent when this process was forked */
    if (l->busy) {
        if (l->owner == me) {
            PyErr_Format(PyExc_RuntimeError,
                         "%s was called re-entrantly from the thread already using this object",
                         what);
            return -1;
        }
        while (l->busy) {
            struct timespec ts = {0, 100000};
            Py_BEGIN_ALLOW_THREADS
            nanosleep(&ts, NULL);
            Py_END_ALLOW_THREADS
            if (PyErr_CheckSignals() < 0)
                return -1;
            if (l->busy && dl_passed(dl))
                return 0;
        }
    }
    l->busy = 1;
    l->pid = shmkit_bcast_getpid();
    l->owner = me;
    return 1;
}

static void lock_release(bc_lock *l)
{
    l->owner = 0;
    l->busy = 0;
}

/* ---- zero-copy window ------------------------------------------------------------------ */

/* A buffer exporter over one message in the ring, valid until its owner ends the view.
 * It keeps its owner (and so the mapping) alive and counts the exports still held. */
typedef struct {
    PyObject_HEAD
    PyObject *owner;
    Py_ssize_t *owner_exports; /* the owner's count of exports from all its windows */
    char *ptr;                 /* NULL once the view ended */
    Py_ssize_t len;
    int readonly;
    Py_ssize_t exports;
} BcWindow;

static int win_getbuffer(PyObject *self, Py_buffer *view, int flags)
{
    BcWindow *w = (BcWindow *)self;
    if (w->ptr == NULL) {
        PyErr_SetString(PyExc_BufferError,
                        "this message view has ended: it is valid only inside its with block");
        view->obj = NULL;
        return -1;
    }
    if (PyBuffer_FillInfo(view, self, w->ptr, w->len, w->readonly, flags) < 0)
        return -1;
    w->exports++;
    (*w->owner_exports)++;
    return 0;
}

static void win_releasebuffer(PyObject *self, Py_buffer *view)
{
    BcWindow *w = (BcWindow *)self;
    (void)view;
    w->exports--;
    (*w->owner_exports)--;
}

static void win_dealloc(PyObject *self)
{
    PyObject_GC_UnTrack(self);
    Py_CLEAR(((BcWindow *)self)->owner);
    PyObject_GC_Del(self);
}

/* The owner holds its open window and the window its owner: let the GC see the cycle. */
static int win_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((BcWindow *)self)->owner);
    return 0;
}

static int win_clear(PyObject *self)
{
    BcWindow *w = (BcWindow *)self;
    if (w->exports == 0) { /* an exported window must keep the mapping alive */
        w->ptr = NULL;     /* no new export may count into the owner we drop */
        Py_CLEAR(w->owner);
    }
    return 0;
}

static PyBufferProcs win_as_buffer = {win_getbuffer, win_releasebuffer};

static PyObject *win_exports(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(((BcWindow *)self)->exports);
}

static PyGetSetDef win_getset[] = {
    {"exports", win_exports, NULL, "buffer exports still held", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BcWindowType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._native.BcastWindow",
    .tp_basicsize = sizeof(BcWindow),
    .tp_dealloc = win_dealloc,
    .tp_as_buffer = &win_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_traverse = win_traverse,
    .tp_clear = win_clear,
    .tp_doc = "One message in a broadcast ring, exported as a buffer while its view is open.",
    .tp_getset = win_getset,
};

static BcWindow *win_new(PyObject *owner, Py_ssize_t *owner_exports, char *ptr, Py_ssize_t len,
                         int readonly)
{
    BcWindow *w = PyObject_GC_New(BcWindow, &BcWindowType);
    if (w == NULL)
        return NULL;
    Py_INCREF(owner);
    w->owner = owner;
    w->owner_exports = owner_exports;
    w->ptr = ptr;
    w->len = len;
    w->readonly = readonly;
    w->exports = 0;
    PyObject_GC_Track((PyObject *)w);
    return w;
}

/* End a window; returns how many exports are still held (views that outlived the block). */
static Py_ssize_t win_end(PyObject *win)
{
    if (win == NULL)
        return 0;
    BcWindow *w = (BcWindow *)win;
    w->ptr = NULL;
    return w->exports;
}

/* ======================================================================================== */
/*  Publisher                                                                               */
/* ======================================================================================== */

typedef struct {
    PyObject_HEAD
    bc_map m;
    bc_lock lk;
    int attached, closing;
    uint32_t pid;
    uint64_t my_word;
    /* our cursors: the publisher is the only writer, so these are authoritative */
    uint64_t head_seq, head_pos, head_off, head_idx;
    uint64_t tail_seq, tail_pos, tail_off, tail_idx;
    uint64_t bytes;
    /* an open reservation (zero-copy publish) */
    int in_reserve;
    uint64_t res_len;
    PyObject *res_win;
    Py_ssize_t exports; /* live buffer exports of our windows: the mapping must stay */
    /* block policy: when each blocking subscriber was first seen stuck */
    uint64_t *stall_word, *stall_pos;
    int64_t *stall_since;
    PyObject *weakrefs;
} BcPub;

static void pub_release_role(BcPub *p)
{
    if (p->m.c == NULL || p->my_word == 0)
        return;
    uint64_t w = p->my_word;
    /* keep the generation, clear the holder; fails harmlessly if the role was taken */
    atomic_compare_exchange_strong(&p->m.c->pub_word, &w, (uint64_t)(uint32_t)p->my_word);
    p->my_word = 0;
}

static void pub_detach(BcPub *p)
{
    if (p->attached) {
        bc_ctrl *c = p->m.c;
        if (p->pid == shmkit_bcast_getpid() && LOAD(&c->pub_word, relaxed) == p->my_word) {
            STORE(&c->pub_waiting, 0, relaxed);
            pub_release_role(p);
        }
        p->attached = 0;
    }
    win_end(p->res_win);
    Py_CLEAR(p->res_win);
    p->in_reserve = 0;
    map_close(&p->m);
    PyMem_Free(p->stall_word);
    PyMem_Free(p->stall_pos);
    PyMem_Free(p->stall_since);
    p->stall_word = p->stall_pos = NULL;
    p->stall_since = NULL;
}

static void pub_dealloc(PyObject *self)
{
    BcPub *p = (BcPub *)self;
    PyObject_GC_UnTrack(self);
    if (p->weakrefs != NULL)
        PyObject_ClearWeakRefs(self);
    pub_detach(p);
    Py_CLEAR(p->m.name);
    Py_CLEAR(p->m.label);
    Py_TYPE(self)->tp_free(self);
}

static int pub_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((BcPub *)self)->res_win);
    return 0;
}

static int pub_clear(PyObject *self)
{
    Py_CLEAR(((BcPub *)self)->res_win);
    return 0;
}

static PyObject *pub_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    BcPub *p = (BcPub *)type->tp_alloc(type, 0);
    if (p == NULL)
        return NULL;
    return (PyObject *)p;
}

/* Walk records from (*seq, *pos, *off) to the first record boundary at or past `target`,
 * but never past `limit` (a subscriber's position) nor our head. Every header is checked: the
 * records are ours, but the memory is shared. */
static int pub_walk(BcPub *p, uint64_t *seq, uint64_t *pos, uint64_t *off, uint64_t target,
                    uint64_t limit)
{
    uint64_t cap = p->m.g.cap, steps = 0, max_steps = cap / BC_REC_HDR + 2;
    while (*pos < target && *pos < p->head_pos) {
        if (++steps > max_steps) {
            raise_corrupt(&p->m, "its record chain does not end");
            return -1;
        }
        bc_rec *r = (bc_rec *)(p->m.ring + *off);
        uint64_t sq = LOAD(&r->seq, relaxed);
        uint32_t n = LOAD(&r->len, relaxed), fl = LOAD(&r->flags, relaxed);
        uint64_t room = cap - *off - BC_REC_HDR, adv;
        if (fl == BC_FLAG_PAD && n == room) {
            adv = cap - *off;
        } else if (fl == 0 && sq == *seq && n <= p->m.g.max_msg && n <= room) {
            adv = rec_size(n);
        } else {
            raise_corrupt(&p->m, "a retained record header was overwritten");
            return -1;
        }
        if (*pos + adv > p->head_pos) {
            raise_corrupt(&p->m, "a retained record runs past the head");
            return -1;
        }
        if (*pos + adv > limit)
            break;
        if (fl == 0)
            (*seq)++;
        *pos += adv;
        *off += adv;
        if (*off == cap)
            *off = 0;
    }
    return 0;
}

static void pub_set_tail(BcPub *p, uint64_t seq, uint64_t pos, uint64_t off)
{
    bc_ctrl *c = p->m.c;
    p->tail_seq = seq;
    p->tail_pos = pos;
    p->tail_off = off;
    pair_write(&c->tail, &p->tail_idx, seq, pos);
    STORE(&c->tail_pos, pos, release);
    /* The freed space is overwritten only after the new tail is visible: readers copy, then
     * (acquire fence) re-read tail_pos. Release fence: prior stores before later stores. */
    atomic_thread_fence(memory_order_release);
}

static void pub_publish_head(BcPub *p)
{
    bc_ctrl *c = p->m.c;
    pair_write(&c->head, &p->head_idx, p->head_seq, p->head_pos);
    STORE(&c->published_bytes, p->bytes, relaxed);
    STORE(&c->head_pos, p->head_pos, release); /* pairs with the acquire in sub_peek */
}

/* Wake sleeping subscribers, if any. The seq_cst fence orders our head store before the
 * load of wake_subs; subscribers raise it, then re-check the head. */
static void pub_notify(BcPub *p)
{
    bc_ctrl *c = p->m.c;
    atomic_thread_fence(memory_order_seq_cst);
    if (LOAD(&c->wake_subs, relaxed) != 0 && atomic_exchange(&c->wake_subs, 0) != 0) {
        atomic_fetch_add_explicit(&c->head_event, 1, memory_order_seq_cst);
        shmkit_futex_wake(&c->head_event, INT_MAX);
    }
}

static void pub_notify(BcPub *p);

/* Evict slot `sl` observed as `w`: a dead owner's slot is freed at once, a live one is marked
 * evicted (its owner frees it when it notices). Returns 1 if this call changed the slot. */
static int evict_slot(bc_ctrl *c, bc_slot *sl, uint64_t w, int dead)
{
    uint64_t nw = dead ? slot_word(0, W_GEN(w), BC_FREE) : slot_word(W_PID(w), W_GEN(w), BC_EVICTED);
    if (!atomic_compare_exchange_strong(&sl->word, &w, nw))
        return 0;
    if (dead)
        STORE(&sl->waiting, 0, relaxed);
    atomic_fetch_add(&c->evictions, 1);
    return 1;
}

/* Block policy: evict the subscribers holding the tail below `want` that are dead or have not
 * moved for the grace period. Returns how many slots changed. */
static int pub_reap(BcPub *p, uint64_t want, int64_t now)
{
    bc_ctrl *c = p->m.c;
    uint32_t high = LOAD(&c->sub_high, acquire);
    if (high > p->m.g.max_subs)
        high = p->m.g.max_subs;
    int changed = 0;
    for (uint32_t i = 0; i < high; i++) {
        bc_slot *sl = &p->m.table[i];
        uint64_t w = LOAD(&sl->word, acquire);
        if (W_STATE(w) != BC_ACTIVE)
            continue;
        uint64_t rp = LOAD(&sl->read_pos, acquire);
        if (rp < p->tail_pos || rp > p->head_pos || rp >= want)
            continue;
        if (!shmkit_task_alive(W_PID(w))) {
            changed += evict_slot(c, sl, w, 1);
            continue;
        }
        if (p->stall_word[i] != w || p->stall_pos[i] != rp) {
            p->stall_word[i] = w;
            p->stall_pos[i] = rp;
            p->stall_since[i] = now;
            continue;
        }
        if (p->m.g.grace_ns < (uint64_t)INT64_MAX &&
            now - p->stall_since[i] >= (int64_t)p->m.g.grace_ns)
            changed += evict_slot(c, sl, w, 0);
    }
    return changed;
}

/* Block policy: wait until the tail can reach `want`. 0 done, 1 deadline passed, -1 error.
 *
 * Each round announces how far the tail may go, scans the subscribers and moves the tail.
 * Once blocked, the publisher asks for `slack` more than it needs before it wakes (and so
 * does a round per slack-worth of messages rather than per message); after a sleep slice
 * without that it settles for what it needs. */
static int pub_wait_room(BcPub *p, uint64_t want, bc_deadline *dl)
{
    bc_ctrl *c = p->m.c;
    uint64_t slack = p->m.g.cap / 8;
    uint64_t target = want + slack < p->head_pos ? want + slack : p->head_pos;
    uint64_t required = want;
    int announced = 0, rc = 0, blocked = 0;
    int64_t slice = BC_SLICE_MIN_NS, last_check = 0;
    for (;;) {
        uint32_t event = LOAD(&c->space_event, acquire);
        /* 1. announce how far the tail may go: the first record boundary at or past target
         * (a joiner below it restarts at the head) */
        uint64_t reach = target + rec_size(p->m.g.max_msg);
        STORE(&c->intent_pos, reach < p->head_pos ? reach : p->head_pos, release);
        atomic_thread_fence(memory_order_seq_cst); /* pairs with the fence in sub_attach */
        /* 2. the slowest active subscriber bounds it; positions outside [tail, head] belong to
         * a joiner moving up (or are garbage) and never hold the tail back */
        uint64_t low = p->head_pos;
        uint32_t high = LOAD(&c->sub_high, acquire);
        if (high > p->m.g.max_subs)
            high = p->m.g.max_subs;
        for (uint32_t i = 0; i < high; i++) {
            bc_slot *sl = &p->m.table[i];
            if (W_STATE(LOAD(&sl->word, acquire)) != BC_ACTIVE)
                continue;
            uint64_t rp = LOAD(&sl->read_pos, acquire);
            if (rp >= p->tail_pos && rp <= p->head_pos && rp < low)
                low = rp;
        }
        /* 3. move the tail towards target, never past that subscriber */
        if (low > p->tail_pos) {
            uint64_t sq = p->tail_seq, ps = p->tail_pos, o = p->tail_off;
            if (pub_walk(p, &sq, &ps, &o, target, low) < 0)
                goto fail;
            if (ps > p->tail_pos)
                pub_set_tail(p, sq, ps, o);
        }
        /* the round is over: the intent falls back to the tail, so that a subscriber joining
         * at the oldest message while we sleep is not sent to the head (release: after the
         * tail, pairs with the acquire in sub_attach) */
        STORE(&c->intent_pos, p->tail_pos, release);
        if (p->tail_pos >= required)
            break;
        /* 4. blocked: deal with dead and stalled subscribers, then sleep */
        if (!blocked) {
            blocked = 1;
            memset(p->stall_word, 0, sizeof(uint64_t) * p->m.g.max_subs);
            /* subscribers asleep on records of this batch must wake up to free room */
            pub_notify(p);
        }
        /* liveness costs system calls: check only once blocked for a while (a busy
         * subscriber usually frees room within microseconds) */
        int64_t now = shmkit_monotonic_ns();
        if (last_check == 0) {
            last_check = now;
        } else if (now - last_check >= BC_CHECK_NS) {
            last_check = now;
            if (pub_reap(p, want, now) > 0)
                continue;
        }
        if (!announced || LOAD(&c->pub_waiting, relaxed) == 0) {
            if (!announced)
                required = target;
            STORE(&c->pub_wait_pos, target, relaxed);
            /* release: a subscriber that sees the flag (acquire) sees this round's mark */
            STORE(&c->pub_waiting, 1, release);
            atomic_thread_fence(memory_order_seq_cst); /* pairs with sub_store_pos */
            announced = 1;
            continue; /* scan once more with the flag visible */
        }
        int64_t deadline = dl_at(dl);
        if (deadline >= 0 && now >= deadline) {
            if (p->tail_pos >= want)
                break;
            rc = 1;
            break;
        }
        if (p->closing) {
            PyErr_Format(PyExc_ValueError,
                         "the publisher of broadcast %U was closed by another thread while "
                         "this one waited for room",
                         p->m.label);
            goto fail;
        }
        int64_t until = now + slice;
        if (deadline >= 0 && until > deadline)
            until = deadline;
        int w = shmkit_wait_u32(&c->space_event, event, until, 0);
        if (w < 0)
            goto fail;
        if (w == 0) {
            required = want; /* a whole slice without the slack: take what we need */
            if (slice < BC_SLICE_MAX_NS)
                slice *= 2;
        }
    }
    if (announced)
        STORE(&c->pub_waiting, 0, relaxed);
    return rc;
fail:
    STORE(&c->intent_pos, p->tail_pos, release);
    if (announced)
        STORE(&c->pub_waiting, 0, relaxed);
    return -1;
}

/* Make room for a record of `need` bytes at the head (after padding, if the ring end is too
 * close). Writes the padding record. 0 ok, 1 deadline passed, -1 error. */
static int pub_make_room(BcPub *p, uint64_t need, bc_deadline *dl)
{
    uint64_t cap = p->m.g.cap;
    uint64_t pad = cap - p->head_off < need ? cap - p->head_off : 0;
    uint64_t end = p->head_pos + pad + need;
    if (end > BC_POS_LIMIT) {
        PyErr_Format(PyExc_OverflowError,
                     "broadcast %U has published 4 EiB, all its 62-bit positions can count; "
                     "create a new broadcast",
                     p->m.label);
        return -1;
    }
    if (p->tail_pos + cap < end) {
        uint64_t want = end - cap;
        if (p->m.g.policy == BC_OVERWRITE) {
            uint64_t s = p->tail_seq, ps = p->tail_pos, o = p->tail_off;
            if (pub_walk(p, &s, &ps, &o, want, UINT64_MAX) < 0)
                return -1;
            if (ps < want) {
                raise_corrupt(&p->m, "the ring cannot hold the message");
                return -1;
            }
            pub_set_tail(p, s, ps, o);
        } else {
            int rc = pub_wait_room(p, want, dl);
            if (rc != 0)
                return rc;
        }
    }
    if (pad) {
        bc_rec *r = (bc_rec *)(p->m.ring + p->head_off);
        STORE(&r->seq, p->head_seq, relaxed);
        STORE(&r->len, (uint32_t)(pad - BC_REC_HDR), relaxed);
        STORE(&r->flags, BC_FLAG_PAD, relaxed);
        p->head_pos += pad;
        p->head_off = 0;
        /* publish the padding at once: the published head then always equals our head
         * outside a commit, even when the message is dropped (an aborted reservation), which
         * sub_attach relies on (a block-policy intent never exceeds the published head) */
        pub_publish_head(p);
    }
    return 0;
}

/* Finish the record whose payload is at the head: header, cursors, publication. */
static void pub_commit_record(BcPub *p, uint64_t len)
{
    bc_rec *r = (bc_rec *)(p->m.ring + p->head_off);
    STORE(&r->seq, p->head_seq, relaxed);
    STORE(&r->len, (uint32_t)len, relaxed);
    STORE(&r->flags, 0, relaxed);
    uint64_t need = rec_size(len);
    p->head_pos += need;
    p->head_off += need;
    if (p->head_off == p->m.g.cap)
        p->head_off = 0;
    p->head_seq++;
    p->bytes += len;
    pub_publish_head(p);
}

/* Is this publisher usable now (called with the object lock held)? */
static int pub_check(BcPub *p)
{
    if (!p->attached) {
        PyErr_Format(PyExc_ValueError,
                     "this publisher of broadcast %U is closed; call publisher() for a new one",
                     p->m.label);
        return -1;
    }
    if (p->pid != shmkit_bcast_getpid()) {
        PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.pub_exists),
                     "this publisher of broadcast %U belongs to process %u, not to this forked "
                     "child; call publisher() in the child",
                     p->m.label, p->pid);
        return -1;
    }
    uint64_t w = LOAD(&p->m.c->pub_word, relaxed);
    if (w != p->my_word) {
        PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.pub_exists),
                     "this process lost the publisher role of broadcast %U: it is now held by "
                     "pid %u; close this publisher",
                     p->m.label, W_PID(w));
        return -1;
    }
    return 0;
}

static int pub_enter(BcPub *p, bc_deadline *dl, const char *what)
{
    int rc = lock_acquire(&p->lk, dl, what);
    if (rc == 0) {
        PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.full),
                     "no room in broadcast %U before the timeout: another thread of this "
                     "process is publishing",
                     p->m.label);
        return -1;
    }
    if (rc < 0)
        return -1;
    if (pub_check(p) < 0) {
        lock_release(&p->lk);
        return -1;
    }
    if (p->in_reserve) {
        lock_release(&p->lk);
        PyErr_Format(PyExc_RuntimeError,
                     "a reservation is open on this publisher of broadcast %U; leave its with "
                     "block first",
                     p->m.label);
        return -1;
    }
    return 0;
}

static void raise_full(BcPub *p)
{
    PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.full),
                 "no room in broadcast %U before the timeout: the slowest subscriber has not read "
                 "far enough; subscribers that stop reading are evicted after the grace period",
                 p->m.label);
}

static int raise_too_large(BcPub *p, Py_ssize_t len)
{
    PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.too_large),
                 "message of %zd bytes exceeds max_message (%llu bytes) of broadcast %U; split "
                 "it or create the broadcast with a larger capacity",
                 len, (unsigned long long)p->m.g.max_msg, p->m.label);
    return -1;
}

/* Publish one message: 0 ok, 1 deadline passed, -1 error. Object lock held. */
static int pub_put(BcPub *p, const char *data, Py_ssize_t len, bc_deadline *dl)
{
    if ((uint64_t)len > p->m.g.max_msg)
        return raise_too_large(p, len);
    int rc = pub_make_room(p, rec_size((uint64_t)len), dl);
    if (rc != 0)
        return rc;
    memcpy(p->m.ring + p->head_off + BC_REC_HDR, data, (size_t)len);
    pub_commit_record(p, (uint64_t)len);
    return 0;
}

static const char *const timeout_names[] = {"timeout"};
static const char *const publish_names[] = {"data", "timeout"};

PyDoc_STRVAR(pub_publish_doc,
"publish(data, timeout=None)\n--\n\n"
"Publish one message (any bytes-like object) to every subscriber.\n\n"
"With the overwrite policy this never waits. With the block policy it waits up to timeout\n"
"seconds (None: forever) for the slowest live subscriber to free room, evicting dead ones\n"
"and ones that make no progress for the grace period.\n\n"
"Raises:\n"
"    MessageTooLargeError: data is larger than max_message.\n"
"    Full: block policy, no room before the timeout.\n"
"    PublisherExistsError: this process no longer holds the publisher role.\n"
"    CorruptSegmentError: the retained records were damaged by another process.");

static PyObject *publish_impl(BcPub *p, PyObject *data, int64_t timeout_ns)
{
    Py_buffer view;
    const char *ptr;
    Py_ssize_t len;
    int have_view = 0;
    if (PyBytes_CheckExact(data)) {
        ptr = PyBytes_AS_STRING(data);
        len = PyBytes_GET_SIZE(data);
    } else {
        if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) {
            PyErr_Format(PyExc_TypeError, "data must be a bytes-like object, not %.100s",
                         Py_TYPE(data)->tp_name);
            return NULL;
        }
        have_view = 1;
        ptr = (const char *)view.buf;
        len = view.len;
    }
    PyObject *result = NULL;
    bc_deadline dl = dl_make(timeout_ns);
    if (pub_enter(p, &dl, "publish") == 0) {
        int rc = pub_put(p, ptr, len, &dl);
        if (rc == 0) {
            pub_notify(p);
            result = Py_None;
            Py_INCREF(result);
        } else if (rc == 1) {
            raise_full(p);
        }
        lock_release(&p->lk);
    }
    if (have_view)
        PyBuffer_Release(&view);
    return result;
}

static PyObject *pub_publish(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    PyObject *a[2];
    int64_t timeout_ns = -1;
    if (kwnames == NULL && nargs == 1) {
        a[0] = args[0];
    } else {
        if (shmkit_bcast_parse("publish", args, nargs, kwnames, publish_names, 2, 1, a) < 0 ||
            shmkit_bcast_timeout(a[1], &timeout_ns) < 0)
            return NULL;
    }
    return publish_impl((BcPub *)self, a[0], timeout_ns);
}

static PyObject *pub_publish_nowait(PyObject *self, PyObject *data)
{
    return publish_impl((BcPub *)self, data, 0);
}

PyDoc_STRVAR(pub_publish_many_doc,
"publish_many(messages, timeout=None) -> int\n--\n\n"
"Publish every message of an iterable of bytes-like objects, in order; subscribers are woken\n"
"once for the batch. Returns how many were published. timeout bounds the whole call (block\n"
"policy). If a message fails (too large, wrong type, Full), the ones before it stay published\n"
"and the exception says how many.");

static PyObject *pub_publish_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    BcPub *p = (BcPub *)self;
    static const char *const names[] = {"messages", "timeout"};
    PyObject *a[2];
    int64_t timeout_ns;
    if (shmkit_bcast_parse("publish_many", args, nargs, kwnames, names, 2, 1, a) < 0 ||
        shmkit_bcast_timeout(a[1], &timeout_ns) < 0)
        return NULL;
    bc_deadline dl = dl_make(timeout_ns);
    PyObject *it = PyObject_GetIter(a[0]);
    if (it == NULL)
        return NULL;
    if (pub_enter(p, &dl, "publish_many") < 0) {
        Py_DECREF(it);
        return NULL;
    }
    Py_ssize_t count = 0;
    int failed = 0;
    PyObject *item;
    while ((item = PyIter_Next(it)) != NULL) {
        Py_buffer view;
        if (PyObject_GetBuffer(item, &view, PyBUF_SIMPLE) < 0) {
            Py_DECREF(item);
            PyErr_Format(PyExc_TypeError,
                         "message %zd must be a bytes-like object (%zd were published)", count,
                         count);
            failed = 1;
            break;
        }
        int rc = pub_put(p, (const char *)view.buf, view.len, &dl);
        PyBuffer_Release(&view);
        Py_DECREF(item);
        if (rc != 0) {
            if (rc == 1)
                raise_full(p);
            failed = 1;
            break;
        }
        count++;
    }
    if (!failed && PyErr_Occurred())
        failed = 1; /* the iterator raised */
    if (count > 0)
        pub_notify(p);
    lock_release(&p->lk);
    Py_DECREF(it);
    if (failed) {
        if (count > 0) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            PyObject *note = PyUnicode_FromFormat("%zd messages of the batch were published", count);
            if (note != NULL && value != NULL) {
                PyObject *r = PyObject_CallMethod(value, "add_note", "O", note);
                Py_XDECREF(r);
                PyErr_Clear();
            }
            Py_XDECREF(note);
            PyErr_Restore(type, value, tb);
        }
        return NULL;
    }
    return PyLong_FromSsize_t(count);
}

static PyObject *pub_reserve_begin(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    BcPub *p = (BcPub *)self;
    static const char *const names[] = {"size", "timeout"};
    PyObject *a[2];
    int64_t timeout_ns;
    if (shmkit_bcast_parse("reserve", args, nargs, kwnames, names, 2, 1, a) < 0 ||
        shmkit_bcast_timeout(a[1], &timeout_ns) < 0)
        return NULL;
    bc_deadline dl = dl_make(timeout_ns);
    Py_ssize_t size = PyNumber_AsSsize_t(a[0], PyExc_OverflowError);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    if (size < 0) {
        PyErr_SetString(PyExc_ValueError, "size must be >= 0");
        return NULL;
    }
    if (pub_enter(p, &dl, "reserve") < 0)
        return NULL;
    PyObject *result = NULL;
    if ((uint64_t)size > p->m.g.max_msg) {
        raise_too_large(p, size);
    } else {
        int rc = pub_make_room(p, rec_size((uint64_t)size), &dl);
        if (rc == 1)
            raise_full(p);
        if (rc == 0) {
            BcWindow *w = win_new(self, &p->exports, p->m.ring + p->head_off + BC_REC_HDR, size, 0);
            if (w != NULL) {
                p->in_reserve = 1;
                p->res_len = (uint64_t)size;
                Py_XSETREF(p->res_win, (PyObject *)w);
                Py_INCREF(w);
                result = (PyObject *)w;
            }
        }
    }
    lock_release(&p->lk);
    return result;
}

/* End the open reservation: commit = 1 publishes it, 0 drops it. Returns the number of
 * exports of the window still alive (the caller reports them). */
static PyObject *pub_reserve_end(BcPub *p, int commit)
{
    bc_deadline forever = dl_make(-1);
    int rc = lock_acquire(&p->lk, &forever, "reserve");
    if (rc <= 0)
        return NULL;
    if (!p->in_reserve) {
        lock_release(&p->lk);
        PyErr_Format(PyExc_RuntimeError,
                     "no reservation is open on this publisher of broadcast %U; use reserve() "
                     "as a with block",
                     p->m.label);
        return NULL;
    }
    p->in_reserve = 0;
    Py_ssize_t alive = win_end(p->res_win);
    Py_CLEAR(p->res_win);
    PyObject *result = NULL;
    if (pub_check(p) == 0) {
        if (commit) {
            pub_commit_record(p, p->res_len);
            pub_notify(p);
        }
        result = PyLong_FromSsize_t(alive);
    }
    lock_release(&p->lk);
    return result;
}

static PyObject *pub_reserve_commit(PyObject *self, PyObject *unused)
{
    (void)unused;
    return pub_reserve_end((BcPub *)self, 1);
}

static PyObject *pub_reserve_abort(PyObject *self, PyObject *unused)
{
    (void)unused;
    return pub_reserve_end((BcPub *)self, 0);
}

/* Load and check the cursors after claiming the role: the head and tail pairs, and the record
 * chain between them. A previous holder killed at any instruction left complete pairs, and
 * perhaps a record beyond the head that nobody can see; we simply write over it. */
static int pub_load_cursors(BcPub *p)
{
    bc_ctrl *c = p->m.c;
    uint64_t cap = p->m.g.cap, hs, hp, ts, tp;
    if (pair_read(&c->head, &hs, &hp) < 0 || pair_read(&c->tail, &ts, &tp) < 0) {
        raise_corrupt(&p->m, "its cursors keep changing");
        return -1;
    }
    if ((hp | tp) & 15 || hp > BC_POS_LIMIT || tp > hp || hp - tp > cap || ts > hs ||
        hs - ts > (hp - tp) / 16) {
        raise_corrupt(&p->m, "its head and tail cursors are inconsistent");
        return -1;
    }
    p->head_idx = LOAD(&c->head.idx, relaxed);
    p->tail_idx = LOAD(&c->tail.idx, relaxed);
    p->head_seq = hs;
    p->head_pos = hp;
    p->head_off = hp % cap;
    p->tail_seq = ts;
    p->tail_pos = tp;
    p->tail_off = tp % cap;
    p->bytes = LOAD(&c->published_bytes, relaxed);
    uint64_t s = ts, ps = tp, o = p->tail_off;
    if (pub_walk(p, &s, &ps, &o, hp, UINT64_MAX) < 0)
        return -1;
    if (ps != hp || s != hs) {
        raise_corrupt(&p->m, "its retained records do not add up to its head cursor");
        return -1;
    }
    /* the words readers use may lag the pairs by one step if the last holder died between */
    STORE(&c->tail_pos, tp, release);
    STORE(&c->head_pos, hp, release);
    /* a holder killed in the middle of a block-policy round left its intent above the tail:
     * joining subscribers asking for the oldest message would start at the head instead */
    STORE(&c->intent_pos, tp, release);
    return 0;
}

PyDoc_STRVAR(pub_attach_doc,
"_attach(buffer, capacity, max_message, max_subscribers, policy, grace_ns, name, label,\n"
"        proc_start) -> (took_over, previous_pid)\n--\n\n"
"Internal: map the broadcast and claim the publisher role (taking it over from a dead\n"
"holder).");

static PyObject *pub_attach(PyObject *self, PyObject *args)
{
    BcPub *p = (BcPub *)self;
    PyObject *buffer, *name, *label, *rest[1];
    bc_geom g;
    if (p->attached || p->m.have_buf) {
        PyErr_SetString(PyExc_RuntimeError, "already attached");
        return NULL;
    }
    if (parse_geom(args, &buffer, &g, &name, &label, rest, 1) < 0)
        return NULL;
    unsigned long long proc_start = PyLong_AsUnsignedLongLong(rest[0]);
    if (proc_start == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (map_open(&p->m, buffer, g, name, label) < 0)
        goto fail;
    PyMem_Free(p->stall_word); /* from a failed earlier _attach, if any */
    PyMem_Free(p->stall_pos);
    PyMem_Free(p->stall_since);
    p->stall_word = PyMem_Calloc(g.max_subs, sizeof(uint64_t));
    p->stall_pos = PyMem_Calloc(g.max_subs, sizeof(uint64_t));
    p->stall_since = PyMem_Calloc(g.max_subs, sizeof(int64_t));
    if (!p->stall_word || !p->stall_pos || !p->stall_since) {
        PyErr_NoMemory();
        goto fail;
    }
    bc_ctrl *c = p->m.c;
    uint32_t me = shmkit_bcast_getpid();
    uint64_t w = LOAD(&c->pub_word, acquire), nw = 0;
    uint32_t previous = 0;
    for (int tries = 0;; tries++) {
        uint32_t holder = W_PID(w);
        /* Our own pid is live unless the holder was an earlier process that had the same pid
         * (pid reuse, e.g. a restarted publisher): its start time differs from ours. The role
         * is claimed with the GIL held until pub_start is stored, so no thread of this
         * process can see our pid with an older start time. */
        int live = holder == me ? LOAD(&c->pub_start, relaxed) == proc_start
                                : shmkit_task_alive(holder);
        if (holder != 0 && live) {
            PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.pub_exists),
                         "broadcast %U already has a live publisher (pid %u%s); close it first "
                         "(a dead publisher's role is taken over automatically)",
                         label, holder, holder == me ? ", this process" : "");
            goto fail;
        }
        nw = ((uint64_t)me << 32) | (uint32_t)(w + 1);
        if (atomic_compare_exchange_strong(&c->pub_word, &w, nw)) {
            previous = holder;
            break;
        }
        if (tries > 1000) {
            raise_corrupt(&p->m, "its publisher word keeps changing");
            goto fail;
        }
    }
    p->my_word = nw;
    p->pid = me;
    STORE(&c->pub_start, proc_start, relaxed);
    atomic_fetch_add(&c->pub_claims, 1);
    if (previous != 0)
        atomic_fetch_add(&c->takeovers, 1);
    STORE(&c->pub_waiting, 0, relaxed);
    if (pub_load_cursors(p) < 0) {
        pub_release_role(p);
        goto fail;
    }
    STORE(&c->ended, 0, release);
    p->attached = 1;
    return Py_BuildValue("(OI)", previous ? Py_True : Py_False, previous);
fail:
    map_close(&p->m);
    return NULL;
}

PyDoc_STRVAR(pub_close_doc,
"_close(end_stream=False)\n--\n\n"
"Internal: give up the publisher role and the mapping. With end_stream, subscribers are told\n"
"the stream is over (they drain what is left, then get QueueClosed).");

static PyObject *pub_close(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    BcPub *p = (BcPub *)self;
    static const char *const names[] = {"end_stream"};
    PyObject *a[1];
    if (shmkit_bcast_parse("_close", args, nargs, kwnames, names, 1, 0, a) < 0)
        return NULL;
    int end = a[0] != NULL && PyObject_IsTrue(a[0]) > 0;
    if (!p->attached && !p->m.have_buf)
        Py_RETURN_NONE;
    if (p->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "views of a reserved message are still alive");
        return NULL;
    }
    p->closing = 1;
    if (p->m.c != NULL) { /* wake our own waiting thread, if any (see sub_close) */
        atomic_fetch_add(&p->m.c->space_event, 1);
        shmkit_futex_wake(&p->m.c->space_event, INT_MAX);
    }
    bc_deadline forever = dl_make(-1);
    int rc = lock_acquire(&p->lk, &forever, "close");
    if (rc <= 0) {
        p->closing = 0; /* interrupted: the publisher stays usable */
        return NULL;
    }
    if (end && p->attached && pub_check(p) == 0) {
        STORE(&p->m.c->ended, 1, release);
        atomic_fetch_add(&p->m.c->head_event, 1);
        shmkit_futex_wake(&p->m.c->head_event, INT_MAX);
    }
    PyErr_Clear();
    pub_detach(p);
    lock_release(&p->lk);
    Py_RETURN_NONE;
}

static PyObject *pub_get_closed(PyObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(!((BcPub *)self)->attached);
}

static PyObject *pub_get_seq(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(((BcPub *)self)->head_seq);
}

static PyMethodDef pub_methods[] = {
    {"publish", (PyCFunction)(void (*)(void))pub_publish, METH_FASTCALL | METH_KEYWORDS,
     pub_publish_doc},
    {"publish_nowait", pub_publish_nowait, METH_O,
     "publish_nowait(data)\n--\n\nPublish without waiting for room (raises Full at once)."},
    {"publish_many", (PyCFunction)(void (*)(void))pub_publish_many,
     METH_FASTCALL | METH_KEYWORDS, pub_publish_many_doc},
    {"_reserve_begin", (PyCFunction)(void (*)(void))pub_reserve_begin,
     METH_FASTCALL | METH_KEYWORDS, "Internal: open a reservation; returns its window."},
    {"_reserve_commit", pub_reserve_commit, METH_NOARGS,
     "Internal: publish the reservation; returns exports still alive."},
    {"_reserve_abort", pub_reserve_abort, METH_NOARGS,
     "Internal: drop the reservation; returns exports still alive."},
    {"_attach", pub_attach, METH_VARARGS, pub_attach_doc},
    {"_close", (PyCFunction)(void (*)(void))pub_close, METH_FASTCALL | METH_KEYWORDS,
     pub_close_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef pub_getset[] = {
    {"closed", pub_get_closed, NULL, "Whether this publisher was closed.", NULL},
    {"next_seq", pub_get_seq, NULL, "Sequence number the next message will get.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BcPubType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._native.BcastPublisher",
    .tp_basicsize = sizeof(BcPub),
    .tp_dealloc = pub_dealloc,
    .tp_traverse = pub_traverse,
    .tp_clear = pub_clear,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C core of shmkit.broadcast.Publisher.",
    .tp_methods = pub_methods,
    .tp_getset = pub_getset,
    .tp_new = pub_new,
    .tp_weaklistoffset = offsetof(BcPub, weakrefs),
};

/* ======================================================================================== */
/*  Subscriber                                                                              */
/* ======================================================================================== */

typedef struct {
    PyObject_HEAD
    bc_map m;
    bc_lock lk;
    int attached, closing, gone, on_lag_raise;
    uint32_t pid, slot_index;
    bc_slot *slot;
    uint64_t my_word;
    uint64_t read_pos, read_off, next_seq, missed, pending_lag;
    uint64_t head_seen; /* last head_pos loaded: records below it are complete */
    int64_t spin_ns;
    int in_view;
    PyObject *view_win;
    Py_ssize_t exports; /* live buffer exports of our windows: the mapping must stay */
    uint32_t view_len;
    PyObject *weakrefs;
} BcSub;

enum { RD_OK, RD_EMPTY, RD_LAPPED, RD_CORRUPT };

static void sub_leave(BcSub *s)
{
    if (!s->attached)
        return;
    s->attached = 0;
    if (s->gone || s->pid != shmkit_bcast_getpid() || s->slot == NULL)
        return;
    bc_ctrl *c = s->m.c;
    bc_slot *sl = s->slot;
    uint64_t w = s->my_word;
    uint64_t fw = slot_word(0, W_GEN(w), BC_FREE);
    if (!atomic_compare_exchange_strong(&sl->word, &w, fw)) {
        uint64_t ev = slot_word(W_PID(s->my_word), W_GEN(s->my_word), BC_EVICTED);
        atomic_compare_exchange_strong(&sl->word, &ev, fw);
    }
    /* a publisher waiting on us can go on */
    atomic_thread_fence(memory_order_seq_cst);
    if (LOAD(&c->pub_waiting, relaxed)) {
        atomic_fetch_add(&c->space_event, 1);
        shmkit_futex_wake(&c->space_event, 1);
    }
}

static void sub_detach(BcSub *s)
{
    sub_leave(s);
    win_end(s->view_win);
    Py_CLEAR(s->view_win);
    s->in_view = 0;
    map_close(&s->m);
    s->slot = NULL;
}

static void sub_dealloc(PyObject *self)
{
    BcSub *s = (BcSub *)self;
    PyObject_GC_UnTrack(self);
    if (s->weakrefs != NULL)
        PyObject_ClearWeakRefs(self);
    sub_detach(s);
    Py_CLEAR(s->m.name);
    Py_CLEAR(s->m.label);
    Py_TYPE(self)->tp_free(self);
}

static int sub_traverse(PyObject *self, visitproc visit, void *arg)
{
    Py_VISIT(((BcSub *)self)->view_win);
    return 0;
}

static int sub_clear(PyObject *self)
{
    Py_CLEAR(((BcSub *)self)->view_win);
    return 0;
}

static PyObject *sub_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    (void)args;
    (void)kwds;
    BcSub *s = (BcSub *)type->tp_alloc(type, 0);
    if (s == NULL)
        return NULL;
    s->spin_ns = BC_DEFAULT_SPIN_NS;
    return (PyObject *)s;
}

/* Has the tail stayed at or below our cursor? Called after copying: the acquire fence keeps
 * the copy's loads before the tail load (pairs with the release fence in pub_set_tail). The
 * tail load itself is an acquire too (pairs with the release store in pub_set_tail): when it
 * says the tail passed us, sub_relocate's later loads of the tail pair must see that move,
 * not an older pair (weakly ordered CPUs may otherwise satisfy them first). */
static inline int sub_tail_ok(BcSub *s)
{
    atomic_thread_fence(memory_order_acquire);
    return LOAD(&s->m.c->tail_pos, acquire) <= s->read_pos;
}

/* Look at the record at our cursor, skipping a padding record. */
static int sub_peek(BcSub *s, const char **data, uint32_t *len, const char **why)
{
    bc_ctrl *c = s->m.c;
    uint64_t cap = s->m.g.cap;
    for (int guard = 0; guard < 3; guard++) {
        /* reload the shared head only when we caught up with the last one we saw: the line
         * is written by the publisher for every message */
        if (s->head_seen <= s->read_pos) {
            s->head_seen = LOAD(&c->head_pos, acquire); /* pairs with pub_publish_head */
            if (s->head_seen <= s->read_pos)
                return RD_EMPTY;
        }
        bc_rec *r = (bc_rec *)(s->m.ring + s->read_off);
        uint64_t seq = LOAD(&r->seq, relaxed);
        uint32_t n = LOAD(&r->len, relaxed), fl = LOAD(&r->flags, relaxed);
        uint64_t room = cap - s->read_off - BC_REC_HDR;
        if (fl == BC_FLAG_PAD && n == room) {
            if (!sub_tail_ok(s))
                return RD_LAPPED;
            s->read_pos += cap - s->read_off;
            s->read_off = 0;
            continue;
        }
        if (fl == 0 && seq == s->next_seq && n <= s->m.g.max_msg && n <= room) {
            *data = (const char *)r + BC_REC_HDR;
            *len = n;
            return RD_OK;
        }
        if (!sub_tail_ok(s))
            return RD_LAPPED;
        /* reload the head next time: a damaged head word may be repaired by a new publisher */
        s->head_seen = s->read_pos;
        *why = seq != s->next_seq ? "a record has an unexpected sequence number"
                                  : "a record header is invalid";
        return RD_CORRUPT;
    }
    s->head_seen = s->read_pos;
    *why = "padding records follow each other";
    return RD_CORRUPT;
}

static void sub_consume(BcSub *s, uint32_t len)
{
    uint64_t n = rec_size(len);
    s->read_pos += n;
    s->read_off += n;
    if (s->read_off == s->m.g.cap)
        s->read_off = 0;
    s->next_seq++;
}

/* Tell the publisher how far we are; wake it if it waits for us (block policy). */
static void sub_store_pos(BcSub *s)
{
    bc_ctrl *c = s->m.c;
    if (s->gone)
        return;
    STORE(&s->slot->read_seq, s->next_seq, relaxed);
    STORE(&s->slot->read_pos, s->read_pos, release); /* pairs with the scan in pub_wait_room */
    if (s->m.g.policy == BC_BLOCK) {
        atomic_thread_fence(memory_order_seq_cst); /* pairs with the announce in pub_wait_room */
        if (LOAD(&c->pub_waiting, acquire) && s->read_pos >= LOAD(&c->pub_wait_pos, relaxed)) {
            /* the first subscriber past the mark wakes the publisher; it re-arms the flag
             * if it still has to wait for others */
            uint32_t one = 1;
            if (atomic_compare_exchange_strong(&c->pub_waiting, &one, 0)) {
                atomic_fetch_add(&c->space_event, 1);
                shmkit_futex_wake(&c->space_event, 1);
            }
        }
    }
}

static int sub_raise_gone(BcSub *s)
{
    PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.evicted),
                 "this subscriber of broadcast %U was evicted: the publisher waited on it for "
                 "longer than the grace period, or found its process dead; subscribe again "
                 "(and read faster, or create the broadcast with a larger grace)",
                 s->m.label);
    return -1;
}

/* Is our slot still ours? The publisher may have evicted us (block policy). */
static int sub_check_slot(BcSub *s)
{
    if (s->gone)
        return sub_raise_gone(s);
    uint64_t w = LOAD(&s->slot->word, acquire);
    if (w == s->my_word)
        return 0;
    uint64_t ev = slot_word(W_PID(s->my_word), W_GEN(s->my_word), BC_EVICTED);
    if (w == ev)
        atomic_compare_exchange_strong(&s->slot->word, &ev,
                                       slot_word(0, W_GEN(s->my_word), BC_FREE));
    s->gone = 1;
    return sub_raise_gone(s);
}

/* Jump to the oldest retained message after the tail passed our cursor. */
static int sub_relocate(BcSub *s, uint64_t *missed)
{
    uint64_t ts, tp;
    if (pair_read(&s->m.c->tail, &ts, &tp) < 0) {
        raise_corrupt(&s->m, "its tail cursor keeps changing");
        return -1;
    }
    /* the tail never passes the head (it moves before the head does; acquire: pair_read's
     * acquire of the tail pair orders this load after it) */
    uint64_t hp = LOAD(&s->m.c->head_pos, acquire);
    if (tp <= s->read_pos || (tp & 15) || tp > hp || tp > BC_POS_LIMIT || ts < s->next_seq ||
        ts - s->next_seq > (tp - s->read_pos) / BC_REC_HDR) {
        raise_corrupt(&s->m, "its tail cursor is inconsistent");
        return -1;
    }
    *missed = ts - s->next_seq;
    s->read_pos = tp;
    s->read_off = tp % s->m.g.cap;
    s->next_seq = ts;
    s->missed += *missed;
    if (!s->gone)
        STORE(&s->slot->drops, s->missed, relaxed);
    sub_store_pos(s);
    return 0;
}

static int raise_lagged(BcSub *s, uint64_t missed)
{
    PyObject *msg = PyUnicode_FromFormat(
        "subscriber of broadcast %U fell behind and missed %llu messages; it continues with "
        "the oldest retained message (sequence number %llu)",
        s->m.label, (unsigned long long)missed, (unsigned long long)s->next_seq);
    if (msg == NULL)
        return -1;
    PyObject *cls = shmkit_bcast_exc(shmkit_bcast_errors.lagged);
    PyObject *exc = cls == PyExc_RuntimeError ? PyObject_CallFunctionObjArgs(cls, msg, NULL)
                                              : PyObject_CallFunction(cls, "OK", msg,
                                                                      (unsigned long long)missed);
    Py_DECREF(msg);
    if (exc == NULL)
        return -1;
    PyErr_SetObject(cls, exc);
    Py_DECREF(exc);
    return -1;
}

/* After the tail passed us: evicted (block policy), or lagged. 0 = go on, -1 = raise. */
static int sub_lapped(BcSub *s)
{
    if (sub_check_slot(s) < 0)
        return -1;
    uint64_t missed;
    if (sub_relocate(s, &missed) < 0)
        return -1;
    if (missed > 0 && s->on_lag_raise)
        return raise_lagged(s, missed);
    return 0;
}

static inline int sub_ready(BcSub *s)
{
    return LOAD(&s->m.c->head_pos, acquire) > s->read_pos || LOAD(&s->m.c->ended, acquire) ||
           s->closing;
}

/* Wait for the head to move past our cursor. 1 maybe ready, 0 deadline, -1 exception. */
static int sub_wait(BcSub *s, bc_deadline *dl)
{
    bc_ctrl *c = s->m.c;
    if (dl->timeout_ns == 0)
        return 0;
    int64_t deadline = dl_at(dl);
    if (s->spin_ns > 0) {
        int64_t spin_end = shmkit_monotonic_ns() + s->spin_ns;
        for (unsigned i = 1;; i++) {
            if (sub_ready(s))
                return 1;
            shmkit_cpu_relax();
            if ((i & 63) == 0) {
                int64_t now = shmkit_monotonic_ns();
                if (now >= spin_end)
                    break;
                if (deadline >= 0 && now >= deadline)
                    return 0;
            }
        }
    }
    for (;;) {
        /* raise the flag first, then re-check: the publisher stores the head, fences, then
         * reads the flag (both seq_cst), so one of us sees the other */
        STORE(&s->slot->waiting, 1, relaxed); /* for inspection only */
        atomic_exchange(&c->wake_subs, 1);
        /* seq_cst fence: the flag store is ordered before the head load in sub_ready (pairs
         * with the fence in pub_notify). The exchange alone does not order a later acquire
         * load on weakly ordered CPUs (an RCpc load may pass it), which would lose a wake-up */
        atomic_thread_fence(memory_order_seq_cst);
        uint32_t event = LOAD(&c->head_event, acquire);
        int rc = sub_ready(s) ? 1 : shmkit_wait_u32(&c->head_event, event, deadline, 0);
        STORE(&s->slot->waiting, 0, relaxed);
        if (rc != 1 || sub_ready(s))
            return rc;
        if (LOAD(&s->slot->word, relaxed) != s->my_word)
            return 1; /* let the caller report the eviction */
    }
}

static int raise_closed_object(BcSub *s)
{
    PyErr_Format(PyExc_ValueError,
                 "this subscriber of broadcast %U is closed; call subscribe() for a new one",
                 s->m.label);
    return -1;
}

/* Find the next message (waiting until `deadline`): 1 found, 0 deadline passed, -1 error. */
static int sub_next(BcSub *s, bc_deadline *dl, const char **data, uint32_t *len)
{
    for (;;) {
        if (sub_check_slot(s) < 0)
            return -1;
        if (s->pending_lag) {
            uint64_t missed = s->pending_lag;
            s->pending_lag = 0;
            return raise_lagged(s, missed);
        }
        const char *why = NULL;
        int rc = sub_peek(s, data, len, &why);
        if (rc == RD_OK)
            return 1;
        if (rc == RD_LAPPED) {
            if (sub_lapped(s) < 0)
                return -1;
            continue;
        }
        if (rc == RD_CORRUPT) {
            raise_corrupt(&s->m, why);
            return -1;
        }
        if (s->closing)
            return raise_closed_object(s);
        if (LOAD(&s->m.c->ended, acquire)) {
            /* ended is stored after the last head: re-check the head once */
            if (LOAD(&s->m.c->head_pos, acquire) > s->read_pos)
                continue;
            PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.closed),
                         "the publisher of broadcast %U ended the stream and every message has "
                         "been received",
                         s->m.label);
            return -1;
        }
        int w = sub_wait(s, dl);
        if (w <= 0)
            return w;
    }
}

static int sub_enter(BcSub *s, bc_deadline *dl, const char *what)
{
    int rc = lock_acquire(&s->lk, dl, what);
    if (rc == 0) {
        PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.empty),
                     "no message on broadcast %U before the timeout: another thread of this "
                     "process is receiving on this subscriber",
                     s->m.label);
        return -1;
    }
    if (rc < 0)
        return -1;
    if (!s->attached) {
        lock_release(&s->lk);
        return raise_closed_object(s);
    }
    const char *bad = NULL;
    if (s->in_view)
        bad = "a receive_view is open on it; leave its with block first";
    else if (s->pid != shmkit_bcast_getpid())
        bad = "it belongs to the parent process; call subscribe() in this child";
    if (bad != NULL) {
        lock_release(&s->lk);
        PyErr_Format(PyExc_RuntimeError, "cannot use this subscriber of broadcast %U: %s",
                     s->m.label, bad);
        return -1;
    }
    return 0;
}

static void raise_empty(BcSub *s)
{
    PyErr_Format(shmkit_bcast_exc(shmkit_bcast_errors.empty),
                 "no message on broadcast %U before the timeout", s->m.label);
}

static PyObject *receive_impl(BcSub *s, int64_t timeout_ns)
{
    bc_deadline dl = dl_make(timeout_ns);
    if (sub_enter(s, &dl, "receive") < 0)
        return NULL;
    PyObject *out = NULL;
    for (;;) {
        const char *data;
        uint32_t len;
        int rc = sub_next(s, &dl, &data, &len);
        if (rc <= 0) {
            if (rc == 0)
                raise_empty(s);
            break;
        }
        out = PyBytes_FromStringAndSize(data, len);
        if (out == NULL)
            break;
        if (!sub_tail_ok(s)) { /* overwritten while we copied: discard */
            Py_CLEAR(out);
            if (sub_lapped(s) < 0)
                break;
            continue;
        }
        sub_consume(s, len);
        sub_store_pos(s);
        break;
    }
    lock_release(&s->lk);
    return out;
}

PyDoc_STRVAR(sub_receive_doc,
"receive(timeout=None) -> bytes\n--\n\n"
"The next message, waiting up to timeout seconds (None: forever) for one.\n\n"
"Messages arrive in publication order from where this subscriber joined. The copy is\n"
"validated after it is made: a message overwritten meanwhile is never returned.\n\n"
"Raises:\n"
"    Empty: no message before the timeout.\n"
"    LaggedError: overwrite policy, the publisher overwrote messages this subscriber had\n"
"        not read; .missed says how many. The next receive returns the oldest retained one.\n"
"    EvictedError: block policy, the publisher evicted this subscriber.\n"
"    QueueClosed: the publisher ended the stream and everything was received.\n"
"    CorruptSegmentError: the segment was damaged by another process.");

static PyObject *sub_receive(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames)
{
    int64_t timeout_ns = -1;
    if (nargs != 0 || kwnames != NULL) {
        PyObject *a[1];
        if (shmkit_bcast_parse("receive", args, nargs, kwnames, timeout_names, 1, 0, a) < 0 ||
            shmkit_bcast_timeout(a[0], &timeout_ns) < 0)
            return NULL;
    }
    return receive_impl((BcSub *)self, timeout_ns);
}

static PyObject *sub_receive_nowait(PyObject *self, PyObject *unused)
{
    (void)unused;
    return receive_impl((BcSub *)self, 0);
}

PyDoc_STRVAR(sub_receive_many_doc,
"receive_many(max_messages, timeout=None) -> list[bytes]\n--\n\n"
"Up to max_messages messages: waits up to timeout for the first one, then takes what is\n"
"already there. If the subscriber lags in the middle of a batch, the batch ends there and\n"
"the next call raises LaggedError.");

static PyObject *sub_receive_many(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    BcSub *s = (BcSub *)self;
    static const char *const names[] = {"max_messages", "timeout"};
    PyObject *a[2];
    int64_t timeout_ns;
    if (shmkit_bcast_parse("receive_many", args, nargs, kwnames, names, 2, 1, a) < 0 ||
        shmkit_bcast_timeout(a[1], &timeout_ns) < 0)
        return NULL;
    bc_deadline dl = dl_make(timeout_ns);
    Py_ssize_t max = PyNumber_AsSsize_t(a[0], PyExc_OverflowError);
    if (max == -1 && PyErr_Occurred())
        return NULL;
    if (max < 1) {
        PyErr_SetString(PyExc_ValueError, "max_messages must be >= 1");
        return NULL;
    }
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return NULL;
    if (sub_enter(s, &dl, "receive_many") < 0) {
        Py_DECREF(list);
        return NULL;
    }
    int failed = 0;
    while (PyList_GET_SIZE(list) < max) {
        const char *data;
        uint32_t len;
        if (PyList_GET_SIZE(list) == 0) {
            int rc = sub_next(s, &dl, &data, &len);
            if (rc <= 0) {
                if (rc == 0)
                    raise_empty(s);
                failed = 1;
                break;
            }
        } else {
            const char *why = NULL;
            int rc = sub_peek(s, &data, &len, &why);
            if (rc == RD_EMPTY)
                break;
            if (rc == RD_CORRUPT) {
                raise_corrupt(&s->m, why);
                failed = 1;
                break;
            }
            if (rc == RD_LAPPED) {
                uint64_t missed;
                if (sub_check_slot(s) < 0 || sub_relocate(s, &missed) < 0) {
                    failed = 1;
                    break;
                }
                if (s->on_lag_raise)
                    s->pending_lag += missed;
                break;
            }
        }
        PyObject *msg = PyBytes_FromStringAndSize(data, len);
        if (msg == NULL) {
            failed = 1;
            break;
        }
        if (!sub_tail_ok(s)) {
            Py_DECREF(msg);
            if (PyList_GET_SIZE(list) == 0) {
                if (sub_lapped(s) < 0) {
                    failed = 1;
                    break;
                }
                continue;
            }
            uint64_t missed;
            if (sub_check_slot(s) < 0 || sub_relocate(s, &missed) < 0) {
                failed = 1;
                break;
            }
            if (s->on_lag_raise)
                s->pending_lag += missed;
            break;
        }
        sub_consume(s, len);
        int arc = PyList_Append(list, msg);
        Py_DECREF(msg);
        if (arc < 0) {
            failed = 1;
            break;
        }
    }
    if (PyList_GET_SIZE(list) > 0)
        sub_store_pos(s);
    lock_release(&s->lk);
    if (failed && (PyList_GET_SIZE(list) == 0 || !PyErr_ExceptionMatches(PyExc_Exception) ||
                   PyErr_ExceptionMatches(PyExc_MemoryError))) {
        Py_DECREF(list);
        return NULL;
    }
    /* an error after some messages were consumed: return them; a persistent condition
     * (eviction, corruption) is raised again by the next call */
    if (failed)
        PyErr_Clear();
    return list;
}

static PyObject *sub_view_begin(PyObject *self, PyObject *const *args, Py_ssize_t nargs,
                                PyObject *kwnames)
{
    BcSub *s = (BcSub *)self;
    PyObject *a[1];
    int64_t timeout_ns;
    if (shmkit_bcast_parse("receive_view", args, nargs, kwnames, timeout_names, 1, 0, a) < 0 ||
        shmkit_bcast_timeout(a[0], &timeout_ns) < 0)
        return NULL;
    bc_deadline dl = dl_make(timeout_ns);
    if (sub_enter(s, &dl, "receive_view") < 0)
        return NULL;
    const char *data;
    uint32_t len;
    PyObject *result = NULL;
    int rc = sub_next(s, &dl, &data, &len);
    if (rc == 0)
        raise_empty(s);
    if (rc == 1) {
        BcWindow *w = win_new(self, &s->exports, (char *)data, len, 1);
        if (w != NULL) {
            s->in_view = 1;
            s->view_len = len;
            Py_XSETREF(s->view_win, (PyObject *)w);
            Py_INCREF(w);
            result = (PyObject *)w;
        }
    }
    lock_release(&s->lk);
    return result;
}

/* End the open view: validate it (overwrite: was it overwritten while held?) and move on.
 * Returns the number of exports of the window still alive. */
static PyObject *sub_view_end(PyObject *self, PyObject *unused)
{
    BcSub *s = (BcSub *)self;
    (void)unused;
    bc_deadline forever = dl_make(-1);
    int rc = lock_acquire(&s->lk, &forever, "receive_view");
    if (rc <= 0)
        return NULL;
    if (!s->in_view) {
        lock_release(&s->lk);
        PyErr_Format(PyExc_RuntimeError,
                     "no receive_view is open on this subscriber of broadcast %U; use "
                     "receive_view() as a with block",
                     s->m.label);
        return NULL;
    }
    s->in_view = 0;
    Py_ssize_t alive = win_end(s->view_win);
    Py_CLEAR(s->view_win);
    PyObject *result = NULL;
    if (!s->attached) {
        raise_closed_object(s);
    } else if (sub_check_slot(s) < 0) {
        /* evicted while the view was open (block policy) */
    } else if (!sub_tail_ok(s)) {
        /* the message was overwritten while it was viewed: it counts as missed */
        uint64_t missed;
        if (sub_relocate(s, &missed) == 0)
            raise_lagged(s, missed);
    } else {
        sub_consume(s, s->view_len);
        sub_store_pos(s);
        result = PyLong_FromSsize_t(alive);
    }
    lock_release(&s->lk);
    return result;
}

PyDoc_STRVAR(sub_attach_doc,
"_attach(buffer, capacity, max_message, max_subscribers, policy, grace_ns, name, label,\n"
"        start_oldest, on_lag_raise, proc_start, joined_ns) -> slot\n--\n\n"
"Internal: map the broadcast and join it in a free subscriber slot.");

static PyObject *sub_attach(PyObject *self, PyObject *args)
{
    BcSub *s = (BcSub *)self;
    PyObject *buffer, *name, *label, *rest[4];
    bc_geom g;
    if (s->attached || s->m.have_buf) {
        PyErr_SetString(PyExc_RuntimeError, "already attached");
        return NULL;
    }
    if (parse_geom(args, &buffer, &g, &name, &label, rest, 4) < 0)
        return NULL;
    int start_oldest = PyObject_IsTrue(rest[0]);
    int on_lag_raise = PyObject_IsTrue(rest[1]);
    unsigned long long proc_start = PyLong_AsUnsignedLongLong(rest[2]);
    unsigned long long joined_ns = PyLong_AsUnsignedLongLong(rest[3]);
    if (start_oldest < 0 || on_lag_raise < 0 || PyErr_Occurred())
        return NULL;
    if (map_open(&s->m, buffer, g, name, label) < 0)
        goto fail;
    bc_ctrl *c = s->m.c;
    uint32_t me = shmkit_bcast_getpid();
    int idx = -1;
    uint64_t jw = 0;
    /* first pass: a free slot; second pass: reclaim the slot of a dead process */
    for (int pass = 0; pass < 2 && idx < 0; pass++) {
        for (uint32_t i = 0; i < g.max_subs && idx < 0; i++) {
            bc_slot *sl = &s->m.table[i];
            uint64_t w = LOAD(&sl->word, acquire);
            if (W_STATE(w) != BC_FREE) {
                if (pass == 0 || shmkit_task_alive(W_PID(w)))
                    continue;
                if (!evict_slot(c, sl, w, 1))
                    continue;
                w = slot_word(0, W_GEN(w), BC_FREE);
            }
            uint64_t want = slot_word(me, W_GEN(w) + 1, BC_JOINING);
            if (atomic_compare_exchange_strong(&sl->word, &w, want)) {
                idx = (int)i;
                jw = want;
            }
        }
    }
    if (idx < 0) {
        PyObject *msg = PyUnicode_FromFormat(
            "cannot subscribe to broadcast %U: all %u subscriber slots are taken by live "
            "processes; close unused subscribers or create it with a larger max_subscribers",
            label, g.max_subs);
        if (msg != NULL) {
            PyObject *exc = PyObject_CallFunction(shmkit_bcast_exc(shmkit_bcast_errors.limit),
                                                  "iOO", EUSERS, msg, name);
            Py_DECREF(msg);
            if (exc != NULL) {
                PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
                Py_DECREF(exc);
            }
        }
        goto fail;
    }
    bc_slot *sl = &s->m.table[idx];
    uint32_t high = LOAD(&c->sub_high, relaxed);
    while (high < (uint32_t)idx + 1 &&
           !atomic_compare_exchange_weak(&c->sub_high, &high, (uint32_t)idx + 1))
        ;
    STORE(&sl->waiting, 0, relaxed);
    STORE(&sl->drops, 0, relaxed);
    STORE(&sl->tid, shmkit_gettid(), relaxed);
    STORE(&sl->proc_start, proc_start, relaxed);
    STORE(&sl->joined_ns, joined_ns ? joined_ns : (uint64_t)realtime_ns(), relaxed);
    /* Block policy: the publisher may be choosing a tail past our start right now (see the
     * file comment). After storing our position we read the intent; if it is above our
     * position the publisher may not have seen us, so we read our start again: the tail
     * (start="oldest") once the round is over (the publisher then lowers the intent to the
     * new tail, and the acquire load of the intent orders the re-read after it), else the
     * head, which is always at or past the intent. A publisher killed in the middle of a
     * round leaves its intent up: after BC_JOIN_TRIES an "oldest" joiner starts at the head.
     * An intent that stays above the head is damage. */
    bc_pair *source = start_oldest ? &c->tail : &c->head;
    uint64_t seq = 0, pos = 0, aw = slot_word(me, W_GEN(jw), BC_ACTIVE);
    const char *bad = NULL;
    for (int tries = 0;; tries++) {
        if (pair_read(source, &seq, &pos) < 0 || (pos & 15) || pos > BC_POS_LIMIT) {
            bad = "its cursors are invalid";
            break;
        }
        STORE(&sl->read_seq, seq, relaxed);
        STORE(&sl->start_seq, seq, relaxed);
        STORE(&sl->read_pos, pos, release);
        if (tries == 0) /* pos before state: a publisher seeing ACTIVE sees pos */
            STORE(&sl->word, aw, release);
        if (g.policy != BC_BLOCK)
            break;
        atomic_thread_fence(memory_order_seq_cst); /* pairs with the fence in pub_wait_room */
        if (LOAD(&c->intent_pos, acquire) <= pos)
            break;
        if (tries == BC_JOIN_TRIES) {
            source = &c->head;
        } else if (tries == 2 * BC_JOIN_TRIES) {
            bad = "its intent cursor stays past its head";
            break;
        }
        shmkit_cpu_relax();
    }
    if (bad != NULL) {
        STORE(&sl->word, slot_word(0, W_GEN(jw), BC_FREE), release);
        raise_corrupt(&s->m, bad);
        goto fail;
    }
    s->slot = sl;
    s->slot_index = (uint32_t)idx;
    s->my_word = aw;
    s->pid = me;
    s->read_pos = pos;
    s->read_off = pos % g.cap;
    s->next_seq = seq;
    s->on_lag_raise = on_lag_raise;
    s->attached = 1;
    return PyLong_FromLong(idx);
fail:
    map_close(&s->m);
    return NULL;
}

static PyObject *sub_close(PyObject *self, PyObject *unused)
{
    BcSub *s = (BcSub *)self;
    (void)unused;
    if (!s->attached && !s->m.have_buf)
        Py_RETURN_NONE;
    if (s->exports > 0) {
        PyErr_SetString(PyExc_BufferError, "views of a received message are still alive");
        return NULL;
    }
    s->closing = 1;
    if (s->m.c != NULL) {
        /* wake our own waiting thread, if any. Bump the word first: a thread that checked
         * `closing` just before we set it is about to sleep on the old value, and the bump
         * makes that sleep return at once instead of lasting until its timeout */
        atomic_fetch_add(&s->m.c->head_event, 1);
        shmkit_futex_wake(&s->m.c->head_event, INT_MAX);
    }
    bc_deadline forever = dl_make(-1);
    int rc = lock_acquire(&s->lk, &forever, "close");
    if (rc <= 0) {
        s->closing = 0; /* interrupted: the subscriber stays usable */
        return NULL;
    }
    sub_detach(s);
    lock_release(&s->lk);
    Py_RETURN_NONE;
}

static PyObject *sub_publisher_alive(PyObject *self, PyObject *unused)
{
    BcSub *s = (BcSub *)self;
    (void)unused;
    if (s->m.c == NULL)
        return raise_closed_object(s), NULL;
    uint32_t pid = W_PID(LOAD(&s->m.c->pub_word, acquire));
    return PyBool_FromLong(pid != 0 && shmkit_task_alive(pid));
}

static PyObject *sub_get_closed(PyObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(!((BcSub *)self)->attached);
}

static PyObject *sub_get_next_seq(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(((BcSub *)self)->next_seq);
}

static PyObject *sub_get_missed(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(((BcSub *)self)->missed);
}

static PyObject *sub_get_slot(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLong(((BcSub *)self)->slot_index);
}

static PyObject *sub_get_spin(PyObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromLongLong(((BcSub *)self)->spin_ns);
}

static int sub_set_spin(PyObject *self, PyObject *value, void *closure)
{
    (void)closure;
    long long v = value == NULL ? -1 : PyLong_AsLongLong(value);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < 0 || v > 1000000000LL) {
        PyErr_SetString(PyExc_ValueError, "spin_ns must be between 0 and 1e9");
        return -1;
    }
    ((BcSub *)self)->spin_ns = v;
    return 0;
}

static PyMethodDef sub_methods[] = {
    {"receive", (PyCFunction)(void (*)(void))sub_receive, METH_FASTCALL | METH_KEYWORDS,
     sub_receive_doc},
    {"receive_nowait", sub_receive_nowait, METH_NOARGS,
     "receive_nowait() -> bytes\n--\n\nThe next message if one is there, else raise Empty."},
    {"receive_many", (PyCFunction)(void (*)(void))sub_receive_many,
     METH_FASTCALL | METH_KEYWORDS, sub_receive_many_doc},
    {"_view_begin", (PyCFunction)(void (*)(void))sub_view_begin, METH_FASTCALL | METH_KEYWORDS,
     "Internal: open a view of the next message; returns its window."},
    {"_view_end", sub_view_end, METH_NOARGS,
     "Internal: validate and release the open view; returns exports still alive."},
    {"publisher_alive", sub_publisher_alive, METH_NOARGS,
     "publisher_alive() -> bool\n--\n\nWhether a publisher holds the role and its process runs."},
    {"_attach", sub_attach, METH_VARARGS, sub_attach_doc},
    {"_close", sub_close, METH_NOARGS, "Internal: leave the slot and release the mapping."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef sub_getset[] = {
    {"closed", sub_get_closed, NULL, "Whether this subscriber was closed.", NULL},
    {"next_seq", sub_get_next_seq, NULL, "Sequence number of the next message to receive.", NULL},
    {"missed", sub_get_missed, NULL, "Messages this subscriber missed (overwrite policy).", NULL},
    {"slot", sub_get_slot, NULL, "Index of this subscriber's slot in the table.", NULL},
    {"spin_ns", sub_get_spin, sub_set_spin,
     "How long receive spins before sleeping, in ns (default 20000).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject BcSubType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._native.BcastSubscriber",
    .tp_basicsize = sizeof(BcSub),
    .tp_dealloc = sub_dealloc,
    .tp_traverse = sub_traverse,
    .tp_clear = sub_clear,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "C core of shmkit.broadcast.Subscriber.",
    .tp_methods = sub_methods,
    .tp_getset = sub_getset,
    .tp_new = sub_new,
    .tp_weaklistoffset = offsetof(BcSub, weakrefs),
};

/* ======================================================================================== */
/*  Module functions                                                                        */
/* ======================================================================================== */

PyDoc_STRVAR(bcast_format_doc,
"bcast_format(buffer, capacity, max_message, max_subscribers, policy, grace_ns)\n--\n\n"
"Internal: write the control block of a new broadcast (the rest must be zero).");

static PyObject *py_bcast_format(PyObject *self, PyObject *args)
{
    (void)self;
    PyObject *buffer;
    unsigned long long cap, max_msg, max_subs, policy, grace;
    if (!PyArg_ParseTuple(args, "OKKKKK", &buffer, &cap, &max_msg, &max_subs, &policy, &grace))
        return NULL;
    if (max_subs == 0 || max_subs > BC_MAX_SUBSCRIBERS || cap < BC_MIN_CAPACITY || cap % 64 ||
        max_msg > cap / 2 - BC_REC_HDR || policy > 1) {
        PyErr_SetString(PyExc_ValueError, "impossible broadcast geometry");
        return NULL;
    }
    uint64_t ring_off = BC_TABLE_OFFSET + BC_SLOT_SIZE * max_subs;
    shmkit_window w;
    if (shmkit_window_get(buffer, 0, (Py_ssize_t)(ring_off + cap), 64, 1, &w) < 0)
        return NULL;
    bc_ctrl *c = (bc_ctrl *)(w.ptr + BC_CTRL_OFFSET);
    memset(c, 0, sizeof *c);
    c->magic = BC_MAGIC;
    c->version = BC_VERSION;
    c->capacity = cap;
    c->max_message = max_msg;
    c->max_subscribers = (uint32_t)max_subs;
    c->policy = (uint32_t)policy;
    c->grace_ns = grace;
    c->ring_offset = ring_off;
    c->table_offset = BC_TABLE_OFFSET;
    shmkit_window_release(&w);
    Py_RETURN_NONE;
}

static PyObject *py_bcast_set_errors(PyObject *self, PyObject *args, PyObject *kwargs)
{
    (void)self;
    static char *kwlist[] = {"corrupt", "lagged", "evicted", "empty", "full", "closed",
                             "too_large", "pub_exists", "limit", "timeout", NULL};
    PyObject *v[10];
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OOOOOOOOOO", kwlist, &v[0], &v[1], &v[2],
                                     &v[3], &v[4], &v[5], &v[6], &v[7], &v[8], &v[9]))
        return NULL;
    for (int i = 0; i < 10; i++) {
        if (!PyExceptionClass_Check(v[i])) {
            PyErr_Format(PyExc_TypeError, "%s must be an exception class", kwlist[i]);
            return NULL;
        }
    }
    PyObject **slots[10] = {
        &shmkit_bcast_errors.corrupt, &shmkit_bcast_errors.lagged, &shmkit_bcast_errors.evicted,
        &shmkit_bcast_errors.empty, &shmkit_bcast_errors.full, &shmkit_bcast_errors.closed,
        &shmkit_bcast_errors.too_large, &shmkit_bcast_errors.pub_exists,
        &shmkit_bcast_errors.limit, &shmkit_bcast_errors.timeout,
    };
    for (int i = 0; i < 10; i++) {
        Py_INCREF(v[i]);
        Py_XSETREF(*slots[i], v[i]);
    }
    Py_RETURN_NONE;
}

static PyMethodDef bcast_functions[] = {
    {"bcast_format", py_bcast_format, METH_VARARGS, bcast_format_doc},
    {"bcast_set_errors", (PyCFunction)(void (*)(void))py_bcast_set_errors,
     METH_VARARGS | METH_KEYWORDS,
     "bcast_set_errors(**classes)\n--\n\nInternal: the exception classes Broadcast and Latest "
     "raise."},
    {NULL, NULL, 0, NULL},
};

int shmkit_init_bcast(PyObject *module)
{
    if (pthread_atfork(NULL, NULL, forget_pid) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return -1;
    }
    if (PyType_Ready(&BcWindowType) < 0 || PyType_Ready(&BcPubType) < 0 ||
        PyType_Ready(&BcSubType) < 0)
        return -1;
    if (PyModule_AddObjectRef(module, "BcastWindow", (PyObject *)&BcWindowType) < 0 ||
        PyModule_AddObjectRef(module, "BcastPublisher", (PyObject *)&BcPubType) < 0 ||
        PyModule_AddObjectRef(module, "BcastSubscriber", (PyObject *)&BcSubType) < 0)
        return -1;
    if (PyModule_AddFunctions(module, bcast_functions) < 0)
        return -1;
    return shmkit_init_latest(module);
}
