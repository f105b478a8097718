/* shmkit._native: the module object and nothing else; each part registers itself. */
#include "native.h"

static struct PyModuleDef native_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "shmkit._native",
    .m_doc = "The shmkit C core: atomics, futex, robust mutex, ring operations, System V calls.",
    .m_size = -1,
};

PyMODINIT_FUNC PyInit__native(void)
{
    PyObject *m = PyModule_Create(&native_module);
    if (m == NULL)
        return NULL;
    if (shmkit_init_window(m) < 0 || shmkit_init_liveness(m) < 0 || shmkit_init_atomic(m) < 0 || shmkit_init_futex(m) < 0 || shmkit_init_sysv(m) < 0 ||
        shmkit_init_mutex(m) < 0 || shmkit_init_sync(m) < 0 || shmkit_init_ring(m) < 0 ||
        shmkit_init_table(m) < 0 || shmkit_init_bcast(m) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
