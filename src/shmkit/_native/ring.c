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
 *   word0 (u64, atomic): tag (38 bits: pos >> 4) | state (4 bits) | owner task id (22 bits)
 *   word1 (u64):         payload length in bytes (written before the state says it is valid)
 * followed by the payload, padded to 16 bytes. The tag makes a header from another lap (or
 * payload bytes) unequal to the header the reader expects, so stale readers fail their CAS.
 *
 * Record life (each arrow one atomic CAS or store, so a SIGKILL anywhere leaves a state that
 * says who has to finish it):
 *   VACANT --producer CAS--> CLAIMED(tid) --> RESERVED(tid) --> COMMITTED --consumer CAS-->
 *   TAKEN(tid) --> FREED;  RESERVED --> ABORTED;  CLAIMED --> PAD (filler up to the ring end)
 * The word after the end of the written records is always VACANT(end): a producer claims it
 * by CAS, writes the length(s) and the next VACANT marker, then publishes RESERVED. put_many
 * claims a run of records with that one CAS (their headers are written before the first is
 * published). Recovery, run by waiters when a wait slice ends with an owner that is no
 * longer alive: CLAIMED(dead) -> VACANT (nothing was reserved), RESERVED(dead) -> ABORTED
 * (skipped, never delivered), TAKEN(dead) -> FREED (that one message is lost).
 *
 * Order: consumers may take a COMMITTED record past records still RESERVED (a slow or dead
 * producer does not stall the others), but before taking it they re-read every record they
 * stepped past; a producer commits its records in position order, so one still RESERVED
 * then belongs to another producer, and one that changed makes the walk start again.
 *
 * Space: `free` advances over runs of FREED/ABORTED/PAD records with one CAS. Consumers do it
 * only when a producer sleeps for room; a producer short of room does it itself (and moves
 * `head` past records nobody needs first).
 *
 * Waiting: poll the ring ~20 us, then sleep on data_seq / space_seq. Bit 0 of those words
 * says "someone sleeps"; a waker that sees it clears it and wakes all, so a busy queue makes
 * no system call and a sleep costs one wake-up. Sleepers wake at least every 10 ms when
 * something owned blocks them (to run recovery), else every 200 ms as a backstop.
 */
#include "native.h"

#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <sched.h>
#include <string.h>
#include <time.h>

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

#define ROLE_PRODUCER 1u
#define ROLE_CONSUMER 2u

#define HDR 16u
#define TID_MASK ((1u << 22) - 1)
#define ST_SHIFT 22
#define TAG_SHIFT 26
#define TAG_MASK ((1ULL << 38) - 1)

enum { ST_VACANT = 1, ST_CLAIMED, ST_RESERVED, ST_COMMITTED, ST_TAKEN, ST_FREED, ST_ABORTED, ST_PAD };

/* Results of the non-blocking steps; negative means a Python exception is set. */
enum { RS_OK = 0, RS_FULL, RS_EMPTY, RS_BUSY, RS_CLOSED, RS_ERROR = -1 };

/* A waiter blocked behind a record whose owner may die re-checks after this long; this bounds
 * crash recovery. Waits with nothing to recover use the long slice as a backstop only. */
#define RECOVER_SLICE_NS (10 * 1000 * 1000LL)
#define IDLE_SLICE_NS (200 * 1000 * 1000LL)
/* Before registering as a waiter (which makes the other side pay a futex_wake syscall per
 * operation), a waiter polls the ring itself for this long: a cross-core hand-off takes well
 * under a microsecond, a futex wake-up tens. */
#define POLL_NS (20 * 1000LL)
/* A consumer steps past at most this many records still being written. */
#define SKIP_MAX 16
/* Copies at least this large run without the GIL. */
#define NOGIL_COPY (256 * 1024)

static PyObject *exc_corrupt, *exc_empty, *exc_full, *exc_closed, *exc_too_large;

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    int has_view;
    int writable;
    char *ctrl;
    char *ring;
    char *slot; /* this handle's attachment slot (counters, roles) or NULL */
    uint64_t cap;
    uint64_t max_message;
    uint64_t mask; /* cap - 1 when cap is a power of two, else 0 */
    unsigned roles;
    int active;  /* threads inside a call that released the GIL */
    int exports; /* zero-copy memoryviews made from this object */
    int64_t last_recover_ns;
    PyObject *label; /* "queue 'jobs' (posix)": how messages name the object */
    PyObject *hint;  /* what to do about corruption */
    PyObject *weakreflist;
} RingObject;

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
static inline uint64_t mkw(uint64_t pos, unsigned st, uint32_t tid)
{
    return (tag_of(pos) << TAG_SHIFT) | ((uint64_t)st << ST_SHIFT) | (tid & TID_MASK);
}
#define W_ST(w) ((unsigned)(((w) >> ST_SHIFT) & 15u))
#define W_TID(w) ((uint32_t)((w)&TID_MASK))
#define W_TAG(w) ((w) >> TAG_SHIFT)

static inline uint64_t ring_off(const RingObject *r, uint64_t pos)
{
    return r->mask ? (pos & r->mask) : pos % r->cap;
}
static inline char *rec(RingObject *r, uint64_t pos) { return r->ring + ring_off(r, pos); }
static inline uint64_t round16(uint64_t n) { return (n + 15u) & ~(uint64_t)15u; }

/* ---- errors -------------------------------------------------------------------------------- */

static int corrupt(RingObject *r, const char *why, uint64_t pos)
{
    PyErr_Format(exc_corrupt, "%U is corrupt: %s (position %llu)%U", r->label, why,
                 (unsigned long long)pos, r->hint);
    return RS_ERROR;
}

static int check_usable(RingObject *r, int need_write)
{
    if (!r->has_view) {
        PyErr_Format(PyExc_ValueError, "%U is closed in this process", r->label ? r->label : Py_None);
        return -1;
    }
    if (need_write && !r->writable) {
        PyErr_Format(PyExc_TypeError, "%U was opened read-only: it can only be inspected", r->label);
        return -1;
    }
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
 * (fetch_or) before its last look at the ring. A waker that made something visible with a
 * seq_cst CAS/store then loads the word: if the bit is set it moves the word on (+2, bit
 * cleared) and wakes every sleeper. Either the waiter's last look sees the change, or the
 * waker sees the bit; so no wake-up is lost, and only the first waker after a sleep pays for
 * a system call. */
static void wake_word(RingObject *r, int off)
{
    _Atomic uint32_t *word = A32(r->ctrl + off);
    uint32_t w = atomic_load(word);
    if ((w & 1u) && atomic_compare_exchange_strong(word, &w, (w + 2u) & ~1u))
        shmkit_futex_wake(word, INT_MAX);
}

static void wake_consumers(RingObject *r, int n)
{
    (void)n;
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

/* Advance `free` over records nobody needs any more (FREED, ABORTED, PAD), returning their
 * space to producers in ring order. Returns bytes advanced, or RS_ERROR. */
/* Move `head` past records no consumer needs (PAD, ABORTED, FREED, TAKEN). Consumers do this
 * as they walk; producers short of room do it too, so a PAD at the head never waits for a
 * consumer to come by. */
static void help_head(RingObject *r)
{
    char *c = r->ctrl;
    for (uint64_t steps = 0; steps <= r->cap / HDR + 1; steps++) {
        uint64_t h = ld_acq(c + C_HEAD);
        uint64_t f = ld_acq(c + C_FREE);
        if (h < f || h - f >= r->cap || (h & 15))
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
        if (h < f || h - f > r->cap || (f & 15)) {
            if (ld_acq(c + C_FREE) != f)
                continue;
            return corrupt(r, "the free cursor is not behind the head cursor", f);
        }
        /* Walk the run of records nobody needs, then hand it all back with one CAS. */
        uint64_t p = f;
        const char *why = NULL;
        while (p < h) {
            uint64_t w = ld_acq(rec(r, p));
            unsigned st = W_ST(w);
            if (W_TAG(w) != tag_of(p) || st == ST_VACANT || st == ST_CLAIMED || st == ST_COMMITTED ||
                st == ST_RESERVED || st > ST_PAD || st == 0) {
                why = "a record the head cursor passed has an invalid header";
                break;
            }
            if (st == ST_TAKEN)
                break; /* a consumer is still copying it */
            uint64_t total = rec_total(r, p, w, NULL);
            if (total == 0 || total > h - p) {
                why = "a freed record has an impossible length";
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

/* One attempt to reserve records for the payload lengths lens[0..n-1], in order. R_OK: *got
 * (1..n) records starting at *pos are RESERVED by `tid`, laid out back to back (a batch is
 * claimed with one CAS and never spans the end of the ring). R_FULL: no room for lens[0] now.
 * R_BUSY: another producer is between its claim and its reservation (*busy = that header
 * word). R_CLOSED: the channel is closed. */
static int try_reserve(RingObject *r, const uint64_t *lens, int n, uint32_t tid, uint64_t *pos,
                       int *got, uint64_t *busy)
{
    char *c = r->ctrl;
    uint64_t total = HDR + round16(lens[0]);
    for (uint64_t iter = 0; iter <= r->cap / HDR + 64; iter++) {
        uint64_t t = ld_acq(c + C_TAIL);
        uint64_t f = ld_acq(c + C_FREE); /* read after t: t - f can only shrink */
        if (t < f) {
            /* The tail hint lags behind records already consumed: `free` is a boundary too. */
            cas64_v(c + C_TAIL, t, f);
            continue;
        }
        if (t - f > r->cap || (t & 15))
            return corrupt(r, "the tail cursor is outside the ring", t);
        uint64_t off = ring_off(r, t);
        char *h = r->ring + off;
        uint64_t w = ld_acq(h);
        unsigned st = W_ST(w);
        if (W_TAG(w) != tag_of(t)) {
            if (ld_acq(c + C_TAIL) != t)
                continue;
            return corrupt(r, "the record at the tail cursor has a header from another position", t);
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
            if (!cas64(h, &w, mkw(t, ST_CLAIMED, tid)))
                continue;
            /* seq_cst load after the claim: pairs with the closer's store and the consumer's
             * check order (closed, then VACANT) so no put succeeds unseen after a close. */
            if (!pad && atomic_load(A32(c + C_CLOSED))) {
                st_rel(h, mkw(t, ST_VACANT, 0));
                wake_consumers(r, INT_MAX);
                return RS_CLOSED;
            }
            /* The batch's later headers live in room we now own; they become reachable only
             * through the first header, published last. */
            uint64_t p = t + total;
            for (int i = 1; i < k; i++) {
                char *hp = rec(r, p);
                st_rlx(hp + 8, lens[i]);
                st_rlx(hp, mkw(p, ST_RESERVED, tid));
                p += HDR + round16(lens[i]);
            }
            st_rlx(h + 8, pad ? need - HDR : lens[0]);
            st_rlx(rec(r, t + run), mkw(t + run, ST_VACANT, 0));
            /* release: lengths, later headers and the next VACANT marker come with the state. */
            st_rel(h, mkw(t, pad ? ST_PAD : ST_RESERVED, pad ? 0 : tid));
            cas64_v(c + C_TAIL, t, t + run);
            if (pad)
                continue;
            *pos = t;
            *got = k;
            return RS_OK;
        }
        if (st == ST_CLAIMED) {
            *busy = w;
            return RS_BUSY;
        }
        if (st < ST_VACANT || st > ST_PAD)
            return corrupt(r, "a record header has an invalid state", t);
        /* Its length is known: help the tail past it. */
        uint64_t rt = rec_total(r, t, w, NULL);
        if (rt == 0 || t + rt > f + r->cap) {
            if (ld_acq(c + C_TAIL) != t || (rt != 0 && ld_acq(c + C_FREE) != f))
                continue;
            return corrupt(r, "a record at the tail has an impossible length", t);
        }
        cas64_v(c + C_TAIL, t, t + rt);
    }
    return RS_BUSY;
}

/* RESERVED(tid) -> COMMITTED or ABORTED. */
static int finish_reserved(RingObject *r, uint64_t pos, uint32_t tid, unsigned to)
{
    if (!cas64_v(rec(r, pos), mkw(pos, ST_RESERVED, tid), mkw(pos, to, 0)))
        return corrupt(r, "a record changed while this process was writing it", pos);
    return RS_OK;
}

/* ---- consumer side ----------------------------------------------------------------------- */

/* One attempt to take the first committed record. RS_OK: the record at *pos is TAKEN by
 * `tid`, *len its payload length. RS_EMPTY: nothing written. RS_BUSY: only records still being
 * written (*busy = header word of the first). */
static int try_take(RingObject *r, uint32_t tid, uint64_t *pos, uint64_t *len, uint64_t *busy)
{
    char *c = r->ctrl;
    for (int restarts = 0; restarts < 1000000; restarts++) {
        uint64_t h = ld_acq(c + C_HEAD);
        uint64_t f = ld_acq(c + C_FREE);
        if (h < f || h - f > r->cap || (h & 15)) {
            if (ld_acq(c + C_HEAD) != h)
                continue;
            return corrupt(r, "the head cursor is outside the ring", h);
        }
        uint64_t p = h;
        int at_head = 1, found_busy = 0, restart = 0;
        /* Records still being written that this walk stepped past, and their header words. */
        uint64_t skipped_pos[SKIP_MAX], skipped_word[SKIP_MAX];
        int nskip = 0;
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
                return corrupt(r, "the records run past the ring's capacity", p);
            }
            char *rp = rec(r, p);
            uint64_t w = ld_acq(rp);
            unsigned st = W_ST(w);
            if (W_TAG(w) != tag_of(p) || st < ST_VACANT || st > ST_PAD) {
                if (ld_acq(c + C_HEAD) != h)
                    break;
                return corrupt(r, "a record header does not match its position", p);
            }
            if (st == ST_VACANT)
                return found_busy ? RS_BUSY : RS_EMPTY;
            if (st == ST_CLAIMED) {
                if (!found_busy)
                    *busy = w;
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
                return corrupt(r, "a record has an impossible length", p);
            }
            if (st == ST_COMMITTED) {
                /* Per-producer order: a producer commits a record before it claims its next
                 * one, so if a record we stepped past is still RESERVED now (after our acquire
                 * load of this later COMMITTED one), it belongs to another producer. If it
                 * changed meanwhile, it may be this one's predecessor: walk again. */
                for (int i = 0; i < nskip && !restart; i++)
                    restart = ld_acq(rec(r, skipped_pos[i])) != skipped_word[i];
                if (restart)
                    break;
                if (!cas64(rp, &w, mkw(p, ST_TAKEN, tid)))
                    continue; /* lost the race for it: look at its new state */
                if (at_head)
                    cas64_v(c + C_HEAD, h, p + total);
                *pos = p;
                *len = l;
                return RS_OK;
            }
            if (st == ST_RESERVED) {
                if (!found_busy)
                    *busy = w;
                found_busy = 1;
                if (nskip == SKIP_MAX)
                    return RS_BUSY;
                skipped_pos[nskip] = p;
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

/* TAKEN(tid) -> FREED, then hand the space back. */
static int release_taken(RingObject *r, uint64_t pos, uint32_t tid)
{
    if (!cas64_v(rec(r, pos), mkw(pos, ST_TAKEN, tid), mkw(pos, ST_FREED, 0)))
        return corrupt(r, "a record changed while this process was reading it", pos);
    return RS_OK;
}

/* ---- recovery ------------------------------------------------------------------------------ */

/* Finish what dead owners left from `free` to the end of the written records. Returns 1 when
 * something changed, 0 when not, RS_ERROR on corruption. Slow path: reads /proc. */
static int recover(RingObject *r)
{
    char *c = r->ctrl;
    int changed = 0;
    uint32_t alive_cache[8] = {0};
    int n_alive = 0;
    r->last_recover_ns = shmkit_monotonic_ns();
    uint64_t f = ld_acq(c + C_FREE);
    uint64_t p = f;
    if (f & 15)
        return 0; /* corrupt: the hot paths report it */
    /* Bounded: the records that can block anyone sit near `free` or near the end. */
    for (uint64_t steps = 0; steps <= r->cap / HDR + 1 && steps < 4096; steps++) {
        if (p - f > r->cap)
            break;
        char *rp = rec(r, p);
        uint64_t w = ld_acq(rp);
        unsigned st = W_ST(w);
        if (W_TAG(w) != tag_of(p) || st < ST_VACANT || st > ST_PAD)
            break; /* moved on under us (or corrupt: the hot path reports that) */
        if (st == ST_CLAIMED || st == ST_RESERVED || st == ST_TAKEN) {
            uint32_t tid = W_TID(w);
            int known = 0;
            for (int i = 0; i < n_alive; i++)
                known |= alive_cache[i] == tid;
            if (!known && tid != shmkit_gettid() && !shmkit_task_alive(tid)) {
                unsigned to = st == ST_CLAIMED ? ST_VACANT : st == ST_RESERVED ? ST_ABORTED : ST_FREED;
                if (cas64_v(rp, w, mkw(p, to, 0))) {
                    changed = 1;
                    if (st == ST_RESERVED)
                        atomic_fetch_add(A64(c + C_ABORTED), 1);
                    else if (st == ST_TAKEN)
                        atomic_fetch_add(A64(c + C_LOST), 1);
                }
                continue; /* look at the new state */
            }
            if (!known && n_alive < 8)
                alive_cache[n_alive++] = tid;
        }
        if (st == ST_VACANT || st == ST_CLAIMED)
            break;
        uint64_t total = rec_total(r, p, w, NULL);
        if (total == 0)
            break;
        p += total;
    }
    if (changed) {
        if (help_free(r) < 0)
            return RS_ERROR;
        wake_consumers(r, INT_MAX);
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
    r->active++;
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&ts, NULL);
    Py_END_ALLOW_THREADS
    r->active--;
    return PyErr_CheckSignals();
}

/* Wait on a futex word for the counterpart, registered as a waiter. `slice_ns` bounds how
 * long before the caller looks again (recovery). Returns 0 to look again, -1 on a signal. */
static int wait_on(RingObject *r, int seq_off, int waiting_off, int64_t deadline, int64_t slice_ns,
                   int (*recheck)(RingObject *, void *), void *arg)
{
    _Atomic uint32_t *seq = A32(r->ctrl + seq_off);
    _Atomic uint32_t *waiting = A32(r->ctrl + waiting_off); /* for statistics only */
    atomic_fetch_add(waiting, 1);
    uint32_t s = atomic_fetch_or(seq, 1u) | 1u; /* seq_cst: ordered before the recheck's loads */
    int rc = recheck(r, arg);
    if (rc == 0) {
        int64_t until = shmkit_monotonic_ns() + slice_ns;
        if (deadline > 0 && deadline < until)
            until = deadline;
        r->active++;
        rc = shmkit_wait_u32(seq, s, until, 0);
        r->active--;
        rc = rc < 0 ? -1 : 0;
    } else {
        rc = rc < 0 ? -1 : 0;
    }
    atomic_fetch_sub(waiting, 1);
    return rc;
}

typedef struct {
    const uint64_t *lens;
    int n;
    int got;
    uint32_t tid;
    uint64_t *pos;
    uint64_t *len_out;
    uint64_t busy;
    int result;
} step_args;

static int recheck_reserve(RingObject *r, void *arg)
{
    step_args *a = arg;
    a->result = try_reserve(r, a->lens, a->n, a->tid, a->pos, &a->got, &a->busy);
    if (a->result == RS_ERROR)
        return -1;
    return a->result == RS_FULL ? 0 : 1;
}

static int recheck_take(RingObject *r, void *arg)
{
    step_args *a = arg;
    a->result = try_take(r, a->tid, a->pos, a->len_out, &a->busy);
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
    step_args a = {.lens = lens, .n = n, .tid = shmkit_gettid(), .pos = pos};
    unsigned busy_rounds = 0;
    for (;;) {
        a.result = try_reserve(r, lens, n, a.tid, pos, &a.got, &a.busy);
        *got = a.got;
        if (a.result == RS_OK || a.result == RS_ERROR || a.result == RS_CLOSED)
            return a.result;
        if (atomic_load(A32(r->ctrl + C_CLOSED)))
            return RS_CLOSED;
        if (a.result == RS_BUSY) {
            /* Another producer is mid-claim (a few instructions unless it was descheduled
             * or killed): back off, and check it is alive now and then. */
            if (busy_rounds > 64 && recover_due(r) && recover(r) < 0)
                return RS_ERROR;
            if (deadline_passed(deadline) && busy_rounds > (deadline == 0 ? 200u : 0u))
                return RS_FULL;
            if (nap(r, busy_rounds++) < 0)
                return RS_ERROR;
            continue;
        }
        busy_rounds = 0;
        if (recover_due(r)) {
            int rc = recover(r);
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
        if (wait_on(r, C_SPACE_SEQ, C_PROD_WAITING, deadline, RECOVER_SLICE_NS, recheck_reserve, &a) < 0)
            return RS_ERROR;
        *got = a.got;
        if (a.result == RS_OK || a.result == RS_CLOSED)
            return a.result;
    }
}

/* Take a record, waiting until `deadline`. RS_OK, RS_EMPTY (timed out), RS_CLOSED, RS_ERROR. */
static int take_wait(RingObject *r, int64_t deadline, uint64_t *pos, uint64_t *len)
{
    step_args a = {.tid = shmkit_gettid(), .pos = pos, .len_out = len};
    for (;;) {
        a.result = try_take(r, a.tid, pos, len, &a.busy);
        if (a.result == RS_OK || a.result == RS_ERROR)
            return a.result;
        if (a.result == RS_EMPTY && atomic_load(A32(r->ctrl + C_CLOSED))) {
            /* closed was seen before this second look: anything put before the close is in. */
            a.result = try_take(r, a.tid, pos, len, &a.busy);
            if (a.result == RS_OK || a.result == RS_ERROR)
                return a.result;
            if (a.result == RS_EMPTY)
                return RS_CLOSED;
        }
        if (a.result == RS_BUSY && recover_due(r)) {
            /* Blocked by a record someone is writing: is that someone alive? */
            int rc = recover(r);
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
        if (wait_on(r, C_DATA_SEQ, C_CONS_WAITING, deadline, slice, recheck_take, &a) < 0)
            return RS_ERROR;
        if (a.result == RS_OK)
            return RS_OK;
    }
}

/* ---- copying ------------------------------------------------------------------------------- */

static void copy_maybe_nogil(RingObject *r, char *dst, const char *src, size_t n)
{
    if (n >= NOGIL_COPY) {
        r->active++;
        Py_BEGIN_ALLOW_THREADS
        memcpy(dst, src, n);
        Py_END_ALLOW_THREADS
        r->active--;
    } else {
        memcpy(dst, src, n);
    }
}

static inline void count(RingObject *r, int slot_field, unsigned role, uint64_t n)
{
    if (r->slot != NULL) {
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
    if (rc == RS_CLOSED) {
        if (putting)
            PyErr_Format(exc_closed, "cannot put into %U: the channel was closed", r->label);
        else
            PyErr_Format(exc_closed, "%U is closed and every message has been taken", r->label);
        return NULL;
    }
    if (putting)
        PyErr_Format(exc_full, deadline == 0 ? "%U is full" : "%U is still full after the timeout",
                     r->label);
    else
        PyErr_Format(exc_empty, deadline == 0 ? "%U is empty" : "%U is still empty after the timeout",
                     r->label);
    return NULL;
}

static int check_size(RingObject *r, Py_ssize_t n)
{
    if ((uint64_t)n > r->max_message) {
        PyErr_Format(exc_too_large,
                     "a message of %zd bytes is larger than the %llu-byte limit of %U; split it, or "
                     "create the queue with a larger max_message (and capacity)",
                     n, (unsigned long long)r->max_message, r->label);
        return -1;
    }
    return 0;
}

/* Borrow the bytes of `obj`: bytes objects directly, anything else through the buffer
 * protocol (must be C-contiguous). *view_used tells whether to release `view`. */
static int get_data(PyObject *obj, Py_buffer *view, const char **data, Py_ssize_t *len, int *view_used)
{
    *view_used = 0;
    if (PyBytes_CheckExact(obj)) {
        *data = PyBytes_AS_STRING(obj);
        *len = PyBytes_GET_SIZE(obj);
        return 0;
    }
    if (!PyObject_CheckBuffer(obj) || PyUnicode_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "data must be a bytes-like object, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    *view_used = 1;
    *data = view->buf;
    *len = view->len;
    return 0;
}

/* ---- argument parsing (fastcall) ----------------------------------------------------------- */

/* Parse (first, timeout=None) or (timeout=None) from a vectorcall argument list. */
static int parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames,
                      int want_first, PyObject **first, PyObject **timeout)
{
    Py_ssize_t max_pos = want_first ? 2 : 1;
    *timeout = Py_None;
    if (nargs > max_pos) {
        PyErr_Format(PyExc_TypeError, "%s() takes at most %zd positional arguments (%zd given)", fname,
                     max_pos, nargs);
        return -1;
    }
    if (want_first) {
        if (nargs < 1) {
            if (kwnames == NULL || PyTuple_GET_SIZE(kwnames) == 0) {
                PyErr_Format(PyExc_TypeError, "%s() missing its first argument", fname);
                return -1;
            }
        } else {
            *first = args[0];
        }
    }
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
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fname, k);
                return -1;
            }
        }
        if (want_first && nargs < 1 && *first == NULL) {
            PyErr_Format(PyExc_TypeError, "%s() missing its first argument", fname);
            return -1;
        }
    }
    return 0;
}

/* ---- put ---------------------------------------------------------------------------------- */

static int put_one(RingObject *r, const char *data, Py_ssize_t n, int64_t deadline, int wake)
{
    if (check_size(r, n) < 0)
        return RS_ERROR;
    uint64_t pos, len = (uint64_t)n;
    int got;
    int rc = reserve_wait(r, &len, 1, deadline, &pos, &got);
    if (rc != RS_OK)
        return rc;
    copy_maybe_nogil(r, rec(r, pos) + HDR, data, (size_t)n);
    if (finish_reserved(r, pos, shmkit_gettid(), ST_COMMITTED) < 0)
        return RS_ERROR;
    if (wake)
        wake_consumers(r, 1);
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
    if (get_data(obj, &view, &data, &n, &used) < 0)
        return NULL;
    int rc = put_one(r, data, n, deadline, 1);
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
    if (parse_args("put", args, nargs, kwnames, 1, &data, &timeout) < 0)
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
"Put every message of an iterable, in order, waking consumers once for the batch.\n\n"
"`timeout` bounds the whole call. On Full, the messages before the one that did not fit\n"
"were put (the exception's `.put_count` says how many).");

#define PUT_BATCH 64

static PyObject *Ring_put_many(RingObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *items = NULL, *timeout;
    if (parse_args("put_many", args, nargs, kwnames, 1, &items, &timeout) < 0)
        return NULL;
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err || check_usable(self, 1) < 0)
        return NULL;
    PyObject *seq = PySequence_Fast(items, "put_many() needs an iterable of bytes-like objects");
    if (seq == NULL)
        return NULL;
    Py_ssize_t done = 0, total = PySequence_Fast_GET_SIZE(seq);
    PyObject **objs = PySequence_Fast_ITEMS(seq);
    uint32_t tid = shmkit_gettid();
    int rc = RS_OK;
    /* Up to PUT_BATCH messages are reserved with one claim, copied, then committed in order. */
    Py_buffer views[PUT_BATCH];
    const char *datas[PUT_BATCH];
    int used[PUT_BATCH];
    uint64_t lens[PUT_BATCH];
    PyObject *et = NULL, *ev = NULL, *etb = NULL; /* a bad item's error, raised after the good ones */
    while (done < total && rc == RS_OK && et == NULL) {
        int k = 0;
        while (k < PUT_BATCH && done + k < total) {
            Py_ssize_t n;
            if (get_data(objs[done + k], &views[k], &datas[k], &n, &used[k]) < 0)
                break;
            if (check_size(self, n) < 0) {
                if (used[k])
                    PyBuffer_Release(&views[k]);
                break;
            }
            lens[k++] = (uint64_t)n;
        }
        if (PyErr_Occurred())
            PyErr_Fetch(&et, &ev, &etb);
        if (k > 0) {
            uint64_t pos;
            int got = 0;
            rc = reserve_wait(self, lens, k, deadline, &pos, &got);
            if (rc == RS_OK) {
                int i = 0;
                for (; i < got; i++) {
                    copy_maybe_nogil(self, rec(self, pos) + HDR, datas[i], (size_t)lens[i]);
                    if (finish_reserved(self, pos, tid, ST_COMMITTED) < 0) {
                        rc = RS_ERROR;
                        break;
                    }
                    pos += HDR + round16(lens[i]);
                }
                done += i;
                count(self, SLOT_PUTS, ROLE_PRODUCER, (uint64_t)i);
                wake_consumers(self, i);
            }
        }
        for (int i = 0; i < k; i++)
            if (used[i])
                PyBuffer_Release(&views[i]);
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

static PyObject *copy_out(RingObject *r, uint64_t pos, uint64_t len, uint32_t tid)
{
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)len);
    if (out == NULL) {
        /* Give the message back rather than lose it: TAKEN -> COMMITTED. */
        cas64_v(rec(r, pos), mkw(pos, ST_TAKEN, tid), mkw(pos, ST_COMMITTED, 0));
        return NULL;
    }
    copy_maybe_nogil(r, PyBytes_AS_STRING(out), rec(r, pos) + HDR, (size_t)len);
    if (release_taken(r, pos, tid) < 0) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyObject *get_obj(RingObject *r, int64_t deadline)
{
    if (check_usable(r, 1) < 0)
        return NULL;
    uint64_t pos, len;
    int rc = take_wait(r, deadline, &pos, &len);
    if (rc != RS_OK)
        return raise_result(r, rc, 0, deadline);
    PyObject *out = copy_out(r, pos, len, shmkit_gettid());
    if (out == NULL)
        return NULL;
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
    if (parse_args("get", args, nargs, kwnames, 0, NULL, &timeout) < 0)
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
    if (parse_args("get_many", args, nargs, kwnames, 1, &maxobj, &timeout) < 0)
        return NULL;
    if (!PyLong_Check(maxobj)) {
        PyErr_Format(PyExc_TypeError, "max_messages must be an int, not %.100s", Py_TYPE(maxobj)->tp_name);
        return NULL;
    }
    Py_ssize_t maxn = PyLong_AsSsize_t(maxobj);
    if (maxn == -1 && PyErr_Occurred())
        return NULL;
    if (maxn < 1) {
        PyErr_Format(PyExc_ValueError, "max_messages must be at least 1, not %zd", maxn);
        return NULL;
    }
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err || check_usable(self, 1) < 0)
        return NULL;
    uint32_t tid = shmkit_gettid();
    uint64_t pos, len, busy;
    int rc = take_wait(self, deadline, &pos, &len);
    if (rc != RS_OK)
        return raise_result(self, rc, 0, deadline);
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        cas64_v(rec(self, pos), mkw(pos, ST_TAKEN, tid), mkw(pos, ST_COMMITTED, 0));
        return NULL;
    }
    Py_ssize_t got = 0;
    for (;;) {
        PyObject *msg = copy_out(self, pos, len, tid);
        if (msg == NULL || PyList_Append(list, msg) < 0) {
            Py_XDECREF(msg);
            Py_DECREF(list);
            help_free(self);
            return NULL;
        }
        Py_DECREF(msg);
        got++;
        if (got >= maxn)
            break;
        rc = try_take(self, tid, &pos, &len, &busy);
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
        PyErr_Format(PyExc_ValueError, "%llu is not a record position", v);
        return -1;
    }
    *pos = v;
    (void)r;
    return 0;
}

static PyObject *seg_offset(RingObject *r, uint64_t pos)
{
    return PyLong_FromSsize_t((Py_ssize_t)(rec(r, pos) + HDR - (char *)r->view.buf));
}

PyDoc_STRVAR(reserve_doc, "_reserve(size, timeout=None) -> (position, offset)\n--\n\n"
"Reserve a record of `size` bytes for writing in place at `offset` of the segment buffer.\n"
"Finish it with _commit(position) or _abort(position) from the same thread.");

static PyObject *Ring_reserve(RingObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *sizeobj = NULL, *timeout;
    if (parse_args("reserve", args, nargs, kwnames, 1, &sizeobj, &timeout) < 0)
        return NULL;
    if (!PyLong_Check(sizeobj)) {
        PyErr_Format(PyExc_TypeError, "size must be an int, not %.100s", Py_TYPE(sizeobj)->tp_name);
        return NULL;
    }
    Py_ssize_t n = PyLong_AsSsize_t(sizeobj);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    if (n < 0) {
        PyErr_Format(PyExc_ValueError, "size must be >= 0, not %zd", n);
        return NULL;
    }
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err || check_usable(self, 1) < 0 || check_size(self, n) < 0)
        return NULL;
    uint64_t pos, len = (uint64_t)n;
    int got;
    int rc = reserve_wait(self, &len, 1, deadline, &pos, &got);
    if (rc != RS_OK)
        return raise_result(self, rc, 1, deadline);
    PyObject *off = seg_offset(self, pos);
    if (off == NULL) {
        finish_reserved(self, pos, shmkit_gettid(), ST_ABORTED);
        return NULL;
    }
    return Py_BuildValue("(KN)", (unsigned long long)pos, off);
}

static PyObject *finish_py(RingObject *self, PyObject *arg, unsigned to)
{
    uint64_t pos;
    if (check_usable(self, 1) < 0 || pos_arg(self, arg, &pos) < 0)
        return NULL;
    if (finish_reserved(self, pos, shmkit_gettid(), to) < 0)
        return NULL;
    wake_consumers(self, 1);
    if (to == ST_COMMITTED)
        count(self, SLOT_PUTS, ROLE_PRODUCER, 1);
    Py_RETURN_NONE;
}

static PyObject *Ring_commit(RingObject *self, PyObject *arg) { return finish_py(self, arg, ST_COMMITTED); }
static PyObject *Ring_abort(RingObject *self, PyObject *arg) { return finish_py(self, arg, ST_ABORTED); }

PyDoc_STRVAR(take_doc, "_take(timeout=None) -> (position, offset, length)\n--\n\n"
"Take the next message for reading in place; hand it back with _release(position).");

static PyObject *Ring_take(RingObject *self, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames)
{
    PyObject *timeout;
    if (parse_args("take", args, nargs, kwnames, 0, NULL, &timeout) < 0)
        return NULL;
    int err;
    int64_t deadline = deadline_from(timeout, &err);
    if (err || check_usable(self, 1) < 0)
        return NULL;
    uint64_t pos, len;
    int rc = take_wait(self, deadline, &pos, &len);
    if (rc != RS_OK)
        return raise_result(self, rc, 0, deadline);
    PyObject *off = seg_offset(self, pos);
    if (off == NULL) {
        cas64_v(rec(self, pos), mkw(pos, ST_TAKEN, shmkit_gettid()), mkw(pos, ST_COMMITTED, 0));
        return NULL;
    }
    return Py_BuildValue("(KNK)", (unsigned long long)pos, off, (unsigned long long)len);
}

static PyObject *Ring_release(RingObject *self, PyObject *arg)
{
    uint64_t pos;
    if (check_usable(self, 1) < 0 || pos_arg(self, arg, &pos) < 0)
        return NULL;
    if (release_taken(self, pos, shmkit_gettid()) < 0 || (producers_sleep(self) && help_free(self) < 0))
        return NULL;
    count(self, SLOT_GETS, ROLE_CONSUMER, 1);
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
    int rc = recover(self);
    if (rc < 0)
        return NULL;
    return PyBool_FromLong(rc);
}

/* Read-only walk from `free` to the end: depth and who is mid-operation. Tolerates racing
 * writers (it retries, then reports what it saw); reports corruption in the result. */
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
        if (f & 15) {
            problem = "the free cursor is not aligned";
            break;
        }
        for (uint64_t steps = 0;; steps++) {
            if (p - f > self->cap || steps > self->cap / HDR + 1) {
                problem = "the records run past the ring's capacity";
                break;
            }
            uint64_t w = ld_acq(rec(self, p));
            unsigned st = W_ST(w);
            if (W_TAG(w) != tag_of(p) || st < ST_VACANT || st > ST_PAD) {
                problem = "a record header does not match its position";
                break;
            }
            counts[st]++;
            if (st == ST_VACANT || st == ST_CLAIMED)
                break;
            uint64_t len, total = rec_total(self, p, w, &len);
            if (total == 0) {
                problem = "a record has an impossible length";
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
"checked header and must match the control block. slot_offset is -1 for no slot.");

static PyObject *Ring_attach(RingObject *self, PyObject *args)
{
    PyObject *buffer, *label, *hint;
    Py_ssize_t ctrl_off, ring_off, slot_off;
    unsigned long long cap, maxm;
    if (!PyArg_ParseTuple(args, "OnnKKnUU", &buffer, &ctrl_off, &ring_off, &cap, &maxm, &slot_off, &label, &hint))
        return NULL;
    if (self->has_view) {
        PyErr_SetString(PyExc_ValueError, "ring is already attached");
        return NULL;
    }
    if (shmkit_gettid() > TID_MASK) {
        PyErr_SetString(PyExc_OSError, "thread ids above 2**22 are not supported");
        return NULL;
    }
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
    if (cap < 64 || (cap & 15) || cap > (1ULL << 42) || maxm > cap - 2 * HDR)
        why = "its capacity parameters are impossible";
    else if (ctrl_off < 0 || (ctrl_off & 63) || ctrl_off + SHMKIT_RING_CTRL_SIZE > ring_off || (ring_off & 15) ||
             ring_off > size || (uint64_t)(size - ring_off) < cap)
        why = "the ring does not fit in the segment";
    else if (slot_off != -1 && (slot_off < ctrl_off + C_SLOTS || slot_off + SLOT_SIZE > ring_off || (slot_off & 7)))
        why = "bad attachment slot";
    else if (ld_acq(base + ctrl_off + C_MAGIC) != SHMKIT_RING_MAGIC)
        why = "its control block has no ring magic";
    else if (ld_acq(base + ctrl_off + C_CAPACITY) != cap || ld_acq(base + ctrl_off + C_MAX_MESSAGE) != maxm)
        why = "its control block disagrees with its header";
    if (why != NULL) {
        PyBuffer_Release(&self->view);
        PyErr_Format(exc_corrupt ? exc_corrupt : PyExc_ValueError, "%U is corrupt: %s%U", label, why, hint);
        return NULL;
    }
    self->has_view = 1;
    self->writable = writable;
    self->ctrl = base + ctrl_off;
    self->ring = base + ring_off;
    self->slot = slot_off >= 0 && writable ? base + slot_off : NULL;
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
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError, "cannot close %U: zero-copy views of its memory are still "
                     "alive; release them first", self->label);
        return NULL;
    }
    if (self->active > 0) {
        PyErr_Format(PyExc_BufferError, "cannot close %U: other threads are blocked in it", self->label);
        return NULL;
    }
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
    self->label = PyUnicode_FromString("queue");
    self->hint = PyUnicode_FromString("");
    if (self->label == NULL || self->hint == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* The segment as a buffer: queue.py makes a fresh memoryview of the Ring for every zero-copy
 * block, so the export count of that view's managed buffer tells whether anything (a numpy
 * array, a slice) still points into the ring after the block. */
static int Ring_getbuffer(RingObject *self, Py_buffer *view, int flags)
{
    if (!self->has_view) {
        PyErr_Format(PyExc_BufferError, "%U is closed in this process", self->label);
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
"Write an empty control block and the first VACANT marker (the creator, before publishing).");

static PyObject *py_ring_init(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *buffer;
    Py_ssize_t ctrl_off, ring_off;
    unsigned long long cap, maxm;
    if (!PyArg_ParseTuple(args, "OnnKK", &buffer, &ctrl_off, &ring_off, &cap, &maxm))
        return NULL;
    if (cap < 64 || (cap & 15) || cap > (1ULL << 42) || maxm > cap - 2 * HDR) {
        PyErr_SetString(PyExc_ValueError, "impossible ring capacity or max_message");
        return NULL;
    }
    if (ring_off < ctrl_off + SHMKIT_RING_CTRL_SIZE || (ring_off & 15) || (ctrl_off & 63)) {
        PyErr_SetString(PyExc_ValueError, "bad ring offsets");
        return NULL;
    }
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

static PyObject *py_ring_setup(PyObject *module, PyObject *args)
{
    (void)module;
    PyObject *c, *e, *f, *cl, *tl;
    if (!PyArg_ParseTuple(args, "OOOOO", &c, &e, &f, &cl, &tl))
        return NULL;
    Py_INCREF(c);
    Py_XSETREF(exc_corrupt, c);
    Py_INCREF(e);
    Py_XSETREF(exc_empty, e);
    Py_INCREF(f);
    Py_XSETREF(exc_full, f);
    Py_INCREF(cl);
    Py_XSETREF(exc_closed, cl);
    Py_INCREF(tl);
    Py_XSETREF(exc_too_large, tl);
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
    {"ring_setup", py_ring_setup, METH_VARARGS,
     "ring_setup(CorruptSegmentError, Empty, Full, QueueClosed, MessageTooLargeError): the classes Ring raises."},
    {NULL, NULL, 0, NULL},
};

int shmkit_init_ring(PyObject *module)
{
    if (PyType_Ready(&RingType) < 0)
        return -1;
    Py_INCREF(&RingType);
    if (PyModule_AddObject(module, "Ring", (PyObject *)&RingType) < 0) {
        Py_DECREF(&RingType);
        return -1;
    }
    /* Exceptions default to builtins until queue.py hands over shmkit's classes. */
    exc_corrupt = Py_NewRef(PyExc_ValueError);
    exc_empty = Py_NewRef(PyExc_LookupError);
    exc_full = Py_NewRef(PyExc_OverflowError);
    exc_closed = Py_NewRef(PyExc_EOFError);
    exc_too_large = Py_NewRef(PyExc_ValueError);
    if (PyModule_AddIntConstant(module, "RING_CTRL_SIZE", SHMKIT_RING_CTRL_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "RING_SLOTS", SHMKIT_RING_SLOTS) < 0 ||
        PyModule_AddIntConstant(module, "RING_SLOTS_OFFSET", C_SLOTS) < 0 ||
        PyModule_AddIntConstant(module, "RING_SLOT_SIZE", SLOT_SIZE) < 0 ||
        PyModule_AddIntConstant(module, "RING_RECORD_HEADER", HDR) < 0)
        return -1;
    return PyModule_AddFunctions(module, ring_functions);
}
