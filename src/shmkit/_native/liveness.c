/* Is a task (process or thread id) still running? The base of owner-death recovery.
 *
 * A SIGKILLed process stays a zombie until its parent reaps it, and kill(pid, 0) still
 * succeeds on a zombie, so the state letter in /proc/TID/stat decides. Ids are untrusted
 * (read from shared memory): impossible ones count as dead. All users of one shmkit object
 * must share a pid namespace, since ids from another namespace are not visible here. */
#include "native.h"

#include <errno.h>
#include <pthread.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SHMKIT_TID_LIMIT (1u << 30)

int shmkit_task_alive(uint32_t tid)
{
    if (tid == 0 || tid >= SHMKIT_TID_LIMIT)
        return 0;
    if (kill((pid_t)tid, 0) < 0 && errno == ESRCH)
        return 0;
    char path[48], stat[512];
    snprintf(path, sizeof path, "/proc/%u/stat", tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        /* kill() saw the task, so a missing /proc entry means either that it exited since,
         * or that /proc hides other users' processes (hidepid=2): ask kill() again. */
        if (errno != ENOENT && errno != ESRCH)
            return 1;
        return !(kill((pid_t)tid, 0) < 0 && errno == ESRCH);
    }
    ssize_t n = read(fd, stat, sizeof stat - 1);
    close(fd);
    if (n <= 0)
        return 0;
    stat[n] = '\0';
    char *paren = strrchr(stat, ')');
    if (paren == NULL || paren[1] == '\0' || paren[2] == '\0')
        return 1;
    char state = paren[2];
    return state != 'Z' && state != 'X' && state != 'x';
}

static __thread uint32_t cached_tid;

static void forget_tid(void)
{
    cached_tid = 0;
}

uint32_t shmkit_gettid(void)
{
    if (cached_tid == 0)
        cached_tid = (uint32_t)syscall(SYS_gettid);
    return cached_tid;
}

static PyObject *py_task_alive(PyObject *self, PyObject *arg)
{
    (void)self;
    unsigned long tid = PyLong_AsUnsignedLong(arg);
    if (tid == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    return PyBool_FromLong(tid <= UINT32_MAX && shmkit_task_alive((uint32_t)tid));
}

static PyObject *py_gettid(PyObject *self, PyObject *unused)
{
    (void)self;
    (void)unused;
    return PyLong_FromUnsignedLong(shmkit_gettid());
}

static PyMethodDef liveness_methods[] = {
    {"task_alive", py_task_alive, METH_O,
     "task_alive(tid) -> bool: the process or thread runs (zombies and impossible ids count as dead)."},
    {"gettid", py_gettid, METH_NOARGS, "gettid() -> int: this thread's kernel task id (cached)."},
    {NULL, NULL, 0, NULL},
};

int shmkit_init_liveness(PyObject *module)
{
    /* A forked child's threads get new ids: drop the cached one there. */
    if (pthread_atfork(NULL, NULL, forget_tid) != 0) {
        PyErr_SetString(PyExc_RuntimeError, "pthread_atfork failed");
        return -1;
    }
    return PyModule_AddFunctions(module, liveness_methods);
}
