/* Robust process-shared mutex (filled in by the sync work). */
#include "native.h"

int shmkit_init_mutex(PyObject *module)
{
    (void)module;
    return 0;
}
