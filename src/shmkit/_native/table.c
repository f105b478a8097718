/* The hot path of SharedDict: a hash table in shared memory with lock-free readers, one writer
 * at a time, and crash-consistent publication. dict.py owns the API, pickling, errors and the
 * layout constants' documentation (docs/data.md draws the whole layout).
 *
 * Memory (offsets from the segment start; the typed header is layout.py's):
 *
 *   128  control block (640 bytes): the robust writer mutex (sync.h, 64 bytes reserved),
 *        the index generation, `dirty`, counters, free-list heads and their bitmap
 *   768  index area 0: nslots x 16-byte slots {u64 ref, u32 hint, u32 0}
 *        index area 1: the same (the next generation is built here, then published)
 *        heap: blocks in 16-byte units
 *
 * A slot's ref is 0 (empty), stamp << 32 (tombstone) or unit | stamp << 32: the block's
 * position in 16-byte units from the segment start, and a 32-bit stamp unique per write.
 * A live block {u32 units, u32 flags, u32 klen, u32 kinds, u64 vlen, u64 hash, key, value}
 * is never modified while published (except `flags`, which readers ignore).
 *
 * Writers (serialized by the mutex) never change a published block: they write the new entry
 * into free heap space, publish it with one release store of the slot's ref, and only then
 * free the old block. A writer killed at any instruction therefore leaves every key with its
 * old or its new value. Heap bookkeeping (free lists, counters) may be half-updated by such a
 * writer, so every write sets `dirty` after taking the lock and clears it before releasing;
 * the next writer that finds `dirty` set rebuilds all bookkeeping from the index (`repair`),
 * which also reclaims the interrupted write's block: only blocks referenced by the index are
 * owned.
 *
 * Readers take no lock. They load the generation and the slot ref (acquire), read the block,
 * issue an acquire fence and check that ref and generation are unchanged; writers issue a
 * release fence before writing into any memory that was once published (freed blocks, the
 * inactive index area). A block can only be freed after its slot was republished, so a reader
 * that saw any such write also sees the new ref and retries. ABA would need 2**32 writes
 * during one read. After many retries a reader takes the writer lock.
 *
 * The index never shrinks in place: tombstones are cleaned by building the other area and
 * publishing it by bumping the generation. Every offset and length read from the segment is
 * checked against the heap bounds captured at attach time; damage gives ST_CORRUPT with a
 * reason, never a crash, and every loop is bounded.
 */
#include "sync.h"

#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* Status codes returned to dict.py (which turns them into exceptions). */
#define ST_OK 0
#define ST_NOT_FOUND 1
#define ST_FULL_HEAP 2
#define ST_FULL_KEYS 3
#define ST_CORRUPT 4
#define ST_TIMEOUT 5
#define ST_READONLY 6
#define ST_TOO_LARGE 7
#define ST_BUSY 8
#define ST_BAD_KEY 9
#define ST_CLOSED 10
#define ST_REENTERED 11 /* called from code that ran inside this thread's own locked call */
#define ST_ERROR (-1) /* a Python exception is set */

/* Control block. */
#define CTL_LOCK 128 /* the whole cache line 128..191 belongs to the mutex */
#define CTL_LOCK_AREA 64
#define CTL_GEN 192 /* own cache line: readers load it on every lookup */
#define CTL_STAMP 256
#define CTL_COUNT 264
#define CTL_TOMBS 272
#define CTL_USED 280
#define CTL_BITMAP 288
#define CTL_REPAIRS 304
#define CTL_DIRTY 312
#define CTL_HEADS 320
#define NCLASS 96
#define CTL_RECOVERIES 704
#define CTL_END 768

_Static_assert(SHMKIT_MUTEX_SIZE <= CTL_LOCK_AREA, "the writer mutex outgrew its cache line");

#define SLOT 16
#define UNIT 16
#define BLK_HDR 32
#define MIN_UNITS 2 /* a free block needs its 16-byte header and 4-byte footer */

/* Block fields. */
#define B_SIZE 0
#define B_FLAGS 4
#define B_KLEN 8
#define B_KINDS 12
#define B_VLEN 16
#define B_HASH 24
#define F_NEXT 8
#define F_PREV 12
#define FL_FREE 1u
#define FL_PREV_FREE 2u

#define READ_ATTEMPTS 64
#define BIG_COPY (1u << 20) /* copies at least this large run without the GIL */
#define TOMBSTONE_LIMIT(n) ((n) - (n) / 8)

typedef struct {
    PyObject_HEAD
    Py_buffer view;
    char *base;
    uint64_t size;
    int attached;
    int readonly;
    int busy;
    unsigned busy_epoch; /* see SHMKIT_BUSY in sync.h */
    uint64_t nslots, mask;
    uint64_t idx[2];
    uint64_t lo, hi; /* heap bounds in units */
    uint64_t max_keys;
    int64_t timeout_ns;
    shmkit_spin spin; /* how long taking the writer lock spins before sleeping */
    const char *why; /* the last damage found, for the error message */
    uint64_t where;
} Table;

typedef struct {
    const char *p;
    uint64_t n;
    int kind;
    uint64_t h;
    uint32_t hint;
} Key;

typedef struct {
    uint64_t off;
    uint32_t units, klen;
    int kkind, vkind;
    uint64_t vlen, hash;
} Blk;

/* ---- memory access ------------------------------------------------------------------------ */

static inline _Atomic uint32_t *p32(Table *t, uint64_t off) { return (_Atomic uint32_t *)(t->base + off); }
static inline _Atomic uint64_t *p64(Table *t, uint64_t off) { return (_Atomic uint64_t *)(t->base + off); }
static inline uint32_t ld32(Table *t, uint64_t off) { return atomic_load_explicit(p32(t, off), memory_order_relaxed); }
static inline uint64_t ld64(Table *t, uint64_t off) { return atomic_load_explicit(p64(t, off), memory_order_relaxed); }
static inline uint64_t acq64(Table *t, uint64_t off) { return atomic_load_explicit(p64(t, off), memory_order_acquire); }
static inline void st32(Table *t, uint64_t off, uint32_t v) { atomic_store_explicit(p32(t, off), v, memory_order_relaxed); }
static inline void st64(Table *t, uint64_t off, uint64_t v) { atomic_store_explicit(p64(t, off), v, memory_order_relaxed); }
static inline void rel64(Table *t, uint64_t off, uint64_t v) { atomic_store_explicit(p64(t, off), v, memory_order_release); }

static int corrupt(Table *t, const char *why, uint64_t where)
{
    t->why = why;
    t->where = where;
    return ST_CORRUPT;
}

/* Copy n bytes; large copies release the GIL (`busy` keeps the mapping attached meanwhile). */
static void copy_bytes(Table *t, void *dst, const void *src, uint64_t n)
{
    if (n < BIG_COPY) {
        memcpy(dst, src, n);
        return;
    }
    SHMKIT_BUSY_ENTER(t);
    Py_BEGIN_ALLOW_THREADS
    memcpy(dst, src, n);
    Py_END_ALLOW_THREADS
    SHMKIT_BUSY_LEAVE(t);
}

/* ---- keys and hashing ----------------------------------------------------------------------- */

/* The hash is part of the on-segment format (every process must agree): do not change it
 * without a new dict format number. Little-endian reads; keys never leave the machine. */
static inline uint64_t fmix64(uint64_t h)
{
    h ^= h >> 33;
    h *= 0xff51afd7ed558ccdULL;
    h ^= h >> 33;
    h *= 0xc4ceb9fe1a85ec53ULL;
    h ^= h >> 33;
    return h;
}

static uint64_t key_hash(int kind, const char *p, uint64_t n)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ (n * 0x100000001B3ULL) ^ (uint64_t)kind;
    while (n >= 8) {
        uint64_t v;
        memcpy(&v, p, 8);
        h = (h ^ v) * 0x9FB21C651E98DF25ULL;
        h ^= h >> 29;
        p += 8;
        n -= 8;
    }
    uint64_t v = 0;
    memcpy(&v, p, n);
    h = (h ^ v) * 0xC4CEB9FE1A85EC53ULL;
    return fmix64(h);
}

/* str keys are stored as UTF-8 with kind 0, bytes keys with kind 1: 'a' and b'a' differ. */
static int key_arg(PyObject *obj, Key *k)
{
    Py_ssize_t n;
    if (PyUnicode_Check(obj)) {
        k->p = PyUnicode_AsUTF8AndSize(obj, &n);
        if (k->p == NULL)
            return ST_ERROR;
        k->kind = 0;
    } else if (PyBytes_Check(obj)) {
        k->p = PyBytes_AS_STRING(obj);
        n = PyBytes_GET_SIZE(obj);
        k->kind = 1;
    } else {
        return ST_BAD_KEY;
    }
    k->n = (uint64_t)n;
    k->h = key_hash(k->kind, k->p, k->n);
    k->hint = (uint32_t)(k->h >> 32);
    return ST_OK;
}

/* ---- blocks --------------------------------------------------------------------------------- */

/* Read a published block's header at unit u; -1 if anything is impossible. */
static int block_fields(Table *t, uint64_t u, Blk *b)
{
    if (u < t->lo || u > t->hi - MIN_UNITS)
        return -1;
    uint64_t off = u * UNIT;
    uint32_t units = ld32(t, off + B_SIZE);
    uint32_t kinds = ld32(t, off + B_KINDS);
    if (units < MIN_UNITS || units > t->hi - u)
        return -1;
    b->off = off;
    b->units = units;
    b->klen = ld32(t, off + B_KLEN);
    b->kkind = (int)(kinds & 0xff);
    b->vkind = (int)((kinds >> 8) & 0xff);
    b->vlen = ld64(t, off + B_VLEN);
    b->hash = ld64(t, off + B_HASH);
    uint64_t cap = (uint64_t)units * UNIT - BLK_HDR;
    if (b->kkind > 1 || b->vkind > 1 || (kinds >> 16) != 0 || b->klen > cap ||
        b->vlen > cap - b->klen)
        return -1;
    return 0;
}

static inline int block_matches(Table *t, const Blk *b, const Key *k)
{
    return b->hash == k->h && b->klen == k->n && b->kkind == k->kind &&
           memcmp(t->base + b->off + BLK_HDR, k->p, k->n) == 0;
}

/* The value of a block as dict.py expects it: bytes for raw values, a 1-tuple for pickles. */
static PyObject *wrap_value(PyObject *bytes, int vkind)
{
    if (bytes == NULL || vkind == 0)
        return bytes;
    PyObject *tup = PyTuple_Pack(1, bytes);
    Py_DECREF(bytes);
    return tup;
}

static PyObject *copy_value(Table *t, const Blk *b)
{
    PyObject *v = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)b->vlen);
    if (v != NULL)
        copy_bytes(t, PyBytes_AS_STRING(v), t->base + b->off + BLK_HDR + b->klen, b->vlen);
    return v;
}

static PyObject *make_key(Table *t, const Blk *b)
{
    const char *p = t->base + b->off + BLK_HDR;
    if (b->kkind == 1)
        return PyBytes_FromStringAndSize(p, b->klen);
    return PyUnicode_DecodeUTF8(p, b->klen, "strict");
}

/* ---- the writer lock ------------------------------------------------------------------------ */

#define LOCKED 0
#define LOCKED_RECOVERED 1

/* Writer-lock sections of any table this thread is inside. Python code can run inside one:
 * an allocation under the lock (the tuple of a pickled value, a scan's pairs) may start the
 * garbage collector, whose finalizers may use the same dict. Such a nested call finds the
 * lock word naming this very thread; it must not take the lock "over" (the outer call would
 * go on without it once the nested one released it), so it fails with ST_REENTERED. */
static __thread int sections;

static int table_lock(Table *t)
{
    shmkit_mutex_t *m = (shmkit_mutex_t *)(t->base + CTL_LOCK);
    int64_t deadline = t->timeout_ns < 0 ? -1 : shmkit_monotonic_ns() + t->timeout_ns;
    for (int round = 0; round < 3; round++) {
        SHMKIT_BUSY_ENTER(t);
        int rc = shmkit_mutex_lock(m, deadline, &t->spin);
        SHMKIT_BUSY_LEAVE(t);
        if (rc == SHMKIT_LOCK_ACQUIRED) {
            sections++;
            return LOCKED;
        }
        if (rc == SHMKIT_LOCK_RECOVERED) {
            st64(t, CTL_RECOVERIES, ld64(t, CTL_RECOVERIES) + 1);
            sections++;
            return LOCKED_RECOVERED;
        }
        if (rc == -ETIMEDOUT)
            return ST_TIMEOUT;
        if (rc == -EINTR)
            return ST_ERROR;
        if (rc == -EDEADLK) {
            if (sections > 0) /* this thread's own call is under way: see `sections` */
                return ST_REENTERED;
            /* The word names this thread, but the table never keeps its lock between calls:
             * a dead task with our recycled id (or a scribble) left it. Take it over. */
            uint32_t v = atomic_load_explicit(&m->word, memory_order_relaxed);
            if ((v & SHMKIT_MUTEX_OWNER_MASK) == shmkit_gettid() &&
                atomic_compare_exchange_strong(&m->word, &v, shmkit_gettid() | SHMKIT_MUTEX_WAITERS)) {
                st64(t, CTL_RECOVERIES, ld64(t, CTL_RECOVERIES) + 1);
                sections++;
                return LOCKED_RECOVERED;
            }
            continue;
        }
        errno = -rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return ST_ERROR;
    }
    return ST_TIMEOUT;
}

static void table_unlock(Table *t)
{
    sections--;
    /* -EPERM only if the word was scribbled meanwhile: nothing to undo then. */
    (void)shmkit_mutex_unlock((shmkit_mutex_t *)(t->base + CTL_LOCK), 1);
}

/* ---- the heap allocator (writer only, under the lock) --------------------------------------- */

static inline int size_class(uint64_t units)
{
    if (units < 64)
        return (int)units;
    int c = 64 + (63 - __builtin_clzll(units)) - 6;
    return c < NCLASS ? c : NCLASS - 1;
}

static inline uint64_t head_off(int c) { return CTL_HEADS + 4 * (uint64_t)c; }

static void bitmap_change(Table *t, int c, int on)
{
    uint64_t off = CTL_BITMAP + 8 * (uint64_t)(c >> 6), bit = 1ULL << (c & 63);
    uint64_t v = ld64(t, off);
    st64(t, off, on ? (v | bit) : (v & ~bit));
}

static int next_class(Table *t, int c)
{
    for (int wi = c >> 6; wi < 2; wi++) {
        uint64_t bits = ld64(t, CTL_BITMAP + 8 * (uint64_t)wi);
        if (wi == (c >> 6))
            bits &= ~0ULL << (c & 63);
        if (bits)
            return wi * 64 + __builtin_ctzll(bits);
    }
    return -1;
}

/* A free block at unit u: its size, or 0 when the header is not a plausible free block. */
static uint32_t free_size(Table *t, uint64_t u)
{
    if (u < t->lo || u > t->hi - MIN_UNITS)
        return 0;
    uint32_t sz = ld32(t, u * UNIT + B_SIZE);
    if (!(ld32(t, u * UNIT + B_FLAGS) & FL_FREE) || sz < MIN_UNITS || sz > t->hi - u)
        return 0;
    return sz;
}

static void write_free(Table *t, uint64_t u, uint32_t sz)
{
    st32(t, u * UNIT + B_SIZE, sz);
    st32(t, u * UNIT + B_FLAGS, FL_FREE);
    st32(t, (u + sz) * UNIT - 4, sz);
}

static void set_prev_free(Table *t, uint64_t u, int on)
{
    if (u >= t->hi)
        return;
    uint32_t fl = ld32(t, u * UNIT + B_FLAGS);
    st32(t, u * UNIT + B_FLAGS, on ? (fl | FL_PREV_FREE) : (fl & ~FL_PREV_FREE));
}

static int list_push(Table *t, uint64_t u, uint32_t sz)
{
    int c = size_class(sz);
    uint32_t head = ld32(t, head_off(c));
    st32(t, u * UNIT + F_NEXT, head);
    st32(t, u * UNIT + F_PREV, 0);
    if (head != 0) {
        if (free_size(t, head) == 0)
            return corrupt(t, "a free list points outside the heap or at a used block", head_off(c));
        st32(t, (uint64_t)head * UNIT + F_PREV, (uint32_t)u);
    }
    st32(t, head_off(c), (uint32_t)u);
    bitmap_change(t, c, 1);
    return ST_OK;
}

static int list_unlink(Table *t, uint64_t u, uint32_t sz)
{
    int c = size_class(sz);
    uint32_t next = ld32(t, u * UNIT + F_NEXT), prev = ld32(t, u * UNIT + F_PREV);
    if (prev != 0) {
        if (free_size(t, prev) == 0 || ld32(t, (uint64_t)prev * UNIT + F_NEXT) != u)
            return corrupt(t, "a free list link is broken", u * UNIT);
        st32(t, (uint64_t)prev * UNIT + F_NEXT, next);
    } else {
        if (ld32(t, head_off(c)) != u)
            return corrupt(t, "a free block is missing from its free list", u * UNIT);
        st32(t, head_off(c), next);
        if (next == 0)
            bitmap_change(t, c, 0);
    }
    if (next != 0) {
        if (free_size(t, next) == 0 || ld32(t, (uint64_t)next * UNIT + F_PREV) != u)
            return corrupt(t, "a free list link is broken", u * UNIT);
        st32(t, (uint64_t)next * UNIT + F_PREV, prev);
    }
    return ST_OK;
}

/* Take `need` units; *out = unit of the block (its header's size field is set). */
static int heap_alloc(Table *t, uint64_t need, uint64_t *out)
{
    /* Release: the space we are about to reuse may be read by a stale reader; everything
     * published before (the slot store that retired it) must be visible first. */
    atomic_thread_fence(memory_order_release);
    uint64_t walk_limit = (t->hi - t->lo) / MIN_UNITS + 1;
    int c = size_class(need);
    for (int cls = next_class(t, c); cls >= 0; cls = cls + 1 < NCLASS ? next_class(t, cls + 1) : -1) {
        uint32_t u = ld32(t, head_off(cls));
        if (u == 0) {
            bitmap_change(t, cls, 0); /* stale bit */
            continue;
        }
        for (uint64_t walked = 0; u != 0; walked++) {
            uint32_t sz = free_size(t, u);
            if (sz == 0 || size_class(sz) != cls || walked > walk_limit)
                return corrupt(t, "a free list is damaged", head_off(cls));
            if (sz >= need) {
                int r = list_unlink(t, u, sz);
                if (r != ST_OK)
                    return r;
                uint32_t keep = ld32(t, (uint64_t)u * UNIT + B_FLAGS) & FL_PREV_FREE;
                if (sz - need >= MIN_UNITS) {
                    uint64_t rest = u + need;
                    write_free(t, rest, (uint32_t)(sz - need));
                    r = list_push(t, rest, (uint32_t)(sz - need));
                    if (r != ST_OK)
                        return r;
                    st32(t, (uint64_t)u * UNIT + B_SIZE, (uint32_t)need);
                } else {
                    need = sz;
                    set_prev_free(t, u + sz, 0);
                }
                st32(t, (uint64_t)u * UNIT + B_FLAGS, keep);
                st64(t, CTL_USED, ld64(t, CTL_USED) + need);
                *out = u;
                return ST_OK;
            }
            u = ld32(t, (uint64_t)u * UNIT + F_NEXT);
        }
    }
    return ST_FULL_HEAP;
}

static int heap_free(Table *t, uint64_t u)
{
    /* Release: pairs with the acquire fence of readers that may still copy this block. */
    atomic_thread_fence(memory_order_release);
    if (u < t->lo || u > t->hi - MIN_UNITS)
        return corrupt(t, "an entry points outside the heap", u * UNIT);
    uint32_t sz = ld32(t, u * UNIT + B_SIZE), fl = ld32(t, u * UNIT + B_FLAGS);
    if (sz < MIN_UNITS || sz > t->hi - u || (fl & FL_FREE))
        return corrupt(t, "an entry's block is free or has an impossible size", u * UNIT);
    uint64_t used = ld64(t, CTL_USED);
    st64(t, CTL_USED, used > sz ? used - sz : 0);
    uint64_t start = u, total = sz;
    uint64_t nx = u + sz;
    if (nx < t->hi && (ld32(t, nx * UNIT + B_FLAGS) & FL_FREE)) {
        uint32_t nsz = free_size(t, nx);
        if (nsz == 0)
            return corrupt(t, "a free block has an impossible size", nx * UNIT);
        int r = list_unlink(t, nx, nsz);
        if (r != ST_OK)
            return r;
        total += nsz;
    }
    if (fl & FL_PREV_FREE) {
        if (u <= t->lo)
            return corrupt(t, "the first block claims a free predecessor", u * UNIT);
        uint32_t psz = ld32(t, u * UNIT - 4);
        if (psz < MIN_UNITS || psz > u - t->lo || free_size(t, u - psz) != psz)
            return corrupt(t, "a free block's footer does not match its header", u * UNIT - 4);
        int r = list_unlink(t, u - psz, psz);
        if (r != ST_OK)
            return r;
        start = u - psz;
        total += psz;
    }
    write_free(t, start, (uint32_t)total);
    int r = list_push(t, start, (uint32_t)total);
    if (r != ST_OK)
        return r;
    set_prev_free(t, start + total, 1);
    return ST_OK;
}

/* The whole heap as one free block. */
static void heap_reset(Table *t)
{
    atomic_thread_fence(memory_order_release);
    for (int c = 0; c < NCLASS; c++)
        st32(t, head_off(c), 0);
    st64(t, CTL_BITMAP, 0);
    st64(t, CTL_BITMAP + 8, 0);
    write_free(t, t->lo, (uint32_t)(t->hi - t->lo));
    (void)list_push(t, t->lo, (uint32_t)(t->hi - t->lo)); /* empty lists: cannot fail */
    st64(t, CTL_USED, 0);
}

/* ---- the index (writer side) ---------------------------------------------------------------- */

/* Under the lock. ST_OK: the key is in *slot (ref *ref, block *b). ST_NOT_FOUND: *ins is where
 * it would go (first tombstone on its probe path, else the empty slot ending it). */
static int probe_locked(Table *t, uint64_t area, const Key *k, uint64_t *slot, uint64_t *ref,
                        Blk *b, uint64_t *ins)
{
    uint64_t i = k->h & t->mask, tomb = 0;
    for (uint64_t step = 1; step <= t->nslots; step++) {
        uint64_t s = area + i * SLOT;
        uint64_t w = ld64(t, s);
        if (w == 0) {
            *ins = tomb ? tomb : s;
            return ST_NOT_FOUND;
        }
        uint32_t u = (uint32_t)w;
        if (u == 0) {
            if (!tomb)
                tomb = s;
        } else if (ld32(t, s + 8) == k->hint) {
            if (block_fields(t, u, b) < 0)
                return corrupt(t, "an entry points outside the heap or has impossible lengths", s);
            if (block_matches(t, b, k)) {
                *slot = s;
                *ref = w;
                return ST_OK;
            }
        }
        i = (i + step) & t->mask;
    }
    if (tomb) {
        *ins = tomb;
        return ST_NOT_FOUND;
    }
    return corrupt(t, "the index has no empty slot", area);
}

/* Copy the live entries of generation g's area into the other one (or none: `empty`) and
 * publish it. A crash before the publishing store leaves generation g untouched. */
static int index_rebuild(Table *t, uint64_t g, int empty)
{
    /* Release: stale readers of the area we overwrite check the generation afterwards. */
    atomic_thread_fence(memory_order_release);
    uint64_t src = t->idx[g & 1], dst = t->idx[(g + 1) & 1], live = 0;
    for (uint64_t i = 0; i < t->nslots; i++) {
        st64(t, dst + i * SLOT, 0);
        st32(t, dst + i * SLOT + 8, 0);
    }
    for (uint64_t i = 0; !empty && i < t->nslots; i++) {
        uint64_t w = ld64(t, src + i * SLOT);
        uint32_t u = (uint32_t)w;
        if (u == 0)
            continue;
        if (u < t->lo || u > t->hi - MIN_UNITS)
            return corrupt(t, "an entry points outside the heap", src + i * SLOT);
        uint64_t h = ld64(t, (uint64_t)u * UNIT + B_HASH), j = h & t->mask, step = 1;
        for (;; step++) {
            if (step > t->nslots)
                return corrupt(t, "more entries than index slots", src);
            uint64_t d = dst + j * SLOT;
            if (ld64(t, d) == 0) {
                st32(t, d + 8, ld32(t, src + i * SLOT + 8));
                st64(t, d, w);
                break;
            }
            j = (j + step) & t->mask;
        }
        live++;
    }
    /* Release: the new area is complete before any reader can pick it. */
    rel64(t, CTL_GEN, g + 1);
    st64(t, CTL_TOMBS, 0);
    st64(t, CTL_COUNT, live);
    return ST_OK;
}

/* ---- consistency: repair after a dead writer, and a full check ------------------------------ */

typedef struct {
    uint32_t u, units;
} Extent;

static int extent_cmp(const void *a, const void *b)
{
    uint32_t x = ((const Extent *)a)->u, y = ((const Extent *)b)->u;
    return x < y ? -1 : x > y;
}

/* Validate every entry of the current index: sorted extents of the live blocks in *out
 * (PyMem_Free it), their count in *n, tombstones in *tombs. */
static int collect_live(Table *t, Extent **out, uint64_t *n, uint64_t *tombs)
{
    uint64_t area = t->idx[ld64(t, CTL_GEN) & 1], live = 0, dead = 0;
    Extent *ext = PyMem_Malloc(sizeof(Extent) * (size_t)t->nslots);
    if (ext == NULL) {
        PyErr_NoMemory();
        return ST_ERROR;
    }
    for (uint64_t i = 0; i < t->nslots; i++) {
        uint64_t s = area + i * SLOT, w = ld64(t, s);
        uint32_t u = (uint32_t)w;
        if (w == 0)
            continue;
        if (u == 0) {
            dead++;
            continue;
        }
        Blk b;
        if (block_fields(t, u, &b) < 0) {
            PyMem_Free(ext);
            return corrupt(t, "an entry points outside the heap or has impossible lengths", s);
        }
        if (key_hash(b.kkind, t->base + b.off + BLK_HDR, b.klen) != b.hash ||
            (uint32_t)(b.hash >> 32) != ld32(t, s + 8)) {
            PyMem_Free(ext);
            return corrupt(t, "an entry's key does not match its stored hash", s);
        }
        ext[live].u = u;
        ext[live].units = b.units;
        live++;
    }
    if (live > t->max_keys) {
        PyMem_Free(ext);
        return corrupt(t, "the index holds more entries than max_keys", area);
    }
    qsort(ext, (size_t)live, sizeof(Extent), extent_cmp);
    for (uint64_t i = 1; i < live; i++) {
        if ((uint64_t)ext[i - 1].u + ext[i - 1].units > ext[i].u) {
            PyMem_Free(ext);
            return corrupt(t, "two entries overlap", (uint64_t)ext[i].u * UNIT);
        }
    }
    *out = ext;
    *n = live;
    *tombs = dead;
    return ST_OK;
}

/* Rebuild the heap bookkeeping from the index: what is not referenced is free. Called with the
 * lock held when `dirty` shows that a writer stopped half-way. Idempotent. */
static int repair(Table *t)
{
    Extent *ext;
    uint64_t live, tombs, used = 0, cursor = t->lo;
    int r = collect_live(t, &ext, &live, &tombs);
    if (r != ST_OK)
        return r;
    atomic_thread_fence(memory_order_release);
    for (int c = 0; c < NCLASS; c++)
        st32(t, head_off(c), 0);
    st64(t, CTL_BITMAP, 0);
    st64(t, CTL_BITMAP + 8, 0);
    for (uint64_t i = 0; i <= live && r == ST_OK; i++) {
        uint64_t next = i < live ? ext[i].u : t->hi, gap = next - cursor;
        if (gap > 0 && gap < MIN_UNITS) {
            r = corrupt(t, "a gap between entries is too small to be a free block", cursor * UNIT);
            break;
        }
        if (gap > 0) {
            write_free(t, cursor, (uint32_t)gap);
            r = list_push(t, cursor, (uint32_t)gap);
        }
        if (i < live) {
            st32(t, next * UNIT + B_FLAGS, gap > 0 ? FL_PREV_FREE : 0);
            used += ext[i].units;
            cursor = next + ext[i].units;
        }
    }
    PyMem_Free(ext);
    if (r != ST_OK)
        return r;
    st64(t, CTL_COUNT, live);
    st64(t, CTL_TOMBS, tombs);
    st64(t, CTL_USED, used);
    st64(t, CTL_REPAIRS, ld64(t, CTL_REPAIRS) + 1);
    return ST_OK;
}

/* Check everything (index, heap tiling, free lists, counters) without changing anything. */
static int check_all(Table *t)
{
    Extent *ext;
    uint64_t live, tombs, used = 0, free_units = 0, free_blocks = 0, cursor = t->lo, i = 0;
    int r = collect_live(t, &ext, &live, &tombs);
    if (r != ST_OK)
        return r;
    int prev_free = 0;
    while (cursor < t->hi && r == ST_OK) {
        uint64_t off = cursor * UNIT;
        uint32_t fl = ld32(t, off + B_FLAGS);
        if (((fl & FL_PREV_FREE) != 0) != prev_free) {
            r = corrupt(t, "a block's free-predecessor flag is wrong", off);
        } else if (i < live && ext[i].u == cursor) {
            if (fl & FL_FREE)
                r = corrupt(t, "an entry's block is marked free", off);
            used += ext[i].units;
            cursor += ext[i++].units;
            prev_free = 0;
        } else {
            uint32_t sz = free_size(t, cursor);
            if (sz == 0 || prev_free || ld32(t, (cursor + sz) * UNIT - 4) != sz ||
                (i < live && cursor + sz > ext[i].u))
                r = corrupt(t, "unreferenced space is not a well-formed free block", off);
            free_units += sz;
            free_blocks++;
            cursor += sz;
            prev_free = 1;
        }
    }
    PyMem_Free(ext);
    if (r != ST_OK)
        return r;
    if (i != live || cursor != t->hi)
        return corrupt(t, "the heap blocks do not tile the heap", cursor * UNIT);
    uint64_t listed_units = 0, listed_blocks = 0, limit = (t->hi - t->lo) / MIN_UNITS + 1;
    for (int c = 0; c < NCLASS; c++) {
        uint32_t prev = 0;
        for (uint32_t u = ld32(t, head_off(c)); u != 0; u = ld32(t, (uint64_t)u * UNIT + F_NEXT)) {
            uint32_t sz = free_size(t, u);
            if (sz == 0 || size_class(sz) != c || ld32(t, (uint64_t)u * UNIT + F_PREV) != prev ||
                ++listed_blocks > limit)
                return corrupt(t, "a free list is damaged", head_off(c));
            listed_units += sz;
            prev = u;
        }
        int bit = (int)((ld64(t, CTL_BITMAP + 8 * (uint64_t)(c >> 6)) >> (c & 63)) & 1);
        if (bit != (ld32(t, head_off(c)) != 0))
            return corrupt(t, "the free-list bitmap disagrees with the lists", CTL_BITMAP);
    }
    if (listed_units != free_units || listed_blocks != free_blocks)
        return corrupt(t, "the free lists do not hold exactly the free blocks", CTL_HEADS);
    if (ld64(t, CTL_COUNT) != live || ld64(t, CTL_TOMBS) != tombs || ld64(t, CTL_USED) != used)
        return corrupt(t, "the counters disagree with the index", CTL_COUNT);
    return ST_OK;
}

/* ---- writer sessions ------------------------------------------------------------------------ */

static int begin_write(Table *t)
{
    if (t->readonly)
        return ST_READONLY;
    int r = table_lock(t);
    if (r != LOCKED && r != LOCKED_RECOVERED)
        return r;
    if (ld32(t, CTL_DIRTY) != 0) {
        int s = repair(t);
        if (s != ST_OK) {
            table_unlock(t);
            return s;
        }
    }
    st32(t, CTL_DIRTY, 1);
    return ST_OK;
}

/* Damage found half-way leaves `dirty` set: the next writer rebuilds the bookkeeping. */
static void end_write(Table *t, int status)
{
    if (status != ST_CORRUPT)
        atomic_store_explicit(p32(t, CTL_DIRTY), 0, memory_order_release);
    table_unlock(t);
}

static uint32_t next_stamp(Table *t)
{
    uint64_t s = ld64(t, CTL_STAMP) + 1;
    if ((uint32_t)s == 0)
        s++;
    st64(t, CTL_STAMP, s);
    return (uint32_t)s;
}

/* Insert or replace under the lock. `only_new`: leave an existing value (setdefault). */
static int store_entry(Table *t, const Key *k, const char *v, uint64_t vlen, int vkind,
                       int only_new, PyObject **existing)
{
    uint64_t g = ld64(t, CTL_GEN), slot = 0, ref = 0, ins = 0;
    Blk old;
    int r = probe_locked(t, t->idx[g & 1], k, &slot, &ref, &old, &ins);
    if (r == ST_CORRUPT)
        return r;
    if (r == ST_OK && only_new) {
        *existing = wrap_value(copy_value(t, &old), old.vkind);
        return *existing == NULL ? ST_ERROR : ST_OK;
    }
    int fresh = r == ST_NOT_FOUND;
    if (fresh) {
        if (ld64(t, CTL_COUNT) >= t->max_keys)
            return ST_FULL_KEYS;
        if (ld64(t, ins) == 0 &&
            ld64(t, CTL_COUNT) + ld64(t, CTL_TOMBS) + 1 > TOMBSTONE_LIMIT(t->nslots)) {
            r = index_rebuild(t, g, 0);
            if (r != ST_OK)
                return r;
            g++;
            r = probe_locked(t, t->idx[g & 1], k, &slot, &ref, &old, &ins);
            if (r != ST_NOT_FOUND)
                return r == ST_OK ? corrupt(t, "a key appeared during an index rebuild", slot) : r;
        }
    }
    uint64_t bytes = BLK_HDR + k->n + vlen;
    if (k->n > UINT32_MAX || bytes < vlen || bytes / UNIT + 1 > t->hi - t->lo)
        return ST_TOO_LARGE;
    uint64_t u = 0, need = (bytes + UNIT - 1) / UNIT;
    if (need < MIN_UNITS)
        need = MIN_UNITS;
    r = heap_alloc(t, need, &u);
    if (r != ST_OK)
        return r;
    uint64_t off = u * UNIT;
    /* The block is not reachable yet: plain writes, then one release store publishes it. */
    st32(t, off + B_KLEN, (uint32_t)k->n);
    st32(t, off + B_KINDS, (uint32_t)k->kind | ((uint32_t)vkind << 8));
    st64(t, off + B_VLEN, vlen);
    st64(t, off + B_HASH, k->h);
    memcpy(t->base + off + BLK_HDR, k->p, k->n);
    copy_bytes(t, t->base + off + BLK_HDR + k->n, v, vlen);
    uint64_t nref = u | ((uint64_t)next_stamp(t) << 32);
    if (fresh) {
        int was_tomb = ld64(t, ins) != 0;
        st32(t, ins + 8, k->hint);
        rel64(t, ins, nref); /* release: the block and hint are complete before it is seen */
        st64(t, CTL_COUNT, ld64(t, CTL_COUNT) + 1);
        if (was_tomb && ld64(t, CTL_TOMBS) > 0)
            st64(t, CTL_TOMBS, ld64(t, CTL_TOMBS) - 1);
        return ST_OK;
    }
    rel64(t, slot, nref); /* release: as above; the old block is retired from here on */
    return heap_free(t, (uint32_t)ref);
}

static int remove_entry(Table *t, const Key *k, PyObject **popped)
{
    uint64_t g = ld64(t, CTL_GEN), slot = 0, ref = 0, ins = 0;
    Blk old;
    int r = probe_locked(t, t->idx[g & 1], k, &slot, &ref, &old, &ins);
    if (r != ST_OK)
        return r;
    if (popped != NULL) {
        *popped = wrap_value(copy_value(t, &old), old.vkind);
        if (*popped == NULL)
            return ST_ERROR;
    }
    rel64(t, slot, (uint64_t)next_stamp(t) << 32); /* tombstone */
    uint64_t count = ld64(t, CTL_COUNT);
    st64(t, CTL_COUNT, count > 0 ? count - 1 : 0);
    st64(t, CTL_TOMBS, ld64(t, CTL_TOMBS) + 1);
    return heap_free(t, (uint32_t)ref);
}

/* ---- readers -------------------------------------------------------------------------------- */

#define R_HIT 0
#define R_MISS 1
#define R_RETRY 2

/* One lock-free lookup. R_HIT (with *out when `copy`), R_MISS, R_RETRY, ST_CORRUPT, ST_ERROR. */
static int lookup_once(Table *t, const Key *k, int copy, PyObject **out)
{
    uint64_t g = acq64(t, CTL_GEN), area = t->idx[g & 1], i = k->h & t->mask;
    for (uint64_t step = 1; step <= t->nslots; step++) {
        uint64_t s = area + i * SLOT;
        uint64_t w = acq64(t, s);
        if (w == 0) /* slots never empty within a generation: a miss is real if g still holds */
            return acq64(t, CTL_GEN) == g ? R_MISS : R_RETRY;
        uint32_t u = (uint32_t)w;
        if (u != 0 && ld32(t, s + 8) == k->hint) {
            Blk b;
            int bad = block_fields(t, u, &b) < 0;
            if (bad || !block_matches(t, &b, k)) {
                /* Acquire: pairs with the writers' release fences before reusing memory. */
                atomic_thread_fence(memory_order_acquire);
                if (ld64(t, s) != w || ld64(t, CTL_GEN) != g)
                    return R_RETRY;
                if (bad)
                    return corrupt(t, "an entry points outside the heap or has impossible lengths", s);
            } else {
                PyObject *v = NULL;
                if (copy) {
                    if (b.vlen >= BIG_COPY) { /* do not allocate for a torn header */
                        atomic_thread_fence(memory_order_acquire);
                        if (ld64(t, s) != w || ld64(t, CTL_GEN) != g)
                            return R_RETRY;
                    }
                    v = wrap_value(copy_value(t, &b), b.vkind);
                    if (v == NULL)
                        return ST_ERROR;
                }
                atomic_thread_fence(memory_order_acquire);
                if (ld64(t, s) != w || ld64(t, CTL_GEN) != g) {
                    Py_XDECREF(v);
                    return R_RETRY;
                }
                *out = v;
                return R_HIT;
            }
        }
        i = (i + step) & t->mask;
    }
    atomic_thread_fence(memory_order_acquire);
    if (ld64(t, CTL_GEN) != g)
        return R_RETRY;
    return corrupt(t, "the index has no empty slot", area);
}

static void pause_briefly(void)
{
    struct timespec ts = {0, 200 * 1000};
    Py_BEGIN_ALLOW_THREADS
    nanosleep(&ts, NULL);
    Py_END_ALLOW_THREADS
}

/* Look a key up: ST_OK (*out set when copy), ST_NOT_FOUND, or an error status. */
static int lookup(Table *t, const Key *k, int copy, PyObject **out)
{
    for (int attempt = 0; attempt < READ_ATTEMPTS; attempt++) {
        int r = lookup_once(t, k, copy, out);
        if (r == R_HIT)
            return ST_OK;
        if (r == R_MISS)
            return ST_NOT_FOUND;
        if (r != R_RETRY)
            return r;
        if (attempt >= 8)
            sched_yield();
    }
    if (t->readonly) { /* cannot take the lock: keep retrying until the timeout */
        int64_t deadline = t->timeout_ns < 0 ? -1 : shmkit_monotonic_ns() + t->timeout_ns;
        for (;;) {
            int r = lookup_once(t, k, copy, out);
            if (r == R_HIT)
                return ST_OK;
            if (r == R_MISS)
                return ST_NOT_FOUND;
            if (r != R_RETRY)
                return r;
            if (deadline >= 0 && shmkit_monotonic_ns() >= deadline)
                return ST_TIMEOUT;
            SHMKIT_BUSY_ENTER(t);
            pause_briefly();
            SHMKIT_BUSY_LEAVE(t);
            if (PyErr_CheckSignals() < 0)
                return ST_ERROR;
        }
    }
    /* Writers keep changing this key: read it under the lock, which guarantees progress. */
    int r = table_lock(t);
    if (r != LOCKED && r != LOCKED_RECOVERED)
        return r;
    uint64_t slot, ref, ins;
    Blk b;
    r = probe_locked(t, t->idx[ld64(t, CTL_GEN) & 1], k, &slot, &ref, &b, &ins);
    if (r == ST_OK && copy) {
        *out = wrap_value(copy_value(t, &b), b.vkind);
        if (*out == NULL)
            r = ST_ERROR;
    }
    table_unlock(t);
    return r;
}

/* Every entry as a list of keys, or of (key, value) pairs. Lock-free: each entry is read
 * consistently; entries present for the whole scan appear exactly once. `locked`: hold the
 * writer lock for a point-in-time snapshot. */
static int scan_once(Table *t, int with_values, int locked, PyObject **out)
{
    uint64_t g = acq64(t, CTL_GEN), area = t->idx[g & 1];
    PyObject *list = PyList_New(0);
    if (list == NULL)
        return ST_ERROR;
    for (uint64_t i = 0; i < t->nslots; i++) {
        uint64_t s = area + i * SLOT;
        for (int tries = 0;; tries++) {
            if (tries >= 16) {
                Py_DECREF(list);
                return R_RETRY;
            }
            uint64_t w = acq64(t, s);
            uint32_t u = (uint32_t)w;
            if (u == 0)
                break;
            Blk b;
            PyObject *key = NULL, *val = NULL, *item;
            int bad = block_fields(t, u, &b) < 0;
            if (!bad && !locked && (uint64_t)b.klen + (with_values ? b.vlen : 0) >= BIG_COPY) {
                /* Lengths read from a block being reused could ask for gigabytes: check that
                 * the entry still stands before allocating for it (as lookup_once does). */
                atomic_thread_fence(memory_order_acquire);
                if (ld64(t, CTL_GEN) != g) {
                    Py_DECREF(list);
                    return R_RETRY;
                }
                if (ld64(t, s) != w)
                    continue;
            }
            if (!bad) {
                key = make_key(t, &b);
                if (key == NULL) {
                    if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
                        Py_DECREF(list);
                        return ST_ERROR;
                    }
                    PyErr_Clear();
                    bad = 1;
                }
            }
            if (!bad && with_values) {
                val = wrap_value(copy_value(t, &b), b.vkind);
                if (val == NULL) {
                    Py_DECREF(key);
                    Py_DECREF(list);
                    return ST_ERROR;
                }
            }
            if (!locked) {
                atomic_thread_fence(memory_order_acquire);
                if (ld64(t, CTL_GEN) != g) {
                    Py_XDECREF(key);
                    Py_XDECREF(val);
                    Py_DECREF(list);
                    return R_RETRY;
                }
                if (ld64(t, s) != w) {
                    Py_XDECREF(key);
                    Py_XDECREF(val);
                    continue;
                }
            }
            if (bad) {
                Py_DECREF(list);
                return corrupt(t, "an entry points outside the heap or has impossible lengths", s);
            }
            item = with_values ? PyTuple_Pack(2, key, val) : (Py_INCREF(key), key);
            Py_DECREF(key);
            Py_XDECREF(val);
            if (item == NULL || PyList_Append(list, item) < 0) {
                Py_XDECREF(item);
                Py_DECREF(list);
                return ST_ERROR;
            }
            Py_DECREF(item);
            break;
        }
    }
    if (!locked) {
        atomic_thread_fence(memory_order_acquire);
        if (ld64(t, CTL_GEN) != g) {
            Py_DECREF(list);
            return R_RETRY;
        }
    }
    *out = list;
    return ST_OK;
}

static int scan(Table *t, int with_values, int locked, PyObject **out)
{
    if (!locked) {
        for (int attempt = 0; attempt < 8; attempt++) {
            int r = scan_once(t, with_values, 0, out);
            if (r != R_RETRY)
                return r;
        }
        if (t->readonly) {
            int64_t deadline = t->timeout_ns < 0 ? -1 : shmkit_monotonic_ns() + t->timeout_ns;
            for (;;) {
                int r = scan_once(t, with_values, 0, out);
                if (r != R_RETRY)
                    return r;
                if (deadline >= 0 && shmkit_monotonic_ns() >= deadline)
                    return ST_TIMEOUT;
                SHMKIT_BUSY_ENTER(t);
                pause_briefly();
                SHMKIT_BUSY_LEAVE(t);
                if (PyErr_CheckSignals() < 0)
                    return ST_ERROR;
            }
        }
    } else if (t->readonly) {
        return ST_READONLY;
    }
    int r = table_lock(t);
    if (r != LOCKED && r != LOCKED_RECOVERED)
        return r;
    r = scan_once(t, with_values, 1, out);
    table_unlock(t);
    return r;
}

/* ---- the Python type ------------------------------------------------------------------------ */

static int table_usable(Table *t)
{
    return t->attached;
}

static PyObject *status(int st)
{
    if (st == ST_ERROR)
        return NULL;
    return PyLong_FromLong(st);
}

static int table_init(PyObject *op, PyObject *args, PyObject *kwargs)
{
    Table *t = (Table *)op;
    static char *kwlist[] = {"buffer", "nslots", "heap_offset", "heap_size", "max_keys",
                             "timeout", NULL};
    PyObject *buffer, *timeout = Py_None;
    unsigned long long nslots, heap_off, heap_size, max_keys;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OKKKK|O", kwlist, &buffer, &nslots,
                                     &heap_off, &heap_size, &max_keys, &timeout))
        return -1;
    if (t->attached) {
        PyErr_SetString(PyExc_RuntimeError, "DictTable is already attached");
        return -1;
    }
    int64_t timeout_ns = shmkit_timeout_ns(timeout);
    if (timeout_ns == -2)
        return -1;
    int readonly = 0;
    if (PyObject_GetBuffer(buffer, &t->view, PyBUF_WRITABLE) < 0) {
        PyErr_Clear();
        if (PyObject_GetBuffer(buffer, &t->view, PyBUF_SIMPLE) < 0)
            return -1;
        readonly = 1;
    }
    uint64_t size = (uint64_t)t->view.len;
    const char *bad = NULL;
    if (nslots < 8 || nslots > (1ULL << 31) || (nslots & (nslots - 1)) != 0)
        bad = "nslots must be a power of two within 8..2**31";
    else if (heap_off != CTL_END + 2 * SLOT * nslots)
        bad = "heap_offset does not follow the two index areas";
    else if (heap_size % UNIT != 0 || heap_size < MIN_UNITS * UNIT || heap_off > size ||
             heap_size > size - heap_off)
        bad = "the heap does not fit the buffer";
    else if ((heap_off + heap_size) / UNIT > UINT32_MAX)
        bad = "the heap ends beyond 64 GiB";
    else if (max_keys < 1 || max_keys > nslots - nslots / 4)
        bad = "max_keys must be within 1..3/4 of nslots";
    else if (((uintptr_t)t->view.buf & 63) != 0)
        bad = "the buffer is not 64-byte aligned";
    if (bad != NULL) {
        PyBuffer_Release(&t->view);
        PyErr_SetString(PyExc_ValueError, bad);
        return -1;
    }
    t->base = t->view.buf;
    t->size = size;
    t->readonly = readonly;
    t->busy = 0;
    t->busy_epoch = shmkit_fork_epoch;
    t->nslots = nslots;
    t->mask = nslots - 1;
    t->idx[0] = CTL_END;
    t->idx[1] = CTL_END + SLOT * nslots;
    t->lo = heap_off / UNIT;
    t->hi = (heap_off + heap_size) / UNIT;
    t->max_keys = max_keys;
    t->timeout_ns = timeout_ns;
    t->spin = (shmkit_spin){.max_ns = 20000, .budget_ns = 20000, .waits = 0};
    t->why = NULL;
    t->where = 0;
    t->attached = 1;
    return 0;
}

static void table_dealloc(PyObject *op)
{
    Table *t = (Table *)op;
    if (t->attached) {
        PyBuffer_Release(&t->view);
        t->attached = 0;
    }
    Py_TYPE(op)->tp_free(op);
}

#define NEED_ATTACHED(t)                  \
    do {                                  \
        if (!table_usable(t))             \
            return PyLong_FromLong(ST_CLOSED); \
    } while (0)

static PyObject *t_get(PyObject *op, PyObject *key)
{
    Table *t = (Table *)op;
    NEED_ATTACHED(t);
    Key k;
    int r = key_arg(key, &k);
    if (r != ST_OK)
        return status(r);
    PyObject *out = NULL;
    r = lookup(t, &k, 1, &out);
    return r == ST_OK ? out : status(r);
}

static PyObject *t_contains(PyObject *op, PyObject *key)
{
    Table *t = (Table *)op;
    NEED_ATTACHED(t);
    Key k;
    int r = key_arg(key, &k);
    if (r != ST_OK)
        return status(r);
    PyObject *out = NULL;
    return status(lookup(t, &k, 0, &out));
}

static PyObject *t_set_common(PyObject *op, PyObject *const *args, Py_ssize_t nargs, int only_new)
{
    Table *t = (Table *)op;
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "expected (key, value, vkind)");
        return NULL;
    }
    NEED_ATTACHED(t);
    Key k;
    int r = key_arg(args[0], &k);
    if (r != ST_OK)
        return status(r);
    long vkind = PyLong_AsLong(args[2]);
    if (vkind == -1 && PyErr_Occurred())
        return NULL;
    if (vkind != 0 && vkind != 1) {
        PyErr_SetString(PyExc_ValueError, "vkind must be 0 (bytes) or 1 (pickle)");
        return NULL;
    }
    Py_buffer vb;
    if (PyObject_GetBuffer(args[1], &vb, PyBUF_SIMPLE) < 0)
        return NULL;
    PyObject *existing = NULL;
    r = begin_write(t);
    if (r == ST_OK) {
        r = store_entry(t, &k, vb.buf, (uint64_t)vb.len, (int)vkind, only_new, &existing);
        end_write(t, r);
    }
    PyBuffer_Release(&vb);
    if (existing != NULL)
        return existing;
    if (only_new && r == ST_OK)
        Py_RETURN_NONE;
    return status(r);
}

static PyObject *t_set(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    return t_set_common(op, args, nargs, 0);
}

static PyObject *t_setdefault(PyObject *op, PyObject *const *args, Py_ssize_t nargs)
{
    return t_set_common(op, args, nargs, 1);
}

static PyObject *t_remove_common(PyObject *op, PyObject *key, int pop)
{
    Table *t = (Table *)op;
    NEED_ATTACHED(t);
    Key k;
    int r = key_arg(key, &k);
    if (r != ST_OK)
        return status(r);
    PyObject *popped = NULL;
    r = begin_write(t);
    if (r != ST_OK)
        return status(r);
    r = remove_entry(t, &k, pop ? &popped : NULL);
    end_write(t, r);
    if (r == ST_OK && pop)
        return popped;
    Py_XDECREF(popped);
    return status(r);
}

static PyObject *t_delete(PyObject *op, PyObject *key) { return t_remove_common(op, key, 0); }
static PyObject *t_pop(PyObject *op, PyObject *key) { return t_remove_common(op, key, 1); }

static PyObject *t_scan(PyObject *op, PyObject *args)
{
    Table *t = (Table *)op;
    int with_values = 0, locked = 0;
    if (!PyArg_ParseTuple(args, "|pp", &with_values, &locked))
        return NULL;
    NEED_ATTACHED(t);
    PyObject *out = NULL;
    int r = scan(t, with_values, locked, &out);
    return r == ST_OK ? out : status(r);
}

static PyObject *t_clear(PyObject *op, PyObject *unused)
{
    Table *t = (Table *)op;
    (void)unused;
    NEED_ATTACHED(t);
    int r = begin_write(t);
    if (r != ST_OK)
        return status(r);
    r = index_rebuild(t, ld64(t, CTL_GEN), 1);
    if (r == ST_OK)
        heap_reset(t);
    end_write(t, r);
    return status(r);
}

static PyObject *t_format(PyObject *op, PyObject *unused)
{
    Table *t = (Table *)op;
    (void)unused;
    NEED_ATTACHED(t);
    if (t->readonly)
        return status(ST_READONLY);
    heap_reset(t);
    return status(ST_OK);
}

static PyObject *t_repair(PyObject *op, PyObject *unused)
{
    Table *t = (Table *)op;
    (void)unused;
    NEED_ATTACHED(t);
    int r = begin_write(t);
    if (r != ST_OK)
        return status(r);
    r = repair(t);
    end_write(t, r);
    return status(r);
}

static PyObject *t_check(PyObject *op, PyObject *unused)
{
    Table *t = (Table *)op;
    (void)unused;
    NEED_ATTACHED(t);
    int r = begin_write(t);
    if (r != ST_OK)
        return status(r);
    r = check_all(t);
    end_write(t, r == ST_CORRUPT ? ST_OK : r); /* checking changed nothing */
    return status(r);
}

static PyObject *t_len(PyObject *op, PyObject *unused)
{
    Table *t = (Table *)op;
    (void)unused;
    if (!table_usable(t))
        return PyLong_FromLong(0);
    uint64_t n = ld64(t, CTL_COUNT);
    return PyLong_FromUnsignedLongLong(n > t->max_keys ? t->max_keys : n);
}

static PyObject *t_stats(PyObject *op, PyObject *unused)
{
    Table *t = (Table *)op;
    (void)unused;
    if (!table_usable(t))
        return status(ST_CLOSED);
    shmkit_mutex_t *m = (shmkit_mutex_t *)(t->base + CTL_LOCK);
    uint32_t word = atomic_load_explicit(&m->word, memory_order_relaxed);
    uint32_t owner_pid = atomic_load_explicit(&m->owner_pid, memory_order_relaxed);
    return Py_BuildValue(
        "{sKsKsKsKsKsKsKsKsKsKsIsIsI}",
        "keys", (unsigned long long)ld64(t, CTL_COUNT),
        "tombstones", (unsigned long long)ld64(t, CTL_TOMBS),
        "used_bytes", (unsigned long long)ld64(t, CTL_USED) * UNIT,
        "heap_bytes", (unsigned long long)(t->hi - t->lo) * UNIT,
        "index_slots", (unsigned long long)t->nslots,
        "max_keys", (unsigned long long)t->max_keys,
        "generation", (unsigned long long)ld64(t, CTL_GEN),
        "writes", (unsigned long long)ld64(t, CTL_STAMP),
        "recoveries", (unsigned long long)ld64(t, CTL_RECOVERIES),
        "repairs", (unsigned long long)ld64(t, CTL_REPAIRS),
        "lock_owner_tid", (unsigned int)(word & SHMKIT_MUTEX_OWNER_MASK),
        "lock_owner_pid", (unsigned int)owner_pid,
        "dirty", (unsigned int)ld32(t, CTL_DIRTY));
}

static PyObject *t_damage(PyObject *op, PyObject *unused)
{
    Table *t = (Table *)op;
    (void)unused;
    return Py_BuildValue("(sK)", t->why ? t->why : "unknown damage", (unsigned long long)t->where);
}

static PyObject *t_release(PyObject *op, PyObject *unused)
{
    Table *t = (Table *)op;
    (void)unused;
    if (SHMKIT_BUSY(t) > 0)
        return status(ST_BUSY);
    if (t->attached) {
        t->attached = 0;
        PyBuffer_Release(&t->view);
        t->base = NULL;
    }
    return status(ST_OK);
}

static PyObject *t_readonly(PyObject *op, void *closure)
{
    (void)closure;
    return PyBool_FromLong(((Table *)op)->readonly);
}

static PyMethodDef table_methods[] = {
    {"get", t_get, METH_O, "get(key) -> bytes | (bytes,) | status: lock-free read."},
    {"contains", t_contains, METH_O, "contains(key) -> status (0 present, 1 missing)."},
    {"set", (PyCFunction)(void (*)(void))t_set, METH_FASTCALL,
     "set(key, value, vkind) -> status: insert or replace."},
    {"setdefault", (PyCFunction)(void (*)(void))t_setdefault, METH_FASTCALL,
     "setdefault(key, value, vkind) -> None (inserted) | existing value | status."},
    {"delete", t_delete, METH_O, "delete(key) -> status."},
    {"pop", t_pop, METH_O, "pop(key) -> bytes | (bytes,) | status: remove and return."},
    {"scan", t_scan, METH_VARARGS,
     "scan(with_values=False, locked=False) -> list | status: keys or (key, value) pairs."},
    {"clear", t_clear, METH_NOARGS, "clear() -> status: remove every entry."},
    {"format", t_format, METH_NOARGS, "format() -> status: initialise a new zeroed table."},
    {"repair", t_repair, METH_NOARGS, "repair() -> status: rebuild bookkeeping from the index."},
    {"check", t_check, METH_NOARGS, "check() -> status: verify every structure."},
    {"count", t_len, METH_NOARGS, "count() -> int: number of keys (exact when idle)."},
    {"stats", t_stats, METH_NOARGS, "stats() -> dict of counters."},
    {"damage", t_damage, METH_NOARGS, "damage() -> (reason, offset) of the last ST_CORRUPT."},
    {"release", t_release, METH_NOARGS, "release() -> status: drop the buffer (ST_BUSY if in use)."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef table_getset[] = {
    {"readonly", t_readonly, NULL, "Whether the buffer is read-only (reads only).", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject TableType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._native.DictTable",
    .tp_basicsize = sizeof(Table),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "DictTable(buffer, nslots, heap_offset, heap_size, max_keys, timeout=None):\n"
              "the SharedDict hash table over a shared buffer (internal; see shmkit.dict).",
    .tp_new = PyType_GenericNew,
    .tp_init = table_init,
    .tp_dealloc = table_dealloc,
    .tp_methods = table_methods,
    .tp_getset = table_getset,
};

int shmkit_init_table(PyObject *module)
{
    if (PyType_Ready(&TableType) < 0)
        return -1;
    Py_INCREF(&TableType);
    if (PyModule_AddObject(module, "DictTable", (PyObject *)&TableType) < 0) {
        Py_DECREF(&TableType);
        return -1;
    }
    static const struct {
        const char *name;
        int value;
    } consts[] = {
        {"DICT_OK", ST_OK}, {"DICT_NOT_FOUND", ST_NOT_FOUND}, {"DICT_FULL_HEAP", ST_FULL_HEAP},
        {"DICT_FULL_KEYS", ST_FULL_KEYS}, {"DICT_CORRUPT", ST_CORRUPT},
        {"DICT_TIMEOUT", ST_TIMEOUT}, {"DICT_READONLY", ST_READONLY},
        {"DICT_TOO_LARGE", ST_TOO_LARGE}, {"DICT_BUSY", ST_BUSY}, {"DICT_BAD_KEY", ST_BAD_KEY},
        {"DICT_CLOSED", ST_CLOSED}, {"DICT_REENTERED", ST_REENTERED},
        {"DICT_CONTROL_END", CTL_END}, {"DICT_SLOT_SIZE", SLOT}, {"DICT_UNIT", UNIT}, {"DICT_BLOCK_HEADER", BLK_HDR}, {"DICT_LOCK_OFFSET", CTL_LOCK},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++)
        if (PyModule_AddIntConstant(module, consts[i].name, consts[i].value) < 0)
            return -1;
    return 0;
}
