# OpenMP is optional at build time: without it these stubs make every parallel region
# run on one thread (sklearn's _openmp_helpers pattern).
cdef extern from *:
    """
    #ifdef _OPENMP
    #include <omp.h>
    #define FASTBN_OPENMP_ENABLED 1
    #else
    #define FASTBN_OPENMP_ENABLED 0
    static int omp_get_max_threads(void) { return 1; }
    static int omp_get_thread_num(void) { return 0; }
    static int omp_get_num_threads(void) { return 1; }
    #endif
    """
    bint FASTBN_OPENMP_ENABLED
    int omp_get_max_threads() noexcept nogil
    int omp_get_thread_num() noexcept nogil
    int omp_get_num_threads() noexcept nogil
