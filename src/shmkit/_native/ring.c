/* Ring push/pop hot path (filled in by the queue work). */
#include "native.h"

int shmkit_init_ring(PyObject *module)
{
    (void)module;
    return 0;
}
