/* System V shared memory: shmget/shmat/shmdt/shmctl, which the standard library lacks.
 *
 * Failures raise OSError carrying errno only; errors.py turns them into shmkit exceptions with
 * messages. An attachment exports the buffer protocol and refuses to detach while a view of it
 * is alive, so no Python object can ever point into unmapped memory. */
#include "native.h"

#include <errno.h>
#include <sys/ipc.h>
#include <sys/shm.h>

static PyObject *py_shmget(PyObject *self, PyObject *args)
{
    long key;
    unsigned long long size;
    int flags;
    (void)self;
    if (!PyArg_ParseTuple(args, "lKi", &key, &size, &flags))
        return NULL;
    int id;
    Py_BEGIN_ALLOW_THREADS
    id = shmget((key_t)key, (size_t)size, flags);
    Py_END_ALLOW_THREADS
    if (id < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return PyLong_FromLong(id);
}

static PyObject *py_shm_stat(PyObject *self, PyObject *args)
{
    int id;
    struct shmid_ds ds;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &id))
        return NULL;
    if (shmctl(id, IPC_STAT, &ds) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    return Py_BuildValue("{s:K,s:I,s:I,s:I,s:I,s:I,s:i,s:i,s:K,s:L,s:L,s:L,s:i}",
                         "size", (unsigned long long)ds.shm_segsz,
                         "mode", (unsigned)(ds.shm_perm.mode & 0777),
                         "uid", (unsigned)ds.shm_perm.uid, "gid", (unsigned)ds.shm_perm.gid,
                         "cuid", (unsigned)ds.shm_perm.cuid, "cgid", (unsigned)ds.shm_perm.cgid,
                         "cpid", (int)ds.shm_cpid, "lpid", (int)ds.shm_lpid,
                         "nattch", (unsigned long long)ds.shm_nattch,
                         "atime", (long long)ds.shm_atime, "dtime", (long long)ds.shm_dtime,
                         "ctime", (long long)ds.shm_ctime,
                         "removed", (ds.shm_perm.mode & SHM_DEST) ? 1 : 0);
}

static PyObject *py_shm_set(PyObject *self, PyObject *args)
{
    int id;
    unsigned uid, gid, mode;
    struct shmid_ds ds;
    (void)self;
    if (!PyArg_ParseTuple(args, "iIII", &id, &uid, &gid, &mode))
        return NULL;
    if (shmctl(id, IPC_STAT, &ds) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    ds.shm_perm.uid = uid;
    ds.shm_perm.gid = gid;
    ds.shm_perm.mode = mode & 0777;
    if (shmctl(id, IPC_SET, &ds) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

static PyObject *py_shm_rmid(PyObject *self, PyObject *args)
{
    int id;
    (void)self;
    if (!PyArg_ParseTuple(args, "i", &id))
        return NULL;
    if (shmctl(id, IPC_RMID, NULL) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    Py_RETURN_NONE;
}

typedef struct {
    PyObject_HEAD
    char *addr;   /* NULL once detached */
    Py_ssize_t size;
    int readonly;
    Py_ssize_t exports;
} SysVAttachment;

static int attachment_init(SysVAttachment *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"shmid", "readonly", NULL};
    int id, readonly = 0;
    struct shmid_ds ds;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "i|p", kwlist, &id, &readonly))
        return -1;
    if (self->addr != NULL) {
        PyErr_SetString(PyExc_RuntimeError, "attachment is already initialised");
        return -1;
    }
    if (shmctl(id, IPC_STAT, &ds) < 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    /* The size comes from the kernel, but kernel.shmmax allows sizes a buffer cannot describe. */
    if (ds.shm_segsz == 0 || ds.shm_segsz > (size_t)PY_SSIZE_T_MAX) {
        errno = EFBIG;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    void *addr = shmat(id, NULL, readonly ? SHM_RDONLY : 0);
    if (addr == (void *)-1) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    self->addr = addr;
    self->size = (Py_ssize_t)ds.shm_segsz;
    self->readonly = readonly;
    return 0;
}

static PyObject *attachment_detach(SysVAttachment *self, PyObject *unused)
{
    (void)unused;
    if (self->exports > 0) {
        PyErr_Format(PyExc_BufferError, "%zd view(s) of the attachment are still alive",
                     self->exports);
        return NULL;
    }
    if (self->addr != NULL && shmdt(self->addr) < 0)
        return PyErr_SetFromErrno(PyExc_OSError);
    self->addr = NULL;
    Py_RETURN_NONE;
}

static void attachment_dealloc(SysVAttachment *self)
{
    /* exports cannot be > 0 here: every view holds a reference to us */
    if (self->addr != NULL)
        shmdt(self->addr);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static int attachment_getbuffer(SysVAttachment *self, Py_buffer *view, int flags)
{
    if (self->addr == NULL) {
        PyErr_SetString(PyExc_ValueError, "System V segment is detached");
        return -1;
    }
    if (PyBuffer_FillInfo(view, (PyObject *)self, self->addr, self->size, self->readonly, flags) < 0)
        return -1;
    self->exports++;
    return 0;
}

static void attachment_releasebuffer(SysVAttachment *self, Py_buffer *view)
{
    (void)view;
    self->exports--;
}

static PyObject *attachment_get_address(SysVAttachment *self, void *closure)
{
    (void)closure;
    return PyLong_FromVoidPtr(self->addr);
}

static PyObject *attachment_get_size(SysVAttachment *self, void *closure)
{
    (void)closure;
    return PyLong_FromSsize_t(self->size);
}

static PyBufferProcs attachment_as_buffer = {
    (getbufferproc)attachment_getbuffer,
    (releasebufferproc)attachment_releasebuffer,
};

static PyMethodDef attachment_methods[] = {
    {"detach", (PyCFunction)attachment_detach, METH_NOARGS,
     "Detach (shmdt). Raises BufferError while views are alive."},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef attachment_getset[] = {
    {"address", (getter)attachment_get_address, NULL, "Address of the mapping in this process (0 when detached).", NULL},
    {"size", (getter)attachment_get_size, NULL, "Size of the segment in bytes.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject SysVAttachmentType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "shmkit._native.SysVAttachment",
    .tp_basicsize = sizeof(SysVAttachment),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "SysVAttachment(shmid, readonly=False): a shmat mapping exporting the buffer protocol.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)attachment_init,
    .tp_dealloc = (destructor)attachment_dealloc,
    .tp_as_buffer = &attachment_as_buffer,
    .tp_methods = attachment_methods,
    .tp_getset = attachment_getset,
};

static PyMethodDef sysv_methods[] = {
    {"shmget", py_shmget, METH_VARARGS, "shmget(key, size, flags) -> shmid"},
    {"shm_stat", py_shm_stat, METH_VARARGS, "shm_stat(shmid) -> dict of IPC_STAT fields"},
    {"shm_set", py_shm_set, METH_VARARGS, "shm_set(shmid, uid, gid, mode): IPC_SET"},
    {"shm_rmid", py_shm_rmid, METH_VARARGS, "shm_rmid(shmid): IPC_RMID (freed after the last detach)"},
    {NULL, NULL, 0, NULL},
};

int shmkit_init_sysv(PyObject *module)
{
    if (PyType_Ready(&SysVAttachmentType) < 0)
        return -1;
    Py_INCREF(&SysVAttachmentType);
    if (PyModule_AddObject(module, "SysVAttachment", (PyObject *)&SysVAttachmentType) < 0) {
        Py_DECREF(&SysVAttachmentType);
        return -1;
    }
    if (PyModule_AddIntConstant(module, "IPC_CREAT", IPC_CREAT) < 0 ||
        PyModule_AddIntConstant(module, "IPC_EXCL", IPC_EXCL) < 0)
        return -1;
    return PyModule_AddFunctions(module, sysv_methods);
}
