/* The ring behind shmkit.Queue: a lock-free, crash-tolerant, multi-producer multi-consumer
 * ring of variable-size records in shared memory, and the C type `Ring` whose put/get methods
 * are the queue's hot path (queue.py subclasses it, so `q.put` is a direct METH_FASTCALL call).
 *
 * Shared memory is untrusted (DESIGN invariant 1): capacity and max_message are copied into the
 * object once, at attach, after checking them against the header; every cursor, record header
 * and length read from the segment is checked against them on every use. A check that fails
 * twice (to rule out a race with a moving cursor) raises CorruptSegmentError.
 *
 * Control block (offsets from ctrl, each hot word on its own cache line):
 *   0    u64 magic "SKRING01"   8 u64 capacity   16 u64 max_message   24 u32 closed
 *   32   u64 creator's pid namespace (queue.py refuses openers from another one: owners are pids)
 *   64   u64 tail   hint: a record boundary at or before the end of the written records
 *   128  u64 head   hint: a record boundary at or before the first record not yet taken
 *   192  u64 free   authoritative: bytes before `free` may be reused by producers
 *   256  u32 data_seq, 260 u32 consumers_waiting  (futex word consumers sleep on)
 *   320  u32 space_seq, 324 u32 producers_waiting (futex word producers sleep on)
 *   384  u64 aborted, 392 u64 lost, 400 u64 retired_put, 408 u64 retired_got
 *   448  attachment slots (SLOTS x 32 bytes: pid, flags, start time, puts, gets; queue.py)
 *
 * Positions are byte counts since creation (u64, never wrap in practice); a position's place
 * in the ring is pos % capacity. Every record starts 16-byte aligned with a 16-byte header:
 *   word0 (u64, atomic): tag (38 bits: pos >> 4) | state (4 bits) | owner (22 bits)
 *   word1 (u64):         payload length in bytes (written before the state says it is valid)
 * followed by the payload, padded to 16 bytes. The tag makes a header from another lap (or
 * payload bytes) unequal to the header the reader expects, so stale readers fail their CAS.
 * Tags repeat every TAG_PERIOD (2^42) bytes of traffic: a process that stalls between reading
 * a header and its CAS while that much data flows could hit a later lap's identical word, so
 * the two CASes that act on a header read earlier (claim, take) check `free` afterwards and
 * undo themselves when the record turns out to be a later one (see stale_* below).
 *
 * The owner is the process id (not the thread id): a record is recovered only when the whole
 * process holding it is gone, so a thread may reserve and another commit, and a thread that
 * exits never leaves its process's records to recovery.
 *
 * Record life (each arrow one atomic CAS or store, so a SIGKILL anywhere leaves a state that
 * says who has to finish it):
 *   VACANT --producer CAS--> CLAIMED(pid) --> RESERVED(pid) --> COMMITTED --consumer CAS-->
 *   TAKEN(pid) --> FREED;  RESERVED --> ABORTED;  CLAIMED --> PAD (filler up to the ring end)
 * The word after the end of the written records is always VACANT(end): a producer claims it
 * by CAS, writes the length(s) and the next VACANT marker, then publishes RESERVED. put_many
 * claims a run of records with that one CAS (their headers are written before the first is
 * published). Recovery, run by waiters when a wait slice ends while something blocks them:
 * CLAIMED(dead) -> VACANT (nothing was reserved), RESERVED(dead) -> ABORTED (skipped, never
 * delivered), TAKEN(dead) -> FREED (that one message is lost). It looks exactly where the
 * waiter is blocked (the records it saw being written, the claim at the tail) and near `free`
 * and `head`, so it is bounded however many records the ring holds.
 *
 * Order: consumers may take a COMMITTED record past records still RESERVED (a slow or dead
 * producer does not stall the others), but before taking it they re-read every record they
 * stepped past; a producer commits its records in position order, so one still RESERVED
 * then belongs to another producer, and one that changed makes the walk start again.
 *
 * Space: `free` advances over runs of FREED/ABORTED/PAD records with one CAS. Consumers do it
 * only when a producer sleeps for room; a producer short of room does it itself (and moves
 * `head` past records nobody needs first). A consumer that cannot keep a message it took
 * (out of memory) gives it back: TAKEN -> COMMITTED, and `head` moves back to it.
 *
 * Waiting: poll the ring ~20 us, then sleep on data_seq / space_seq. Bit 0 of those words
 * says "someone sleeps"; a waker that sees it clears it and wakes all, so a busy queue makes
 * no system call and a sleep costs one wake-up. Sleepers wake at least every 10 ms when
 * something owned blocks them (to run recovery), else every 200 ms as a backstop.
 *
 * Errors: this file never words a message. It raises what queue.py's error factory (set with
 * ring_setup) builds from a short code ("full", "corrupt", ...) and the values involved.
 */
#include "native.h"

#include <errno.h>
#include <limits.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stddef.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#define SHMKIT_RING_MAGIC 0x3130474e49524b53ULL /* "SKRING01" little-endian */

#define C_MAGIC 0
#define C_CAPACITY 8
#define C_MAX_MESSAGE 16
#define C_CLOSED 24
#define C_TAIL 64
#define C_HEAD 128
#define C_FREE 192
#define C_DATA_SEQ 256
#define C_CONS_WAITING 260
#define C_SPACE_SEQ 320
#define C_PROD_WAITING 324
#define C_ABORTED 384
#define C_LOST 392
#define C_RETIRED_PUT 400
#define C_RETIRED_GOT 408
#define C_SLOTS 448
#define SHMKIT_RING_SLOTS 64
#define SLOT_SIZE 32
#define SLOT_FLAGS 4
#define SLOT_PUTS 16
#define SLOT_GETS 24
#define SHMKIT_RING_CTRL_SIZE (C_SLOTS + SHMKIT_RING_SLOTS * SLOT_SIZE)

/* Slot flags: roles in bits 0-1; threads of the slot's process asleep in a get (bits 2-16)
 * and in a put (bits 17-31). Counting sleepers in the slot (not in one shared counter) lets
 * statistics ignore the sleepers of a process that was killed in its sleep. */
#define ROLE_PRODUCER 1u
#define ROLE_CONSUMER 2u
#define SLOT_CONS_WAIT_UNIT (1u << 2)
#define SLOT_PROD_WAIT_UNIT (1u << 17)

#define HDR 16u
#define OWNER_MASK ((1u << 22) - 1) /* pid_max is at most 2^22 (PID_MAX_LIMIT) */
#define ST_SHIFT 22
#define TAG_SHIFT 26
#define TAG_MASK ((1ULL << 38) - 1)
#define TAG_PERIOD (1ULL << 42) /* bytes of traffic after which a slot's tags repeat */

/* The largest ring: well below TAG_PERIOD, so that a record's real position is the only one
 * with its tag in [free, free + capacity) (what the stale-CAS checks rely on). */
#define SHMKIT_RING_MAX_CAPACITY (1ULL << 40)
/* No cursor gets near this (2^62 bytes is 146 years at 1 TB/s); one beyond it was scribbled,
 * and rejecting it keeps every `position + length` below in range. */
#define POS_LIMIT (1ULL << 62)

enum { ST_VACANT = 1, ST_CLAIMED, ST_RESERVED, ST_COMMITTED, ST_TAKEN, ST_FREED, ST_ABORTED, ST_PAD };

/* Results of the non-blocking steps; negative means a Python exception is set. */
enum { RS_OK = 0, RS_FULL, RS_EMPTY, RS_BUSY, RS_CLOSED, RS_ERROR = -1 };

/* A waiter blocked behind a record whose owner may die re-checks after this long; this bounds
 * crash recovery. Waits with nothing to recover use the long slice as a backstop only. */
#define RECOVER_SLICE_NS (10 * 1000 * 1000LL)
#define IDLE_SLICE_NS (200 * 1000 * 1000LL)
/* Records recovery walks from `free` and from `head` (besides the exact records a waiter is
 * blocked by): the records that hold the cursors back sit right there. */
#define RECOVER_STEPS 4096
/* Before registering as a waiter (which makes the other side pay a futex_wake syscall per
 * operation), a waiter polls the ring itself for this long: a cross-core hand-off takes well
 * under a microsecond, a futex wake-up tens. */
#define POLL_NS (20 * 1000LL)
/* A consumer steps past at most this many records still being written. */
#define SKIP_MAX 16
/* Copies at least this large run without the GIL. */
#define NOGIL_COPY (256 * 1024)

/* Builds the exception for an error code (queue.py's _ring_error); NULL until ring_setup. */
static PyObject *error_factory;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    int writable;
    char *ctrl;
    char *ring;
    char *slot;        /* this handle's attachment slot (counters, roles) or NULL */
    uint32_t slot_pid; /* the process the slot belongs to (a forked child must not use it) */
    uint64_t cap;
    uint64_t max_message;
    uint64_t mask; /* cap - 1 when cap is a power of two, else 0 */
    unsigned roles;
    int active;          /* threads inside a call that released the GIL ... */
    uint32_t active_pid; /* ... in this process (a forked child inherits the count, not them) */
    int exports;         /* zero-copy memoryviews made from this object */
    int64_t last_recover_ns;
    PyObject *label; /* given by queue.py; handed to the error factory */
    PyObject *hint;
    PyObject *weakreflist;
} RingObject;

/* Records the caller is blocked by: the ones it stepped past still being written, and the
 * claim at the end. Recovery looks at exactly these. */
typedef struct {
    uint64_t pos[SKIP_MAX + 1];
    int n;
} busy_set;

/* ---- owner ids ------------------------------------------------------------------------------ */

/* getpid() is a system call in glibc: cache it, and forget it in a forked child. */
static _Atomic uint32_t cached_pid;

static void forget_pid(void)
{
    atomic_store_explicit(&cached_pid, 0, memory_order_relaxed);
}

static inline uint32_t owner_id(void)
{
    uint32_t pid = atomic_load_explicit(&cached_pid, memory_order_relaxed);
    if (pid == 0) {
        pid = (uint32_t)getpid();
        atomic_store_explicit(&cached_pid, pid, memory_order_relaxed);
    }
    return pid;
}

static inline int slot_mine(const RingObject *r)
{
    return r->slot != NULL && r->slot_pid == owner_id();
}

/* Bracket a stretch without the GIL, so that detach can refuse while threads are inside. */
static inline void active_enter(RingObject *r)
{
    uint32_t me = owner_id();
    if (r->active_pid != me) {
        r->active_pid = me;
        r->active = 0;
    }
    r->active++;
}

static inline void active_leave(RingObject *r)
{
    r->active--;
}

/* ---- shared-memory access ------------------------------------------------------------- */

#define A64(p) ((_Atomic uint64_t *)(void *)(p))
#define A32(p) ((_Atomic uint32_t *)(void *)(p))

static inline uint64_t ld_acq(const char *p) { return atomic_load_explicit(A64(p), memory_order_acquire); }
static inline uint64_t ld_rlx(const char *p) { return atomic_load_explicit(A64(p), memory_order_relaxed); }
static inline void st_rlx(char *p, uint64_t v) { atomic_store_explicit(A64(p), v, memory_order_relaxed); }
static inline void st_rel(char *p, uint64_t v) { atomic_store_explicit(A64(p), v, memory_order_release); }
/* seq_cst CAS: also orders the waiter-count loads that follow it (see wake_*). */
static inline int cas64(char *p, uint64_t *expected, uint64_t desired)
{
    return atomic_compare_exchange_strong(A64(p), expected, desired);
}
static inline int cas64_v(char *p, uint64_t expected, uint64_t desired)
{
    return atomic_compare_exchange_strong(A64(p), &expected, desired);
}

static inline uint64_t tag_of(uint64_t pos) { return (pos >> 4) & TAG_MASK; }
static inline uint64_t mkw(uint64_t pos, unsigned st, uint32_t owner)
{
    return (tag_of(pos) << TAG_SHIFT) | ((uint64_t)st << ST_SHIFT) | (owner & OWNER_MASK);
}
#define W_ST(w) ((unsigned)(((w) >> ST_SHIFT) & 15u))
#define W_OWNER(w) ((uint32_t)((w)&OWNER_MASK))
#define W_TAG(w) ((w) >> TAG_SHIFT)

static inline uint64_t ring_off(const RingObject *r, uint64_t pos)
{
    return r->mask ? (pos & r->mask) : pos % r->cap;
}
static inline char *rec(RingObject *r, uint64_t pos) { return r->ring + ring_off(r, pos); }
static inline uint64_t round16(uint64_t n) { return (n + 15u) & ~(uint64_t)15u; }

/* ---- errors -------------------------------------------------------------------------------- */

/* Raise the exception the error factory builds from (code, label, hint, *values); `fmt` is a
 * Py_BuildValue tuple format for the values, e.g. "(nK)". Returns RS_ERROR. */
static int fail(RingObject *r, const char *code, const char *fmt, ...)
{
    va_list va;
    va_start(va, fmt);
    PyObject *values = Py_VaBuildValue(fmt, va);
    va_end(va);
    if (values == NULL)
        return RS_ERROR;
    PyObject *head = Py_BuildValue("(sOO)", code, r != NULL && r->label ? r->label : Py_None,
                                   r != NULL && r->hint ? r->hint : Py_None);
    PyObject *args = head != NULL ? PySequence_Concat(head, values) : NULL;
    Py_XDECREF(head);
    Py_DECREF(values);
    if (args == NULL)
        return RS_ERROR;
    /* Without queue.py's factory (a bare _native.Ring), raise the code and values as they are. */
    PyObject *exc = PyObject_Call(error_factory != NULL ? error_factory : PyExc_RuntimeError, args, NULL);
    Py_DECREF(args);
    if (exc == NULL)
        return RS_ERROR;
    if (PyExceptionInstance_Check(exc))
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
    else
        PyErr_SetObject(PyExc_RuntimeError, exc);
    Py_DECREF(exc);
    return RS_ERROR;
}

static int corrupt(RingObject *r, const char *why, uint64_t pos)
{
    return fail(r, "corrupt", "(sK)", why, (unsigned long long)pos);
}

static int check_usable(RingObject *r, int need_write)
{
    if (!r->has_view)
        return fail(r, "detached", "()");
    if (need_write && !r->writable)
        return fail(r, "readonly", "()");
    return 0;
}

/* Total size of the record at `pos` whose header word (already loaded with acquire) is `w`,
 * or 0 when the stored length is impossible. */
static uint64_t rec_total(RingObject *r, uint64_t pos, uint64_t w, uint64_t *len_out)
{
    if (pos & 15)
        return 0; /* never read a header at an unaligned place (it could end past the ring) */
    uint64_t len = ld_rlx(rec(r, pos) + 8);
    uint64_t off = ring_off(r, pos);
    if (len_out)
        *len_out = len;
    if (W_ST(w) == ST_PAD)
        return len == r->cap - off - HDR ? r->cap - off : 0;
    if (len > r->max_message)
        return 0;
    uint64_t total = HDR + round16(len);
    return off + total <= r->cap ? total : 0;
}

/* ---- waking -------------------------------------------------------------------------------- */

/* The futex words data_seq and space_seq carry a "sleepers" bit (bit 0) that a waiter sets
 * (fetch_or, then a seq_cst fence) before its last look at the ring. A waker that made
 * something visible with a seq_cst CAS/store then loads the word (seq_cst): if the bit is set
 * it moves the word on (+2, bit cleared) and wakes every sleeper. Either the waiter's last
 * look sees the change, or the waker sees the bit (Dekker); so no wake-up is lost, and only
 * the first waker after a sleep pays for a system call. */
static void wake_word(RingObject *r, int off)
{
    _Atomic uint32_t *word = A32(r->ctrl + off);
    uint32_t w = atomic_load(word);
    if ((w & 1u) && atomic_compare_exchange_strong(word, &w, (w + 2u) & ~1u))
        shmkit_futex_wake(word, INT_MAX);
}

static void wake_consumers(RingObject *r)
{
    wake_word(r, C_DATA_SEQ);
}

static void wake_producers(RingObject *r)
{
    wake_word(r, C_SPACE_SEQ);
}

static int producers_sleep(RingObject *r)
{
    return atomic_load(A32(r->ctrl + C_SPACE_SEQ)) & 1u;
}

/* ---- free cursor ------------------------------------------------------------------------- */

/* Move `head` past records no consumer needs (PAD, ABORTED, FREED, TAKEN). Consumers do this
 * as they walk; producers short of room do it too, so a PAD at the head never waits for a
 * consumer to come by. */
static void help_head(RingObject *r)
{
    char *c = r->ctrl;
    for (uint64_t steps = 0; steps <= r->cap / HDR + 1; steps++) {
        uint64_t h = ld_acq(c + C_HEAD);
        uint64_t f = ld_acq(c + C_FREE);
        if (h < f || h - f >= r->cap || (h & 15) || f > POS_LIMIT)
            return; /* moving under us, or corrupt: the hot paths judge that */
        uint64_t w = ld_acq(rec(r, h));
        unsigned st = W_ST(w);
        if (W_TAG(w) != tag_of(h) || !(st == ST_PAD || st == ST_ABORTED || st == ST_FREED || st == ST_TAKEN))
            return;
        uint64_t total = rec_total(r, h, w, NULL);
        if (total == 0 || h + total - f > r->cap)
            return;
        cas64_v(c + C_HEAD, h, h + total);
    }
}

/* Advance `free` over records nobody needs any more (FREED, ABORTED, PAD), returning their
 * space to producers in ring order. Returns bytes advanced, or RS_ERROR. */
static int64_t help_free(RingObject *r)
{
    char *c = r->ctrl;
    int64_t advanced = 0;
    help_head(r);
    for (int rounds = 0; rounds < 64; rounds++) {
        uint64_t f = ld_acq(c + C_FREE);
        uint64_t h = ld_acq(c + C_HEAD); /* read after f: h >= f always holds */
        if (f == h)
            break;
        if (h < f || h - f > r->cap || (f & 15) || f > POS_LIMIT) {
            if (ld_acq(c + C_FREE) != f)
                continue;
            return corrupt(r, "free_cursor", f);
        }
        /* Walk the run of records nobody needs, then hand it all back with one CAS. */
        uint64_t p = f;
        const char *why = NULL;
        while (p < h) {
            uint64_t w = ld_acq(rec(r, p));
            unsigned st = W_ST(w);
            /* TAKEN: a consumer is still copying it. COMMITTED: a consumer gave it back
             * (give_back), and `head` is on its way back to it. */
            if (W_TAG(w) == tag_of(p) && (st == ST_TAKEN || st == ST_COMMITTED))
                break;
            if (W_TAG(w) != tag_of(p) || !(st == ST_FREED || st == ST_ABORTED || st == ST_PAD)) {
                why = "passed_header";
                break;
            }
            uint64_t total = rec_total(r, p, w, NULL);
            if (total == 0 || total > h - p) {
                why = "freed_length";
                break;
            }
            p += total;
        }
        if (why != NULL && p == f) {
            if (ld_acq(c + C_FREE) != f)
                continue;
            return corrupt(r, why, f);
        }
        if (p == f)
            break;
        if (!cas64_v(c + C_FREE, f, p))
            continue;
        advanced += (int64_t)(p - f);
        if (why == NULL)
            break; /* reached the head, or a record still TAKEN */
    }
    if (advanced > 0)
        wake_producers(r);
    return advanced;
}

/* ---- producer side ----------------------------------------------------------------------- */

/* One attempt to reserve records for the payload lengths lens[0..n-1], in order. RS_OK: *got
 * (1..n) records starting at *pos are RESERVED by `me`, laid out back to back (a batch is
 * claimed with one CAS and never spans the end of the ring). RS_FULL: no room for lens[0] now.
 * RS_BUSY: another producer is between its claim and its reservation (its position goes into
 * *busy). RS_CLOSED: the channel is closed. */
static int try_reserve(RingObject *r, const uint64_t *lens, int n, uint32_t me, uint64_t *pos,
                       int *got, busy_set *busy)
{
    char *c = r->ctrl;
    uint64_t total = HDR + round16(lens[0]);
    busy->n = 0;
    for (uint64_t iter = 0; iter <= r->cap / HDR + 64; iter++) {
        uint64_t t = ld_acq(c + C_TAIL);
        uint64_t f = ld_acq(c + C_FREE); /* read after t: t - f can only shrink */
        if (f > POS_LIMIT || (f & 15))
            return corrupt(r, "free_cursor", f);
        if (t < f) {
            /* The tail hint lags behind records already consumed: `free` is a boundary too. */
            cas64_v(c + C_TAIL, t, f);
            continue;
        }
        if (t - f > r->cap || (t & 15))
            return corrupt(r, "tail_cursor", t);
        uint64_t off = ring_off(r, t);
        char *h = r->ring + off;
        uint64_t w = ld_acq(h);
        unsigned st = W_ST(w);
        if (W_TAG(w) != tag_of(t)) {
            if (ld_acq(c + C_TAIL) != t)
                continue;
            return corrupt(r, "tail_tag", t);
        }
        if (st == ST_VACANT) {
            uint64_t need = off + total > r->cap ? r->cap - off : total;
            int pad = need != total;
            if (t + need + HDR > f + r->cap) {
                int64_t freed = help_free(r);
                if (freed < 0)
                    return RS_ERROR;
                if (freed > 0)
                    continue;
                return RS_FULL;
            }
            /* How many of the batch fit here, before the ring's end and within the room. */
            int k = 1;
            uint64_t run = need;
            while (!pad && k < n) {
                uint64_t next = HDR + round16(lens[k]);
                if (off + run + next > r->cap || t + run + next + HDR > f + r->cap)
                    break;
                run += next;
                k++;
            }
            if (!cas64(h, &w, mkw(t, ST_CLAIMED, me)))
                continue;
            /* Stale claim (tag wrap): we read VACANT(t) long ago and claimed the identical
             * VACANT word of a later lap, whose room we never checked. The real end is then
             * at least a lap past t, so `free` is past t; here, `free` <= t always. */
            if (ld_acq(c + C_FREE) > t) {
                atomic_store(A64(h), w); /* ours to undo: put the VACANT marker back */
                continue;
            }
            /* seq_cst load after the claim: pairs with the closer's store and the consumer's
             * check order (closed, then VACANT) so no put succeeds unseen after a close. */
            if (!pad && atomic_load(A32(c + C_CLOSED))) {
                atomic_store(A64(h), w); /* seq_cst: ordered before the waiter-bit load */
                wake_consumers(r);
                return RS_CLOSED;
            }
            /* The batch's later headers live in room we now own; they become reachable only
             * through the first header, published last. */
            uint64_t p = t + total;
            for (int i = 1; i < k; i++) {
                char *hp = rec(r, p);
                st_rlx(hp + 8, lens[i]);
                st_rlx(hp, mkw(p, ST_RESERVED, me));
                p += HDR + round16(lens[i]);
            }
            st_rlx(h + 8, pad ? need - HDR : lens[0]);
            st_rlx(rec(r, t + run), mkw(t + run, ST_VACANT, 0));
            /* release: lengths, later headers and the next VACANT marker come with the state. */
            st_rel(h, mkw(t, pad ? ST_PAD : ST_RESERVED, pad ? 0 : me));
            cas64_v(c + C_TAIL, t, t + run);
            if (pad)
                continue;
            *pos = t;
            *got = k;
            return RS_OK;
        }
        if (st == ST_CLAIMED) {
            busy->pos[0] = t;
            busy->n = 1;
            return RS_BUSY;
        }
        if (st < ST_VACANT || st > ST_PAD)
            return corrupt(r, "bad_state", t);
        /* Its length is known: help the tail past it. */
        uint64_t rt = rec_total(r, t, w, NULL);
        if (rt == 0 || t + rt > f + r->cap) {
            if (ld_acq(c + C_TAIL) != t || (rt != 0 && ld_acq(c + C_FREE) != f))
                continue;
            return corrupt(r, "tail_length", t);
        }
        cas64_v(c + C_TAIL, t, t + rt);
    }
    return RS_BUSY;
}

/* Why a record this process meant to finish (`state`, owner `me`) is not its to finish: held
 * by another process (a block inherited through fork), or changed under us (recovery judged
 * us dead, or corruption). `w` is the word found instead. */
__attribute__((noinline, cold)) static int not_mine(RingObject *r, uint64_t pos, uint64_t w, unsigned state)
{
    if (W_TAG(w) == tag_of(pos) && W_ST(w) == state)
        return fail(r, "not_owner", "(KI)", (unsigned long long)pos, (unsigned)W_OWNER(w));
    return corrupt(r, state == ST_RESERVED ? "changed_writing" : "changed_reading", pos);
}

/* RESERVED(me) -> COMMITTED or ABORTED. */
static inline int finish_reserved(RingObject *r, uint64_t pos, uint32_t me, unsigned to)
{
    uint64_t w = mkw(pos, ST_RESERVED, me);
    if (cas64(rec(r, pos), &w, mkw(pos, to, 0)))
        return RS_OK;
    return not_mine(r, pos, w, ST_RESERVED);
}

/* ---- consumer side ----------------------------------------------------------------------- */

/* Hand a record this process took back to the consumers: TAKEN(me) -> COMMITTED, and move
 * `head` back to it, since a consumer (this one, or another walking past a TAKEN record) may
 * have moved it on and consumers only look from `head` on. `free` cannot have passed it.
 * Used when the message cannot be delivered after all (out of memory), so it is not lost. */
static void give_back(RingObject *r, uint64_t pos, uint32_t me)
{
    char *c = r->ctrl;
    if (!cas64_v(rec(r, pos), mkw(pos, ST_TAKEN, me), mkw(pos, ST_COMMITTED, 0)))
        return;
    for (int i = 0; i < 1000; i++) {
        uint64_t h = ld_acq(c + C_HEAD);
        if (h <= pos || cas64_v(c + C_HEAD, h, pos))
            break;
    }
    wake_consumers(r);
}

/* One attempt to take the first committed record. RS_OK: the record at *pos is TAKEN by `me`,
 * *len its payload length. RS_EMPTY: nothing written. RS_BUSY: only records still being
 * written (their positions go into *busy). */
static int try_take(RingObject *r, uint32_t me, uint64_t *pos, uint64_t *len, busy_set *busy)
{
    char *c = r->ctrl;
    busy->n = 0;
    for (int restarts = 0; restarts < 1000000; restarts++) {
        uint64_t h = ld_acq(c + C_HEAD);
        uint64_t f = ld_acq(c + C_FREE);
        if (h < f || h - f > r->cap || (h & 15) || f > POS_LIMIT) {
            if (ld_acq(c + C_HEAD) != h)
                continue;
            return corrupt(r, "head_cursor", h);
        }
        uint64_t p = h;
        int at_head = 1, restart = 0;
        /* Records still being written that this walk stepped past (positions in busy->pos),
         * and their header words. */
        uint64_t skipped_word[SKIP_MAX];
        int nskip = 0;
        busy->n = 0;
        for (;;) {
            if (p - f > r->cap) {
                /* `free` may have moved on since we read it: look again before judging. */
                uint64_t f2 = ld_acq(c + C_FREE);
                if (f2 != f && f2 <= h) {
                    f = f2;
                    continue;
                }
                if (ld_acq(c + C_HEAD) != h)
                    break;
                return corrupt(r, "run_past", p);
            }
            char *rp = rec(r, p);
            uint64_t w = ld_acq(rp);
            unsigned st = W_ST(w);
            if (W_TAG(w) != tag_of(p) || st < ST_VACANT || st > ST_PAD) {
                if (ld_acq(c + C_HEAD) != h)
                    break;
                return corrupt(r, "header_position", p);
            }
            if (st == ST_VACANT)
                return nskip > 0 ? RS_BUSY : RS_EMPTY;
            if (st == ST_CLAIMED) {
                busy->pos[busy->n++] = p;
                return RS_BUSY;
            }
            uint64_t l;
            uint64_t total = rec_total(r, p, w, &l);
            if (total == 0 || p + total - f > r->cap) {
                uint64_t f2 = ld_acq(c + C_FREE);
                if (total != 0 && f2 != f && f2 <= h) {
                    f = f2;
                    continue;
                }
                if (ld_acq(c + C_HEAD) != h)
                    break;
                return corrupt(r, "length", p);
            }
            if (st == ST_COMMITTED) {
                /* Per-producer order: a producer commits a record before it claims its next
                 * one, so if a record we stepped past is still RESERVED now (after our acquire
                 * load of this later COMMITTED one), it belongs to another producer. If it
                 * changed meanwhile, it may be this one's predecessor: walk again. */
                for (int i = 0; i < nskip && !restart; i++)
                    restart = ld_acq(rec(r, busy->pos[i])) != skipped_word[i];
                if (restart)
                    break;
                if (!cas64(rp, &w, mkw(p, ST_TAKEN, me)))
                    continue; /* lost the race for it: look at its new state */
                /* Stale take (tag wrap): we read this header long ago and took the identical
                 * COMMITTED word of a later lap, whose length we never read. That record's
                 * real position is the one with its tag in [free, free + capacity); `free`
                 * is past p then, and never is otherwise. Give it back and look again. */
                uint64_t f_now = ld_acq(c + C_FREE);
                if (f_now > p) {
                    uint64_t real = f_now + ((p - f_now) & (TAG_PERIOD - 1));
                    /* (A scribbled `free` gives no such position: give back in place, and the
                     * cursor checks report the damage.) */
                    give_back(r, ring_off(r, real) == ring_off(r, p) ? real : p, me);
                    break;
                }
                if (at_head)
                    cas64_v(c + C_HEAD, h, p + total);
                *pos = p;
                *len = l;
                return RS_OK;
            }
            if (st == ST_RESERVED) {
                if (nskip == SKIP_MAX)
                    return RS_BUSY;
                busy->pos[busy->n++] = p;
                skipped_word[nskip++] = w;
                at_head = 0; /* the head waits for it; later records may still be taken */
            } else if (at_head) {
                /* TAKEN, FREED, ABORTED, PAD: nobody needs to take it; move the head on. */
                if (!cas64_v(c + C_HEAD, h, p + total))
                    break;
                h = p + total;
            }
            p += total;
        }
    }
    return RS_BUSY;
}

/* TAKEN(me) -> FREED (the space goes back when `free` passes it). */
static inline int release_taken(RingObject *r, uint64_t pos, uint32_t me)
{
    uint64_t w = mkw(pos, ST_TAKEN, me);
    if (cas64(rec(r, pos), &w, mkw(pos, ST_FREED, 0)))
        return RS_OK;
    return not_mine(r, pos, w, ST_TAKEN);
}

/* ---- recovery ------------------------------------------------------------------------------ */

/* Owners seen alive in one recovery pass, so each costs one /proc read. */
typedef struct {
    uint32_t me;
    uint32_t alive[8];
    int n;
} owner_cache;

static int owner_dead(owner_cache *oc, uint32_t owner)
{
    if (owner == oc->me)
        return 0; /* this process holds it: alive by definition */
    for (int i = 0; i < oc->n; i++)
        if (oc->alive[i] == owner)
            return 0;
    if (!shmkit_task_alive(owner))
        return 1;
    if (oc->n < 8)
        oc->alive[oc->n++] = owner;
    return 0;
}

/* Finish the record at `p` for its owner if it holds it (CLAIMED, RESERVED, TAKEN) and is
 * gone. Returns 1 when it changed the record; *w_out is the header word as last seen. The CAS
 * names the whole word (tag, state, owner), so even a stale `p` can only hit a record that
 * really is held by that dead owner. */
static int recover_at(RingObject *r, uint64_t p, owner_cache *oc, uint64_t *w_out)
{
    char *c = r->ctrl;
    char *rp = rec(r, p);
    uint64_t w = ld_acq(rp);
    unsigned st = W_ST(w);
    *w_out = w;
    if ((p & 15) || W_TAG(w) != tag_of(p) || !(st == ST_CLAIMED || st == ST_RESERVED || st == ST_TAKEN))
        return 0;
    if (!owner_dead(oc, W_OWNER(w)))
        return 0;
    unsigned to = st == ST_CLAIMED ? ST_VACANT : st == ST_RESERVED ? ST_ABORTED : ST_FREED;
    uint64_t nw = mkw(p, to, 0);
    if (!cas64(rp, &w, nw)) {
        *w_out = w;
        return 0;
    }
    *w_out = nw;
    if (st == ST_RESERVED)
        atomic_fetch_add(A64(c + C_ABORTED), 1);
    else if (st == ST_TAKEN)
        atomic_fetch_add(A64(c + C_LOST), 1);
    return 1;
}

/* Recover along the records from `p` on, up to the end of the written ones. */
static int recover_window(RingObject *r, uint64_t p, owner_cache *oc)
{
    int changed = 0;
    uint64_t start = p;
    if ((p & 15) || p > POS_LIMIT)
        return 0; /* corrupt: the hot paths report it */
    for (int steps = 0; steps < RECOVER_STEPS && p - start < r->cap; steps++) {
        uint64_t w;
        changed |= recover_at(r, p, oc, &w);
        unsigned st = W_ST(w);
        if (W_TAG(w) != tag_of(p) || st <= ST_CLAIMED || st > ST_PAD)
            break; /* the end (VACANT, a claim), or moved on under us */
        uint64_t total = rec_total(r, p, w, NULL);
        if (total == 0)
            break;
        p += total;
    }
    return changed;
}

/* Finish what dead owners left where it blocks anyone: the records that hold `free` back
 * (producers wait for them), those from `head` on (consumers wait for them), and the records
 * in `busy` the caller is blocked by. Returns 1 when something changed, 0 when not, RS_ERROR
 * on corruption. Slow path: reads /proc. */
static int recover(RingObject *r, const busy_set *busy)
{
    char *c = r->ctrl;
    owner_cache oc = {.me = owner_id()};
    int changed = 0;
    r->last_recover_ns = shmkit_monotonic_ns();
    /* `free` lags behind until producers need room: bring it up to the first record that
     * holds it back, so that record is the first one the walk below sees. */
    if (help_free(r) < 0)
        return RS_ERROR;
    changed |= recover_window(r, ld_acq(c + C_FREE), &oc);
    changed |= recover_window(r, ld_acq(c + C_HEAD), &oc);
    for (int i = 0; busy != NULL && i < busy->n; i++) {
        uint64_t w;
        changed |= recover_at(r, busy->pos[i], &oc, &w);
    }
    if (changed) {
        if (help_free(r) < 0)
            return RS_ERROR;
        wake_consumers(r);
        wake_producers(r);
    }
    return changed;
}

/* ---- blocking ------------------------------------------------------------------------------ */

/* deadline: -1 forever, 0 do not wait, else monotonic ns. */
static int64_t deadline_from(PyObject *timeout, int *err)
{
    *err = 0;
    int64_t ns = shmkit_timeout_ns(timeout);
    if (ns == -2) {
        *err = 1;
        return 0;
    }
    if (ns < 0)
        return -1;
    return shmkit_monotonic_ns() + ns + 1; /* +1: never 0 */
}

static int deadline_passed(int64_t deadline)
{
    return deadline == 0 || (deadline > 0 && shmkit_monotonic_ns() >= deadline);
}

/* Sleep briefly without the GIL while another producer finishes its claim (no futex event
 * exists for that short step). Returns -1 with an exception set on a signal. */
static int nap(RingObject *r, unsigned round)
{
    if (round < 64) {
        for (int i = 0; i < 64; i++)
            shmkit_cpu_relax();
        return 0;
    }
    if (round < 128) {
        sched_yield();
        return 0;
    }
    struct timespec ts = {0, round < 256 ? 20000 : 500000};
    active_enter(r);
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&ts, NULL);
    Py_END_ALLOW_THREADS
    active_leave(r);
    return PyErr_CheckSignals();
}

/* Wait on a futex word for the counterpart, registered as a waiter. `slice_ns` bounds how
 * long before the caller looks again (recovery). Returns 0 to look again, -1 on a signal. */
static int wait_on(RingObject *r, int seq_off, int waiting_off, uint32_t slot_unit, int64_t deadline,
                   int64_t slice_ns, int (*recheck)(RingObject *, void *), void *arg)
{
    _Atomic uint32_t *seq = A32(r->ctrl + seq_off);
    /* How many sleep, for statistics only: in this process's slot when it has one. */
    _Atomic uint32_t *waiting = A32(r->ctrl + waiting_off);
    uint32_t unit = 1;
    if (slot_mine(r)) {
        waiting = A32(r->slot + SLOT_FLAGS);
        unit = slot_unit;
    }
    atomic_fetch_add_explicit(waiting, unit, memory_order_relaxed);
    uint32_t s = atomic_fetch_or(seq, 1u) | 1u;
    /* The recheck's loads are acquire only, and an acquire load may be satisfied before an
     * earlier store (aarch64 LDAPR; the C11 model): this fence keeps the bit's store before
     * them, so either they see the waker's publication or the waker sees the bit. */
    atomic_thread_fence(memory_order_seq_cst);
    int rc = recheck(r, arg);
    if (rc == 0) {
        int64_t until = shmkit_monotonic_ns() + slice_ns;
        if (deadline > 0 && deadline < until)
            until = deadline;
        active_enter(r);
        rc = shmkit_wait_u32(seq, s, until, 0);
        active_leave(r);
        rc = rc < 0 ? -1 : 0;
    } else {
        rc = rc < 0 ? -1 : 0;
    }
    atomic_fetch_sub_explicit(waiting, unit, memory_order_relaxed);
    return rc;
}

typedef struct {
    const uint64_t *lens;
    int n;
    int got;
    uint32_t me;
    uint64_t *pos;
    uint64_t *len_out;
    busy_set busy;
    int result;
} step_args;

static int recheck_reserve(RingObject *r, void *arg)
{
    step_args *a = arg;
    a->result = try_reserve(r, a->lens, a->n, a->me, a->pos, &a->got, &a->busy);
    if (a->result == RS_ERROR)
        return -1;
    return a->result == RS_FULL ? 0 : 1;
}

static int recheck_take(RingObject *r, void *arg)
{
    step_args *a = arg;
    a->result = try_take(r, a->me, a->pos, a->len_out, &a->busy);
    if (a->result == RS_ERROR)
        return -1;
    if (a->result == RS_EMPTY && atomic_load(A32(r->ctrl + C_CLOSED)))
        return 1;
    return a->result == RS_OK ? 1 : 0;
}

/* Poll `recheck` for up to POLL_NS (GIL held, like the spin of shmkit_wait_u32). Returns 1
 * when it reports progress (or an error), 0 when the time is up. */
static int poll(RingObject *r, int (*recheck)(RingObject *, void *), void *arg, int64_t deadline)
{
    int64_t end = shmkit_monotonic_ns() + POLL_NS;
    if (deadline > 0 && deadline < end)
        end = deadline;
    for (unsigned i = 1;; i++) {
        for (int k = 0; k < 8; k++)
            shmkit_cpu_relax();
        int rc = recheck(r, arg);
        if (rc != 0)
            return 1;
        if ((i & 15) == 0 && shmkit_monotonic_ns() >= end)
            return 0;
    }
}

static int recover_due(RingObject *r)
{
    return shmkit_monotonic_ns() - r->last_recover_ns >= RECOVER_SLICE_NS;
}

/* Reserve up to n records (at least one), waiting until `deadline`. RS_OK (*got reserved
 * from *pos on), RS_FULL (timed out), RS_CLOSED, RS_ERROR. */
static int reserve_wait(RingObject *r, const uint64_t *lens, int n, int64_t deadline, uint64_t *pos,
                        int *got)
{
    step_args a; /* not `= {...}`: that would zero the busy set on every call */
    a.lens = lens;
    a.n = n;
    a.got = 0;
    a.me = owner_id();
    a.pos = pos;
    a.len_out = NULL;
    a.busy.n = 0;
    unsigned busy_rounds = 0;
    for (;;) {
        a.result = try_reserve(r, lens, n, a.me, pos, &a.got, &a.busy);
        *got = a.got;
        if (a.result == RS_OK || a.result == RS_ERROR || a.result == RS_CLOSED)
            return a.result;
        if (atomic_load(A32(r->ctrl + C_CLOSED)))
            return RS_CLOSED;
        if (a.result == RS_BUSY) {
            /* Another producer is mid-claim (a few instructions unless it was descheduled
             * or killed): back off, and check it is alive now and then. */
            if (busy_rounds > 64 && recover_due(r) && recover(r, &a.busy) < 0)
                return RS_ERROR;
            if (deadline_passed(deadline) && busy_rounds > (deadline == 0 ? 200u : 0u))
                return RS_FULL;
            if (nap(r, busy_rounds++) < 0)
                return RS_ERROR;
            continue;
        }
        busy_rounds = 0;
        if (recover_due(r)) {
            int rc = recover(r, NULL);
            if (rc < 0)
                return RS_ERROR;
            if (rc > 0)
                continue;
        }
        if (deadline_passed(deadline))
            return RS_FULL;
        if (poll(r, recheck_reserve, &a, deadline) != 0) {
            *got = a.got;
            if (a.result == RS_ERROR)
                return RS_ERROR;
            if (a.result == RS_OK || a.result == RS_CLOSED)
                return a.result;
            continue;
        }
        if (wait_on(r, C_SPACE_SEQ, C_PROD_WAITING, SLOT_PROD_WAIT_UNIT, deadline, RECOVER_SLICE_NS,
                    recheck_reserve, &a) < 0)
            return RS_ERROR;
        *got = a.got;
        if (a.result == RS_OK || a.result == RS_CLOSED)
            return a.result;
    }
}

/* Take a record, waiting until `deadline`. RS_OK, RS_EMPTY (timed out), RS_CLOSED, RS_ERROR. */
static int take_wait(RingObject *r, int64_t deadline, uint64_t *pos, uint64_t *len)
{
    step_args a; /* not `= {...}`: that would zero the busy set on every call */
    a.lens = NULL;
    a.n = 0;
    a.got = 0;
    a.me = owner_id();
    a.pos = pos;
    a.len_out = len;
    a.busy.n = 0;
    for (;;) {
        a.result = try_take(r, a.me, pos, len, &a.busy);
        if (a.result == RS_OK || a.result == RS_ERROR)
            return a.result;
        if (a.result == RS_EMPTY && atomic_load(A32(r->ctrl + C_CLOSED))) {
            /* closed was seen before this second look: anything put before the close is in.
             * The fence makes the second walk's acquire loads see every claim that the closed
             * flag's seq_cst order puts before it (a claim is followed by a seq_cst load of
             * closed that found it 0). */
            atomic_thread_fence(memory_order_seq_cst);
            a.result = try_take(r, a.me, pos, len, &a.busy);
            if (a.result == RS_OK || a.result == RS_ERROR)
                return a.result;
            if (a.result == RS_EMPTY)
                return RS_CLOSED;
        }
        if (a.result == RS_BUSY && recover_due(r)) {
            /* Blocked by records someone is writing: is that someone alive? */
            int rc = recover(r, &a.busy);
            if (rc < 0)
                return RS_ERROR;
            if (rc > 0)
                continue;
        }
        if (deadline_passed(deadline))
            return RS_EMPTY;
        if (poll(r, recheck_take, &a, deadline) != 0) {
            if (a.result == RS_ERROR)
                return RS_ERROR;
            if (a.result == RS_OK)
                return RS_OK;
            continue;
        }
        int64_t slice = a.result == RS_BUSY ? RECOVER_SLICE_NS : IDLE_SLICE_NS;
        if (wait_on(r, C_DATA_SEQ, C_CONS_WAITING, SLOT_CONS_WAIT_UNIT, deadline, slice, recheck_take,
                    &a) < 0)
            return RS_ERROR;
        if (a.result == RS_OK)
            return RS_OK;
    }
}

/* ---- copying ------------------------------------------------------------------------------- */

__attribute__((noinline)) static void copy_nogil(RingObject *r, char *dst, const char *src, size_t n)
{
    active_enter(r);
    Py_BEGIN_ALLOW_THREADS
    memcpy(dst, src, n);
    Py_END_ALLOW_THREADS
    active_leave(r);
}

static inline void copy_maybe_nogil(RingObject *r, char *dst, const char *src, size_t n)
{
    if (n >= NOGIL_COPY)
        copy_nogil(r, dst, src, n);
    else
        memcpy(dst, src, n);
}

static inline void count(RingObject *r, int slot_field, unsigned role, uint64_t n)
{
    if (slot_mine(r)) {
        char *p = r->slot + slot_field;
        /* One writer per slot (this handle, under the GIL): a plain read-modify-write. */
        st_rlx(p, ld_rlx(p) + n);
        if (!(r->roles & role)) {
            r->roles |= role;
            atomic_fetch_or(A32(r->slot + SLOT_FLAGS), role);
        }
    } else {
        atomic_fetch_add(A64(r->ctrl + (slot_field == SLOT_PUTS ? C_RETIRED_PUT : C_RETIRED_GOT)), n);
    }
}

/* ---- Python errors for results ----------------------------------------------------------- */

static PyObject *raise_result(RingObject *r, int rc, int putting, int64_t deadline)
{
    if (rc == RS_ERROR)
        return NULL;
    if (rc == RS_CLOSED)
        fail(r, putting ? "closed_put" : "closed_get", "()");
    else
        fail(r, putting ? "full" : "empty", "(O)", deadline == 0 ? Py_False : Py_True);
    return NULL;
}

static int check_size(RingObject *r, Py_ssize_t n)
{
    if ((uint64_t)n > r->max_message)
        return fail(r, "too_large", "(nK)", n, (unsigned long long)r->max_message);
    return 0;
}

/* Borrow the bytes of `obj`: bytes objects directly, anything else through the buffer
 * protocol (must be C-contiguous). *view_used tells whether to release `view`. */
static int get_data(RingObject *r, PyObject *obj, Py_buffer *view, const char **data, Py_ssize_t *len,
                    int *view_used)
{
    *view_used = 0;
    if (PyBytes_CheckExact(obj)) {
        *data = PyBytes_AS_STRING(obj);
        *len = PyBytes_GET_SIZE(obj);
        return 0;
    }
    if (!PyObject_CheckBuffer(obj) || PyUnicode_Check(obj))
        return fail(r, "bad_data", "(s)", Py_TYPE(obj)->tp_name);
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    *view_used = 1;
    *data = view->buf;
    *len = view->len;
    return 0;
}

/* ---- argument parsing (fastcall) ----------------------------------------------------------- */

/* Parse (first, timeout=None) or (timeout=None) from a vectorcall argument list. */
static int parse_args(RingObject *r, const char *fname, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames, int want_first, PyObject **first, PyObject **timeout)
{
    Py_ssize_t max_pos = want_first ? 2 : 1;
    *timeout = Py_None;
    if (nargs > max_pos)
        return fail(r, "too_many_args", "(snn)", fname, max_pos, nargs);
    if (want_first && nargs >= 1)
        *first = args[0];
    if (nargs == max_pos)
        *timeout = args[max_pos - 1];
    if (kwnames != NULL) {
        for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(kwnames); i++) {
            PyObject *k = PyTuple_GET_ITEM(kwnames, i);
            PyObject *v = args[nargs + i];
            if (PyUnicode_CompareWithASCIIString(k, "timeout") == 0 && nargs < max_pos) {
                *timeout = v;
            } else if (want_first && nargs < 1 &&
                       (PyUnicode_CompareWithASCIIString(k, "data") == 0 ||
                        PyUnicode_CompareWithASCIIString(k, "messages") == 0 ||
                        PyUnicode_CompareWithASCIIString(k, "max_messages") == 0 ||
                        PyUnicode_CompareWithASCIIString(k, "size") == 0)) {
                *first = v;
            } else {
                return fail(r, "unexpected_arg", "(sO)", fname, k);
            }
        }
    }
    if (want_first && *first == NULL)
        return fail(r, "missing_arg", "(s)", fname);
    return 0;
}

/* ---- put ---------------------------------------------------------------------------------- */

static int put_one(RingObject *r, const char *data, Py_ssize_t n, int64_t deadline)
{
    if (check_size(r, n) < 0)
        return RS_ERROR;
    uint64_t pos, len = (uint64_t)n;
    int got;
    int rc = reserve_wait(r, &len, 1, deadline, &pos, &got);
    if (rc != RS_OK)
        return rc;
    copy_maybe_nogil(r, rec(r, pos) + HDR, data, (size_t)n);
    if (finish_reserved(r, pos, owner_id(), ST_COMMITTED) < 0)
        return RS_ERROR;
    wake_consumers(r);
    count(r, SLOT_PUTS, ROLE_PRODUCER, 1);
    return RS_OK;
}

static PyObject *put_obj(RingObject *r, PyObject *obj, int64_t deadline)
{
    if (check_usable(r, 1) < 0)
        return NULL;
    Py_buffer view;
    const char *data;
    Py_ssize_t n;
    int used;
    if (get_data(r, obj, &view, &data, &n, &used) < 0)
        return NULL;
    int rc = put_one(r, data, n, deadline);
    if (used)
        PyBuffer_Release(&view);
    if (rc != RS_OK)
        return raise_result(r, rc, 1, deadline);
    Py_RETURN_NONE;
}

PyDoc_STRVAR(put_doc, "put(data, timeout=None)\n--\n\n"
"Append one message (any bytes-like object), waiting up to `timeout` seconds for room.\n\n"
"Visible to consumers in every process as soon as it returns. Raises Full on timeout,\n"
"QueueClosed once the channel is closed, MessageTooLargeError above max_message.");

static PyObject *Ring_put(RingObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *data = NULL, *timeout;
    if (parse_args(self, "put", args, nargs, kwnames, 1, &data, &timeout) < 0)
        return NULL;
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err)
        return NULL;
    return put_obj(self, data, deadline);
}

PyDoc_STRVAR(put_nowait_doc, "put_nowait(data)\n--\n\nPut without waiting; raises Full when there is no room.");

static PyObject *Ring_put_nowait(RingObject *self, PyObject *data)
{
    return put_obj(self, data, 0);
}

PyDoc_STRVAR(put_many_doc, "put_many(messages, timeout=None)\n--\n\n"
"Put every message of an iterable, in order, waking consumers once per batch.\n\n"
"`timeout` bounds the whole call. On Full, the messages before the one that did not fit\n"
"were put (the exception's `.put_count` says how many); on a bad item (TypeError,\n"
"MessageTooLargeError) every message before it was put.");

#define PUT_BATCH 64

static PyObject *Ring_put_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *items = NULL, *timeout;
    if (parse_args(self, "put_many", args, nargs, kwnames, 1, &items, &timeout) < 0)
        return NULL;
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err || check_usable(self, 1) < 0)
        return NULL;
    /* The GIL is released while we wait for room and during large copies: another thread may
     * then change a list we were given (clear it, freeing bytes objects whose memory we are
     * about to copy from). So each batch holds references to its own messages, and a list is
     * indexed afresh, under the GIL, for each batch. Other iterables become a tuple. */
    PyObject *seq;
    if (PyTuple_Check(items) || PyList_Check(items)) {
        seq = Py_NewRef(items);
    } else {
        PyObject *it = PyObject_GetIter(items);
        if (it == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_TypeError))
                return NULL;
            PyErr_Clear();
            fail(self, "bad_messages", "(s)", Py_TYPE(items)->tp_name);
            return NULL;
        }
        seq = PySequence_Tuple(it);
        Py_DECREF(it);
    }
    if (seq == NULL)
        return NULL;
    int is_list = PyList_Check(seq);
    Py_ssize_t done = 0, limit = is_list ? PyList_GET_SIZE(seq) : PyTuple_GET_SIZE(seq);
    uint32_t me = owner_id();
    int rc = RS_OK;
    /* Up to PUT_BATCH messages are reserved with one claim, copied, then committed in order. */
    Py_buffer views[PUT_BATCH];
    PyObject *held[PUT_BATCH];
    const char *datas[PUT_BATCH];
    int used[PUT_BATCH];
    uint64_t lens[PUT_BATCH];
    PyObject *et = NULL, *ev = NULL, *etb = NULL; /* a bad item's error, raised after the good ones */
    while (done < limit && rc == RS_OK) {
        if (is_list && PyList_GET_SIZE(seq) < limit)
            limit = PyList_GET_SIZE(seq); /* shrunk by another thread meanwhile */
        int k = 0;
        while (k < PUT_BATCH && done + k < limit) {
            Py_ssize_t n;
            PyObject *item = is_list ? PyList_GET_ITEM(seq, done + k) : PyTuple_GET_ITEM(seq, done + k);
            if (get_data(self, item, &views[k], &datas[k], &n, &used[k]) < 0)
                break;
            if (check_size(self, n) < 0) {
                if (used[k])
                    PyBuffer_Release(&views[k]);
                break;
            }
            held[k] = Py_NewRef(item);
            lens[k++] = (uint64_t)n;
        }
        if (PyErr_Occurred()) {
            /* Put everything before the bad item, then raise its error. */
            if (et == NULL)
                PyErr_Fetch(&et, &ev, &etb);
            else
                PyErr_Clear();
            limit = done + k;
        }
        if (k > 0) {
            uint64_t pos;
            int got = 0;
            rc = reserve_wait(self, lens, k, deadline, &pos, &got);
            if (rc == RS_OK) {
                int i = 0;
                for (; i < got; i++) {
                    copy_maybe_nogil(self, rec(self, pos) + HDR, datas[i], (size_t)lens[i]);
                    if (finish_reserved(self, pos, me, ST_COMMITTED) < 0) {
                        rc = RS_ERROR;
                        break;
                    }
                    pos += HDR + round16(lens[i]);
                }
                /* After a failure, drop the rest of the run rather than leave it RESERVED by a
                 * live process (which would hold the ring's space forever). */
                for (int j = i + 1; j < got; j++) {
                    pos += HDR + round16(lens[j - 1]);
                    cas64_v(rec(self, pos), mkw(pos, ST_RESERVED, me), mkw(pos, ST_ABORTED, 0));
                }
                done += i;
                count(self, SLOT_PUTS, ROLE_PRODUCER, (uint64_t)i);
                wake_consumers(self);
            }
        }
        for (int i = 0; i < k; i++) {
            if (used[i])
                PyBuffer_Release(&views[i]);
            Py_DECREF(held[i]);
        }
    }
    Py_DECREF(seq);
    if (rc != RS_OK || et != NULL) {
        if (rc != RS_OK && rc != RS_ERROR)
            raise_result(self, rc, 1, deadline);
        if (et != NULL) {
            /* The bad item's error wins over a later Full or QueueClosed. */
            if (PyErr_Occurred())
                PyErr_Clear();
            PyErr_Restore(et, ev, etb);
        }
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        PyObject *n = PyLong_FromSsize_t(done);
        if (n != NULL && value != NULL && PyObject_SetAttrString(value, "put_count", n) < 0)
            PyErr_Clear();
        Py_XDECREF(n);
        PyErr_Restore(type, value, tb);
        return NULL;
    }
    Py_RETURN_NONE;
}

/* ---- get ---------------------------------------------------------------------------------- */

/* Copy the TAKEN record at `pos` into `out` (a fresh bytes object of its length) and free it. */
static int copy_taken(RingObject *r, PyObject *out, uint64_t pos, uint64_t len, uint32_t me)
{
    copy_maybe_nogil(r, PyBytes_AS_STRING(out), rec(r, pos) + HDR, (size_t)len);
    return release_taken(r, pos, me);
}

static PyObject *get_obj(RingObject *r, int64_t deadline)
{
    if (check_usable(r, 1) < 0)
        return NULL;
    uint64_t pos, len;
    uint32_t me = owner_id();
    int rc = take_wait(r, deadline, &pos, &len);
    if (rc != RS_OK)
        return raise_result(r, rc, 0, deadline);
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (out == NULL) {
        give_back(r, pos, me); /* rather than lose it */
        return NULL;
    }
    if (copy_taken(r, out, pos, len, me) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    /* Space goes back lazily: producers advance `free` themselves when they run short, so a
     * consumer only does it when a producer sleeps for room. */
    if (producers_sleep(r) && help_free(r) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    count(r, SLOT_GETS, ROLE_CONSUMER, 1);
    return out;
}

PyDoc_STRVAR(get_doc, "get(timeout=None) -> bytes\n--\n\n"
"Take the next message, waiting up to `timeout` seconds. Each message goes to exactly one\n"
"consumer. Raises Empty on timeout, QueueClosed when the channel is closed and drained.");

static PyObject *Ring_get(RingObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;
    if (parse_args(self, "get", args, nargs, kwnames, 0, NULL, &timeout) < 0)
        return NULL;
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err)
        return NULL;
    return get_obj(self, deadline);
}

PyDoc_STRVAR(get_nowait_doc, "get_nowait() -> bytes\n--\n\nGet without waiting; raises Empty when there is none.");

static PyObject *Ring_get_nowait(RingObject *self, PyObject *unused)
{
    (void)unused;
    return get_obj(self, 0);
}

PyDoc_STRVAR(get_many_doc, "get_many(max_messages, timeout=None) -> list[bytes]\n--\n\n"
"Wait up to `timeout` for at least one message, then take up to `max_messages` that are\n"
"ready, returning their space in one pass. Raises Empty on timeout, QueueClosed when the\n"
"channel is closed and drained.");

static PyObject *Ring_get_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *maxobj = NULL, *timeout;
    if (parse_args(self, "get_many", args, nargs, kwnames, 1, &maxobj, &timeout) < 0)
        return NULL;
    if (!PyLong_Check(maxobj))
        return fail(self, "bad_type", "(ss)", "max_messages", Py_TYPE(maxobj)->tp_name), NULL;
    Py_ssize_t maxn = PyLong_AsSsize_t(maxobj);
    if (maxn == -1 && PyErr_Occurred())
        return NULL;
    if (maxn < 1)
        return fail(self, "bad_count", "(sn)", "max_messages", maxn), NULL;
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err || check_usable(self, 1) < 0)
        return NULL;
    uint32_t me = owner_id();
    uint64_t pos, len;
    busy_set busy;
    int rc = take_wait(self, deadline, &pos, &len);
    if (rc != RS_OK)
        return raise_result(self, rc, 0, deadline);
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        give_back(self, pos, me);
        return NULL;
    }
    Py_ssize_t got = 0;
    for (;;) {
        /* The bytes object goes into the list before the record is freed: if either step runs
         * out of memory, the message is given back instead of lost. */
        PyObject *msg = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
        if (msg == NULL || PyList_Append(list, msg) < 0) {
            Py_XDECREF(msg);
            give_back(self, pos, me);
            if (got == 0) {
                Py_DECREF(list);
                return NULL;
            }
            PyErr_Clear(); /* deliver what we have; the rest stays in the queue */
            break;
        }
        Py_DECREF(msg); /* the list holds it */
        if (copy_taken(self, msg, pos, len, me) < 0) {
            Py_DECREF(list);
            return NULL;
        }
        got++;
        if (got >= maxn)
            break;
        rc = try_take(self, me, &pos, &len, &busy);
        if (rc == RS_ERROR) {
            Py_DECREF(list);
            return NULL;
        }
        if (rc != RS_OK)
            break;
    }
    if (producers_sleep(self) && help_free(self) < 0) {
        Py_DECREF(list);
        return NULL;
    }
    count(self, SLOT_GETS, ROLE_CONSUMER, (uint64_t)got);
    return list;
}

/* ---- zero copy ----------------------------------------------------------------------------- */

static int pos_arg(RingObject *r, PyObject *obj, uint64_t *pos)
{
    unsigned long long v = PyLong_AsUnsignedLongLong(obj);
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if (v & 15) {
        fail(r, "bad_position", "(K)", v);
        return -1;
    }
    *pos = v;
    return 0;
}

static PyObject *seg_offset(RingObject *r, uint64_t pos)
{
    return PyLong_FromSsize_t((Py_ssize_t)(rec(r, pos) + HDR - (char *)r->view.buf));
}

PyDoc_STRVAR(reserve_doc, "_reserve(size, timeout=None) -> (position, offset)\n--\n\n"
"Reserve a record of `size` bytes for writing in place at `offset` of the segment buffer.\n"
"Finish it with _commit(position) or _abort(position) from any thread of this process.");

static PyObject *Ring_reserve(RingObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *sizeobj = NULL, *timeout;
    if (parse_args(self, "reserve", args, nargs, kwnames, 1, &sizeobj, &timeout) < 0)
        return NULL;
    if (!PyLong_Check(sizeobj))
        return fail(self, "bad_type", "(ss)", "size", Py_TYPE(sizeobj)->tp_name), NULL;
    Py_ssize_t n = PyLong_AsSsize_t(sizeobj);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0)
        return fail(self, "bad_size", "(n)", n), NULL;
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err || check_usable(self, 1) < 0 || check_size(self, n) < 0)
        return NULL;
    uint64_t pos, len = (uint64_t)n;
    int got;
    int rc = reserve_wait(self, &len, 1, deadline, &pos, &got);
    if (rc != RS_OK)
        return raise_result(self, rc, 1, deadline);
    PyObject *result = Py_BuildValue("(KN)", (unsigned long long)pos, seg_offset(self, pos));
    if (result == NULL) {
        /* Never leave a record RESERVED by a live process that forgot it. */
        cas64_v(rec(self, pos), mkw(pos, ST_RESERVED, owner_id()), mkw(pos, ST_ABORTED, 0));
        wake_consumers(self);
    }
    return result;
}

static PyObject *finish_py(RingObject *self, PyObject *arg, unsigned to)
{
    uint64_t pos = 0;
    if (check_usable(self, 1) < 0 || pos_arg(self, arg, &pos) < 0)
        return NULL;
    if (finish_reserved(self, pos, owner_id(), to) < 0)
        return NULL;
    wake_consumers(self);
    if (to == ST_COMMITTED)
        count(self, SLOT_PUTS, ROLE_PRODUCER, 1);
    Py_RETURN_NONE;
}

static PyObject *Ring_commit(RingObject *self, PyObject *arg) { return finish_py(self, arg, ST_COMMITTED); }
static PyObject *Ring_abort(RingObject *self, PyObject *arg) { return finish_py(self, arg, ST_ABORTED); }

PyDoc_STRVAR(take_doc, "_take(timeout=None) -> (position, offset, length)\n--\n\n"
"Take the next message for reading in place; hand it back with _release(position) (read)\n"
"or _untake(position) (not read: it goes back to the consumers).");

static PyObject *Ring_take(RingObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;
    if (parse_args(self, "take", args, nargs, kwnames, 0, NULL, &timeout) < 0)
        return NULL;
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err || check_usable(self, 1) < 0)
        return NULL;
    uint64_t pos, len;
    int rc = take_wait(self, deadline, &pos, &len);
    if (rc != RS_OK)
        return raise_result(self, rc, 0, deadline);
    PyObject *result =
        Py_BuildValue("(KNK)", (unsigned long long)pos, seg_offset(self, pos), (unsigned long long)len);
    if (result == NULL)
        give_back(self, pos, owner_id());
    return result;
}

static PyObject *Ring_release(RingObject *self, PyObject *arg)
{
    uint64_t pos = 0;
    if (check_usable(self, 1) < 0 || pos_arg(self, arg, &pos) < 0)
        return NULL;
    if (release_taken(self, pos, owner_id()) < 0)
        return NULL;
    count(self, SLOT_GETS, ROLE_CONSUMER, 1);
    if (producers_sleep(self) && help_free(self) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *Ring_untake(RingObject *self, PyObject *arg)
{
    uint64_t pos = 0;
    if (check_usable(self, 1) < 0 || pos_arg(self, arg, &pos) < 0)
        return NULL;
    give_back(self, pos, owner_id());
    Py_RETURN_NONE;
}

/* ---- control ------------------------------------------------------------------------------- */

static PyObject *Ring_close_channel(RingObject *self, PyObject *unused)
{
    (void)unused;
    if (check_usable(self, 1) < 0)
        return NULL;
    atomic_store(A32(self->ctrl + C_CLOSED), 1);
    atomic_fetch_add(A32(self->ctrl + C_DATA_SEQ), 2);
    atomic_fetch_add(A32(self->ctrl + C_SPACE_SEQ), 2);
    shmkit_futex_wake(A32(self->ctrl + C_DATA_SEQ), INT_MAX);
    shmkit_futex_wake(A32(self->ctrl + C_SPACE_SEQ), INT_MAX);
    Py_RETURN_NONE;
}

static PyObject *Ring_recover(RingObject *self, PyObject *unused)
{
    (void)unused;
    if (check_usable(self, 1) < 0)
        return NULL;
    int rc = recover(self, NULL);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

/* Read-only walk from `free` to the end: depth and who is mid-operation. Tolerates racing
 * writers (it retries, then reports what it saw); reports corruption in the result as a
 * reason code ("problem"), which queue.py words. */
static PyObject *Ring_walk(RingObject *self, PyObject *unused)
{
    (void)unused;
    if (check_usable(self, 0) < 0)
        return NULL;
    char *c = self->ctrl;
    uint64_t counts[ST_PAD + 1];
    uint64_t bytes = 0, used = 0, f = 0, h = 0, t = 0;
    const char *problem = NULL;
    for (int attempt = 0; attempt < 20; attempt++) {
        memset(counts, 0, sizeof counts);
        bytes = 0;
        problem = NULL;
        f = ld_acq(c + C_FREE);
        h = ld_acq(c + C_HEAD);
        t = ld_acq(c + C_TAIL);
        uint64_t p = f;
        if ((f & 15) || f > POS_LIMIT) {
            problem = "free_cursor";
            break;
        }
        for (uint64_t steps = 0;; steps++) {
            if (p - f > self->cap || steps > self->cap / HDR + 1) {
                problem = "run_past";
                break;
            }
            uint64_t w = ld_acq(rec(self, p));
            unsigned st = W_ST(w);
            if (W_TAG(w) != tag_of(p) || st < ST_VACANT || st > ST_PAD) {
                problem = "header_position";
                break;
            }
            counts[st]++;
            if (st == ST_VACANT || st == ST_CLAIMED)
                break;
            uint64_t len, total = rec_total(self, p, w, &len);
            if (total == 0) {
                problem = "length";
                break;
            }
            if (st == ST_COMMITTED)
                bytes += len;
            p += total;
        }
        used = p - f;
        if (problem == NULL || ld_acq(c + C_FREE) == f)
            break;
    }
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsKsKsIsIsKsKsIsz}",
        "free", (unsigned long long)f, "head", (unsigned long long)h, "tail", (unsigned long long)t,
        "used_bytes", (unsigned long long)used, "depth_messages", (unsigned long long)counts[ST_COMMITTED],
        "depth_bytes", (unsigned long long)bytes, "being_written", (unsigned long long)(counts[ST_CLAIMED] + counts[ST_RESERVED]),
        "being_read", (unsigned long long)counts[ST_TAKEN], "capacity", (unsigned long long)self->cap,
        "max_message", (unsigned long long)self->max_message,
        "retired_put", (unsigned long long)ld_acq(c + C_RETIRED_PUT),
        "retired_got", (unsigned long long)ld_acq(c + C_RETIRED_GOT),
        "waiting_producers", (unsigned)atomic_load(A32(c + C_PROD_WAITING)),
        "waiting_consumers", (unsigned)atomic_load(A32(c + C_CONS_WAITING)),
        "aborted", (unsigned long long)ld_acq(c + C_ABORTED), "lost", (unsigned long long)ld_acq(c + C_LOST),
        "closed", (unsigned)atomic_load(A32(c + C_CLOSED)), "problem", problem);
}

/* ---- attach / detach ----------------------------------------------------------------------- */

PyDoc_STRVAR(attach_doc, "_attach(buffer, ctrl_offset, ring_offset, capacity, max_message, slot_offset, label, hint)\n--\n\n"
"Map the ring that starts at ctrl_offset of buffer. capacity and max_message come from the\n"
"checked header and must match the control block. slot_offset is -1 for no slot. label and\n"
"hint are handed to the error factory with every error.");

static PyObject *Ring_attach(RingObject *self, PyObject *args)
{
    PyObject *buffer, *label, *hint;
    Py_ssize_t ctrl_off, ring_off, slot_off;
    unsigned long long cap, maxm;
    if (!PyArg_ParseTuple(args, "OnnKKnUU", &buffer, &ctrl_off, &ring_off, &cap, &maxm, &slot_off, &label, &hint))
        return NULL;
    if (self->has_view)
        return fail(self, "attached", "()"), NULL;
    Py_INCREF(label);
    Py_XSETREF(self->label, label);
    Py_INCREF(hint);
    Py_XSETREF(self->hint, hint);
    int writable = 1;
    if (PyObject_GetBuffer(buffer, &self->view, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        writable = 0;
        if (PyObject_GetBuffer(buffer, &self->view, PyBUF_SIMPLE) < 0)
            return NULL;
    }
    char *base = self->view.buf;
    Py_ssize_t size = self->view.len;
    const char *why = NULL;
    if (cap < 64 || (cap & 15) || cap > SHMKIT_RING_MAX_CAPACITY || maxm > cap - 2 * HDR)
        why = "attach_params";
    else if (ctrl_off < 0 || (ctrl_off & 63) || ctrl_off + SHMKIT_RING_CTRL_SIZE > ring_off || (ring_off & 15) ||
             ring_off > size || (uint64_t)(size - ring_off) < cap)
        why = "attach_fit";
    else if (slot_off != -1 && (slot_off < ctrl_off + C_SLOTS || slot_off + SLOT_SIZE > ring_off || (slot_off & 7)))
        why = "attach_slot";
    else if (ld_acq(base + ctrl_off + C_MAGIC) != SHMKIT_RING_MAGIC)
        why = "attach_magic";
    else if (ld_acq(base + ctrl_off + C_CAPACITY) != cap || ld_acq(base + ctrl_off + C_MAX_MESSAGE) != maxm)
        why = "attach_disagree";
    if (why != NULL) {
        PyBuffer_Release(&self->view);
        return fail(self, "corrupt", "(sO)", why, Py_None), NULL;
    }
    self->has_view = 1;
    self->writable = writable;
    self->ctrl = base + ctrl_off;
    self->ring = base + ring_off;
    self->slot = slot_off >= 0 && writable ? base + slot_off : NULL;
    self->slot_pid = owner_id();
    self->cap = cap;
    self->max_message = maxm;
    self->mask = (cap & (cap - 1)) == 0 ? cap - 1 : 0;
    self->roles = 0;
    self->last_recover_ns = shmkit_monotonic_ns();
    Py_RETURN_NONE;
}

static PyObject *Ring_detach(RingObject *self, PyObject *unused)
{
    (void)unused;
    if (self->exports > 0)
        return fail(self, "detach_views", "()"), NULL;
    /* Threads of this process only: a forked child inherits the count, not the threads. */
    if (self->active > 0 && self->active_pid == owner_id())
        return fail(self, "detach_threads", "()"), NULL;
    if (self->has_view) {
        self->has_view = 0;
        self->ctrl = self->ring = self->slot = NULL;
        PyBuffer_Release(&self->view);
    }
    Py_RETURN_NONE;
}

static PyObject *Ring_get_capacity(RingObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->cap);
}

static PyObject *Ring_get_max_message(RingObject *self, void *closure)
{
    (void)closure;
    return PyLong_FromUnsignedLongLong(self->max_message);
}

static PyObject *Ring_get_attached(RingObject *self, void *closure)
{
    (void)closure;
    return PyBool_FromLong(self->has_view);
}

static void Ring_dealloc(RingObject *self)
{
    if (self->weakreflist != NULL)
        PyObject_ClearWeakRefs((PyObject *)self);
    if (self->has_view) {
        self->has_view = 0;
        PyBuffer_Release(&self->view);
    }
    Py_CLEAR(self->label);
    Py_CLEAR(self->hint);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Ring_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    (void)args;
    (void)kwargs;
    RingObject *self = (RingObject *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->label = Py_NewRef(Py_None);
    self->hint = Py_NewRef(Py_None);
    return (PyObject *)self;
}

/* The segment as a buffer: queue.py makes a fresh memoryview of the Ring for every zero-copy
 * block, so the export count of that view's managed buffer tells whether anything (a numpy
 * array, a slice) still points into the ring after the block. */
static int Ring_getbuffer(RingObject *self, Py_buffer *view, int flags)
{
    if (!self->has_view) {
        fail(self, "detached_buffer", "()");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->view.buf, self->view.len, !self->writable, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void Ring_releasebuffer(RingObject *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

static PyBufferProcs Ring_as_buffer = {
    .bf_getbuffer = (getbufferproc)Ring_getbuffer,
    .bf_releasebuffer = (releasebufferproc)Ring_releasebuffer,
};

static PyMethodDef Ring_methods[] = {
    {"put", (PyCFunction)(void (*)(void))Ring_put, METH_FASTCALL | METH_KEYWORDS, put_doc},
    {"put_nowait", (PyCFunction)Ring_put_nowait, METH_O, put_nowait_doc},
    {"put_many", (PyCFunction)(void (*)(void))Ring_put_many, METH_FASTCALL | METH_KEYWORDS, put_many_doc},
    {"get", (PyCFunction)(void (*)(void))Ring_get, METH_FASTCALL | METH_KEYWORDS, get_doc},
    {"get_nowait", (PyCFunction)Ring_get_nowait, METH_NOARGS, get_nowait_doc},
    {"get_many", (PyCFunction)(void (*)(void))Ring_get_many, METH_FASTCALL | METH_KEYWORDS, get_many_doc},
    {"_reserve", (PyCFunction)(void (*)(void))Ring_reserve, METH_FASTCALL | METH_KEYWORDS, reserve_doc},
    {"_commit", (PyCFunction)Ring_commit, METH_O, "_commit(position): publish a reserved record."},
    {"_abort", (PyCFunction)Ring_abort, METH_O, "_abort(position): drop a reserved record."},
    {"_take", (PyCFunction)(void (*)(void))Ring_take, METH_FASTCALL | METH_KEYWORDS, take_doc},
    {"_release", (PyCFunction)Ring_release, METH_O, "_release(position): free a taken record."},
    {"_untake", (PyCFunction)Ring_untake, METH_O,
     "_untake(position): give a taken record back to the consumers, unread."},
    {"_close_channel", (PyCFunction)Ring_close_channel, METH_NOARGS, "Mark the channel closed and wake everyone."},
    {"_recover", (PyCFunction)Ring_recover, METH_NOARGS, "Finish what dead owners left; True if anything changed."},
    {"_walk", (PyCFunction)Ring_walk, METH_NOARGS, "Cursors, depth and counters as a dict (read-only)."},
    {"_attach", (PyCFunction)Ring_attach, METH_VARARGS, attach_doc},
    {"_detach", (PyCFunction)Ring_detach, METH_NOARGS, "Release the buffer; refuses while threads wait in it."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef Ring_getset[] = {
    {"capacity", (getter)Ring_get_capacity, NULL, "Ring size in bytes (records include a 16-byte header).", NULL},
    {"max_message", (getter)Ring_get_max_message, NULL, "Largest message in bytes.", NULL},
    {"_attached", (getter)Ring_get_attached, NULL, "Whether the ring is mapped in this object.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject RingType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._native.Ring",
    .tp_basicsize = sizeof(RingObject),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The lock-free shared-memory ring under shmkit.Queue (use Queue).",
    .tp_new = Ring_new,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Ring_methods,
    .tp_getset = Ring_getset,
    .tp_as_buffer = &Ring_as_buffer,
    .tp_weaklistoffset = offsetof(RingObject, weakreflist),
};

/* ---- module functions ---------------------------------------------------------------------- */

PyDoc_STRVAR(ring_init_doc, "ring_init(buffer, ctrl_offset, ring_offset, capacity, max_message)\n--\n\n"
"Write an empty control block and the first VACANT marker (the creator, before publishing).\n"
"queue.py validates the values first; impossible ones raise the factory's \"corrupt\" error.");

static PyObject *py_ring_init(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *buffer;
    Py_ssize_t ctrl_off, ring_off;
    unsigned long long cap, maxm;
    if (!PyArg_ParseTuple(args, "OnnKK", &buffer, &ctrl_off, &ring_off, &cap, &maxm))
        return NULL;
    if (cap < 64 || (cap & 15) || cap > SHMKIT_RING_MAX_CAPACITY || maxm > cap - 2 * HDR)
        return fail(NULL, "corrupt", "(sO)", "attach_params", Py_None), NULL;
    if (ring_off < ctrl_off + SHMKIT_RING_CTRL_SIZE || (ring_off & 15) || (ctrl_off & 63) || ctrl_off < 0)
        return fail(NULL, "corrupt", "(sO)", "attach_fit", Py_None), NULL;
    shmkit_window w;
    if (shmkit_window_get(buffer, ctrl_off, (ring_off - ctrl_off) + (Py_ssize_t)cap, 16, 1, &w) < 0)
        return NULL;
    memset(w.ptr, 0, (size_t)(ring_off - ctrl_off));
    st_rlx(w.ptr + C_CAPACITY, cap);
    st_rlx(w.ptr + C_MAX_MESSAGE, maxm);
    st_rlx(w.ptr + (ring_off - ctrl_off), mkw(0, ST_VACANT, 0));
    st_rel(w.ptr + C_MAGIC, SHMKIT_RING_MAGIC);
    shmkit_window_release(&w);
    Py_RETURN_NONE;
}

static PyObject *py_ring_setup(PyObject *module, PyObject *factory)
{
    (void)module;
    if (!PyCallable_Check(factory)) {
        PyErr_SetString(PyExc_TypeError, "ring_setup() needs a callable");
        return NULL;
    }
    Py_XSETREF(error_factory, Py_NewRef(factory));
    Py_RETURN_NONE;
}

static PyObject *py_view_count(PyObject *module, PyObject *arg)
{
    (void)module;
    if (!PyMemoryView_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "view_count() needs a memoryview");
        return NULL;
    }
    return PyLong_FromSsize_t(((PyMemoryViewObject *)arg)->mbuf->exports);
}

static PyMethodDef ring_functions[] = {
    {"view_count", py_view_count, METH_O,
     "view_count(memoryview) -> int: memoryviews alive on the same managed buffer (this one included)."},
    {"ring_init", py_ring_init, METH_VARARGS, ring_init_doc},
    {"ring_setup", py_ring_setup, METH_O,
     "ring_setup(factory): factory(code, label, hint, *values) -> the exception Ring raises."},
    {NULL, NULL, 0, NULL},
};

int shmkit_init_ring(PyObject *module)
{
    if (PyType_Ready(&RingType) < 0)
        return -1;
    /* A forked child has another pid: forget the cached one there. */
    if (pthread_atfork(NULL, NULL, forget_pid) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return -1;
    }
    Py_INCREF(&RingType);
    if (PyModule_AddObject(module, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "RING_CTRL_SIZE", SHMKIT_RING_CTRL_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "RING_SLOTS", SHMKIT_RING_SLOTS) < 0 ||
        PyModule_AddIntConstant(module, "RING_SLOTS_OFFSET", C_SLOTS) < 0 ||
        PyModule_AddIntConstant(module, "RING_SLOT_SIZE", SLOT_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "RING_RECORD_HEADER", HDR) < 0)
        return -1;
    PyObject *maxcap = PyLong_FromUnsignedLongLong(SHMKIT_RING_MAX_CAPACITY);
    int rc = maxcap == NULL ? -1 : PyModule_AddObjectRef(module, "RING_MAX_CAPACITY", maxcap);
    Py_XDECREF(maxcap);
    if (rc < 0)
        return -1;
    return PyModule_AddFunctions(module, ring_functions);
}
