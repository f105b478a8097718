/* Shared declarations of the shmkit C core.
 *
 * The C core does only what Python cannot: atomics with explicit memory ordering, futex
 * wait/wake, the robust mutex, the ring hot path and the System V calls. Functions here take
 * plain integers, addresses and lengths, re-check every bound (segment memory is untrusted)
 * and return 0 or -errno; policy and messages belong to Python.
 */
#ifndef SHMKIT_NATIVE_H
#define SHMKIT_NATIVE_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdatomic.h>
#include <stdint.h>

/* Pause inside a spin loop: tells the CPU we are spinning (saves power, frees the sibling). */
static inline void shmkit_cpu_relax(void)
{
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield" ::: "memory");
#endif
}

/* A borrowed window [ptr, ptr + len) into an object exporting the buffer protocol. While the
 * view is held the exporter cannot be closed or unmapped (mmap and memoryview refuse), so the
 * memory stays valid even with the GIL released. */
typedef struct {
    Py_buffer view;
    char *ptr;
} shmkit_window;

/* Get `len` bytes at `offset` of `obj`, aligned to `align` (a power of two). Sets a Python
 * exception and returns -1 when out of bounds, misaligned, or read-only while `writable`. */
int shmkit_window_get(PyObject *obj, Py_ssize_t offset, Py_ssize_t len, Py_ssize_t align,
                      int writable, shmkit_window *out);
void shmkit_window_release(shmkit_window *w);

/* Convert a Python timeout (None or seconds >= 0) to nanoseconds; -1 means forever.
 * Sets ValueError/TypeError and returns -2 on a bad value. */
int64_t shmkit_timeout_ns(PyObject *timeout);
int64_t shmkit_monotonic_ns(void);

/* Sleep while *word == expected. Returns 0 on wake-up (possibly spurious), -ETIMEDOUT,
 * -EINTR or -EAGAIN (value already differed). Runs without the GIL; touches no Python object. */
int shmkit_futex_wait(_Atomic uint32_t *word, uint32_t expected, int64_t timeout_ns);
/* Wake up to n waiters on word; returns how many were woken or -errno. */
int shmkit_futex_wake(_Atomic uint32_t *word, int n);

/* Wait, spinning `spin_ns` first (-1: the default), until *word != expected, the deadline passes or a
 * signal handler raises. Call with the GIL held; it is released while sleeping.
 * Returns 1 when the word changed (or a wake-up arrived), 0 on timeout, -1 with a Python
 * exception set (KeyboardInterrupt and friends). `deadline_ns` is monotonic; -1 = forever. */
int shmkit_wait_u32(_Atomic uint32_t *word, uint32_t expected, int64_t deadline_ns, int64_t spin_ns);

/* 1 while the process or thread `tid` runs; 0 when it is gone, a zombie, or impossible. */
int shmkit_task_alive(uint32_t tid);
/* This thread's kernel task id, cached per thread (reset in a forked child). */
uint32_t shmkit_gettid(void);

/* Registration of each part's functions and types on the module. */
int shmkit_init_window(PyObject *module);
int shmkit_init_liveness(PyObject *module);
int shmkit_init_atomic(PyObject *module);
int shmkit_init_futex(PyObject *module);
int shmkit_init_sysv(PyObject *module);
int shmkit_init_mutex(PyObject *module);
int shmkit_init_sync(PyObject *module);
int shmkit_init_ring(PyObject *module);
int shmkit_init_table(PyObject *module);
int shmkit_init_bcast(PyObject *module);

#endif
