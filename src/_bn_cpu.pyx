# distutils: language = c++
"""fastbn's CPU core: OpenMP-parallel loops over the per-channel C++ kernels.

Design (after sklearn/_loss/_loss.pyx.tp):
  * The per-channel / per-chunk kernels are C++ templates in bn_kernels.hpp
    (`noexcept nogil`, runtime-dispatched AVX-512/AVX2/baseline clones).
  * The `cdef ... noexcept nogil` functions here hold the parallel structure: work
    items (channels, or (channel, chunk) items when channels are few, or row chunks
    for channels-last) split statically over the threads of a `parallel` block, each
    thread running a `cdef` body over its range of items (_team_start); one thread
    runs the body over all of them without a parallel region. Every path folds chunk
    partials in chunk order, so results are bitwise identical for every thread count.
  * The `def` wrappers take arrays the Python layer already validated: 3-D views
    (outer, C, inner) whose inner axis is contiguous (inner > 1) or whose channel axis
    is contiguous (inner == 1); outputs are preallocated by the caller. Nothing is
    re-checked here.
  * The exception, "plain calls" at the end: the common public call recognized and run
    in compiled code, for its fixed cost; anything it does not recognize goes back to
    the Python layer's checks.
"""
from cython.parallel cimport parallel, threadid
from libc.stdint cimport uint8_t, uint64_t
from libc.string cimport memset
cimport numpy as cnp
import threading

import numpy as np

from _openmp_helpers cimport (FASTBN_OPENMP_ENABLED, omp_get_max_threads, omp_get_num_threads,
                              omp_get_thread_num)

cnp.import_array()

ctypedef Py_ssize_t idx


cdef extern from "bn_kernels.hpp" namespace "fastbn" nogil:
    const char* half_conversion_name()
    bint channel_tiles_available()
    ctypedef struct Epilogue:
        const void* res
        idx res_so
        idx res_sc
        bint relu
        bint stream
        bint spread
        bint strips
    ctypedef struct Activation:
        const void* y
        idx y_so
        idx y_sc
        void* dres
        idx dres_so
        idx dres_sc
        bint stream
        bint strips
    ctypedef struct half:
        pass
    ctypedef struct bf16:
        pass
    ctypedef struct Moments:
        double n
        double mean
        double m2
    ctypedef struct Sums:
        double dy
        double dy_xmu
    ctypedef struct NCGrid:
        idx outer
        idx inner
        idx n_chunks
    ctypedef struct NLCGrid:
        idx rows
        idx channels
        idx n_chunks
        idx chunk_rows
    ctypedef struct Span:
        idx r0
        idx r1
        idx i0
        idx i1

    NCGrid nc_grid(idx outer, idx inner)
    Span nc_chunk(NCGrid g, idx k)
    Span row_span(idx r, idx inner)
    NLCGrid nlc_grid(idx rows, idx channels)
    void merge_into(Moments& a, double nb, double mb, double m2b)
    double invstd_of(double n, double m2, double eps)
    void update_running_all[R](idx C, R* rm, idx sm, R* rv, idx sv, const double* mean,
                               const double* var, double count, double momentum)
    void inference_scales(idx C, const double* weight, const double* running_var, double eps,
                         double* scale)
    void finalize_channels(idx C, const double* count, idx count_step, double eps, double* var,
                           double* invstd, const double* weight, double* scale)
    void backward_coefficients_all(idx C, const double* sdy, const double* sxmu,
                                   const double* invstd, const double* weight, double m,
                                   bint frozen, double* a, double* b, double* c)
    void fold_chunk_sums(idx n_chunks, idx C, const double* pd, const double* pq, double* sdy,
                         double* sxmu)
    double merge_chunks_nlc(idx n_chunks, idx C, const double* counts, const double* means,
                            const double* m2s, double* out_mean, double* out_m2)
    void merge_column_groups(idx C, idx group, double n, const double* col_mean,
                             const double* col_m2, double* mean, double* m2)
    void sum_column_groups(idx C, idx group, const double* col, double* out)
    void expand_to_columns(idx C, idx group, const double* v, double* out)

    Moments chunk_moments_nc[T](const T* xc, idx so, Span s)
    void channel_range_moments_nc[T](const T* x, idx so, idx sc, NCGrid g, idx c0, idx c1,
                                     double* counts, double* mean, double* m2, double* chunk)
    void normalize_nc[T](const T* xc, T* yc, idx sox, idx soy, Span s, double mean,
                         double scale, double shift, Epilogue e, idx c)
    Moments train_forward_channel_nc[T](const T* xc, T* yc, idx sox, idx soy, NCGrid g,
                                        double weight, double bias, double eps,
                                        double* invstd_out, Epilogue e, idx c,
                                        const T* x_next)
    Sums chunk_sums_nc[T](const T* dyc, const T* xc, idx sody, idx sox, Span s, double mean,
                          Activation act, idx c, const T* dy_ahead, const T* x_ahead)
    idx short_rows_channels_ahead(idx row_bytes)
    void backward_elementwise_nc[T](const T* dyc, const T* xc, T* dxc, idx sody, idx sox,
                                    idx sodx, Span s, double a, double b, double c,
                                    double mean, bint frozen, Activation act, idx ch,
                                    const T* dy_ahead, const T* x_ahead, const T* dx_ahead)
    Sums backward_channel_nc[T](const T* dyc, const T* xc, T* dxc, idx sody, idx sox,
                                idx sodx, NCGrid g, double mean, double invstd,
                                double weight, bint frozen, Activation act, idx c,
                                const T* dy_next, const T* x_next)
    void train_forward_channels_nc[T](const T* x, T* y, idx sox, idx scx, idx soy, NCGrid g,
                                      idx c0, idx c1, const double* weight, const double* bias,
                                      double eps, double* mean, double* var, double* invstd,
                                      Epilogue e, const T* x_next)
    void backward_channels_nc[T](const T* dy, const T* x, T* dx, idx sody, idx scdy, idx sox,
                                 idx scx, idx sodx, NCGrid g, idx c0, idx c1,
                                 const double* mean, const double* invstd,
                                 const double* weight, bint frozen, Activation act,
                                 double* sdy, double* sxmu, const T* dy_next, const T* x_next)
    const idx STAGE_BYTES
    bint streams_rows_from_registers(bint half_data) nogil
    uint64_t floor_read(const unsigned char* a, idx b0, idx b1)
    void floor_write(const unsigned char* a, const unsigned char* b, unsigned char* out, idx b0,
                     idx b1, bint stream)
    uint64_t floor_fused_channels(const unsigned char* a, const unsigned char* b,
                                  unsigned char* out, idx outer, idx C, idx inner_bytes,
                                  idx block, idx u0, idx u1, bint ask_ahead, bint stream)
    uint64_t floor_pieces_read(const unsigned char* a, const unsigned char* b, idx n,
                               idx piece, idx k0, idx k1)
    void floor_pieces_write(const unsigned char* a, const unsigned char* b, unsigned char* out,
                            idx n, idx piece, idx k0, idx k1, bint most_recent_first,
                            bint stream)
    const idx MAX_BLOCK_CHANNELS

    double chunk_moments_nlc[T](const T* x, idx sr, NLCGrid g, idx r0, idx r1, double* mean,
                                double* m2, double* bmean, double* bm2, bint spread_ahead)
    void finish_statistics_nlc[T](const T* dtype_tag, idx n_chunks, idx C, const double* counts,
                                  const double* means, const double* m2s, double eps,
                                  const double* weight, const double* bias, double* mean,
                                  double* var, double* invstd, void* buf, idx b0, idx b1)
    void finish_backward_sums_nlc[T](const T* dtype_tag, idx n_chunks, idx C, const double* pd,
                                     const double* pq, const double* mean, const double* invstd,
                                     const double* weight, double m, bint frozen, double* sdy,
                                     double* sxmu, void* buf, idx b0, idx b1)
    idx finish_blocks(idx C)
    void team_barrier()
    void prepare_channel_constants[T](const T* dtype_tag, idx C, idx group, const double* mean, const double* p0,
                                      const double* p1, const double* p2, void* buf)
    void normalize_nlc[T](const T* x, T* y, idx srx, idx sry, idx C, idx r0, idx r1,
                          const void* buf, Epilogue e)
    void normalize_rows_nc[T](const T* x, T* y, idx sox, idx scx, idx soy, idx scy, idx C,
                              idx inner, idx w0, idx w1, const void* buf, Epilogue e)
    void chunk_sums_nlc[T](const T* dy, const T* x, idx srdy, idx srx, idx C, idx r0, idx r1,
                           const double* mean, double* sdy, double* sxmu, Activation act,
                           bint spread_ahead)
    void backward_elementwise_nlc[T](const T* dy, const T* x, T* dx, idx srdy, idx srx,
                                     idx srdx, idx C, idx r0, idx r1, const void* buf,
                                     bint frozen, Activation act)


ctypedef fused data_t:
    float
    double
    half
    bf16


def openmp_enabled():
    """True when the extension was compiled with OpenMP."""
    return bool(FASTBN_OPENMP_ENABLED)


def half_conversion():
    """The float16 <-> float conversions in use: 'avx512', 'f16c' or 'plain' (the widest
    the CPU has, capped by FASTBN_HALF_CONVERSION=plain|f16c)."""
    return half_conversion_name().decode()


def channel_tiles():
    """True when channels-last elementwise passes keep channel tiles' constants in AVX-512
    registers (the CPU has AVX-512 F/BW/VL and FASTBN_CHANNEL_TILES is not 'off')."""
    return bool(channel_tiles_available())


def channel_block(idx outer, idx C, idx inner, int itemsize, int n_inputs, int n_threads):
    """Channels per block with which the fused passes stream a large contiguous NC output
    of short rows (inputs: 1 for the training forward, 2 for backward); 0: none (rows
    written one channel at a time with ordinary stores, or long enough to stream alone)."""
    if not _short_rows(inner, itemsize):
        return 0
    return _channel_block(C, outer, inner, itemsize, inner, n_inputs, n_threads)


# ----------------------------------------------------------------- thread count, streaming
# fastbn.set_num_threads's count (0: OpenMP's default team size), kept here so that the
# compiled plain calls read it without a Python call.
cdef int _threads_set = 0

# Below this many elements a call runs on one thread: waking an OpenMP team costs more
# than the work. Measured (2 threads, float32 training forward, whole call, interleaved):
# (16,32,8,8) 17.4 -> 12.8 us on 2 threads, (8,32,8,8) 13.1 -> 10.4 us. The results are
# the same bits either way. (Any multi-threaded call made while another runtime's threads
# spin, e.g. OpenBLAS's after a NumPy matmul, can wait milliseconds for a core; README,
# "Threads".)
cdef idx _PARALLEL_MIN_ELEMENTS = 1 << 14


def set_num_threads(int n):
    """Threads of the next calls; 0: OpenMP's default (fastbn.set_num_threads checks n)."""
    global _threads_set
    _threads_set = n


cdef inline int _num_threads() noexcept:
    return _threads_set if _threads_set > 0 else max(1, omp_get_max_threads())


def num_threads():
    """Threads a large call uses (fastbn.get_num_threads)."""
    return _num_threads()


cdef inline int _threads_for(idx size) noexcept:
    return 1 if size < _PARALLEL_MIN_ELEMENTS else _num_threads()


def threads_for(idx size):
    """Threads a call on `size` elements uses."""
    return _threads_for(size)


# Training forward and backward write outputs at least this large with non-temporal
# (streaming) stores: their second pass re-reads inputs from cache while the output, too
# large to stay cached for its next reader, would otherwise cost a read of every line
# it overwrites. Measured with a warm heap, (32,64,56,56) float32, 2 threads: training
# forward 2.30 -> 2.07 ms, backward 3.21 -> 3.01 ms; (8,256,28,28) float64 training
# 0.86 -> 0.75 ms. Inference (one read, one write) streams only the rows that
# _inference_rows_stream names: NC rows staged through L1 and then streamed were slower
# than ordinary stores (1.43 -> 1.83 ms, 0.42 -> 0.62 ms when first measured).
cdef idx _STREAM_MIN_BYTES = 8 << 20


cdef inline bint _stream_out(idx nbytes, idx C, idx inner, idx so_bytes, idx sc_bytes,
                             idx itemsize) noexcept:
    # only where the stores write whole cache lines (partial-line streaming stores are
    # slow): long rows, rows of channels that follow each other in memory (short ones are
    # streamed a block of channels at a time, or not at all: the kernels decide per path),
    # rows of a channels-last array that follow each other
    if nbytes < _STREAM_MIN_BYTES:
        return False
    if inner > 1:
        return inner * itemsize >= 1024 or (inner > _SHORT_ROW_MAX and sc_bytes == inner * itemsize)
    return so_bytes == C * itemsize


# Statistics, inference and backward sums over inputs (x; dy and x) at least this large
# -- more than a core's L2, so taken not to be cache-resident -- ask for what comes next a
# line at a time in wide channels-last rows (bn_kernels.hpp, sweep_asking_ahead).
cdef idx _SPREAD_AHEAD_MIN_BYTES = 1 << 20

# The second pass of a channels-last training forward or backward re-reads the rows each
# thread reduced; while they fit its L2 (at most this much of each input per thread), wide
# rows are walked a strip of channels at a time (bn_kernels.hpp, normalize_strips_nlc).
# Beyond it the strips cost more than they save (cold (64, 16384) float32 training
# forward, 2 MB a thread: 0.317-0.431 -> 0.326-0.479 ms).
cdef idx _STRIPS_MAX_BYTES_PER_THREAD = 1 << 20


def thresholds(parallel_min_elements=None, stream_min_bytes=None, spread_ahead_min_bytes=None,
               strips_max_bytes_per_thread=None):
    """The size policies in force, (parallel_min_elements, stream_min_bytes,
    spread_ahead_min_bytes, strips_max_bytes_per_thread), after setting those given (tests
    switch them)."""
    global _PARALLEL_MIN_ELEMENTS, _STREAM_MIN_BYTES, _SPREAD_AHEAD_MIN_BYTES
    global _STRIPS_MAX_BYTES_PER_THREAD
    if parallel_min_elements is not None:
        _PARALLEL_MIN_ELEMENTS = parallel_min_elements
    if stream_min_bytes is not None:
        _STREAM_MIN_BYTES = stream_min_bytes
    if spread_ahead_min_bytes is not None:
        _SPREAD_AHEAD_MIN_BYTES = spread_ahead_min_bytes
    if strips_max_bytes_per_thread is not None:
        _STRIPS_MAX_BYTES_PER_THREAD = strips_max_bytes_per_thread
    return (_PARALLEL_MIN_ELEMENTS, _STREAM_MIN_BYTES, _SPREAD_AHEAD_MIN_BYTES,
            _STRIPS_MAX_BYTES_PER_THREAD)


cdef inline bint _rereads_from_cache(cnp.ndarray x3, int n_threads):
    # whether a second pass over x3 finds each thread's rows in its L2 (see above)
    return cnp.PyArray_NBYTES(x3) <= _STRIPS_MAX_BYTES_PER_THREAD * max(n_threads, 1)


def stream_output(cnp.ndarray out3):
    """Whether the training forward and backward stream their (outer, C, inner) output."""
    return _stream_out(cnp.PyArray_NBYTES(out3), out3.shape[1], out3.shape[2],
                       cnp.PyArray_STRIDES(out3)[0], cnp.PyArray_STRIDES(out3)[1],
                       cnp.PyArray_ITEMSIZE(out3))


cdef inline bint _inference_rows_stream(idx nbytes, idx C, idx inner, idx itemsize,
                                        int code) noexcept nogil:
    # Of the outputs _stream_out allows, inference streams those of twice its size (16
    # MiB) whose rows go out straight from registers (bn_kernels.hpp): NC rows of 1 KB or
    # more and float32 channels-last rows of 16 channels or more (stream_run). Inference
    # streamed or stored, one
    # build, in turn, cold inputs, 2 threads, on a host whose streamed copy drifted
    # between 42 and 50 GB/s: (32,64,56,56) float32 NC rows from registers 0.75-0.77x
    # the stored time in one state of the host and 0.87-0.97x in another; staged through
    # L1 0.99-1.10x.
    # Channels-last (32,56,56,64) float32 from registers 0.77-0.80x, (32,28,28,256)
    # 0.55x; staged four rows at a time 0.76-0.80x, then 0.91-1.08x, and 1.07-1.33x with
    # 56 channels; float16 from registers 1.06-1.69x. Below 16 MiB an output and its
    # input fit the 32 MB last-level cache, where stored outputs were often the faster
    # ((8,256,28,28) float64: 0.76x in the first state, 1.07-1.23x in the second; float16
    # (32,64,56,56) 0.75x and 1.11x). 7x7 NC rows (196 bytes) from registers 1.37x.
    if nbytes // 2 < _STREAM_MIN_BYTES:
        return False
    if inner == 1:
        return code == 0 and C >= 16 and streams_rows_from_registers(False)
    return inner * itemsize >= 1024 and streams_rows_from_registers(code == 2)


def inference_stream(cnp.ndarray out3):
    """Whether an inference streams its (outer, C, inner) output (_inference_rows_stream)."""
    return stream_output(out3) and _inference_rows_stream(
        cnp.PyArray_NBYTES(out3), out3.shape[1], out3.shape[2], cnp.PyArray_ITEMSIZE(out3),
        _dtype_code(out3))


cdef enum:
    _FLOOR_MAX_THREADS = 256  # floor_pass: the most threads it runs


cdef struct FloorCall:
    const unsigned char* a
    const unsigned char* b  # NULL: none
    unsigned char* out  # NULL: none
    idx n  # bytes of each
    int threads  # 1.._FLOOR_MAX_THREADS


cdef FloorCall _floor_call(str name, cnp.ndarray a, cnp.ndarray b, cnp.ndarray out,
                           int n_threads) except *:
    # the floors' arrays (b, out: None allowed) after checking that they can be walked,
    # and the team size
    cdef FloorCall f
    f.n = cnp.PyArray_NBYTES(a)
    for v in (a, b, out):
        if v is not None and not (<cnp.ndarray> v).flags.c_contiguous:
            raise ValueError(f"{name}: arrays must be C-contiguous")
        if v is not None and cnp.PyArray_NBYTES(<cnp.ndarray> v) != f.n:
            raise ValueError(f"{name}: arrays must have a's byte size")
    f.a = <const unsigned char*> cnp.PyArray_DATA(a)
    f.b = <const unsigned char*> cnp.PyArray_DATA(b) if b is not None else NULL
    f.out = <unsigned char*> cnp.PyArray_DATA(out) if out is not None else NULL
    f.threads = max(1, min(n_threads, _FLOOR_MAX_THREADS))
    return f


cdef inline uint64_t _xor_of(const uint64_t* each, int n) noexcept nogil:
    # the per-thread results of a floor's read, folded (threads the team did not get: 0)
    cdef uint64_t r = 0
    cdef int t
    for t in range(n):
        r ^= each[t]
    return r


def floor_pass(cnp.ndarray a not None, cnp.ndarray b, cnp.ndarray out, int n_threads,
               bint stream):
    """benchmarks/compare.py's memory floor: the traffic of a call, next to no arithmetic.
    IN a, b (None, or a's byte size), OUT out (None: a read of a; else out = a ^ b bytewise,
    or a copy of a), all C-contiguous; streaming or ordinary stores; at most
    _FLOOR_MAX_THREADS threads. Returns the xor of a read's 8-byte words (so that it is not
    optimized away), else 0."""
    cdef FloorCall f = _floor_call("floor_pass", a, b, out, n_threads)
    cdef uint64_t r = 0
    cdef uint64_t each[_FLOOR_MAX_THREADS]  # a read's per-thread results (no allocation)
    with nogil:
        if f.out == NULL:
            if f.threads == 1:
                r = floor_read(f.a, 0, f.n)
            else:
                memset(each, 0, f.threads * sizeof(uint64_t))
                with parallel(num_threads=f.threads):
                    each[threadid()] = floor_read(f.a, _team_start(f.n, 0), _team_start(f.n, 1))
                r = _xor_of(each, f.threads)
        elif f.threads == 1:
            floor_write(f.a, f.b, f.out, 0, f.n, stream)
        else:
            with parallel(num_threads=f.threads):
                floor_write(f.a, f.b, f.out, _team_start(f.n, 0), _team_start(f.n, 1), stream)
    return r


def floor_fused(cnp.ndarray a not None, cnp.ndarray b, cnp.ndarray out not None, idx outer,
                idx C, idx block, bint ask_ahead, int n_threads, bint stream):
    """benchmarks/compare.py's floor for the fused per-channel passes: the same bytes in
    the same order, next to no arithmetic. a, b (None, or a's byte size) and out,
    C-contiguous, walked as (outer, C, inner) bytes in blocks of `block` adjacent channels
    (1: single channels; short rows: channel_block's): per block its rows of a and b are
    read (ask_ahead: asking for the bytes ahead as the statistics do on long rows), then
    out = a ^ b (or a copy of a) is written from the last row back while the
    next block is asked for; blocks split over the team as the passes split them; at most
    _FLOOR_MAX_THREADS threads. Returns the xor of the reads."""
    cdef FloorCall f = _floor_call("floor_fused", a, b, out, n_threads)
    cdef uint64_t r = 0
    cdef uint64_t each[_FLOOR_MAX_THREADS]
    if outer < 1 or C < 1 or f.n % (outer * C):
        raise ValueError(f"floor_fused: outer={outer} and C={C} must be positive and divide "
                         f"the {f.n} bytes into rows")
    if block < 1:
        raise ValueError(f"floor_fused: block must be at least 1 channel, got {block}")
    cdef idx inner_bytes = f.n // (outer * C)
    cdef idx units = (C + block - 1) // block
    with nogil:
        if f.threads == 1:
            r = floor_fused_channels(f.a, f.b, f.out, outer, C, inner_bytes, block, 0, units,
                                     ask_ahead, stream)
        else:
            memset(each, 0, f.threads * sizeof(uint64_t))
            with parallel(num_threads=f.threads):
                each[threadid()] = floor_fused_channels(f.a, f.b, f.out, outer, C, inner_bytes,
                                                        block, _team_start(units, 0),
                                                        _team_start(units, 1), ask_ahead,
                                                        stream)
            r = _xor_of(each, f.threads)
    return r


def floor_two_pass(cnp.ndarray a not None, cnp.ndarray b, cnp.ndarray out not None,
                   idx piece_bytes, bint most_recent_first, int n_threads, bint stream):
    """benchmarks/compare.py's floor for the channels-last passes: the same bytes in the
    same order, next to no arithmetic. a, b (None, or a's byte size) and out, C-contiguous,
    in pieces of piece_bytes (the passes' row chunks) split over the team as the passes
    split their chunks: one parallel pass reads every piece of a and b, a second writes
    out = a ^ b (or a copy of a), each thread its own pieces, the last one first where
    most_recent_first; at most _FLOOR_MAX_THREADS threads. Returns the xor of the reads."""
    cdef FloorCall f = _floor_call("floor_two_pass", a, b, out, n_threads)
    cdef uint64_t r = 0
    cdef uint64_t each[_FLOOR_MAX_THREADS]
    if piece_bytes < 1:
        raise ValueError(f"floor_two_pass: piece_bytes must be at least 1, got {piece_bytes}")
    cdef idx pieces = (f.n + piece_bytes - 1) // piece_bytes
    with nogil:
        if f.threads == 1:
            r = floor_pieces_read(f.a, f.b, f.n, piece_bytes, 0, pieces)
            floor_pieces_write(f.a, f.b, f.out, f.n, piece_bytes, 0, pieces, most_recent_first,
                               stream)
        else:
            memset(each, 0, f.threads * sizeof(uint64_t))
            with parallel(num_threads=f.threads):
                each[threadid()] = floor_pieces_read(f.a, f.b, f.n, piece_bytes,
                                                     _team_start(pieces, 0),
                                                     _team_start(pieces, 1))
            with parallel(num_threads=f.threads):
                floor_pieces_write(f.a, f.b, f.out, f.n, piece_bytes, _team_start(pieces, 0),
                                   _team_start(pieces, 1), most_recent_first, stream)
            r = _xor_of(each, f.threads)
    return r


def nlc_chunk_rows(idx rows, idx channels):
    """Rows per chunk of the channels-last passes over (rows, channels) (nlc_grid): the
    pieces of benchmarks/compare.py's two-pass floor."""
    return nlc_grid(rows, channels).chunk_rows


# ------------------------------------------------------------------------ helpers

cdef inline idx _static_start(idx n, int n_threads, int t) noexcept nogil:
    """First of the work items of thread t under schedule='static' (libgomp's split: the
    first n % n_threads threads take one more); thread t's items are
    [_static_start(t), _static_start(t + 1)).

    Returned, not written through pointers: in a parallel block Cython makes a variable
    private only where the block assigns it; one filled through `&name` is shared by the
    team, a data race (README, "Development")."""
    cdef idx q = n // n_threads, r = n % n_threads
    return t * q + (t if t < r else r)


cdef inline idx _team_start(idx n, int next) noexcept nogil:
    """In a `parallel` block: the first of n work items of this thread (next=0) or of the
    next thread (next=1), split as _static_start over the threads the team has.

    The loops are parallel blocks over such ranges rather than prange: a prange's loop
    variable is firstprivate and lastprivate, which GCC orders with a barrier of its own,
    and every barrier's release is a futex system call (~0.18 us here) even in a team of
    one. A block has only its closing barrier, and one thread runs without a parallel
    region. Builds called in turn, both orders: (4,32,8,8) training forward on one thread
    5.3-5.4 -> 4.7-4.8 us, (64,256) backward on one 10.0 -> 8.5 us, (16,32,8,8) training
    on two 8.2 -> 7.7 and 7.7 -> 7.7 us; a hot plain call on (2,32,1,1) 1.8-1.9 -> 0.7 us."""
    return _static_start(n, omp_get_num_threads(), omp_get_thread_num() + next)


cdef inline bint _split_channels(idx C, idx n_chunks, int n_threads) noexcept nogil:
    """Split channels into (channel, chunk) work items when there are too few channels
    to keep every thread busy. Either way the bits are the same."""
    return n_threads > 1 and n_chunks > 1 and C < 4 * n_threads


cdef inline idx _rows_end(NLCGrid g, idx k) noexcept nogil:
    cdef idx r1 = (k + 1) * g.chunk_rows
    return r1 if r1 < g.rows else g.rows


_scratch_store = threading.local()


cdef cnp.ndarray _scratch(Py_ssize_t n, int slot):
    """A float64 work buffer of at least n values, kept per Python thread and reused:
    chunk partials can be hundreds of KB, and a fresh allocation of that size costs page
    faults on every call."""
    cdef list bufs = getattr(_scratch_store, "bufs", None)
    if bufs is None:
        bufs = _scratch_store.bufs = [None, None, None]
    cdef cnp.ndarray b = bufs[slot]
    if b is None or b.shape[0] < n:
        b = bufs[slot] = np.empty(max(n, 1), dtype=np.float64)
    return b


# NC arrays with rows of at most SHORT_ROW_MAX elements are walked as channels-last rows
# of C*inner columns (bn_kernels.hpp, "short rows as columns"): per-row work over a few
# elements cost several times the arithmetic. Measured, 2 threads, float32, 64 channels,
# 8 MB: rows of 4: training forward 3.1 -> 0.33 ms, backward 5.5 -> 0.55 ms; rows of 16:
# 1.7 -> 0.4 ms, 1.7 -> 0.64 ms; rows of 32 were mixed and of 64 slower. The Python layer
# copies views whose channels are not side by side (fastbn._api._kernel_ready), so that a
# view and its contiguous copy take the same path.
cdef idx _SHORT_ROW_MAX = 16
SHORT_ROW_MAX = _SHORT_ROW_MAX


cdef idx _fold_group(tuple arrays):
    """inner when the (outer, C, inner) views (None: absent) have short rows and their
    channels side by side (channel stride inner), so that a row of C*inner contiguous
    columns can be walked as a channels-last row; 0 otherwise."""
    cdef cnp.ndarray a = arrays[0]
    cdef idx C = a.shape[1], inner = a.shape[2]
    if inner < 2 or inner > _SHORT_ROW_MAX:
        return 0
    for o in arrays:
        if o is None:
            continue
        a = o
        if _stride(a, 2) != 1 or (C > 1 and _stride(a, 1) != inner):
            return 0
    return inner


cdef inline double* _ext_ptr(object ext):
    if ext is None:
        return NULL
    return <double*> cnp.PyArray_DATA(ext)


cdef inline double* _dptr(cnp.ndarray a):
    return <double*> cnp.PyArray_DATA(a)


cdef inline idx _stride(cnp.ndarray a, int axis):
    return cnp.PyArray_STRIDES(a)[axis] // cnp.PyArray_ITEMSIZE(a)


# ----------------------------------------------------------------- statistics

cdef inline void _chunk_moments_nc_items(const data_t* x, idx so, idx sc, NCGrid g, double* parts,
                                         idx w0, idx w1) noexcept nogil:
    # (channel, chunk) items [w0, w1): (n, mean, m2) partials to parts
    cdef idx w
    cdef Moments m
    for w in range(w0, w1):
        m = chunk_moments_nc(x + (w // g.n_chunks) * sc, so, nc_chunk(g, w % g.n_chunks))
        parts[3 * w] = m.n
        parts[3 * w + 1] = m.mean
        parts[3 * w + 2] = m.m2


cdef void _moments_nc(const data_t* x, idx so, idx sc, NCGrid g, idx C, double* counts,
                      double* mean, double* m2, double* parts, int n_threads) noexcept nogil:
    # IN x (outer, C, inner); OUT counts, mean, m2 (C,); parts: 3*C*n_chunks scratch
    # (at least 3*C)
    cdef idx c, k, w, lo, hi
    cdef Moments m
    if not _split_channels(C, g.n_chunks, n_threads):
        # each thread a range of channels, walked in memory order (chunk partials in parts)
        if n_threads == 1:
            channel_range_moments_nc(x, so, sc, g, 0, C, counts, mean, m2, parts)
        else:
            with parallel(num_threads=n_threads):
                lo = _team_start(C, 0)
                hi = _team_start(C, 1)
                if lo < hi:
                    channel_range_moments_nc(x, so, sc, g, lo, hi, counts + lo, mean + lo,
                                             m2 + lo, parts + 3 * lo)
        return
    # split: n_threads > 1
    with parallel(num_threads=n_threads):
        _chunk_moments_nc_items(x, so, sc, g, parts, _team_start(C * g.n_chunks, 0),
                                _team_start(C * g.n_chunks, 1))
    for c in range(C):
        m.n = 0
        m.mean = 0
        m.m2 = 0
        for k in range(g.n_chunks):
            w = c * g.n_chunks + k
            merge_into(m, parts[3 * w], parts[3 * w + 1], parts[3 * w + 2])
        counts[c] = m.n
        mean[c] = m.mean
        m2[c] = m.m2


cdef inline idx _thread_scratch_stride(idx C) noexcept nogil:
    # 2*C doubles per thread, rounded up to whole cache lines plus two lines of padding:
    # a block's accumulators are updated every few rows, and two threads' accumulators in
    # one line (or in an adjacent-line prefetch pair) made the statistics 20-30 % slower or
    # not depending on where the buffer happened to start
    return (2 * C + 7) // 8 * 8 + 16


cdef inline void _chunk_moments_nlc_items(const data_t* x, idx sr, NLCGrid g, double* parts,
                                          double* mine, bint spread_ahead, idx k0,
                                          idx k1) noexcept nogil:
    # chunks [k0, k1) of _moments_nlc's parts; mine: this thread's scratch
    cdef idx C = g.channels, k
    cdef double* pm = parts + g.n_chunks
    cdef double* pq = pm + C * g.n_chunks
    for k in range(k0, k1):
        parts[k] = chunk_moments_nlc(x, sr, g, k * g.chunk_rows, _rows_end(g, k), pm + k * C,
                                     pq + k * C, mine, mine + C, spread_ahead)


cdef void _moments_nlc_parts(const data_t* x, idx sr, NLCGrid g, double* parts, int n_threads,
                             bint spread_ahead) noexcept nogil:
    # IN x (rows, C); OUT parts: n_chunks counts, then the chunks' means and M2s (C each,
    # chunk k at k*C), then a cache-line-aligned scratch of _thread_scratch_stride(C) per
    # thread
    if n_threads == 1:
        _chunk_moments_nlc_items(x, sr, g, parts, _thread_scratch(parts, g), spread_ahead, 0,
                                 g.n_chunks)
    else:
        with parallel(num_threads=n_threads):
            _chunk_moments_nlc_items(x, sr, g, parts, _thread_scratch(parts, g), spread_ahead,
                                     _team_start(g.n_chunks, 0), _team_start(g.n_chunks, 1))


cdef inline double* _thread_scratch(double* parts, NLCGrid g) noexcept nogil:
    # the calling thread's scratch in _moments_nlc_parts's parts (thread 0's outside a
    # parallel block): past the chunks' partials, cache-line aligned, one
    # _thread_scratch_stride(C) per thread
    cdef double* end = parts + g.n_chunks + 2 * g.channels * g.n_chunks
    cdef double* scratch = <double*> ((<size_t> end + 63) & ~(<size_t> 63))
    return scratch + _thread_scratch_stride(g.channels) * omp_get_thread_num()


cdef void _moments_nlc(const data_t* x, idx sr, NLCGrid g, double* counts, double* mean,
                       double* m2, double* parts, int n_threads, bint spread_ahead) noexcept nogil:
    # IN x (rows, C); OUT counts (1,), mean, m2 (C,); parts: as _moments_nlc_parts
    cdef idx C = g.channels
    _moments_nlc_parts(x, sr, g, parts, n_threads, spread_ahead)
    counts[0] = merge_chunks_nlc(g.n_chunks, C, parts, parts + g.n_chunks,
                                 parts + g.n_chunks + C * g.n_chunks, mean, m2)


cdef idx _moments_work_size(cnp.ndarray x3, int n_threads, idx group):
    cdef idx outer = x3.shape[0], C = x3.shape[1], inner = x3.shape[2]
    cdef NLCGrid gl
    if group:
        C = C * group
    if inner == 1 or group:
        gl = nlc_grid(outer, C)
        return gl.n_chunks * (1 + 2 * C) + 8 + _thread_scratch_stride(C) * n_threads
    return 3 * C * nc_grid(outer, inner).n_chunks


cdef void _moments_any(const data_t* x, cnp.ndarray x3, double* counts, double* mean,
                       double* m2, double* parts, double* ext, int n_threads,
                       idx group) noexcept:
    # ext: 2*C*group scratch (column moments) when group
    cdef idx outer = x3.shape[0], C = x3.shape[1], inner = x3.shape[2]
    cdef idx so = _stride(x3, 0), sc = _stride(x3, 1), c
    cdef bint spread_ahead = cnp.PyArray_NBYTES(x3) >= _SPREAD_AHEAD_MIN_BYTES
    if group:
        with nogil:
            _moments_nlc(x, so, nlc_grid(outer, C * group), counts, ext, ext + C * group, parts,
                         n_threads, spread_ahead)
            merge_column_groups(C, group, counts[0], ext, ext + C * group, mean, m2)
    elif inner == 1:
        with nogil:
            _moments_nlc(x, so, nlc_grid(outer, C), counts, mean, m2, parts, n_threads,
                         spread_ahead)
            for c in range(1, C):
                counts[c] = counts[0]
    else:
        with nogil:
            _moments_nc(x, so, sc, nc_grid(outer, inner), C, counts, mean, m2, parts, n_threads)


def moments(cnp.ndarray x3, cnp.ndarray mean, cnp.ndarray m2, int n_threads):
    """Per-channel count, mean and M2 (sum of squared deviations) of x3.

    x3: validated (outer, C, inner) view. mean, m2: preallocated float64 (C,).
    Returns the count (elements per channel)."""
    cdef idx C = x3.shape[1]
    cdef idx group = _fold_group((x3,))
    cdef cnp.ndarray counts = np.zeros(max(C, 1), dtype=np.float64)
    cdef cnp.ndarray parts = _scratch(_moments_work_size(x3, n_threads, group), 0)
    cdef double* ext = _ext_ptr(_scratch(2 * C * group, 2) if group else None)
    cdef void* p = cnp.PyArray_DATA(x3)
    cdef int code = _dtype_code(x3)
    if code == 0:
        _moments_any[float](<const float*> p, x3, _dptr(counts), _dptr(mean), _dptr(m2), _dptr(parts), ext, n_threads, group)
    elif code == 1:
        _moments_any[double](<const double*> p, x3, _dptr(counts), _dptr(mean), _dptr(m2), _dptr(parts), ext, n_threads, group)
    elif code == 2:
        _moments_any[half](<const half*> p, x3, _dptr(counts), _dptr(mean), _dptr(m2), _dptr(parts), ext, n_threads, group)
    else:
        _moments_any[bf16](<const bf16*> p, x3, _dptr(counts), _dptr(mean), _dptr(m2), _dptr(parts), ext, n_threads, group)
    return x3.shape[0] * x3.shape[2]


cdef int _dtype_code(cnp.ndarray a):
    cdef int num = cnp.PyArray_TYPE(a)
    if num == cnp.NPY_FLOAT32:
        return 0
    if num == cnp.NPY_FLOAT64:
        return 1
    if num == cnp.NPY_FLOAT16:
        return 2
    return 3  # bfloat16 (ml_dtypes), admitted by the Python layer only


# --------------------------------------------------------------- forward passes

cdef void _optional_view(object a3, const void** data, idx* so, idx* sc):
    """Data pointer and outer/channel strides of an optional (outer, C, inner) view."""
    data[0] = NULL
    so[0] = 0
    sc[0] = 0
    if a3 is not None:
        data[0] = cnp.PyArray_DATA(a3)
        so[0] = _stride(a3, 0)
        sc[0] = _stride(a3, 1)


cdef Epilogue _epilogue(object res3, bint relu, bint stream):
    cdef Epilogue e
    e.relu = relu
    e.stream = stream
    e.spread = False
    e.strips = False
    _optional_view(res3, &e.res, &e.res_so, &e.res_sc)
    return e


cdef Activation _activation(object y3, object dres3, bint stream):
    cdef Activation act
    cdef const void* dres
    act.stream = stream
    act.strips = False
    _optional_view(y3, &act.y, &act.y_so, &act.y_sc)
    _optional_view(dres3, &dres, &act.dres_so, &act.dres_sc)
    act.dres = <void*> dres
    return act


# --------------------------------------------------------------- forward passes

cdef inline idx _prefetch_channels_end(idx C, idx outer, idx inner, size_t itemsize,
                                       bint backward) noexcept nogil:
    # The fused per-channel passes ask for channel c + 1 while they write channel c from
    # cache when c + 1 < this, a piece of each row at a time (for_each_row_piece). Rows
    # under 4 KB, which the hardware prefetcher follows badly (far apart, short):
    # (128,512,7,7) float32, 2 threads: backward 2.3 -> 1.9 ms, training 2.0 -> 1.8 ms;
    # (32,128,28,28): -8% / -10%. Longer rows once asked for a whole row of the next
    # channel at a time, which outran the core's misses and was slower (56x56 float32);
    # spread over the row it is faster (cold, 2 threads, builds called in turn in one
    # process): (32,64,56,56) float32 backward 2.02 -> 1.80 ms, training 1.21 -> 1.08;
    # (8,256,28,28) float64 backward 0.97 -> 0.81, training 0.47 -> 0.40; (8,256,56,56)
    # float64 training 1.58 -> 1.34; (8,64,112,112) float32 training 1.18 -> 1.08,
    # backward 1.83 -> 1.72; float16 backward 1.15 -> 1.03; 1 thread: training 1.76 ->
    # 1.67, backward 2.89 vs 2.91. Not the training forward of long 16-bit rows (0.77 ->
    # 0.81 ms), nor channels whose inputs would not share L2 with the next one's (over
    # 1 MB: not measured).
    cdef idx row_bytes = inner * <idx> itemsize
    if row_bytes < 4096:
        return C
    if not backward and itemsize == 2:
        return 0
    if outer * row_bytes * (2 if backward else 1) > 1024 * 1024:
        return 0
    return C


# Rows shorter than this are not streamed one by one (their partial lines are slow):
# large outputs with such rows are streamed a block of channels at a time, each of the
# block's rows one contiguous run (bn_kernels.hpp, "nc channel blocks"), or not at all.
cdef idx _WHOLE_ROW_STREAM_BYTES = 1024
# A block's rows are runs of about _CHANNEL_BLOCK_RUN bytes, fewer channels where its
# inputs (x; dy and x) would not stay in L2 between its two passes (_CHANNEL_BLOCK_BYTES).
cdef idx _CHANNEL_BLOCK_RUN = 2048
cdef idx _CHANNEL_BLOCK_BYTES = 1024 * 1024


cdef inline bint _short_rows(idx inner, size_t itemsize) noexcept nogil:
    """NC rows too short to be streamed one by one."""
    return inner * <idx> itemsize < _WHOLE_ROW_STREAM_BYTES


cdef inline idx _channel_block(idx C, idx outer, idx inner, size_t itemsize, idx out_sc,
                               int n_inputs, int n_threads) noexcept nogil:
    """Channels per block for a streamed NC output of short rows; 0 where a block's row
    would not be a run of at least _WHOLE_ROW_STREAM_BYTES (or the output's channels do not
    follow each other)."""
    cdef idx row_bytes = inner * <idx> itemsize
    cdef idx n = (_CHANNEL_BLOCK_RUN + row_bytes - 1) // row_bytes
    n = min(n, STAGE_BYTES // row_bytes, MAX_BLOCK_CHANNELS, (C + n_threads - 1) // n_threads,
            _CHANNEL_BLOCK_BYTES // (n_inputs * outer * row_bytes))
    if out_sc != inner or n * row_bytes < _WHOLE_ROW_STREAM_BYTES:
        return 0
    return n


cdef inline void _normalize_nlc_chunks(const data_t* x, data_t* y, idx sox, idx soy, NLCGrid gl,
                                       const double* consts, Epilogue e, bint most_recent_first,
                                       idx k0, idx k1) noexcept nogil:
    # channels-last row chunks [k0, k1), the last one first where most_recent_first
    cdef idx k, kk
    for k in range(k0, k1):
        kk = k1 - 1 - (k - k0) if most_recent_first else k
        normalize_nlc(x, y, sox, soy, gl.channels, kk * gl.chunk_rows, _rows_end(gl, kk), consts, e)


cdef inline void _normalize_nlc(const data_t* x, data_t* y, idx sox, idx soy, NLCGrid gl,
                                const double* consts, Epilogue e, bint most_recent_first,
                                int n_threads) noexcept nogil:
    # every channels-last row chunk, each thread its static share
    if n_threads == 1:
        _normalize_nlc_chunks(x, y, sox, soy, gl, consts, e, most_recent_first, 0, gl.n_chunks)
    else:
        with parallel(num_threads=n_threads):
            _normalize_nlc_chunks(x, y, sox, soy, gl, consts, e, most_recent_first,
                                  _team_start(gl.n_chunks, 0), _team_start(gl.n_chunks, 1))


cdef inline void _train_blocks_nc(const data_t* x, data_t* y, idx sox, idx scx, idx soy, NCGrid g,
                                  idx C, idx nb, const double* weight, const double* bias,
                                  double eps, double* mean, double* var, double* invstd,
                                  Epilogue e, idx b0, idx b1) noexcept nogil:
    # blocks [b0, b1) of nb channels, each fused (statistics, then normalized)
    cdef idx b, c0, c1
    for b in range(b0, b1):
        c0 = b * nb
        c1 = min(c0 + nb, C)
        train_forward_channels_nc(x, y, sox, scx, soy, g, c0, c1, weight, bias, eps, mean, var,
                                  invstd, e, x + c1 * scx if c1 < C else NULL)


cdef inline void _train_channels_nc(const data_t* x, data_t* y, idx sox, idx scx, idx soy, idx scy,
                                    NCGrid g, idx C, idx pf_end, const double* weight,
                                    const double* bias, double eps, double* mean, double* var,
                                    double* invstd, Epilogue e, idx c0, idx c1) noexcept nogil:
    # channels [c0, c1), each fused (statistics, then normalized)
    cdef idx c
    cdef Moments m
    for c in range(c0, c1):
        m = train_forward_channel_nc(x + c * scx, y + c * scy, sox, soy, g, weight[c], bias[c],
                                     eps, &invstd[c], e, c,
                                     x + (c + 1) * scx if c + 1 < pf_end else NULL)
        mean[c] = m.mean
        var[c] = m.m2 / m.n


cdef inline void _normalize_nc_items(const data_t* x, data_t* y, idx sox, idx scx, idx soy,
                                     idx scy, NCGrid g, const double* mean, const double* invstd,
                                     const double* weight, const double* bias, Epilogue e,
                                     idx w0, idx w1) noexcept nogil:
    # (channel, chunk) items [w0, w1) normalized with the training statistics
    cdef idx w, c
    for w in range(w0, w1):
        c = w // g.n_chunks
        normalize_nc(x + c * scx, y + c * scy, sox, soy, nc_chunk(g, w % g.n_chunks), mean[c],
                     weight[c] * invstd[c], bias[c], e, c)


cdef inline void _train_nlc_team(const data_t* x, data_t* y, idx sox, idx soy, NLCGrid gl,
                                 double eps, const double* weight, const double* bias,
                                 double* mean, double* var, double* invstd, double* parts,
                                 double* consts, Epilogue e, bint spread_ahead) noexcept nogil:
    # channels-last training forward by each thread of a parallel block (or one thread
    # alone), as _backward_nlc_team: its row chunks' moments (parts as _moments_nlc_parts),
    # its share of the channels' statistics and constants, then it normalizes the chunks it
    # reduced, walking back (the rows it read most recently are still in its cache)
    cdef idx C = gl.channels, nb = finish_blocks(C)
    cdef double* pm = parts + gl.n_chunks
    cdef double* pq = pm + C * gl.n_chunks
    _chunk_moments_nlc_items(x, sox, gl, parts, _thread_scratch(parts, gl), spread_ahead,
                             _team_start(gl.n_chunks, 0), _team_start(gl.n_chunks, 1))
    team_barrier()
    finish_statistics_nlc(x, gl.n_chunks, C, parts, pm, pq, eps, weight, bias, mean, var, invstd,
                          consts, _finish_share(nb, gl.n_chunks, 0),
                          _finish_share(nb, gl.n_chunks, 1))
    team_barrier()
    _normalize_nlc_chunks(x, y, sox, soy, gl, consts, e, True, _team_start(gl.n_chunks, 0),
                          _team_start(gl.n_chunks, 1))


cdef void _train_forward(const data_t* x, data_t* y, cnp.ndarray x3, cnp.ndarray y3,
                         const double* weight, const double* bias, double eps,
                         double* mean, double* var, double* invstd, double* parts,
                         double* consts, double* ext, Epilogue e, int n_threads,
                         idx group) noexcept:
    # group: short rows walked as C*group columns; ext: 2*C*group scratch
    cdef idx outer = x3.shape[0], C = x3.shape[1], inner = x3.shape[2]
    cdef idx Cf = C * group if group else C
    cdef idx sox = _stride(x3, 0), scx = _stride(x3, 1)
    cdef idx soy = _stride(y3, 0), scy = _stride(y3, 1)
    cdef NCGrid g
    cdef NLCGrid gl
    cdef Moments m
    cdef idx nb, nblocks
    cdef bint split
    cdef double count
    cdef idx pf_end = _prefetch_channels_end(C, outer, inner, sizeof(data_t), False)
    cdef bint spread_ahead = cnp.PyArray_NBYTES(x3) >= _SPREAD_AHEAD_MIN_BYTES
    with nogil:
        if inner == 1 or group:
            gl = nlc_grid(outer, Cf)
            if group:
                _moments_nlc(x, sox, gl, &count, ext, ext + Cf, parts, n_threads, spread_ahead)
                merge_column_groups(C, group, count, ext, ext + Cf, mean, var)
                count = count * group
                finalize_channels(C, &count, 0, eps, var, invstd, weight, parts)
                prepare_channel_constants(x, C, group, mean, parts, bias, NULL, consts)
            else:
                if n_threads == 1:
                    _train_nlc_team(x, y, sox, soy, gl, eps, weight, bias, mean, var, invstd,
                                    parts, consts, e, spread_ahead)
                else:
                    with parallel(num_threads=n_threads):
                        _train_nlc_team(x, y, sox, soy, gl, eps, weight, bias, mean, var, invstd,
                                        parts, consts, e, spread_ahead)
                return
            _normalize_nlc(x, y, sox, soy, gl, consts, e, True, n_threads)
            return
        g = nc_grid(outer, inner)
        split = _split_channels(C, g.n_chunks, n_threads)
        if e.stream and _short_rows(inner, sizeof(data_t)):
            e.stream = False
            nb = 0 if split else _channel_block(C, outer, inner, sizeof(data_t), scy, 1, n_threads)
            if nb:
                nblocks = (C + nb - 1) // nb
                if n_threads == 1:
                    _train_blocks_nc(x, y, sox, scx, soy, g, C, nb, weight, bias, eps, mean, var,
                                     invstd, e, 0, nblocks)
                else:
                    with parallel(num_threads=n_threads):
                        _train_blocks_nc(x, y, sox, scx, soy, g, C, nb, weight, bias, eps, mean,
                                         var, invstd, e, _team_start(nblocks, 0),
                                         _team_start(nblocks, 1))
                return
        if not split:
            if n_threads == 1:
                _train_channels_nc(x, y, sox, scx, soy, scy, g, C, pf_end, weight, bias, eps,
                                   mean, var, invstd, e, 0, C)
            else:
                with parallel(num_threads=n_threads):
                    _train_channels_nc(x, y, sox, scx, soy, scy, g, C, pf_end, weight, bias, eps,
                                       mean, var, invstd, e, _team_start(C, 0), _team_start(C, 1))
            return
        # split: n_threads > 1
        _moments_nc(x, sox, scx, g, C, invstd, mean, var, parts, n_threads)
        finalize_channels(C, invstd, 1, eps, var, invstd, weight, NULL)  # counts are in invstd
        with parallel(num_threads=n_threads):
            _normalize_nc_items(x, y, sox, scx, soy, scy, g, mean, invstd, weight, bias, e,
                                _team_start(C * g.n_chunks, 0), _team_start(C * g.n_chunks, 1))


cdef int _run_train_forward(cnp.ndarray x3, cnp.ndarray y3, const double* weight,
                            const double* bias, double eps, double* mean, double* var,
                            double* invstd, int n_threads, object res3, bint relu,
                            bint stream) except -1:
    cdef idx C = x3.shape[1]
    cdef idx group = _fold_group((x3, y3, res3))
    cdef idx Cf = C * group if group else C
    cdef cnp.ndarray parts = _scratch(max(_moments_work_size(x3, n_threads, group), C), 0)
    cdef cnp.ndarray consts = _scratch(5 * Cf, 1)
    cdef double* ext = _ext_ptr(_scratch(2 * Cf, 2) if group else None)
    cdef void* px = cnp.PyArray_DATA(x3)
    cdef void* py = cnp.PyArray_DATA(y3)
    cdef Epilogue e = _epilogue(res3, relu, stream)
    cdef int code = _dtype_code(x3)
    e.strips = _rereads_from_cache(x3, n_threads)
    if code == 0:
        _train_forward(<const float*> px, <float*> py, x3, y3, weight, bias, eps,
                       mean, var, invstd, _dptr(parts), _dptr(consts), ext, e, n_threads, group)
    elif code == 1:
        _train_forward(<const double*> px, <double*> py, x3, y3, weight, bias, eps,
                       mean, var, invstd, _dptr(parts), _dptr(consts), ext, e, n_threads, group)
    elif code == 2:
        _train_forward(<const half*> px, <half*> py, x3, y3, weight, bias, eps,
                       mean, var, invstd, _dptr(parts), _dptr(consts), ext, e, n_threads, group)
    else:
        _train_forward(<const bf16*> px, <bf16*> py, x3, y3, weight, bias, eps,
                       mean, var, invstd, _dptr(parts), _dptr(consts), ext, e, n_threads, group)
    return 0


def train_forward(cnp.ndarray x3, cnp.ndarray y3, cnp.ndarray weight, cnp.ndarray bias,
                  double eps, cnp.ndarray mean, cnp.ndarray var, cnp.ndarray invstd,
                  int n_threads, res3=None, bint relu=False, bint stream=False):
    """Fused training forward: batch statistics, then
    y = relu?((x-mean)*invstd*weight + bias + res?).

    x3, y3 (may be x3 itself), res3: validated (outer, C, inner) views. weight, bias:
    float64 (C,). OUT mean, var (biased), invstd: float64 (C,)."""
    _run_train_forward(x3, y3, _dptr(weight), _dptr(bias), eps, _dptr(mean), _dptr(var),
                       _dptr(invstd), n_threads, res3, relu, stream)


cdef void _normalize(const data_t* x, data_t* y, cnp.ndarray x3, cnp.ndarray y3,
                     const double* mean, const double* scale, const double* shift,
                     double* consts, Epilogue e, int n_threads, idx group) noexcept:
    # group: short rows walked as C*group columns
    cdef idx outer = x3.shape[0], C = x3.shape[1], inner = x3.shape[2]
    cdef idx sox = _stride(x3, 0), scx = _stride(x3, 1)
    cdef idx soy = _stride(y3, 0), scy = _stride(y3, 1)
    cdef NLCGrid gl
    cdef idx n_rows
    with nogil:
        prepare_channel_constants(x, C, max(group, 1), mean, scale, shift, NULL, consts)
        if group:
            C = C * group
            inner = 1
        if inner == 1:
            gl = nlc_grid(outer, C)
            _normalize_nlc(x, y, sox, soy, gl, consts, e, False, n_threads)
            return
        # rows (o, c) in memory order: each thread streams through one contiguous range
        n_rows = outer * C
        if n_threads == 1:
            normalize_rows_nc(x, y, sox, scx, soy, scy, C, inner, 0, n_rows, consts, e)
        else:
            with parallel(num_threads=n_threads):
                normalize_rows_nc(x, y, sox, scx, soy, scy, C, inner, _team_start(n_rows, 0),
                                  _team_start(n_rows, 1), consts, e)


cdef int _run_normalize(cnp.ndarray x3, cnp.ndarray y3, const double* mean,
                        const double* scale, const double* shift, int n_threads, object res3,
                        bint relu, bint stream) except -1:
    cdef idx group = _fold_group((x3, y3, res3))
    cdef idx Cf = x3.shape[1] * group if group else x3.shape[1]
    cdef cnp.ndarray consts = _scratch(5 * Cf, 1)
    cdef void* px = cnp.PyArray_DATA(x3)
    cdef void* py = cnp.PyArray_DATA(y3)
    cdef Epilogue e = _epilogue(res3, relu, stream)
    cdef int code = _dtype_code(x3)
    e.spread = cnp.PyArray_NBYTES(x3) >= _SPREAD_AHEAD_MIN_BYTES
    e.strips = not e.spread  # x small enough to be taken as cache-resident
    if code == 0:
        _normalize(<const float*> px, <float*> py, x3, y3, mean, scale, shift, _dptr(consts), e, n_threads, group)
    elif code == 1:
        _normalize(<const double*> px, <double*> py, x3, y3, mean, scale, shift, _dptr(consts), e, n_threads, group)
    elif code == 2:
        _normalize(<const half*> px, <half*> py, x3, y3, mean, scale, shift, _dptr(consts), e, n_threads, group)
    else:
        _normalize(<const bf16*> px, <bf16*> py, x3, y3, mean, scale, shift, _dptr(consts), e, n_threads, group)
    return 0


def normalize(cnp.ndarray x3, cnp.ndarray y3, cnp.ndarray mean, cnp.ndarray scale,
              cnp.ndarray shift, int n_threads, res3=None, bint relu=False,
              bint stream=False):
    """Elementwise y = relu?((x - mean) * scale + shift + res?) with given float64 (C,)
    constants (inference forward: scale = weight/sqrt(running_var + eps))."""
    _run_normalize(x3, y3, _dptr(mean), _dptr(scale), _dptr(shift), n_threads, res3, relu,
                   stream)


# --------------------------------------------------------------------- backward

cdef inline void _chunk_sums_nlc_items(const data_t* dy, const data_t* x, idx sog, idx sox,
                                       NLCGrid gl, const double* col_mean, double* parts,
                                       Activation act, bint spread_ahead, idx k0,
                                       idx k1) noexcept nogil:
    # row chunks [k0, k1): sums of g per column to parts + k*C, of g*(x - mean) to
    # parts + (n_chunks + k)*C
    cdef idx C = gl.channels, k
    cdef double* pq = parts + C * gl.n_chunks
    for k in range(k0, k1):
        chunk_sums_nlc(dy, x, sog, sox, C, k * gl.chunk_rows, _rows_end(gl, k), col_mean,
                       parts + k * C, pq + k * C, act, spread_ahead)


cdef void _sums_nlc_parts(const data_t* dy, const data_t* x, idx sog, idx sox, NLCGrid gl,
                          const double* col_mean, double* parts, Activation act,
                          bint spread_ahead, int n_threads) noexcept nogil:
    # every row chunk's partials (see _chunk_sums_nlc_items), each thread its static share
    if n_threads == 1:
        _chunk_sums_nlc_items(dy, x, sog, sox, gl, col_mean, parts, act, spread_ahead, 0,
                              gl.n_chunks)
    else:
        with parallel(num_threads=n_threads):
            _chunk_sums_nlc_items(dy, x, sog, sox, gl, col_mean, parts, act, spread_ahead,
                                  _team_start(gl.n_chunks, 0), _team_start(gl.n_chunks, 1))


cdef inline bint _sums_spread_ahead(cnp.ndarray dy3, cnp.ndarray x3):
    # the backward sums ask for what follows as rows go (arrays not cache-resident)
    return cnp.PyArray_NBYTES(dy3) + cnp.PyArray_NBYTES(x3) >= _SPREAD_AHEAD_MIN_BYTES


cdef inline void _chunk_sums_nc_items(const data_t* dy, const data_t* x, idx sog, idx scg, idx sox,
                                      idx scx, NCGrid g, const double* mean, double* parts,
                                      Activation act, idx w0, idx w1) noexcept nogil:
    # (channel, chunk) items [w0, w1): (sum g, sum g*(x - mean)) partials to parts. Short
    # rows in one chunk per channel: each item asks for the item `ahead` on (its channel's
    # rows far apart are more streams than the hardware prefetchers follow): cold
    # (128,512,7,7), 2 threads, builds in turn: float32 2.14-2.24 -> 1.53-1.61 ms, float16
    # 1.64 -> 1.29
    cdef idx w, c
    cdef Sums t
    cdef idx ahead = 0
    cdef const data_t* dy_ahead
    cdef const data_t* x_ahead
    if g.n_chunks == 1:
        ahead = short_rows_channels_ahead(g.inner * <idx> sizeof(data_t))
    for w in range(w0, w1):
        c = w // g.n_chunks
        dy_ahead = NULL
        x_ahead = NULL
        if ahead and w + ahead < w1:
            dy_ahead = dy + (c + ahead) * scg
            x_ahead = x + (c + ahead) * scx
        t = chunk_sums_nc(dy + c * scg, x + c * scx, sog, sox, nc_chunk(g, w % g.n_chunks),
                          mean[c], act, c, dy_ahead, x_ahead)
        parts[2 * w] = t.dy
        parts[2 * w + 1] = t.dy_xmu


cdef void _backward_sums(const data_t* dy, const data_t* x, cnp.ndarray dy3, cnp.ndarray x3,
                         const double* mean, Activation act, double* sdy, double* sxmu,
                         double* parts, double* ext, int n_threads, idx group) noexcept:
    # OUT sdy = sum(g), sxmu = sum(g * (x - mean)) per channel, chunk partials folded in
    # chunk order (the same bits as the fused per-channel path).
    # group: short rows walked as C*group columns; ext: 3*C*group scratch
    cdef idx outer = dy3.shape[0], C = dy3.shape[1], inner = dy3.shape[2]
    cdef const double* col_mean = mean
    cdef double* col_sdy = sdy
    cdef double* col_sxmu = sxmu
    cdef idx sog = _stride(dy3, 0), scg = _stride(dy3, 1)
    cdef idx sox = _stride(x3, 0), scx = _stride(x3, 1)
    cdef bint spread_ahead = _sums_spread_ahead(dy3, x3)
    cdef NCGrid g
    cdef NLCGrid gl
    cdef Sums t
    cdef idx c, k, w, n_chunks
    cdef double* pd
    cdef double* pq
    with nogil:
        if group:
            C = C * group
            expand_to_columns(dy3.shape[1], group, mean, ext)
            col_mean = ext
            col_sdy = ext + C
            col_sxmu = ext + 2 * C
        if inner == 1 or group:
            gl = nlc_grid(outer, C)
            n_chunks = gl.n_chunks
            pd = parts
            pq = parts + C * n_chunks
            _sums_nlc_parts(dy, x, sog, sox, gl, col_mean, parts, act, spread_ahead, n_threads)
            fold_chunk_sums(n_chunks, C, pd, pq, col_sdy, col_sxmu)
            if group:
                sum_column_groups(dy3.shape[1], group, col_sdy, sdy)
                sum_column_groups(dy3.shape[1], group, col_sxmu, sxmu)
            return
        g = nc_grid(outer, inner)
        if n_threads == 1:
            _chunk_sums_nc_items(dy, x, sog, scg, sox, scx, g, mean, parts, act, 0, C * g.n_chunks)
        else:
            with parallel(num_threads=n_threads):
                _chunk_sums_nc_items(dy, x, sog, scg, sox, scx, g, mean, parts, act,
                                     _team_start(C * g.n_chunks, 0), _team_start(C * g.n_chunks, 1))
        for c in range(C):
            t.dy = 0
            t.dy_xmu = 0
            for k in range(g.n_chunks):
                w = c * g.n_chunks + k
                t.dy += parts[2 * w]
                t.dy_xmu += parts[2 * w + 1]
            sdy[c] = t.dy
            sxmu[c] = t.dy_xmu


cdef inline void _apply_nlc_chunks_back(const data_t* dy, const data_t* x, data_t* dx, idx sog,
                                        idx sox, idx sod, NLCGrid gl, const double* consts,
                                        bint frozen, Activation act, idx k0,
                                        idx k1) noexcept nogil:
    # channels-last row chunks [k0, k1), the last one first
    cdef idx kk
    for kk in range(k1 - 1, k0 - 1, -1):
        backward_elementwise_nlc(dy, x, dx, sog, sox, sod, gl.channels, kk * gl.chunk_rows,
                                 _rows_end(gl, kk), consts, frozen, act)


cdef inline idx _finish_share(idx nb, idx n_chunks, int next) noexcept nogil:
    # in a parallel block: the first of nb channel blocks of the serial steps for this
    # thread (next=0) or the next one (next=1), split over the threads that have row chunks
    # (the others would fetch partials from another core's cache and hand their constants
    # back across; with one chunk, or none (an empty batch: zero sums), thread 0 does it all)
    cdef int workers = <int> min(<idx> omp_get_num_threads(), max(n_chunks, <idx> 1))
    cdef int t = omp_get_thread_num() + next
    return _static_start(nb, workers, min(t, workers))


cdef inline void _backward_nlc_team(const data_t* dy, const data_t* x, data_t* dx, idx sog,
                                    idx sox, idx sod, NLCGrid gl, const double* mean,
                                    const double* invstd, const double* weight, double m,
                                    bint frozen, double* sdy, double* sxmu, double* parts,
                                    double* consts, Activation act,
                                    bint spread_ahead) noexcept nogil:
    # channels-last backward by each thread of a parallel block (or one thread alone): its
    # row chunks' sums, then its share of the channels' constants (finish_backward_sums_nlc
    # in blocks), then dx over its chunks, most recent first (its cache); team barriers
    # between the steps, where a block per step had the serial step run on one thread
    cdef idx C = gl.channels, nb = finish_blocks(C)
    _chunk_sums_nlc_items(dy, x, sog, sox, gl, mean, parts, act, spread_ahead,
                          _team_start(gl.n_chunks, 0), _team_start(gl.n_chunks, 1))
    team_barrier()
    finish_backward_sums_nlc(dy, gl.n_chunks, C, parts, parts + C * gl.n_chunks, mean, invstd,
                             weight, m, frozen, sdy, sxmu, consts,
                             _finish_share(nb, gl.n_chunks, 0), _finish_share(nb, gl.n_chunks, 1))
    team_barrier()
    _apply_nlc_chunks_back(dy, x, dx, sog, sox, sod, gl, consts, frozen, act,
                           _team_start(gl.n_chunks, 0), _team_start(gl.n_chunks, 1))


cdef void _apply_nlc(const data_t* dy, const data_t* x, data_t* dx, idx sog, idx sox, idx sod,
                     NLCGrid gl, const double* consts, bint frozen, Activation act,
                     int n_threads) noexcept nogil:
    # each thread applies the chunks it reduced, most recent first (its cache)
    if n_threads == 1:
        _apply_nlc_chunks_back(dy, x, dx, sog, sox, sod, gl, consts, frozen, act, 0, gl.n_chunks)
    else:
        with parallel(num_threads=n_threads):
            _apply_nlc_chunks_back(dy, x, dx, sog, sox, sod, gl, consts, frozen, act,
                                   _team_start(gl.n_chunks, 0), _team_start(gl.n_chunks, 1))


cdef inline void _apply_nc_items(const data_t* dy, const data_t* x, data_t* dx, idx sog, idx scg,
                                 idx sox, idx scx, idx sod, idx scd, NCGrid g, const double* mean,
                                 const double* ka, const double* kb, const double* kc,
                                 bint frozen, Activation act, idx w0, idx w1) noexcept nogil:
    # (channel, chunk) items [w0, w1) of dx; short rows in one chunk per channel ask for
    # the item `ahead` on (see _chunk_sums_nc_items)
    cdef idx w, c
    cdef idx ahead = short_rows_channels_ahead(g.inner * <idx> sizeof(data_t)) if g.n_chunks == 1 else 0
    cdef const data_t* dy_ahead
    cdef const data_t* x_ahead
    cdef const data_t* dx_ahead
    for w in range(w0, w1):
        c = w // g.n_chunks
        dy_ahead = NULL
        x_ahead = NULL
        dx_ahead = NULL
        if ahead and w + ahead < w1:
            dy_ahead = dy + (c + ahead) * scg
            x_ahead = x + (c + ahead) * scx
            dx_ahead = dx + (c + ahead) * scd
        backward_elementwise_nc(dy + c * scg, x + c * scx, dx + c * scd, sog, sox, sod,
                                nc_chunk(g, w % g.n_chunks), ka[c], kb[c], kc[c], mean[c],
                                frozen, act, c, dy_ahead, x_ahead, dx_ahead)


cdef void _backward_apply(const data_t* dy, const data_t* x, data_t* dx, cnp.ndarray dy3,
                          cnp.ndarray x3, cnp.ndarray dx3, const double* mean, double* ka,
                          double* kb, double* kc, bint frozen, Activation act, double* consts,
                          int n_threads, idx group) noexcept:
    # OUT dx = ka*g + kb*(x - mean) + kc per channel (g = dy, masked by a fused ReLU).
    # group: short rows walked as C*group columns
    cdef idx outer = dy3.shape[0], C = dy3.shape[1], inner = dy3.shape[2]
    cdef idx sog = _stride(dy3, 0), scg = _stride(dy3, 1)
    cdef idx sox = _stride(x3, 0), scx = _stride(x3, 1)
    cdef idx sod = _stride(dx3, 0), scd = _stride(dx3, 1)
    cdef NCGrid g
    cdef NLCGrid gl
    with nogil:
        if inner == 1 or group:
            prepare_channel_constants(x, C, max(group, 1), mean, ka, kb, kc, consts)
            _apply_nlc(dy, x, dx, sog, sox, sod, nlc_grid(outer, C * max(group, 1)), consts,
                       frozen, act, n_threads)
            return
        g = nc_grid(outer, inner)
        if _short_rows(inner, sizeof(data_t)):
            act.stream = False
        if n_threads == 1:
            _apply_nc_items(dy, x, dx, sog, scg, sox, scx, sod, scd, g, mean, ka, kb, kc, frozen,
                            act, 0, C * g.n_chunks)
        else:
            with parallel(num_threads=n_threads):
                _apply_nc_items(dy, x, dx, sog, scg, sox, scx, sod, scd, g, mean, ka, kb, kc,
                                frozen, act, _team_start(C * g.n_chunks, 0),
                                _team_start(C * g.n_chunks, 1))


cdef inline void _backward_blocks_nc(const data_t* dy, const data_t* x, data_t* dx, idx sog,
                                     idx scg, idx sox, idx scx, idx sod, NCGrid g, idx C, idx nb,
                                     const double* mean, const double* invstd,
                                     const double* weight, bint frozen, Activation act,
                                     double* sdy, double* sxmu, idx b0, idx b1) noexcept nogil:
    # blocks [b0, b1) of nb channels, each fused (sums, then dx)
    cdef idx b, c0, c1
    for b in range(b0, b1):
        c0 = b * nb
        c1 = min(c0 + nb, C)
        backward_channels_nc(dy, x, dx, sog, scg, sox, scx, sod, g, c0, c1, mean, invstd, weight,
                             frozen, act, sdy, sxmu, dy + c1 * scg if c1 < C else NULL,
                             x + c1 * scx if c1 < C else NULL)


cdef inline void _backward_channels_nc(const data_t* dy, const data_t* x, data_t* dx, idx sog,
                                       idx scg, idx sox, idx scx, idx sod, idx scd, NCGrid g,
                                       idx C, idx pf_end, const double* mean,
                                       const double* invstd, const double* weight, bint frozen,
                                       Activation act, double* sdy, double* sxmu, idx c0,
                                       idx c1) noexcept nogil:
    # channels [c0, c1), each fused (sums, then dx)
    cdef idx c
    cdef Sums t
    for c in range(c0, c1):
        t = backward_channel_nc(dy + c * scg, x + c * scx, dx + c * scd, sog, sox, sod, g,
                                mean[c], invstd[c], weight[c], frozen, act, c,
                                dy + (c + 1) * scg if c + 1 < pf_end else NULL,
                                x + (c + 1) * scx if c + 1 < pf_end else NULL)
        sdy[c] = t.dy
        sxmu[c] = t.dy_xmu


cdef void _backward(const data_t* dy, const data_t* x, data_t* dx, cnp.ndarray dy3,
                    cnp.ndarray x3, cnp.ndarray dx3, const double* mean, const double* invstd,
                    const double* weight, bint frozen, double* sdy, double* sxmu,
                    double* parts, double* consts, double* ext, Activation act, int n_threads,
                    idx group) noexcept:
    # group: short rows walked as C*group columns (not fused: sums, then dx);
    # consts: 5*C*group + 3*C, ext: 3*C*group scratch
    cdef idx outer = dy3.shape[0], C = dy3.shape[1], inner = dy3.shape[2]
    cdef idx Cf = C * group if group else C
    cdef idx sog = _stride(dy3, 0), scg = _stride(dy3, 1)
    cdef idx sox = _stride(x3, 0), scx = _stride(x3, 1)
    cdef idx sod = _stride(dx3, 0), scd = _stride(dx3, 1)
    cdef double m = <double> (outer * inner)
    cdef NCGrid g = nc_grid(outer, inner)
    cdef double* ka = consts + 5 * Cf
    cdef double* kb = ka + C
    cdef double* kc = kb + C
    cdef idx pf_end = _prefetch_channels_end(C, outer, inner, sizeof(data_t), True)
    cdef bint split = _split_channels(C, g.n_chunks, n_threads)
    cdef idx nblocks, nb = 0
    cdef NLCGrid gl
    cdef bint spread_ahead
    if (inner > 1 and not group and not split and act.stream
            and _short_rows(inner, sizeof(data_t))):
        nb = _channel_block(C, outer, inner, sizeof(data_t), scd, 2, n_threads)
    if nb:
        nblocks = (C + nb - 1) // nb
        with nogil:
            if n_threads == 1:
                _backward_blocks_nc(dy, x, dx, sog, scg, sox, scx, sod, g, C, nb, mean, invstd,
                                    weight, frozen, act, sdy, sxmu, 0, nblocks)
            else:
                with parallel(num_threads=n_threads):
                    _backward_blocks_nc(dy, x, dx, sog, scg, sox, scx, sod, g, C, nb, mean,
                                        invstd, weight, frozen, act, sdy, sxmu,
                                        _team_start(nblocks, 0), _team_start(nblocks, 1))
        return
    if inner > 1 and not group and _short_rows(inner, sizeof(data_t)):
        act.stream = False
    if inner > 1 and not group and not split:
        with nogil:
            if n_threads == 1:
                _backward_channels_nc(dy, x, dx, sog, scg, sox, scx, sod, scd, g, C, pf_end, mean,
                                      invstd, weight, frozen, act, sdy, sxmu, 0, C)
            else:
                with parallel(num_threads=n_threads):
                    _backward_channels_nc(dy, x, dx, sog, scg, sox, scx, sod, scd, g, C, pf_end,
                                          mean, invstd, weight, frozen, act, sdy, sxmu,
                                          _team_start(C, 0), _team_start(C, 1))
        return
    if inner == 1 and not group:
        # channels-last: the sums' partials, one walk over the channels to the dx constants,
        # then dx
        spread_ahead = _sums_spread_ahead(dy3, x3)
        with nogil:
            gl = nlc_grid(outer, C)
            if n_threads == 1:
                _backward_nlc_team(dy, x, dx, sog, sox, sod, gl, mean, invstd, weight, m, frozen,
                                   sdy, sxmu, parts, consts, act, spread_ahead)
            else:
                with parallel(num_threads=n_threads):
                    _backward_nlc_team(dy, x, dx, sog, sox, sod, gl, mean, invstd, weight, m,
                                       frozen, sdy, sxmu, parts, consts, act, spread_ahead)
        return
    _backward_sums(dy, x, dy3, x3, mean, act, sdy, sxmu, parts, ext, n_threads, group)
    backward_coefficients_all(C, sdy, sxmu, invstd, weight, m, frozen, ka, kb, kc)
    _backward_apply(dy, x, dx, dy3, x3, dx3, mean, ka, kb, kc, frozen, act, consts, n_threads,
                    group)


cdef idx _backward_work_size(cnp.ndarray dy3, idx group):
    cdef idx outer = dy3.shape[0], C = dy3.shape[1], inner = dy3.shape[2]
    if group:
        return max(2 * C * group * nlc_grid(outer, C * group).n_chunks, 1)
    if inner == 1:
        return max(2 * C * nlc_grid(outer, C).n_chunks, 1)
    return max(2 * C * nc_grid(outer, inner).n_chunks, 1)


cdef int _run_backward(cnp.ndarray dy3, cnp.ndarray x3, cnp.ndarray dx3, const double* mean,
                       const double* invstd, const double* weight, bint frozen, double* sdy,
                       double* sxmu, int n_threads, object y3, object dres3,
                       bint stream) except -1:
    cdef idx C = x3.shape[1]
    cdef idx group = _fold_group((dy3, x3, dx3, y3, dres3))
    cdef idx Cf = C * group if group else C
    cdef cnp.ndarray parts = _scratch(_backward_work_size(dy3, group), 0)
    cdef cnp.ndarray consts = _scratch(5 * Cf + 3 * C, 1)
    cdef double* ext = _ext_ptr(_scratch(3 * Cf, 2) if group else None)
    cdef void* pg = cnp.PyArray_DATA(dy3)
    cdef void* px = cnp.PyArray_DATA(x3)
    cdef void* pd = cnp.PyArray_DATA(dx3)
    cdef Activation act = _activation(y3, dres3, stream)
    cdef int code = _dtype_code(dy3)
    act.strips = _rereads_from_cache(x3, n_threads)
    if code == 0:
        _backward(<const float*> pg, <const float*> px, <float*> pd, dy3, x3, dx3, mean, invstd,
                  weight, frozen, sdy, sxmu, _dptr(parts), _dptr(consts), ext, act, n_threads, group)
    elif code == 1:
        _backward(<const double*> pg, <const double*> px, <double*> pd, dy3, x3, dx3, mean, invstd,
                  weight, frozen, sdy, sxmu, _dptr(parts), _dptr(consts), ext, act, n_threads, group)
    elif code == 2:
        _backward(<const half*> pg, <const half*> px, <half*> pd, dy3, x3, dx3, mean, invstd,
                  weight, frozen, sdy, sxmu, _dptr(parts), _dptr(consts), ext, act, n_threads, group)
    else:
        _backward(<const bf16*> pg, <const bf16*> px, <bf16*> pd, dy3, x3, dx3, mean, invstd,
                  weight, frozen, sdy, sxmu, _dptr(parts), _dptr(consts), ext, act, n_threads, group)
    return 0


def backward(cnp.ndarray dy3, cnp.ndarray x3, cnp.ndarray dx3, cnp.ndarray mean,
             cnp.ndarray invstd, cnp.ndarray weight, bint frozen, cnp.ndarray sdy,
             cnp.ndarray sxmu, int n_threads, y3=None, dres3=None, bint stream=False):
    """Fused backward. IN dy3, x3 (validated views of one shape), mean, invstd, weight:
    float64 (C,). OUT dx3 (may be dy3), sdy = sum(g), sxmu = sum(g*(x-mean)) (C,).
    frozen: statistics are constants (inference-mode backward, dx = g*weight*invstd).
    y3: forward output of a fused ReLU (g = dy where y > 0, else 0); dres3: OUT g."""
    _run_backward(dy3, x3, dx3, _dptr(mean), _dptr(invstd), _dptr(weight), frozen, _dptr(sdy),
                  _dptr(sxmu), n_threads, y3, dres3, stream)


def backward_reduce(cnp.ndarray dy3, cnp.ndarray x3, cnp.ndarray mean, cnp.ndarray sdy,
                    cnp.ndarray sxmu, int n_threads, y3=None):
    """OUT sdy = sum(g), sxmu = sum(g*(x-mean)) per channel, float64 (C,)."""
    cdef idx group = _fold_group((dy3, x3, y3))
    cdef cnp.ndarray parts = _scratch(_backward_work_size(dy3, group), 0)
    cdef double* ext = _ext_ptr(_scratch(3 * x3.shape[1] * group, 2) if group else None)
    cdef void* pg = cnp.PyArray_DATA(dy3)
    cdef void* px = cnp.PyArray_DATA(x3)
    cdef Activation act = _activation(y3, None, False)
    cdef int code = _dtype_code(dy3)
    if code == 0:
        _backward_sums(<const float*> pg, <const float*> px, dy3, x3, _dptr(mean), act, _dptr(sdy), _dptr(sxmu), _dptr(parts), ext, n_threads, group)
    elif code == 1:
        _backward_sums(<const double*> pg, <const double*> px, dy3, x3, _dptr(mean), act, _dptr(sdy), _dptr(sxmu), _dptr(parts), ext, n_threads, group)
    elif code == 2:
        _backward_sums(<const half*> pg, <const half*> px, dy3, x3, _dptr(mean), act, _dptr(sdy), _dptr(sxmu), _dptr(parts), ext, n_threads, group)
    else:
        _backward_sums(<const bf16*> pg, <const bf16*> px, dy3, x3, _dptr(mean), act, _dptr(sdy), _dptr(sxmu), _dptr(parts), ext, n_threads, group)


def backward_apply(cnp.ndarray dy3, cnp.ndarray x3, cnp.ndarray dx3, cnp.ndarray mean,
                   cnp.ndarray a, cnp.ndarray b, cnp.ndarray c, bint frozen, int n_threads,
                   y3=None, dres3=None, bint stream=False):
    """OUT dx3 = a*g + b*(x - mean) + c per channel (float64 (C,) coefficients)."""
    cdef idx group = _fold_group((dy3, x3, dx3, y3, dres3))
    cdef idx Cf = x3.shape[1] * group if group else x3.shape[1]
    cdef cnp.ndarray consts = _scratch(5 * Cf, 1)
    cdef void* pg = cnp.PyArray_DATA(dy3)
    cdef void* px = cnp.PyArray_DATA(x3)
    cdef void* pd = cnp.PyArray_DATA(dx3)
    cdef Activation act = _activation(y3, dres3, stream)
    cdef int code = _dtype_code(dy3)
    act.strips = _rereads_from_cache(x3, n_threads)
    if code == 0:
        _backward_apply(<const float*> pg, <const float*> px, <float*> pd, dy3, x3, dx3, _dptr(mean), _dptr(a), _dptr(b), _dptr(c), frozen, act, _dptr(consts), n_threads, group)
    elif code == 1:
        _backward_apply(<const double*> pg, <const double*> px, <double*> pd, dy3, x3, dx3, _dptr(mean), _dptr(a), _dptr(b), _dptr(c), frozen, act, _dptr(consts), n_threads, group)
    elif code == 2:
        _backward_apply(<const half*> pg, <const half*> px, <half*> pd, dy3, x3, dx3, _dptr(mean), _dptr(a), _dptr(b), _dptr(c), frozen, act, _dptr(consts), n_threads, group)
    else:
        _backward_apply(<const bf16*> pg, <const bf16*> px, <bf16*> pd, dy3, x3, dx3, _dptr(mean), _dptr(a), _dptr(b), _dptr(c), frozen, act, _dptr(consts), n_threads, group)


# ------------------------------------------------------------------------ running stats

def inference_scale(const double[::1] weight, const double[::1] running_var, double eps,
                    double[::1] scale):
    """OUT scale = weight / sqrt(running_var + eps) per channel (NaN/Inf as NumPy's)."""
    with nogil:
        inference_scales(weight.shape[0], &weight[0], &running_var[0], eps, &scale[0])


def update_running(cnp.ndarray running_mean, cnp.ndarray running_var, cnp.ndarray mean,
                   cnp.ndarray var, double count, double momentum):
    """running = (1 - momentum) * running + momentum * batch statistic (the unbiased
    variance), per channel, in the expression order of the NumPy update
    (fastbn._api._update_running), so the bits agree. running_mean, running_var: (C,)
    float32 or float64 arrays of one dtype, any stride, not overlapping; mean, var:
    contiguous float64 (C,). Nothing in the loop can fail, so the statistics are never
    half-updated. (ndarray arguments: typed memoryviews of a fused type cost 0.4 us of a
    small call's 20.)"""
    _update_running(running_mean, running_var, _dptr(mean), _dptr(var), count, momentum)


cdef void _update_running(cnp.ndarray running_mean, cnp.ndarray running_var, const double* pm,
                          const double* pv, double count, double momentum) noexcept:
    cdef idx C = running_mean.shape[0]
    cdef idx item = cnp.PyArray_ITEMSIZE(running_mean)
    cdef idx sm = cnp.PyArray_STRIDES(running_mean)[0] // item
    cdef idx sv = cnp.PyArray_STRIDES(running_var)[0] // item
    cdef void* rm = cnp.PyArray_DATA(running_mean)
    cdef void* rv = cnp.PyArray_DATA(running_var)
    if C == 0:
        return
    if cnp.PyArray_TYPE(running_mean) == cnp.NPY_FLOAT32:
        with nogil:
            update_running_all(C, <float*> rm, sm, <float*> rv, sv, pm, pv, count, momentum)
    else:
        with nogil:
            update_running_all(C, <double*> rm, sm, <double*> rv, sv, pm, pv, count, momentum)


# ------------------------------------------------------------------------ plain calls
# The common call -- NumPy arrays, C-contiguous data of one dtype, float32/float64 (C,)
# parameters, Python float momentum and eps, out= that the kernels can write directly
# (fused ReLU and residual included) -- checked and run here in compiled code. After a
# pass over tens of MB nothing of a call's Python code is cached, and every bytecode and
# NumPy object the argument checks touch is a miss: in benchmarks/compare.py's interleaved
# loop the checks of fastbn._api cost ~25 us of a (256, 2048) backward and ~4 us of a
# (16, 32, 8, 8) training call. These functions accept only arguments that fastbn._api accepts
# and return None for anything else, which fastbn._api then checks, and reports, as ever;
# the kernels, the float64 parameters and the order of operations are the same, so are the
# bits.
from libc.stdlib cimport malloc, free
from libc.string cimport memcpy
from libc.math cimport isfinite, NAN


cdef int _plain_data(object a) noexcept:
    """dtype code (float32 0, float64 1, float16 2) of an exact NumPy array of at least 2
    dimensions, native byte order, C-contiguous and aligned, with elements; -1 otherwise."""
    if type(a) is not cnp.ndarray:
        return -1
    cdef cnp.ndarray arr = <cnp.ndarray> a
    if (cnp.PyArray_NDIM(arr) < 2 or cnp.PyArray_SIZE(arr) == 0
            or not cnp.PyArray_ISCARRAY_RO(arr) or not cnp.PyArray_ISNOTSWAPPED(arr)):
        return -1
    cdef int num = cnp.PyArray_TYPE(arr)
    if num == cnp.NPY_FLOAT32:
        return 0
    if num == cnp.NPY_FLOAT64:
        return 1
    if num == cnp.NPY_FLOAT16:
        return 2
    return -1


cdef bint _plain_like(object a, cnp.ndarray x, int code) noexcept:
    """Plain data of x's dtype (code) and shape."""
    if _plain_data(a) != code:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray> a
    cdef int d
    if cnp.PyArray_NDIM(arr) != cnp.PyArray_NDIM(x):
        return False
    for d in range(cnp.PyArray_NDIM(x)):
        if cnp.PyArray_DIMS(arr)[d] != cnp.PyArray_DIMS(x)[d]:
            return False
    return True


cdef int _plain_relu(object activation) noexcept:
    """1 for activation 'relu', 0 for None, -1 for anything else."""
    if activation is None:
        return 0
    if type(activation) is str and activation == "relu":
        return 1
    return -1


cdef bint _plain_vector(object a, idx C, bint writeable) noexcept:
    """An exact NumPy float32/float64 array of shape (C,), native, contiguous, aligned."""
    if type(a) is not cnp.ndarray:
        return False
    cdef cnp.ndarray arr = <cnp.ndarray> a
    cdef int num = cnp.PyArray_TYPE(arr)
    return (cnp.PyArray_NDIM(arr) == 1 and cnp.PyArray_DIMS(arr)[0] == C
            and (num == cnp.NPY_FLOAT32 or num == cnp.NPY_FLOAT64)
            and cnp.PyArray_ISCARRAY_RO(arr) and cnp.PyArray_ISNOTSWAPPED(arr)
            and (not writeable or cnp.PyArray_ISWRITEABLE(arr)))


cdef bint _plain_param(object a, idx C, double fill, double* out) noexcept:
    """out = a as float64 (fill where a is None); False where a is not a plain vector."""
    cdef idx c
    if a is None:
        for c in range(C):
            out[c] = fill
        return True
    if not _plain_vector(a, C, False):
        return False
    cdef void* p = cnp.PyArray_DATA(<cnp.ndarray> a)
    if cnp.PyArray_TYPE(<cnp.ndarray> a) == cnp.NPY_FLOAT64:
        memcpy(out, p, C * sizeof(double))
    else:
        for c in range(C):
            out[c] = (<const float*> p)[c]
    return True


cdef bint _plain_real(object v, bint non_negative, double* out) noexcept:
    """A Python float, finite (and >= 0 where asked)."""
    if type(v) is not float:
        return False
    out[0] = <double> v
    return isfinite(out[0]) and not (non_negative and out[0] < 0)


cdef bint _apart(cnp.ndarray a, cnp.ndarray b) noexcept:
    """Contiguous arrays of one size in bytes with no byte in common."""
    cdef char* pa = <char*> cnp.PyArray_DATA(a)
    cdef char* pb = <char*> cnp.PyArray_DATA(b)
    cdef idx n = cnp.PyArray_NBYTES(a)
    return pa + n <= pb or pb + n <= pa


cdef bint _plain_running(object rm, object rv, idx C) noexcept:
    """Running statistics a training call updates in place: writable plain vectors of one
    dtype that do not overlap."""
    if not (_plain_vector(rm, C, True) and _plain_vector(rv, C, True)):
        return False
    if cnp.PyArray_TYPE(<cnp.ndarray> rm) != cnp.PyArray_TYPE(<cnp.ndarray> rv):
        return False
    return _apart(<cnp.ndarray> rm, <cnp.ndarray> rv)


cdef object _plain_out(object out, cnp.ndarray x, int code, object a, object b, object c):
    """The array a plain call writes: a new one where out is None; out itself where the
    kernels may write it directly (plain data of x's dtype and shape, writable, and each
    data input a, b, c (None: absent) either the very same view, an in-place call, or apart
    from it, as fastbn._api._output decides); None for any other out, which fastbn._api
    then checks, stages through a buffer of its own or reports."""
    if out is None:
        return _empty_like(x)
    if not (_plain_like(out, x, code) and cnp.PyArray_ISWRITEABLE(<cnp.ndarray> out)):
        return None
    cdef void* p = cnp.PyArray_DATA(<cnp.ndarray> out)
    for v in (a, b, c):  # plain data of one shape and dtype: the same first byte, same view
        if v is not None and not (p == cnp.PyArray_DATA(<cnp.ndarray> v)
                                  or _apart(<cnp.ndarray> out, <cnp.ndarray> v)):
            return None
    return out


cdef struct Shape3:
    idx outer, C, inner


cdef bint _plain_shape(cnp.ndarray x, object axis, Shape3* s):
    """(outer, C, inner) of x for an int axis in range, with at least one channel."""
    if type(axis) is not int:
        return False
    cdef int nd = cnp.PyArray_NDIM(x)
    if not -nd <= axis < nd:
        return False
    cdef int k = <int> axis, d
    if k < 0:
        k += nd
    cdef cnp.npy_intp* dims = cnp.PyArray_DIMS(x)
    s.outer = 1
    s.inner = 1
    for d in range(k):
        s.outer *= dims[d]
    for d in range(k + 1, nd):
        s.inner *= dims[d]
    s.C = dims[k]
    return s.C > 0


cdef cnp.ndarray _view3(cnp.ndarray a, Shape3 s):
    cdef cnp.npy_intp d[3]
    d[0] = s.outer
    d[1] = s.C
    d[2] = s.inner
    cdef cnp.PyArray_Dims shape
    shape.ptr = d
    shape.len = 3
    return cnp.PyArray_Newshape(a, &shape, cnp.NPY_CORDER)


cdef int _threads_stream(cnp.ndarray out, Shape3 s, bint* stream) noexcept:
    cdef idx item = cnp.PyArray_ITEMSIZE(out)
    stream[0] = _stream_out(cnp.PyArray_NBYTES(out), s.C, s.inner, s.C * s.inner * item,
                            s.inner * item, item)
    return _threads_for(cnp.PyArray_SIZE(out))


cdef int _plain_forward(object x, object axis, object activation, object residual,
                        object momentum, object eps, Shape3* s, int* relu, double* mom,
                        double* epsilon):
    """The checks the training and inference forwards share -> x's dtype code, or -1."""
    cdef int code = _plain_data(x)
    relu[0] = _plain_relu(activation)
    if code < 0 or relu[0] < 0 or not _plain_shape(<cnp.ndarray> x, axis, s):
        return -1
    if not (residual is None or _plain_like(residual, <cnp.ndarray> x, code)):
        return -1
    if not (_plain_real(momentum, False, mom) and _plain_real(eps, True, epsilon)):
        return -1
    return code


cdef double* _channel_buffers(idx C) except NULL:
    """Five float64 (C,) buffers in one block, for the caller to free."""
    cdef double* buf = <double*> malloc(5 * max(C, 1) * sizeof(double))
    if buf == NULL:
        raise MemoryError()
    return buf


# Outputs start on a cache line. NumPy's allocator returns malloc's 16-byte alignment, so
# most 64-byte stores of a row walk straddle two lines: 3 us of a cold (256, 2048) float32
# training forward and 5 us of its backward (2-3 % at (768, 2048)). Outputs of
# STREAM_MIN_BYTES and more are written through aligned staging, and inference outputs of
# any size showed no difference, so only outputs in [ALIGNED_MIN_BYTES, _STREAM_MIN_BYTES)
# are allocated here, through NumPy's documented handler API: the array owns its data and
# frees it through the same handler. From 4 MiB up the pages are advised huge as NumPy's
# own allocator advises them (numpy._core.multiarray._set_madvise_hugepage).
cdef extern from "numpy/arrayobject.h":
    ctypedef struct PyDataMemAllocator:
        void* ctx
        void* (*malloc)(void* ctx, size_t size) noexcept nogil
        void* (*calloc)(void* ctx, size_t nelem, size_t elsize) noexcept nogil
        void* (*realloc)(void* ctx, void* ptr, size_t new_size) noexcept nogil
        void (*free)(void* ctx, void* ptr, size_t size) noexcept nogil
    ctypedef struct PyDataMem_Handler:
        char name[127]
        uint8_t version
        PyDataMemAllocator allocator
    object PyDataMem_SetHandler(object handler)

from cpython.pycapsule cimport PyCapsule_New
from posix.mman cimport madvise, MADV_HUGEPAGE

cdef enum:
    CACHE_LINE = 64
    PAGE = 4096
cdef size_t ALIGNED_MIN_BYTES = 1 << 16
cdef size_t HUGEPAGE_ADVICE_BYTES = 1 << 22  # NumPy's threshold for the advice


cdef extern from "<mutex>" namespace "std" nogil:
    cppclass mutex:
        void lock()
        void unlock()

# Freed blocks kept for the next outputs. glibc hands the top of its heap back to the OS
# and maps large blocks afresh by heuristics that any mix of sizes can trip, and then every
# page of the next output faults on first touch: (256, 2048) float32, 2 MiB outputs,
# ~500 faults and 3-4x the time of a call in loops as plain as holding a training
# forward's and a backward's outputs for one step, with NumPy's allocator as with
# posix_memalign or an over-allocated malloc (each had loops of its own that tripped it).
# At most CACHED_BLOCKS blocks and CACHED_BYTES_MAX bytes stay cached (the oldest dropped
# first), each reused for a request up to an eighth smaller than it.
cdef enum:
    CACHED_BLOCKS = 6
cdef size_t CACHED_BYTES_MAX = 48 << 20
cdef mutex _cache_lock
cdef char* _cached[CACHED_BLOCKS]
cdef int _n_cached = 0
cdef size_t _cached_bytes = 0


cdef inline size_t _capacity(const char* p) noexcept nogil:
    return (<const size_t*> p)[-2]


cdef inline bint _fits(size_t size, size_t cap) noexcept nogil:
    # a block of cap bytes serves size bytes wasting at most an eighth of them
    return size <= cap and cap - size <= size // 8


cdef char* _remove_cached(int i) noexcept nogil:
    # cached block i out of the cache (the others keep their order, oldest first); the
    # caller holds _cache_lock
    global _n_cached, _cached_bytes
    cdef char* p = _cached[i]
    for i in range(i, _n_cached - 1):
        _cached[i] = _cached[i + 1]
    _n_cached -= 1
    _cached_bytes -= _capacity(p)
    return p


cdef char* _take_cached(size_t size) noexcept nogil:
    """A cached block that fits size bytes; NULL if none."""
    cdef int i, best = -1
    cdef size_t cap
    cdef char* p = NULL
    _cache_lock.lock()
    for i in range(_n_cached - 1, -1, -1):  # the newest of the best fits: the warmest
        cap = _capacity(_cached[i])
        if _fits(size, cap) and (best < 0 or cap < _capacity(_cached[best])):
            best = i
    if best >= 0:
        p = _remove_cached(best)
    _cache_lock.unlock()
    return p


cdef void* _line_malloc(void* ctx, size_t size) noexcept nogil:
    """ctx: non-NULL to advise huge pages from HUGEPAGE_ADVICE_BYTES, as NumPy does.

    A cached block, or a malloc of CACHE_LINE more bytes: the array starts at the first
    line boundary past a 16-byte header (malloc's block, the block's capacity)."""
    cdef char* base
    cdef char* p
    cdef size_t skip
    if size > (<size_t> -1) - 2 * CACHE_LINE:
        return NULL
    p = _take_cached(size)
    if p == NULL:
        base = <char*> malloc(size + CACHE_LINE)
        if base == NULL:
            return NULL
        p = <char*> ((<size_t> base + CACHE_LINE) & ~(<size_t> (CACHE_LINE - 1)))  # 16..64 past
        (<void**> p)[-1] = base
        (<size_t*> p)[-2] = size
    if ctx != NULL and size >= HUGEPAGE_ADVICE_BYTES:
        skip = PAGE - (<size_t> p) % PAGE
        madvise(p + skip, size - skip, MADV_HUGEPAGE)  # a hint: errors ignored
    return p


cdef void* _line_calloc(void* ctx, size_t nelem, size_t elsize) noexcept nogil:
    if elsize and nelem > (<size_t> -1) / elsize:
        return NULL
    cdef void* p = _line_malloc(ctx, nelem * elsize)
    if p != NULL:
        memset(p, 0, nelem * elsize)
    return p


cdef void _line_free(void* ctx, void* ptr, size_t size) noexcept nogil:
    """Keeps the block, dropping the oldest cached ones to make room; frees it if it alone
    is over the byte bound."""
    global _n_cached, _cached_bytes
    if ptr == NULL:
        return
    cdef char* p = <char*> ptr
    cdef size_t cap = _capacity(p)
    cdef char* dropped[CACHED_BLOCKS]
    cdef int n_dropped = 0, i
    if cap > CACHED_BYTES_MAX:
        free((<void**> p)[-1])
        return
    _cache_lock.lock()
    while _n_cached == CACHED_BLOCKS or _cached_bytes + cap > CACHED_BYTES_MAX:
        dropped[n_dropped] = _remove_cached(0)
        n_dropped += 1
    _cached[_n_cached] = p
    _n_cached += 1
    _cached_bytes += cap
    _cache_lock.unlock()
    for i in range(n_dropped):
        free((<void**> dropped[i])[-1])


cdef void* _line_realloc(void* ctx, void* ptr, size_t new_size) noexcept nogil:
    if ptr == NULL:
        return _line_malloc(ctx, new_size)
    cdef size_t cap = _capacity(<char*> ptr)
    if _fits(new_size, cap):
        return ptr
    cdef void* q = _line_malloc(ctx, new_size)
    if q != NULL:  # on failure the old block stays, as realloc's contract says
        memcpy(q, ptr, cap if cap < new_size else new_size)
        _line_free(ctx, ptr, cap)
    return q


def cached_output_blocks():
    """(blocks, bytes) freed outputs kept for reuse (tests)."""
    return _n_cached, _cached_bytes


cdef PyDataMem_Handler _line_handlers[2]  # [1] advises huge pages


cdef object _line_handler(int advise):
    cdef PyDataMem_Handler* h = &_line_handlers[advise]
    memcpy(h.name, b"fastbn_line64", 14)
    h.version = 1
    h.allocator.ctx = <void*> h if advise else NULL
    h.allocator.malloc = _line_malloc
    h.allocator.calloc = _line_calloc
    h.allocator.realloc = _line_realloc
    h.allocator.free = _line_free
    return PyCapsule_New(h, "mem_handler", NULL)


_LINE_HANDLERS = (_line_handler(0), _line_handler(1))
try:
    from numpy._core.multiarray import _get_madvise_hugepage
except ImportError:
    try:  # NumPy 1.x
        from numpy.core.multiarray import _get_madvise_hugepage
    except ImportError:  # a NumPy without the switch: its Linux default
        import sys as _sys
        _get_madvise_hugepage = lambda: _sys.platform.startswith("linux")


cdef object _handler_for(size_t nbytes):
    """The handler for an output of nbytes; None: NumPy's own."""
    if not ALIGNED_MIN_BYTES <= nbytes < <size_t> _STREAM_MIN_BYTES:
        return None
    if nbytes >= HUGEPAGE_ADVICE_BYTES and _get_madvise_hugepage():
        return _LINE_HANDLERS[1]
    return _LINE_HANDLERS[0]


cdef cnp.ndarray _empty(int ndim, cnp.npy_intp* dims, int typenum, size_t nbytes):
    """An uninitialized C-ordered array, cache-line aligned where that pays (see above)."""
    handler = _handler_for(nbytes)
    if handler is None:
        return cnp.PyArray_EMPTY(ndim, dims, typenum, 0)
    previous = PyDataMem_SetHandler(handler)
    try:
        return cnp.PyArray_EMPTY(ndim, dims, typenum, 0)
    finally:
        PyDataMem_SetHandler(previous)


cdef cnp.ndarray _empty_like(cnp.ndarray a):
    return _empty(cnp.PyArray_NDIM(a), cnp.PyArray_DIMS(a), cnp.PyArray_TYPE(a),
                  cnp.PyArray_NBYTES(a))


def empty_output(shape, dtype):
    """numpy.empty(shape, dtype) for a kernel's output, cache-line aligned as above."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize  # a Python int: numpy.empty reports negative or huge shapes
    for n in shape:
        nbytes *= n
    handler = _handler_for(nbytes) if 0 <= nbytes < 1 << 62 else None
    if handler is None:
        return np.empty(shape, dtype)
    previous = PyDataMem_SetHandler(handler)
    try:
        return np.empty(shape, dtype)
    finally:
        PyDataMem_SetHandler(previous)


cdef cnp.ndarray _statistic(const double* v, idx C, int code):
    """A (C,) statistic as returned: float64 for float64 data, float32 otherwise."""
    cdef cnp.npy_intp n = C
    cdef cnp.ndarray out = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT64 if code == 1 else cnp.NPY_FLOAT32, 0)
    cdef idx c
    if code == 1:
        memcpy(cnp.PyArray_DATA(out), v, C * sizeof(double))
    else:
        for c in range(C):
            (<float*> cnp.PyArray_DATA(out))[c] = <float> v[c]
    return out


cdef object _plain_welford(object x, object axis, int* code):
    """(count, float64 mean, float64 M2) of plain data x (code: its dtype), as the Python
    path's backend.moments computes them; None for any other x or axis."""
    cdef Shape3 s
    code[0] = _plain_data(x)
    if code[0] < 0 or not _plain_shape(<cnp.ndarray> x, axis, &s):
        return None
    cdef cnp.npy_intp n = s.C
    cdef cnp.ndarray mean = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT64, 0)
    cdef cnp.ndarray m2 = cnp.PyArray_EMPTY(1, &n, cnp.NPY_FLOAT64, 0)
    count = moments(_view3(<cnp.ndarray> x, s), mean, m2,
                    _threads_for(cnp.PyArray_SIZE(<cnp.ndarray> x)))
    return count, mean, m2


def plain_welford(x, axis):
    """welford(x, axis) as (count, mean, m2) for a plain call (fastbn._api wraps them in
    Moments); None for any other."""
    cdef int code
    return _plain_welford(x, axis, &code)


def plain_moments(x, axis, ddof):
    """moments(x, axis, ddof=ddof) (-> mean, var) for a plain call; None for any other."""
    cdef int code
    if type(ddof) is not int or not -(1 << 52) < ddof < (1 << 52):  # exact as a double
        return None
    parts = _plain_welford(x, axis, &code)
    if parts is None:
        return None
    count, mean, m2 = parts
    cdef idx C = cnp.PyArray_SIZE(<cnp.ndarray> m2), c
    cdef double* v = <double*> cnp.PyArray_DATA(<cnp.ndarray> m2)
    cdef double denom = <double> (count - ddof)  # as _moments._var: NaN without a degree
    for c in range(C):
        v[c] = v[c] / denom if denom > 0 else NAN
    return (_statistic(<double*> cnp.PyArray_DATA(<cnp.ndarray> mean), C, code),
            _statistic(v, C, code))


def plain_train(x, weight, bias, running_mean, running_var, momentum, eps, axis,
                activation, residual, bint statistics, out=None):
    """batch_norm(training=True) (-> y) or, with statistics, batch_norm_forward (-> y,
    mean, invstd) for a plain call (y is out where given); None for any other."""
    cdef Shape3 s
    cdef int relu
    cdef double mom, epsilon
    cdef int code = _plain_forward(x, axis, activation, residual, momentum, eps, &s, &relu,
                                   &mom, &epsilon)
    if code < 0 or s.outer * s.inner < 2:
        return None
    cdef bint running = running_mean is not None or running_var is not None
    if running and not _plain_running(running_mean, running_var, s.C):
        return None
    cdef double* buf = _channel_buffers(s.C)
    cdef double* w = buf
    cdef double* b = buf + s.C
    cdef double* mean = buf + 2 * s.C
    cdef double* var = buf + 3 * s.C
    cdef double* invstd = buf + 4 * s.C
    cdef cnp.ndarray xa = <cnp.ndarray> x, y
    cdef bint stream
    cdef int n_threads
    cdef double count = <double> (s.outer * s.inner)
    try:
        if not (_plain_param(weight, s.C, 1.0, w) and _plain_param(bias, s.C, 0.0, b)):
            return None
        y = _plain_out(out, xa, code, x, residual, None)
        if y is None:
            return None
        n_threads = _threads_stream(y, s, &stream)
        _run_train_forward(_view3(xa, s), _view3(y, s), w, b, epsilon, mean, var, invstd,
                           n_threads, None if residual is None else _view3(residual, s),
                           relu, stream)
        if running:
            _update_running(running_mean, running_var, mean, var, count, mom)
        if statistics:
            return y, _statistic(mean, s.C, code), _statistic(invstd, s.C, code)
        return y
    finally:
        free(buf)


def plain_inference(x, running_mean, running_var, weight, bias, momentum, eps, axis,
                    activation, residual, out=None):
    """batch_norm(training=False) for a plain call (-> y, which is out where given); None
    for any other."""
    cdef Shape3 s
    cdef int relu
    cdef double mom, epsilon
    cdef int code = _plain_forward(x, axis, activation, residual, momentum, eps, &s, &relu,
                                   &mom, &epsilon)
    if code < 0:
        return None
    cdef double* buf = _channel_buffers(s.C)
    cdef double* rm = buf
    cdef double* rv = buf + s.C
    cdef double* w = buf + 2 * s.C
    cdef double* b = buf + 3 * s.C
    cdef double* scale = buf + 4 * s.C
    cdef cnp.ndarray xa = <cnp.ndarray> x, y
    cdef bint stream
    cdef int n_threads
    try:
        if not (_plain_param(running_mean, s.C, 0.0, rm) and running_mean is not None
                and _plain_param(running_var, s.C, 0.0, rv) and running_var is not None
                and _plain_param(weight, s.C, 1.0, w) and _plain_param(bias, s.C, 0.0, b)):
            return None
        y = _plain_out(out, xa, code, x, residual, None)
        if y is None:
            return None
        inference_scales(s.C, w, rv, epsilon, scale)
        n_threads = _threads_stream(y, s, &stream)
        stream = stream and _inference_rows_stream(cnp.PyArray_NBYTES(y), s.C, s.inner,
                                                   cnp.PyArray_ITEMSIZE(y), code)
        _run_normalize(_view3(xa, s), _view3(y, s), rm, scale, b, n_threads,
                       None if residual is None else _view3(residual, s), relu, stream)
        return y
    finally:
        free(buf)


def plain_backward(dy, x, mean, invstd, weight, training, axis, activation, y,
                   return_residual_grad, out=None):
    """batch_norm_backward (-> dx, dweight, dbias[, dresidual]) for a plain call (dx is
    out where given); None for any other."""
    cdef int code = _plain_data(x)
    cdef int relu = _plain_relu(activation)
    cdef Shape3 s
    if code < 0 or not _plain_like(dy, <cnp.ndarray> x, code) or not _plain_shape(<cnp.ndarray> x, axis, &s):
        return None
    if relu < 0 or not (_plain_like(y, <cnp.ndarray> x, code) if relu else y is None):
        return None
    if training is not True and training is not False:
        return None
    if return_residual_grad is not True and return_residual_grad is not False:
        return None
    cdef cnp.ndarray xa = <cnp.ndarray> x, ga = <cnp.ndarray> dy, dx, dres = None
    cdef bint frozen = training is False
    if not frozen and s.outer * s.inner < 2:
        return None
    cdef double* buf = _channel_buffers(s.C)
    cdef double* m = buf
    cdef double* iv = buf + s.C
    cdef double* w = buf + 2 * s.C
    cdef double* sdy = buf + 3 * s.C
    cdef double* sxmu = buf + 4 * s.C
    cdef bint stream
    cdef int n_threads
    cdef idx c
    try:
        if not (mean is not None and _plain_param(mean, s.C, 0.0, m)
                and invstd is not None and _plain_param(invstd, s.C, 0.0, iv)
                and _plain_param(weight, s.C, 1.0, w)):
            return None
        dx = _plain_out(out, xa, code, x, dy, y if relu else None)
        if dx is None:
            return None
        if return_residual_grad:  # the masked dy (written by the kernel), or dy itself
            dres = (_empty_like(xa)
                    if relu else cnp.PyArray_NewCopy(ga, cnp.NPY_CORDER))
        n_threads = _threads_stream(dx, s, &stream)
        _run_backward(_view3(ga, s), _view3(xa, s), _view3(dx, s), m, iv, w, frozen, sdy, sxmu,
                      n_threads, _view3(<cnp.ndarray> y, s) if relu else None,
                      _view3(dres, s) if relu and dres is not None else None, stream)
        for c in range(s.C):  # dweight = invstd * sum(g * (x - mean)), as fastbn._api
            sxmu[c] = iv[c] * sxmu[c]
        if dres is not None:
            return dx, _statistic(sxmu, s.C, code), _statistic(sdy, s.C, code), dres
        return dx, _statistic(sxmu, s.C, code), _statistic(sdy, s.C, code)
    finally:
        free(buf)
