// Per-channel batch-norm kernels for fastbn's CPU core.
//
// Every function here works on one channel (or one fixed chunk of one channel, or one
// chunk of rows in the channels-last layout) and is called from the parallel blocks in
// _bn_cpu.pyx, with the GIL released. Nothing here allocates, checks arguments or
// touches Python objects: the Python layer validated everything before.
//
// Layouts (see DESIGN.md): the array is the 3-D view (outer, C, inner).
//   "nc"  kernels: inner > 1, the inner axis is contiguous; a channel is `outer` rows of
//         `inner` elements, row r of channel c starting at x + c*sc + r*so.
//   "nlc" kernels: inner == 1 (channels-last); a row holds all C channels contiguously,
//         row r starting at x + r*sr, and loops vectorize across channels.
//
// Determinism: the reduction over a channel is split into chunks whose bounds depend
// only on the shape (never on the thread count); chunk partials are always folded in
// chunk order with the same merge. Whether one thread walks a whole channel or many
// threads compute chunks that are folded afterwards, the bits are the same.
//
// Accuracy: statistics accumulate in double. Inside a chunk the data is walked in
// cache-sized blocks: a block's mean and M2 come from one pass of sums shifted by one of
// the block's values while it sits in L1 (at most log2(block size + 1) bits cancel; two
// passes for blocks with Inf/NaN), and blocks merge with Chan's formula. Elementwise
// passes compute in float for float32/float16/bfloat16 and subtract the mean as a
// (hi, lo) float pair, so y keeps float accuracy even when |mean| >> std.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <type_traits>
#if defined(__x86_64__) || defined(_M_X64)
#include <emmintrin.h>
#define FASTBN_HAVE_STREAM 1
#if defined(__GNUC__) || defined(__clang__)
#include <immintrin.h>
#define FASTBN_HAVE_F16C 1
#endif
#else
#define FASTBN_HAVE_STREAM 0
#endif

// Runtime ISA dispatch: GCC emits an AVX-512, an AVX2 and a baseline x86-64 version of
// each hot function and picks one at load time (ifunc), so one wheel runs on any x86-64.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__) && \
    !defined(FASTBN_NO_TARGET_CLONES)
#define FASTBN_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define FASTBN_CLONES
#endif
#define FASTBN_INLINE inline __attribute__((always_inline))
// Lambdas are inlined into the clone that calls them, so they get its instruction set.
#define FASTBN_LAMBDA_INLINE __attribute__((always_inline))

namespace fastbn {

typedef std::ptrdiff_t idx;

// Elements per cache block (two passes over a block hit L1) and per chunk (the unit of
// parallel work and of the fixed reduction order).
static const idx BLOCK = 2048;
// Statistics ask for memory this many bytes ahead of what they reduce, a piece of
// STREAM_PIECE elements at a time (see merge_block, chunk_moments_nlc).
static const idx STATS_PREFETCH_AHEAD = 4096;
static const idx STREAM_PIECE = 512;

// Every software prefetch asks for its line into L2 (prefetcht1), not L1: the hardware
// prefetchers bring lines the loops walk from L2 to L1 in time, and lines asked for into
// L1 ahead of use evicted lines still in use there. Rows a multiple of 4 KB apart (a
// channels-last sweep's four rows, the rows asked for next, a channel's rows of x, dy and
// dx) all map to one of L1's 64 sets of 8 lines. Cold, 2 threads, the two builds called
// in turn in one process (locality 3 -> 2, the same bits; every pair measured, on a noisy
// host): float32 (256, 2048) backward 0.254-0.298 -> 0.199-0.285 ms, backward sums
// 0.182-0.201 -> 0.148-0.175, training forward 0.177-0.199 -> 0.138-0.156, inference
// 0.127-0.153 -> 0.094-0.138; (32,64,56,56)
// backward 3.17-3.18 -> 2.30-2.36 ms, training forward 1.82-1.95 -> 1.62-1.67;
// (128,512,7,7) backward 1.97 -> 1.49, statistics 0.96-1.00 -> 0.73-0.78; float64
// (8,256,28,28) backward 1.17-1.49 -> 0.74-0.99; (32,56,56,64) statistics 0.82-1.40 ->
// 0.73-1.03. The one case slower that way: (32,64,56,56) statistics alone, 0.71-0.79 ->
// 0.76-0.82 ms.
FASTBN_INLINE void prefetch_line(const void* p) { __builtin_prefetch(p, 0, 2); }

// Ask for the `bytes` bytes that start STATS_PREFETCH_AHEAD past p (a streamed piece).
FASTBN_INLINE void prefetch_past(const void* p, idx bytes) {
    const char* ahead = (const char*)p + STATS_PREFETCH_AHEAD;
    for (idx b = 0; b < bytes; b += 64) prefetch_line(ahead + b);
}
// NC reductions over short rows (shorter than BLOCK) ask for the rows of the channel about
// SHORT_ROWS_AHEAD bytes on along each row (channel_range_moments_nc, chunk_sums_nc).
static const idx SHORT_ROWS_AHEAD = 1024;
inline idx short_rows_channels_ahead(idx row_bytes) { return (SHORT_ROWS_AHEAD + row_bytes - 1) / row_bytes; }
static const idx CHUNK = 32768;
static const int LANES = 32;

// IEEE binary16 (numpy.float16) and bfloat16 (ml_dtypes) as raw bits. The conversions
// below are exact (round to nearest even, subnormals, Inf/NaN) and written branch-free in
// integer/float arithmetic so that GCC vectorizes them in every clone; compilers'
// _Float16 conversions stay scalar (or become libgcc calls) in loops, and not every
// compiler has _Float16.
struct half { uint16_t bits; };
struct bf16 { uint16_t bits; };

FASTBN_INLINE float bits_to_float(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
FASTBN_INLINE uint32_t float_to_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }

// F. Giesen's half -> float: shift exponent/mantissa into place, then fix up the
// exponent for Inf/NaN and renormalize subnormals.
FASTBN_INLINE float half_to_float(uint16_t h) {
    const uint32_t shifted_exp = 0x7c00u << 13;
    uint32_t o = (uint32_t)(h & 0x7fffu) << 13;
    uint32_t exp = shifted_exp & o;
    o += (127u - 15u) << 23;
    uint32_t inf_nan = o + ((128u - 16u) << 23);
    float denormal = bits_to_float(o + (1u << 23)) - bits_to_float(113u << 23);
    uint32_t r = exp == shifted_exp ? inf_nan : o;
    r = exp == 0 ? float_to_bits(denormal) : r;
    return bits_to_float(r | ((uint32_t)(h & 0x8000u) << 16));
}

// F. Giesen's float -> half with round to nearest even.
FASTBN_INLINE uint16_t float_to_half(float v) {
    uint32_t u = float_to_bits(v);
    uint32_t sign = u & 0x80000000u;
    u ^= sign;
    const uint32_t f32_inf = 255u << 23, f16_max = (127u + 16u) << 23;
    const uint32_t denorm_magic = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    uint32_t inf_nan = u > f32_inf ? 0x7e00u : 0x7c00u;
    uint32_t denormal = float_to_bits(bits_to_float(u) + bits_to_float(denorm_magic)) - denorm_magic;
    uint32_t mant_odd = (u >> 13) & 1u;
    uint32_t normal = (u + (((uint32_t)(15 - 127)) << 23) + 0xfffu + mant_odd) >> 13;
    uint32_t o = u >= f16_max ? inf_nan : (u < (113u << 23) ? denormal : normal);
    return (uint16_t)(o | (sign >> 16));
}

// float16 a piece at a time. Where the CPU has F16C (every x86-64-v3/v4 machine) pieces
// of float16 data are converted with vcvtph2ps / vcvtps2ph and the float code runs on
// them: the branch-free conversions above cost more than the arithmetic and made the
// float16 passes compute-bound. The hardware conversions are exact / round to nearest
// even as the functions above are, so the results are the same bits (NaN payloads
// aside). Pieces of HALF_PIECE elements, a multiple of LANES, keep each element's
// accumulator lane.
static const idx HALF_PIECE = 512;

inline void half_to_float_plain(const half* s, float* d, idx n) {
    for (idx i = 0; i < n; ++i) d[i] = half_to_float(s[i].bits);
}
inline void float_to_half_plain(const float* s, half* d, idx n) {
    for (idx i = 0; i < n; ++i) d[i].bits = float_to_half(s[i]);
}
#if FASTBN_HAVE_F16C
__attribute__((target("avx2,f16c"))) inline void half_to_float_f16c(const half* s, float* d, idx n) {
    idx i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(d + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s + i))));
    for (; i < n; ++i) d[i] = half_to_float(s[i].bits);
}
__attribute__((target("avx2,f16c"))) inline void float_to_half_f16c(const float* s, half* d, idx n) {
    idx i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i*)(d + i), _mm256_cvtps_ph(_mm256_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    for (; i < n; ++i) d[i].bits = float_to_half(s[i]);
}
// AVX-512 CPUs convert 16 at a time: on the development machine's AMD EPYC the 8-wide
// loops above took 0.085 ns per element each way on 512-element pieces in L1, these 0.031
// (float16 -> float) and 0.044 (float -> float16). The same conversions, the same bits.
__attribute__((target("avx512f,avx2,f16c"))) inline void half_to_float_avx512(const half* s, float* d, idx n) {
    idx i = 0;
    for (; i + 16 <= n; i += 16)
        _mm512_storeu_ps(d + i, _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s + i))));
    half_to_float_f16c(s + i, d + i, n - i);  // the remainder, 8 at a time
}
__attribute__((target("avx512f,avx2,f16c"))) inline void float_to_half_avx512(const float* s, half* d, idx n) {
    idx i = 0;
    for (; i + 16 <= n; i += 16)
        _mm256_storeu_si256((__m256i*)(d + i), _mm512_cvtps_ph(_mm512_loadu_ps(s + i), _MM_FROUND_TO_NEAREST_INT));
    float_to_half_f16c(s + i, d + i, n - i);  // the remainder, 8 at a time
}

// The hottest float16 loops (statistics, backward sums, the elementwise passes; both
// layouts) also have AVX-512 twins that convert 16 values in registers instead of a piece
// through an L1 buffer: the conversion round trip was a third of float16 backward's time.
// They do the float code's operations in the same order on the same lanes, so the same
// bits.
#define FASTBN_AVX512_HALF __attribute__((target("avx512f,avx2,f16c")))
FASTBN_AVX512_HALF FASTBN_INLINE __m512 load_half16(const half* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
}
FASTBN_AVX512_HALF FASTBN_INLINE void store_half16(half* p, __m512 v) {
    _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
// 8 float16 values at p widened to double, converted 8 at a time from memory: the 16-wide
// conversion and widen_half_of cost one lane extract more per 16 values, and the
// float16 sums are bound by these conversions, not by memory.
FASTBN_AVX512_HALF FASTBN_INLINE __m512d load_half8_wide(const half* p) {
    return _mm512_cvtps_pd(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)));
}
// The low (h = 0) or high (h = 1) 8 floats of v, widened to double.
FASTBN_AVX512_HALF FASTBN_INLINE __m512d widen_half_of(__m512 v, int h) {
    __m256 part = h ? _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)) : _mm512_castps512_ps256(v);
    return _mm512_cvtps_pd(part);
}
// The LANES (32) double accumulators of a row's sums as four vectors, and back.
FASTBN_AVX512_HALF FASTBN_INLINE void load_lanes(const double* a, __m512d* v) {
    for (int q = 0; q < 4; ++q) v[q] = _mm512_loadu_pd(a + 8 * q);
}
FASTBN_AVX512_HALF FASTBN_INLINE void store_lanes(double* a, const __m512d* v) {
    for (int q = 0; q < 4; ++q) _mm512_storeu_pd(a + 8 * q, v[q]);
}
// 16 values of g (float16 dy), zero where a fused ReLU's output y is not > 0 (as
// masked_grad; y is NaN-safe: the comparison is false).
template <bool MASK>
FASTBN_AVX512_HALF FASTBN_INLINE __m512 masked_grad_half16(const half* g, const half* y) {
    __m512 gv = load_half16(g);
    if (MASK) gv = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(load_half16(y), _mm512_setzero_ps(), _CMP_GT_OQ), gv);
    return gv;
}
// g where y > 0, else 0, on widened values (as masked_grad: NaN-safe, the comparison is
// false); y > 0 in double is y > 0 in float, the widening being exact.
FASTBN_AVX512_HALF FASTBN_INLINE __m512d where_positive(__m512d g, __m512d y) {
    return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(y, _mm512_setzero_pd(), _CMP_GT_OQ), g);
}
// masked_grad_half16 on 8 values widened to double (see load_half8_wide).
template <bool MASK>
FASTBN_AVX512_HALF FASTBN_INLINE __m512d masked_grad_half8_wide(const half* g, const half* y) {
    const __m512d gd = load_half8_wide(g);
    return MASK ? where_positive(gd, load_half8_wide(y)) : gd;
}
// Up to 16 float16 values of a row's end through the 16-wide loop body: copied to (and
// from) a zero-padded block of 16.
struct HalfTail {
    alignas(32) half v[16];
    HalfTail(const half* p, idx m) {
        std::memset(v, 0, sizeof v);
        if (p) std::memcpy(v, p, (size_t)m * sizeof(half));
    }
};
#endif

// AVX-512 loops that keep tiles of channels in registers (see normalize_tile_nlc), for
// float32, float16 and bfloat16 data. FASTBN_CHANNEL_TILES=off (read once) turns them
// off, so that the tests can compare them with the loops other CPUs run.
#if FASTBN_HAVE_F16C
#define FASTBN_AVX512_TILES __attribute__((target("avx512f,avx512bw,avx512vl,avx2,f16c")))

// 16 values of T as floats, and back (masked: lanes of a row's last, partial vector).
template <class T> struct Lanes16;
template <> struct Lanes16<float> {
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512 load(const float* p) { return _mm512_loadu_ps(p); }
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512 load(const float* p, __mmask16 k) {
        return _mm512_maskz_loadu_ps(k, p);
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
    FASTBN_AVX512_TILES FASTBN_INLINE static void store(float* p, __m512 v, __mmask16 k) {
        _mm512_mask_storeu_ps(p, k, v);
    }
};
template <> struct Lanes16<half> {
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512 load(const half* p) {
        return _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)p));
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512d load8_wide(const half* p) { return load_half8_wide(p); }
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512 load(const half* p, __mmask16 k) {
        return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static void store(half* p, __m512 v) {
        _mm256_storeu_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static void store(half* p, __m512 v, __mmask16 k) {
        _mm256_mask_storeu_epi16(p, k, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
    }
};
template <> struct Lanes16<bf16> {
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512 widen(__m256i bits) {
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(bits), 16));
    }
    // store(bf16*, float) on 16 lanes: round to nearest even, NaN stays a quiet NaN
    FASTBN_AVX512_TILES FASTBN_INLINE static __m256i narrow(__m512 v) {
        const __m512i u = _mm512_castps_si512(v);
        const __m512i high = _mm512_srli_epi32(u, 16);
        const __m512i odd = _mm512_and_si512(high, _mm512_set1_epi32(1));
        const __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
        const __mmask16 nan = _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)),
                                                      _mm512_set1_epi32(0x7f800000));
        const __m512i bits = _mm512_mask_mov_epi32(rounded, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x40)));
        return _mm512_cvtepi32_epi16(bits);
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512 load(const bf16* p) {
        return widen(_mm256_loadu_si256((const __m256i*)p));
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512d load8_wide(const bf16* p) {
        const __m256i bits = _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16);
        return _mm512_cvtps_pd(_mm256_castsi256_ps(bits));
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512 load(const bf16* p, __mmask16 k) {
        return widen(_mm256_maskz_loadu_epi16(k, p));
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static void store(bf16* p, __m512 v) {
        _mm256_storeu_si256((__m256i*)p, narrow(v));
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static void store(bf16* p, __m512 v, __mmask16 k) {
        _mm256_mask_storeu_epi16(p, k, narrow(v));
    }
};

// 16 values of g (masked: the lanes in k), zero where a fused ReLU's output y is not > 0
// (as masked_grad; NaN-safe: the comparison is false).
template <class T, bool MASK>
FASTBN_AVX512_TILES FASTBN_INLINE __m512 masked_grad16(const T* g, const T* y, bool masked = false,
                                                     __mmask16 k = 0) {
    __m512 gv = masked ? Lanes16<T>::load(g, k) : Lanes16<T>::load(g);
    if (MASK) {
        const __m512 yv = masked ? Lanes16<T>::load(y, k) : Lanes16<T>::load(y);
        gv = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(yv, _mm512_setzero_ps(), _CMP_GT_OQ), gv);
    }
    return gv;
}
// 16 values of T (dy: zero where y is not > 0, as masked_grad16) for the reductions,
// widened to double 8 at a time: half(h) holds values 8h..8h+7. 16-bit types convert 8
// at a time from memory when asked (see load_half8_wide); float32 loads the 16 once and widens each half, as
// before (converted 8 at a time from memory it was 1-3 % slower).
template <class T, bool MASK = false>
struct Wide16 {
    const T* g;
    const T* y;
    FASTBN_AVX512_TILES FASTBN_INLINE Wide16(const T* g_, const T* y_ = nullptr) : g(g_), y(y_) {}
    FASTBN_AVX512_TILES FASTBN_INLINE __m512d half(int h) const {
        const __m512d w = Lanes16<T>::load8_wide(g + 8 * h);
        return MASK ? where_positive(w, Lanes16<T>::load8_wide(y + 8 * h)) : w;
    }
};
template <bool MASK>
struct Wide16<float, MASK> {
    __m512 v;
    FASTBN_AVX512_TILES FASTBN_INLINE Wide16(const float* g, const float* y = nullptr)
        : v(masked_grad16<float, MASK>(g, y)) {}
    FASTBN_AVX512_TILES FASTBN_INLINE __m512d half(int h) const { return widen_half_of(v, h); }
};

inline bool pick_channel_tiles() {
    const char* cap = std::getenv("FASTBN_CHANNEL_TILES");
    if (cap && std::strcmp(cap, "off") == 0) return false;
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
}
inline bool channel_tiles_available() {
    static const bool available = pick_channel_tiles();
    return available;
}
#else
inline bool channel_tiles_available() { return false; }
#endif

struct HalfConverters {
    void (*to_float)(const half*, float*, idx);
    void (*to_half)(const float*, half*, idx);
    bool in_registers;  // the AVX-512 twins of the hottest loops (see load_half16)
};

// The widest the CPU has; FASTBN_HALF_CONVERSION=plain|f16c (read once) caps it, so that
// the tests can run every version on one machine.
inline HalfConverters pick_half_converters() {
    const char* cap = std::getenv("FASTBN_HALF_CONVERSION");
    const bool plain = cap && std::strcmp(cap, "plain") == 0;
    const bool f16c = cap && std::strcmp(cap, "f16c") == 0;
#if FASTBN_HAVE_F16C
    __builtin_cpu_init();
    const bool has_f16c = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c");
    if (!plain && !f16c && has_f16c && __builtin_cpu_supports("avx512f"))
        return HalfConverters{half_to_float_avx512, float_to_half_avx512, true};
    if (!plain && has_f16c)
        return HalfConverters{half_to_float_f16c, float_to_half_f16c, false};
#endif
    (void)f16c;
    return HalfConverters{half_to_float_plain, float_to_half_plain, false};
}

// chosen once (thread-safe static initialization)
inline const HalfConverters& half_converters() {
    static const HalfConverters converters = pick_half_converters();
    return converters;
}

// "avx512", "f16c" or "plain": the conversions in use.
inline const char* half_conversion_name() {
#if FASTBN_HAVE_F16C
    if (half_converters().to_float == half_to_float_avx512) return "avx512";
    if (half_converters().to_float == half_to_float_f16c) return "f16c";
#endif
    return "plain";
}

template <class T> FASTBN_INLINE constexpr bool is_half() { return std::is_same<T, half>::value; }

// Compute type of the elementwise passes: double for double data, float otherwise.
template <class T> struct compute_of { typedef float type; };
template <> struct compute_of<double> { typedef double type; };

FASTBN_INLINE float to_compute(float v) { return v; }
FASTBN_INLINE double to_compute(double v) { return v; }
FASTBN_INLINE float to_compute(half v) { return half_to_float(v.bits); }
FASTBN_INLINE void store(half* p, float v) { p->bits = float_to_half(v); }
FASTBN_INLINE float to_compute(bf16 v) { return bits_to_float((uint32_t)v.bits << 16); }
FASTBN_INLINE void store(float* p, float v) { *p = v; }
FASTBN_INLINE void store(double* p, double v) { *p = v; }
FASTBN_INLINE void store(bf16* p, float v) {
    // round to nearest even; NaN stays a (quiet) NaN
    uint32_t u = float_to_bits(v);
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t quiet_nan = (u >> 16) | 0x40u;
    p->bits = (uint16_t)((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}
template <class T> FASTBN_INLINE double to_double(T v) { return (double)to_compute(v); }

// ---------------------------------------------------------------- moments and merging
struct Moments {
    double n, mean, m2;
};

// Chan's merge of (nb, mb, m2b) into a. Python's Moments.merge uses the same expression
// order, so partials merged there and here agree bit for bit.
FASTBN_INLINE void merge_into(Moments& a, double nb, double mb, double m2b) {
    if (nb == 0) return;
    if (a.n == 0) {
        a.n = nb; a.mean = mb; a.m2 = m2b;
        return;
    }
    double n = a.n + nb;
    double d = mb - a.mean;
    if (d * 0.0 == 0.0) {
        a.mean = a.mean + d * (nb / n);
        a.m2 = a.m2 + (m2b + (d * d) * (a.n * nb / n));
    } else {
        // an Inf or NaN mean: the sum of the means, as a plain sum gives (Inf + finite
        // = Inf, Inf - Inf = NaN), and M2 NaN, as numpy's var -- whatever the blocking
        a.mean = a.mean + mb;
        a.m2 = d * 0.0;
    }
    a.n = n;
}

// Pairwise sum of the lanes in a fixed order.
FASTBN_INLINE double lane_total(const double* acc) {
    double t[LANES];
    for (int j = 0; j < LANES; ++j) t[j] = acc[j];
    for (int width = LANES / 2; width >= 1; width /= 2)
        for (int j = 0; j < width; ++j) t[j] = t[j] + t[j + width];
    return t[0];
}

// Element k of a row goes to lane k % LANES: the full groups of n (a multiple of LANES)
// elements, and a tail of n < LANES elements.
template <class T> FASTBN_INLINE void add_sum_full(const T* p, idx n, double* acc) {
    for (idx i = 0; i < n; i += LANES)
        for (int j = 0; j < LANES; ++j) acc[j] += to_double(p[i + j]);
}

template <class T> FASTBN_INLINE void add_sum_tail(const T* p, idx n, double* acc) {
    for (int j = 0; j < n; ++j) acc[j] += to_double(p[j]);
}

template <class T> FASTBN_INLINE void add_sq_dev_full(const T* p, idx n, double mean, double* acc) {
    for (idx i = 0; i < n; i += LANES)
        for (int j = 0; j < LANES; ++j) {
            double d = to_double(p[i + j]) - mean;
            acc[j] += d * d;
        }
}

template <class T> FASTBN_INLINE void add_sq_dev_tail(const T* p, idx n, double mean, double* acc) {
    for (int j = 0; j < n; ++j) {
        double d = to_double(p[j]) - mean;
        acc[j] += d * d;
    }
}

template <class T>
FASTBN_INLINE void add_shifted_full(const T* p, idx n, double K, double* s1, double* s2) {
    for (idx i = 0; i < n; i += LANES)
        for (int j = 0; j < LANES; ++j) {
            double d = to_double(p[i + j]) - K;
            s1[j] += d;
            s2[j] += d * d;
        }
}

template <class T>
FASTBN_INLINE void add_shifted_tail(const T* p, idx n, double K, double* s1, double* s2) {
    for (int j = 0; j < n; ++j) {
        double d = to_double(p[j]) - K;
        s1[j] += d;
        s2[j] += d * d;
    }
}

#if FASTBN_HAVE_F16C
// add_shifted_full<float> on float16 data converted in registers (see load_half16), n a
// multiple of LANES; stream_ahead: as merge_block's pieces.
FASTBN_AVX512_HALF inline void add_shifted_half_in_registers(const half* p, idx n, double K, double* s1,
                                                            double* s2, bool stream_ahead) {
    __m512d a1[4], a2[4];
    load_lanes(s1, a1);
    load_lanes(s2, a2);
    const __m512d k = _mm512_set1_pd(K);
    for (idx i = 0; i < n; i += LANES) {
        if (stream_ahead && i % STREAM_PIECE == 0)
            prefetch_past(p + i, (n - i < STREAM_PIECE ? n - i : STREAM_PIECE) * (idx)sizeof(half));
        for (int q = 0; q < 4; ++q) {
            const __m512d d = _mm512_sub_pd(load_half8_wide(p + i + 8 * q), k);
            a1[q] = _mm512_add_pd(a1[q], d);
            a2[q] = _mm512_add_pd(a2[q], _mm512_mul_pd(d, d));
        }
    }
    store_lanes(s1, a1);
    store_lanes(s2, a2);
}
#endif

// The one-pass block moments from the lanes of the shifted sums (see merge_block): merged
// into m, or false where the check fails (Inf/NaN) and the block needs two passes.
FASTBN_INLINE bool merge_shifted_sums(Moments& m, const double* s1, const double* s2, double count, double K) {
    const double S1 = lane_total(s1), S2 = lane_total(s2);
    const double M2 = S2 - S1 * (S1 / count);
    if (!(M2 >= S2 * 0x1p-20)) return false;
    merge_into(m, count, K + S1 / count, M2);
    return true;
}

// Moments of rows x rows [i0, i1) while the block is in L1. stream_ahead (one row): the
// row is reduced (float16: converted) a piece of STREAM_PIECE elements at a time, each
// piece asking for the bytes STATS_PREFETCH_AHEAD past it.
template <class T>
FASTBN_INLINE void merge_block(Moments& m, const T* x, idx so, idx rows, idx i0, idx i1,
                               bool stream_ahead = false) {
    if constexpr (is_half<T>()) {
        // float16: the block (at most BLOCK elements) converted once, for both passes;
        // the same rows and lanes, so the same bits
        alignas(64) float f[BLOCK];
        const HalfConverters& cv = half_converters();
        const idx n = i1 - i0;
#if FASTBN_HAVE_F16C
        if (cv.in_registers) {  // the one pass below in registers; the two passes from f
            const idx full = n - n % LANES;
            const double K = to_double(x[i0]);
            double s1[LANES] = {}, s2[LANES] = {};
            for (idx r = 0; r < rows; ++r)
                add_shifted_half_in_registers(x + r * so + i0, full, K, s1, s2, stream_ahead && rows == 1);
            if (full < n)
                for (idx r = 0; r < rows; ++r) add_shifted_tail(x + r * so + i0 + full, n - full, K, s1, s2);
            if (merge_shifted_sums(m, s1, s2, (double)(rows * n), K)) return;
        }
#endif
        if (stream_ahead && rows == 1) {
            for (idx i = 0; i < n; i += STREAM_PIECE) {
                const idx len = n - i < STREAM_PIECE ? n - i : STREAM_PIECE;
                prefetch_past(x + i0 + i, len * (idx)sizeof(T));
                cv.to_float(x + i0 + i, f + i, len);
            }
        } else {
            for (idx r = 0; r < rows; ++r) cv.to_float(x + r * so + i0, f + r * n, n);
        }
        merge_block<float>(m, f, n, rows, 0, n);
        return;
    }
    // One pass of sums shifted by the block's first element, K: S1 = sum(x - K), S2 =
    // sum((x - K)^2), M2 = S2 - S1^2/n. K is one of the block's n values, so (K - mean)^2
    // <= M2 and S2 = M2 + n (K - mean)^2 <= (n + 1) M2: at most log2(BLOCK + 1) = 12 bits
    // cancel, and M2 keeps ~40 bits (float64). The check M2 >= 2^-20 S2 therefore only
    // fails for Inf/NaN (or overflowing squares); those blocks take the two passes below,
    // whose second pass is centred on the block mean, so non-finite data keeps the
    // semantics of a plain sum. One pass instead of two: (2,16,56,56) statistics 0.150 ->
    // 0.103 ns per element, 1 thread, hot; (32,64,56,56) moments, 2 threads, cold, about
    // 1.07 -> 0.91 ms, training forward 1.74 -> 1.52 ms.
    const idx n = i1 - i0, full = n - n % LANES;
    const double count = (double)(rows * n);
    {
        const double K = to_double(x[i0]);
        double s1[LANES] = {}, s2[LANES] = {};
        if (stream_ahead) {
            // a piece of a row at a time, each asking for the bytes STATS_PREFETCH_AHEAD
            // past it: the same lanes and order (the same bits)
            for (idx r = 0; r < rows; ++r) {
                const T* row = x + r * so + i0;
                for (idx i = 0; i < full; i += STREAM_PIECE) {
                    const idx len = full - i < STREAM_PIECE ? full - i : STREAM_PIECE;
                    prefetch_past(row + i, len * (idx)sizeof(T));
                    add_shifted_full(row + i, len, K, s1, s2);
                }
            }
        } else {
            for (idx r = 0; r < rows; ++r) add_shifted_full(x + r * so + i0, full, K, s1, s2);
        }
        if (full < n)
            for (idx r = 0; r < rows; ++r) add_shifted_tail(x + r * so + i0 + full, n - full, K, s1, s2);
        if (merge_shifted_sums(m, s1, s2, count, K)) return;
    }
    // Two passes. The full LANES-groups of every row first, then the rows' tails: the
    // accumulators stay in registers across rows (with a tail per row they were stored
    // and reloaded for every row: (64,64,7,7) statistics 0.44 -> 0.24 ns per element).
    double acc[LANES] = {};
    for (idx r = 0; r < rows; ++r) add_sum_full(x + r * so + i0, full, acc);
    if (full < n)
        for (idx r = 0; r < rows; ++r) add_sum_tail(x + r * so + i0 + full, n - full, acc);
    double mean = lane_total(acc) / count;
    double acc2[LANES] = {};
    for (idx r = 0; r < rows; ++r) add_sq_dev_full(x + r * so + i0, full, mean, acc2);
    if (full < n)
        for (idx r = 0; r < rows; ++r) add_sq_dev_tail(x + r * so + i0 + full, n - full, mean, acc2);
    merge_into(m, count, mean, lane_total(acc2));
}

// ------------------------------------------------------------------ nc chunk geometry
struct NCGrid {
    idx outer, inner, rows_per_chunk, seg_len, segs_per_row, n_chunks;
};

inline NCGrid nc_grid(idx outer, idx inner) {
    NCGrid g;
    g.outer = outer;
    g.inner = inner;
    if (outer == 0 || inner == 0) {
        g.rows_per_chunk = 1; g.seg_len = 1; g.segs_per_row = 0; g.n_chunks = 0;
    } else if (inner >= CHUNK) {
        g.rows_per_chunk = 1;
        g.seg_len = CHUNK;
        g.segs_per_row = (inner + CHUNK - 1) / CHUNK;
        g.n_chunks = outer * g.segs_per_row;
    } else {
        g.rows_per_chunk = CHUNK / inner;
        g.seg_len = inner;
        g.segs_per_row = 1;
        g.n_chunks = (outer + g.rows_per_chunk - 1) / g.rows_per_chunk;
    }
    return g;
}

struct Span {
    idx r0, r1, i0, i1;
};

// The whole row r of a channel.
inline Span row_span(idx r, idx inner) {
    Span s = {r, r + 1, 0, inner};
    return s;
}

inline Span nc_chunk(const NCGrid& g, idx k) {
    Span s;
    if (g.segs_per_row > 1 || g.inner >= CHUNK) {
        idx r = k / g.segs_per_row, seg = k % g.segs_per_row;
        s.r0 = r; s.r1 = r + 1;
        s.i0 = seg * g.seg_len;
        s.i1 = s.i0 + g.seg_len < g.inner ? s.i0 + g.seg_len : g.inner;
    } else {
        s.r0 = k * g.rows_per_chunk;
        s.r1 = s.r0 + g.rows_per_chunk < g.outer ? s.r0 + g.rows_per_chunk : g.outer;
        s.i0 = 0; s.i1 = g.inner;
    }
    return s;
}

// ---------------------------------------------------------------- nc statistics
// Ask for rows x [i0, i1) ahead of use: rows of a channel are far apart in memory, so the
// hardware prefetcher restarts at every row; one block of lookahead keeps loads in flight.
template <class T> FASTBN_INLINE void prefetch_rows(const T* x, idx so, idx rows, idx i0, idx i1) {
    const idx step = 64 / sizeof(T);
    for (idx r = 0; r < rows; ++r)
        for (idx i = i0; i < i1; i += step) prefetch_line(x + r * so + i);
}

// Channels-last row loops: prefetch the row about PREFETCH_AHEAD bytes (statistics:
// STATS_PREFETCH_AHEAD) ahead of row r (rows of [r0, r1) with stride sr), so that DRAM
// streams while rows are computed. RowsAhead turns the distance into rows once per loop
// rather than with a 64-bit division per row.
static const idx PREFETCH_AHEAD = 2048;
struct RowsAhead {
    idx rows;
    template <class T> static RowsAhead of(idx C, idx ahead_bytes = PREFETCH_AHEAD) {
        const idx row_bytes = C * (idx)sizeof(T);
        return RowsAhead{row_bytes >= ahead_bytes ? 1 : ahead_bytes / row_bytes};
    }
};
template <class T>
FASTBN_INLINE void prefetch_ahead_nlc(const T* base, idx sr, idx C, idx r, idx r1, RowsAhead ahead) {
    if (base && r + ahead.rows < r1) prefetch_rows(base + (r + ahead.rows) * sr, sr, 1, 0, C);
}

// The fused per-channel passes read a channel from memory, then re-read it from cache
// while nothing else is read from memory. Asking for the next channel's rows (into L2)
// during that second pass keeps memory busy: rows [i0, i1) of row r of `next` (NULL: none).
template <class T> FASTBN_INLINE void prefetch_next_channel_row(const T* next, idx so, idx r, idx i0, idx i1) {
    if (!next) return;
    const idx step = 64 / sizeof(T);
    const T* p = next + r * so;
    for (idx i = i0; i < i1; i += step) prefetch_line(p + i);
}

// Wide channels-last rows of arrays that are not cache-resident: a sweep over channels
// [c0, c1) of a few rows asks for the rows that follow a line at a time as it goes
// (ask(c) for the line at channel c, then work(c, c + line)), not whole rows at its
// start: a burst of 128+ requests per row waits for free miss buffers.
static const idx SPREAD_ROWS = 4;
template <class Ask, class Work>
FASTBN_INLINE void sweep_asking_ahead(idx c0, idx c1, idx line, const Ask& ask, const Work& work) {
    for (idx c = c0; c < c1; c += line) {
        ask(c);
        work(c, c + line < c1 ? c + line : c1);
    }
}

// What a sweep of four rows asks for at each of its steps (a line of its rows): the
// SPREAD_ROWS rows after its own, elements [c0, c1) of each (first: the first of them,
// stride s), in memory order -- row after row, SPREAD_ROWS lines a step, so that the whole
// next sweep has been asked for when this one ends. Asked for column by column (a line of
// each of the four rows per step), memory saw four streams per array, 8 KB apart; in
// order it sees one. Cold, 2 threads, builds called in turn, both orders: (256, 2048)
// float32 backward sums 0.104-0.106 -> 0.093-0.094 ms, backward 0.137-0.140 ->
// 0.127-0.133 ms, statistics 0.054-0.055 -> 0.051, inference 0.053-0.054 -> 0.049 (more in
// the README). Same bits (prefetches only).
template <class T> struct RowsInOrder {
    const T* row;
    idx s, c0, c1, c;
    FASTBN_INLINE RowsInOrder(const T* first, idx s_, idx c0_, idx c1_) : row(first), s(s_), c0(c0_), c1(c1_), c(c0_) {}
    FASTBN_INLINE void ask() {
        for (idx k = 0; k < SPREAD_ROWS; ++k) {
            if (c >= c1) {
                row += s;
                c = c0;
            }
            prefetch_line(row + c);
            c += 64 / (idx)sizeof(T);
        }
    }
};

// Moments of one chunk of a channel. Long rows: each block streams ahead within its row
// (merge_block's stream_ahead; cold (32,64,56,56) training forward, 2 threads: 1.67-2.04
// -> 1.58-1.87 ms), and the row's last block asks for the next row's first one.
template <class T> FASTBN_INLINE Moments chunk_moments_nc_impl(const T* xc, idx so, Span s) {
    Moments m = {0, 0, 0};
    idx len = s.i1 - s.i0;
    if (len >= BLOCK) {
        for (idx r = s.r0; r < s.r1; ++r)
            for (idx i = s.i0; i < s.i1; i += BLOCK) {
                idx e = i + BLOCK < s.i1 ? i + BLOCK : s.i1;
                if (e >= s.i1 && r + 1 < s.r1) prefetch_rows(xc + (r + 1) * so, so, 1, s.i0, s.i0 + BLOCK);
                merge_block(m, xc + r * so, so, 1, i, e, true);
            }
    } else {
        idx rows_per_block = BLOCK / len;
        for (idx r = s.r0; r < s.r1; r += rows_per_block) {
            idx n = r + rows_per_block < s.r1 ? rows_per_block : s.r1 - r;
            idx rn = r + n;
            if (rn < s.r1)
                prefetch_rows(xc + rn * so, so, rn + rows_per_block < s.r1 ? rows_per_block : s.r1 - rn,
                              s.i0, s.i1);
            merge_block(m, xc + r * so, so, n, s.i0, s.i1);
        }
    }
    return m;
}

template <class T> FASTBN_CLONES Moments chunk_moments_nc(const T* xc, idx so, Span s) {
    return chunk_moments_nc_impl(xc, so, s);
}

// Moments of channels [c0, c1) walking memory in order: chunk by chunk, each of its rows
// (short rows: each block's group of rows) for every channel of the range in turn, so
// that a thread streams through contiguous memory where the per-channel walk jumped a
// channel's length at every row and the hardware prefetcher restarted there. Measured
// (C++ harness, cold, 2 threads, float32, one variant per process): (32,64,56,56)
// 1.08-1.17 -> 0.84-0.98 ms; in one process (32,256,14,14) 0.40 -> 0.31 ms, (128,512,7,7)
// 1.07 -> 0.79 ms. Rows are reduced a piece at a time, each piece asking for the bytes
// 4 KB past it (merge_block's stream_ahead; in memory order that is what comes next):
// (32,64,56,56) 0.81-1.10 -> 0.68-0.76 ms in the harness; from Python, cold, 2 threads,
// instead of asking for the next channel's group of short rows at once, (32,128,28,28)
// 0.41-0.54 -> 0.34-0.37 ms, (32,256,14,14) 0.25-0.33 -> 0.21-0.24 ms. Every channel merges the same blocks as chunk_moments_nc in the same
// order and folds its chunk partials in chunk order, as the split path does: the same bits.
// OUT counts, mean, m2: (c1 - c0,); chunk: 3 * (c1 - c0) doubles of scratch.
template <class T>
FASTBN_CLONES void channel_range_moments_nc(const T* x, idx so, idx sc, NCGrid g, idx c0, idx c1,
                                            double* counts, double* mean, double* m2, double* chunk) {
    const idx nch = c1 - c0;
    Moments* part = reinterpret_cast<Moments*>(chunk);
    for (idx c = 0; c < nch; ++c) { counts[c] = 0; mean[c] = 0; m2[c] = 0; }
    for (idx k = 0; k < g.n_chunks; ++k) {
        const Span s = nc_chunk(g, k);
        const idx len = s.i1 - s.i0;
        for (idx c = 0; c < nch; ++c) part[c] = Moments{0, 0, 0};
        if (len >= BLOCK) {
            for (idx r = s.r0; r < s.r1; ++r)
                for (idx c = 0; c < nch; ++c) {
                    const T* row = x + (c0 + c) * sc + r * so;
                    for (idx i = s.i0; i < s.i1; i += BLOCK)
                        merge_block(part[c], row, so, 1, i, i + BLOCK < s.i1 ? i + BLOCK : s.i1, true);
                }
        } else {
            // A block of a channel is n short rows far apart: as many streams, each a row's
            // bytes further per channel, more than the hardware prefetchers follow. Each
            // channel asks for the block of the channel about SHORT_ROWS_AHEAD bytes on
            // (cold (128,512,7,7), 2 threads, builds in turn: float32 0.72-1.04 -> 0.46-0.64
            // ms, float16 1.90 -> 0.73; the same bits).
            const idx rows_per_block = BLOCK / len;
            const idx ahead = short_rows_channels_ahead(len * (idx)sizeof(T));
            for (idx r = s.r0; r < s.r1; r += rows_per_block) {
                const idx n = r + rows_per_block < s.r1 ? rows_per_block : s.r1 - r;
                for (idx c = 0; c < nch; ++c) {
                    if (c + ahead < nch) prefetch_rows(x + (c0 + c + ahead) * sc + r * so, so, n, s.i0, s.i1);
                    merge_block(part[c], x + (c0 + c) * sc + r * so, so, n, s.i0, s.i1, true);
                }
            }
        }
        for (idx c = 0; c < nch; ++c) {
            Moments t = {counts[c], mean[c], m2[c]};
            merge_into(t, part[c].n, part[c].mean, part[c].m2);
            counts[c] = t.n; mean[c] = t.mean; m2[c] = t.m2;
        }
    }
}

// 1/sqrt(var + eps) with var = m2/n; the one expression every path uses.
FASTBN_INLINE double invstd_of(double n, double m2, double eps) { return 1.0 / std::sqrt(m2 / n + eps); }

// Per-channel results of a training forward from (count, M2), in place: invstd, var = M2 /
// count (biased) and, when scale is given, scale = weight * invstd. count[c * count_step]
// (0: one count for all channels) may be invstd itself. finalize_channels is a clone of its
// own: the scalar divide/sqrt/divide of wide layers (2048 channels) cost more than their
// statistics.
FASTBN_INLINE void finalize_range(idx C, const double* count, idx count_step, double eps, double* var,
                                  double* invstd, const double* weight, double* scale) {
    for (idx c = 0; c < C; ++c) {
        double n = count[c * count_step], m2 = var[c];
        invstd[c] = invstd_of(n, m2, eps);
        var[c] = m2 / n;
    }
    if (scale)
        for (idx c = 0; c < C; ++c) scale[c] = weight[c] * invstd[c];
}

FASTBN_CLONES void finalize_channels(idx C, const double* count, idx count_step, double eps, double* var,
                                     double* invstd, const double* weight, double* scale) {
    finalize_range(C, count, count_step, eps, var, invstd, weight, scale);
}

// ---------------------------------------------------------------- fused epilogues
// Forward: y = relu?(bn(x) + residual?). For "nc" kernels res points at the array base
// and res_so/res_sc are its outer/channel strides; for "nlc" kernels res_so is the row
// stride (channels contiguous).
struct Epilogue {
    const void* res;
    idx res_so, res_sc;
    bool relu;
    bool stream;  // write y with non-temporal stores (large outputs, not re-read soon)
    bool spread;  // x not cache-resident: ask for what follows as rows go (sweep_asking_ahead)
    bool strips;  // x in cache: wide rows a strip of channels at a time (normalize_strips_nlc)
};

// Backward through a fused ReLU: the gradient is masked where the forward output y was
// not positive; the masked gradient (the residual's gradient) goes to dres when given.
// y == NULL: no activation.
struct Activation {
    const void* y;
    idx y_so, y_sc;
    void* dres;
    idx dres_so, dres_sc;
    bool stream;  // write dx with non-temporal stores
    bool strips;  // dy and x in cache: wide rows a strip of channels at a time
};

template <class T> FASTBN_INLINE const T* channel_ptr(const void* base, idx c, idx sc) {
    return base ? (const T*)base + c * sc : (const T*)0;
}

// ReLU that keeps NaN (as torch.relu does).
template <class CT> FASTBN_INLINE CT relu(CT v) { return v < 0 ? (CT)0 : v; }

// ---------------------------------------------------------------- streaming stores
// A large output that is not read again soon costs a read for every write (the cache
// line is fetched before it is overwritten) unless it is written with non-temporal
// stores. Rows are computed into an L1 buffer by the ordinary vectorized code, then
// copied out with SSE2 streaming stores (baseline x86-64, so every clone has them).
static const idx STAGE_BYTES = 4096;

// Copy with streaming stores in whole aligned units of UNIT bytes (16: every byte it can;
// 64: whole cache lines only), the bytes before the first and after the last unit with
// ordinary stores.
template <size_t UNIT> FASTBN_INLINE void stream_copy_units(void* dst, const void* src, size_t bytes) {
    char* d = (char*)dst;
    const char* s = (const char*)src;
#if FASTBN_HAVE_STREAM
    size_t head = (UNIT - ((uintptr_t)d & (UNIT - 1))) & (UNIT - 1);
    if (head > bytes) head = bytes;
    std::memcpy(d, s, head);
    d += head; s += head; bytes -= head;
    for (; bytes >= UNIT; bytes -= UNIT, d += UNIT, s += UNIT)
        for (size_t k = 0; k < UNIT; k += 16)
            _mm_stream_si128((__m128i*)(d + k), _mm_loadu_si128((const __m128i*)(s + k)));
#endif
    std::memcpy(d, s, bytes);
}

FASTBN_INLINE void stream_copy(void* dst, const void* src, size_t bytes) { stream_copy_units<16>(dst, src, bytes); }

// Make streamed stores visible before the results are used (end of a kernel call).
FASTBN_INLINE void stream_fence() {
#if FASTBN_HAVE_STREAM
    _mm_sfence();
#endif
}

// Write out[0..n) of a row through fill(dst, i, m), which writes elements i..i+m-1 of
// the row to dst[0..m): directly, or staged through L1 and streamed.
template <class T, class Fill>
FASTBN_INLINE void write_row(T* out, idx n, bool stream, const Fill& fill) {
    if (!stream) {
        fill(out, 0, n);
        return;
    }
    const idx B = STAGE_BYTES / (idx)sizeof(T);
    alignas(64) T stage[STAGE_BYTES / sizeof(T)];
    for (idx i = 0; i < n; i += B) {
        idx m = n - i < B ? n - i : B;
        fill(stage, i, m);
        stream_copy(out + i, stage, (size_t)m * sizeof(T));
    }
}

// Four output rows (stride sr) of n values through L1 staging, streamed row by row:
// fill(s0, s1, s2, s3, i, m) writes values [i, i + m) of the four rows to s0..s3.
template <class T, class Fill>
FASTBN_INLINE void stream_four_rows(T* out, idx sr, idx n, const Fill& fill) {
    const idx B = STAGE_BYTES / 4 / (idx)sizeof(T);
    alignas(64) T stage[4][STAGE_BYTES / 4 / sizeof(T)];
    for (idx i = 0; i < n; i += B) {
        const idx m = n - i < B ? n - i : B;
        fill(stage[0], stage[1], stage[2], stage[3], i, m);
        for (idx j = 0; j < 4; ++j) stream_copy(out + j * sr + i, stage[j], (size_t)m * sizeof(T));
    }
}

// ---------------------------------------------------------------- nc elementwise
// y = ((x - mean_hi) - mean_lo) * scale + shift, computed in the compute type.
template <class T> struct Affine {
    typedef typename compute_of<T>::type CT;
    CT mean_hi, mean_lo, scale, shift;
    Affine() = default;
    template <class U>  // the same constants for another type of one compute type
    explicit Affine(const Affine<U>& o) : mean_hi(o.mean_hi), mean_lo(o.mean_lo), scale(o.scale), shift(o.shift) {}
    Affine(CT mean_hi_, CT mean_lo_, CT scale_, CT shift_)
        : mean_hi(mean_hi_), mean_lo(mean_lo_), scale(scale_), shift(shift_) {}
    Affine(double mean, double scale_, double shift_) {
        mean_hi = (CT)mean;
        mean_lo = (CT)(mean - (double)mean_hi);
        scale = (CT)scale_;
        shift = (CT)shift_;
    }
};

#if FASTBN_HAVE_F16C
// normalize_row<float> on 16 float16 values converted in registers (see load_half16), with
// the constants of their 16 columns (one channel's, broadcast, or 16 channels').
struct AffineVectors {
    __m512 mean_hi, mean_lo, scale, shift;
};
template <bool RES, bool RELU>
FASTBN_AVX512_HALF FASTBN_INLINE void normalize_half16(const half* x, half* y, const half* res, const AffineVectors& a) {
    __m512 v = _mm512_sub_ps(_mm512_sub_ps(load_half16(x), a.mean_hi), a.mean_lo);
    v = _mm512_add_ps(_mm512_mul_ps(v, a.scale), a.shift);
    if (RES) v = _mm512_add_ps(v, load_half16(res));
    if (RELU) v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_LT_OQ), _mm512_setzero_ps());
    store_half16(y, v);
}

template <bool RES, bool RELU>
FASTBN_AVX512_HALF void normalize_row_half_in_registers(const half* x, half* y, const half* res, idx n,
                                                        const Affine<float>& a) {
    const AffineVectors av = {_mm512_set1_ps(a.mean_hi), _mm512_set1_ps(a.mean_lo), _mm512_set1_ps(a.scale),
                              _mm512_set1_ps(a.shift)};
    idx i = 0;
    for (; i + 16 <= n; i += 16) normalize_half16<RES, RELU>(x + i, y + i, RES ? res + i : res, av);
    if (i < n) {
        const idx m = n - i;
        HalfTail tx(x + i, m), tres(RES ? res + i : nullptr, m), ty(nullptr, m);
        normalize_half16<RES, RELU>(tx.v, ty.v, tres.v, av);
        std::memcpy(y + i, ty.v, (size_t)m * sizeof(half));
    }
}

// Up to 16 per-channel float constants of a row's end, zero-padded to 16.
struct FloatTail {
    alignas(64) float v[16];
    FloatTail(const float* p, idx m) {
        std::memset(v, 0, sizeof v);
        std::memcpy(v, p, (size_t)m * sizeof(float));
    }
};

// normalize_row_nlc<half> in registers: channels [0, m) of a row, constants mh, ml, sc, sh
// per channel (the float loop's operations, the same bits).
template <bool RES, bool RELU>
FASTBN_AVX512_HALF void normalize_row_nlc_half_in_registers(const half* x, half* y, const half* res, const float* mh,
                                                            const float* ml, const float* sc, const float* sh,
                                                            idx m) {
    idx c = 0;
    for (; c + 16 <= m; c += 16) {
        const AffineVectors av = {_mm512_loadu_ps(mh + c), _mm512_loadu_ps(ml + c), _mm512_loadu_ps(sc + c),
                                  _mm512_loadu_ps(sh + c)};
        normalize_half16<RES, RELU>(x + c, y + c, RES ? res + c : res, av);
    }
    if (c < m) {
        const idx r = m - c;
        FloatTail a(mh + c, r), b(ml + c, r), k(sc + c, r), d(sh + c, r);
        const AffineVectors av = {_mm512_load_ps(a.v), _mm512_load_ps(b.v), _mm512_load_ps(k.v), _mm512_load_ps(d.v)};
        HalfTail tx(x + c, r), tres(RES ? res + c : nullptr, r), ty(nullptr, r);
        normalize_half16<RES, RELU>(tx.v, ty.v, tres.v, av);
        std::memcpy(y + c, ty.v, (size_t)r * sizeof(half));
    }
}
#endif

#if FASTBN_HAVE_F16C
// 16 lanes (masked: those in k) of normalize_row's arithmetic, relu?(((x - mean_hi) -
// mean_lo) * scale + shift + res?), and of backward_row's (g masked by a fused ReLU's
// output y, stored to dr when DRES; dx = FROZEN ? g * a : (g * a + ((x - mean_hi) -
// mean_lo) * b) + c): the float code's operations in its order.
template <class T, bool RES, bool RELU>
FASTBN_AVX512_TILES FASTBN_INLINE __m512 normalized16(const T* x, const T* res, __m512 mh, __m512 ml, __m512 sc,
                                                      __m512 sh, bool masked, __mmask16 k) {
    const __m512 zero = _mm512_setzero_ps();
    __m512 v = _mm512_sub_ps(_mm512_sub_ps(masked ? Lanes16<T>::load(x, k) : Lanes16<T>::load(x), mh), ml);
    v = _mm512_add_ps(_mm512_mul_ps(v, sc), sh);
    if (RES) v = _mm512_add_ps(v, masked ? Lanes16<T>::load(res, k) : Lanes16<T>::load(res));
    if (RELU) v = _mm512_mask_mov_ps(v, _mm512_cmp_ps_mask(v, zero, _CMP_LT_OQ), zero);
    return v;
}
template <class T, bool RES, bool RELU>
FASTBN_AVX512_TILES FASTBN_INLINE void normalize16(const T* x, const T* res, T* y, __m512 mh, __m512 ml, __m512 sc,
                                                   __m512 sh, bool masked, __mmask16 k) {
    const __m512 v = normalized16<T, RES, RELU>(x, res, mh, ml, sc, sh, masked, k);
    if (masked) Lanes16<T>::store(y, v, k);
    else Lanes16<T>::store(y, v);
}

// The same 8 lanes of float64 data (normalize_row<double>'s arithmetic in its order).
template <bool RES, bool RELU>
FASTBN_AVX512_TILES FASTBN_INLINE __m512d normalized8(const double* x, const double* res, __m512d mh, __m512d ml,
                                                      __m512d sc, __m512d sh, bool masked, __mmask8 k) {
    const __m512d zero = _mm512_setzero_pd();
    __m512d v = _mm512_sub_pd(_mm512_sub_pd(masked ? _mm512_maskz_loadu_pd(k, x) : _mm512_loadu_pd(x), mh), ml);
    v = _mm512_add_pd(_mm512_mul_pd(v, sc), sh);
    if (RES) v = _mm512_add_pd(v, masked ? _mm512_maskz_loadu_pd(k, res) : _mm512_loadu_pd(res));
    if (RELU) v = _mm512_mask_mov_pd(v, _mm512_cmp_pd_mask(v, zero, _CMP_LT_OQ), zero);
    return v;
}

// Streaming stores of 16 values (64 bytes of float32, 32 of 16-bit data) at p, aligned
// to their size.
FASTBN_AVX512_TILES FASTBN_INLINE void stream16(float* p, __m512 v) { _mm512_stream_ps(p, v); }
FASTBN_AVX512_TILES FASTBN_INLINE void stream16(half* p, __m512 v) {
    _mm256_stream_si256((__m256i*)p, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT));
}
FASTBN_AVX512_TILES FASTBN_INLINE void stream16(bf16* p, __m512 v) {
    _mm256_stream_si256((__m256i*)p, Lanes16<bf16>::narrow(v));
}

// The constants of each vector of a streamed run (stream_run): one channel's N,
// broadcast (an NC row) ...
template <int N> struct OneChannel {
    __m512 v[N];
    FASTBN_AVX512_TILES explicit OneChannel(const float (&c)[N]) {
        for (int j = 0; j < N; ++j) v[j] = _mm512_set1_ps(c[j]);
    }
    FASTBN_AVX512_TILES FASTBN_INLINE void get(__m512* out) const {
        for (int j = 0; j < N; ++j) out[j] = v[j];
    }
    FASTBN_AVX512_TILES FASTBN_INLINE void advance(idx) {}
};

// ... or those of the 16 columns c, c + 1, ... under it in channels-last rows that follow
// each other (wrapping to the next row's first columns past C; C >= 16): one load, or two
// masked ones (lanes masked out are not read). k: the first N of prepare_channel_constants'
// float arrays of C each; element 0 of the run is column 0.
template <int N> struct ChannelColumns {
    const float* k;
    idx C, c;
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512 at(const float* a, idx c, idx C) {
        if (c + 16 <= C) return _mm512_loadu_ps(a + c);
        const __mmask16 here = (__mmask16)((1u << (C - c)) - 1u);
        return _mm512_mask_loadu_ps(_mm512_maskz_loadu_ps(here, a + c), (__mmask16)~here, a + c - C);
    }
    FASTBN_AVX512_TILES FASTBN_INLINE void get(__m512* out) const {
        for (int j = 0; j < N; ++j) out[j] = at(k + j * C, c, C);
    }
    FASTBN_AVX512_TILES FASTBN_INLINE void advance(idx m) {
        c += m;
        if (c >= C) c -= C;
    }
};

// The vectors of a streamed run: 16 lanes (in float) of float32 or 16-bit data, 8 of
// float64; store: the first m lanes (all: one ordinary store), stream: a whole vector.
FASTBN_INLINE __mmask16 first_lanes16(idx m) { return (__mmask16)((1u << m) - 1u); }
FASTBN_INLINE __mmask8 first_lanes8(idx m) { return (__mmask8)((1u << m) - 1u); }
template <class T> struct RunLanes {
    typedef __m512 V;
    static const idx n = 16;
    FASTBN_AVX512_TILES FASTBN_INLINE static void store(T* p, V v, idx m) {
        if (m < 16) Lanes16<T>::store(p, v, first_lanes16(m));
        else Lanes16<T>::store(p, v);
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static void stream(T* p, V v) { stream16(p, v); }
};
template <> struct RunLanes<double> {
    typedef __m512d V;
    static const idx n = 8;
    FASTBN_AVX512_TILES FASTBN_INLINE static void store(double* p, V v, idx m) {
        if (m < 8) _mm512_mask_storeu_pd(p, first_lanes8(m), v);
        else _mm512_storeu_pd(p, v);
    }
    FASTBN_AVX512_TILES FASTBN_INLINE static void stream(double* p, V v) { _mm512_stream_pd(p, v); }
};

// A streamed run of n outputs at y computed in registers (values.next(i, m): outputs
// [i, i + m), m <= one vector, lanes past m masked) and stored straight from them:
// masked ordinary stores up to y's first 64-byte boundary and after its last, streaming
// stores for the whole lines between. No line is written partly streamed (slow), and
// nothing goes through an L1 stage: staging a piece and then streaming it left the reads
// idle while the stores drained (cold (32,64,56,56) float32 inference, 2 threads: see the
// README).
template <class T, class Values>
FASTBN_AVX512_TILES void stream_run(T* y, idx n, Values values) {
    typedef RunLanes<T> L;
    const idx line = 64 / (idx)sizeof(T);
    idx head = (idx)(((64 - ((uintptr_t)y & 63)) & 63) / sizeof(T));
    if (head > n) head = n;
    const idx body_end = head + (n - head) / line * line;
    for (idx i = 0, m; i < n; i += m) {
        const bool body = i >= head && i < body_end;
        m = body ? L::n : (i < head ? head - i : n - i);
        if (m > L::n) m = L::n;
        const typename L::V v = values.next(i, m);
        if (body) L::stream(y + i, v);
        else L::store(y + i, v, m);
    }
}

// The values of stream_run: the normalized output (normalized16, constants mean_hi,
// mean_lo, scale, shift) ...
template <class T, bool RES, bool RELU, class Consts> struct NormalizedRun {
    const T* x;
    const T* res;
    Consts k;
    FASTBN_AVX512_TILES FASTBN_INLINE __m512 next(idx i, idx m) {
        __m512 kv[4];
        k.get(kv);
        const __m512 v = normalized16<T, RES, RELU>(x + i, RES ? res + i : res, kv[0], kv[1], kv[2], kv[3], m < 16,
                                                    first_lanes16(m));
        k.advance(m);
        return v;
    }
};
template <bool RES, bool RELU> struct NormalizedRunF64 {
    const double* x;
    const double* res;
    __m512d mh, ml, sc, sh;
    FASTBN_AVX512_TILES NormalizedRunF64(const double* x_, const double* res_, const Affine<double>& a)
        : x(x_), res(res_), mh(_mm512_set1_pd(a.mean_hi)), ml(_mm512_set1_pd(a.mean_lo)),
          sc(_mm512_set1_pd(a.scale)), sh(_mm512_set1_pd(a.shift)) {}
    FASTBN_AVX512_TILES FASTBN_INLINE __m512d next(idx i, idx m) {
        return normalized8<RES, RELU>(x + i, RES ? res + i : res, mh, ml, sc, sh, m < 8, first_lanes8(m));
    }
};

// One NC row of 16-bit data in registers (one channel's constants, broadcast), the last
// partial vector masked: a row of 49 (7x7) is three vectors and one masked one, where
// copying the tail through a zeroed block of 16 cost as much as the rest of the row.
template <class T, bool RES, bool RELU>
FASTBN_AVX512_TILES void normalize_row_lanes(const T* x, T* y, const T* res, idx n, const Affine<float>& a) {
    const __m512 mh = _mm512_set1_ps(a.mean_hi), ml = _mm512_set1_ps(a.mean_lo);
    const __m512 sc = _mm512_set1_ps(a.scale), sh = _mm512_set1_ps(a.shift);
    idx i = 0;
    for (; i + 16 <= n; i += 16) normalize16<T, RES, RELU>(x + i, RES ? res + i : res, y + i, mh, ml, sc, sh, false, 0);
    if (i < n)
        normalize16<T, RES, RELU>(x + i, RES ? res + i : res, y + i, mh, ml, sc, sh, true,
                                  (__mmask16)((1u << (n - i)) - 1u));
}
#endif

template <class T, bool RES, bool RELU>
FASTBN_INLINE void normalize_row(const T* x, T* y, const T* res, idx i0, idx i1, const Affine<T>& a) {
    typedef typename compute_of<T>::type CT;
#if FASTBN_HAVE_F16C
    if constexpr (is_half<T>() || std::is_same<T, bf16>::value) {
        if (channel_tiles_available() && (!is_half<T>() || half_converters().in_registers)) {
            normalize_row_lanes<T, RES, RELU>(x + i0, y + i0, RES ? res + i0 : res, i1 - i0, Affine<float>(a));
            return;
        }
    }
#endif
    if constexpr (is_half<T>()) {
        alignas(64) float xf[HALF_PIECE], yf[HALF_PIECE], rf[RES ? HALF_PIECE : 1];
        const HalfConverters& cv = half_converters();
        const Affine<float> af(a);
#if FASTBN_HAVE_F16C
        if (cv.in_registers) {
            normalize_row_half_in_registers<RES, RELU>(x + i0, y + i0, RES ? res + i0 : res, i1 - i0, af);
            return;
        }
#endif
        for (idx i = i0; i < i1; i += HALF_PIECE) {
            idx m = i1 - i < HALF_PIECE ? i1 - i : HALF_PIECE;
            cv.to_float(x + i, xf, m);
            if (RES) cv.to_float(res + i, rf, m);
            normalize_row<float, RES, RELU>(xf, yf, rf, 0, m, af);
            cv.to_half(yf, y + i, m);
        }
        return;
    }
    for (idx i = i0; i < i1; ++i) {
        CT v = ((to_compute(x[i]) - a.mean_hi) - a.mean_lo) * a.scale + a.shift;
        if (RES) v = v + to_compute(res[i]);
        if (RELU) v = relu(v);
        store(y + i, v);
    }
}

// Whether streamed NC rows of this data are written by stream_run: where the
// CPU has AVX-512 (channel_tiles_available; float16 also needs its in-register
// conversions). The core's inference streams NC rows only then (_inference_rows_stream).
inline bool streams_rows_from_registers(bool half_data) {
#if FASTBN_HAVE_F16C
    return channel_tiles_available() && (!half_data || half_converters().in_registers);
#else
    (void)half_data;
    return false;
#endif
}

// ... and whether a streamed row starting at y is (y aligned to its element size).
template <class T> FASTBN_INLINE bool rows_stream_from_registers(const T* y) {
    return streams_rows_from_registers(is_half<T>()) && ((uintptr_t)y % sizeof(T)) == 0;
}

// f(res, relu), each a std::bool_constant: the normalized runs' epilogue chosen once.
template <class F> FASTBN_INLINE void with_epilogue(bool res, bool relu, const F& f) {
    if (res) {
        if (relu) f(std::true_type(), std::true_type());
        else f(std::true_type(), std::false_type());
    } else {
        if (relu) f(std::false_type(), std::true_type());
        else f(std::false_type(), std::false_type());
    }
}

template <class T>
FASTBN_INLINE void stream_row_from_registers(const T* x, T* y, const T* res, idx n, const Affine<T>& a, bool relu) {
#if FASTBN_HAVE_F16C
    with_epilogue(res != nullptr, relu, [&](auto has_res, auto has_relu) FASTBN_LAMBDA_INLINE {
        constexpr bool RES = decltype(has_res)::value, RELU = decltype(has_relu)::value;
        if constexpr (std::is_same<T, double>::value) {
            stream_run(y, n, NormalizedRunF64<RES, RELU>(x, res, a));
        } else {
            const float k[4] = {(float)a.mean_hi, (float)a.mean_lo, (float)a.scale, (float)a.shift};
            stream_run(y, n, NormalizedRun<T, RES, RELU, OneChannel<4>>{x, res, OneChannel<4>(k)});
        }
    });
#else
    (void)x; (void)y; (void)res; (void)n; (void)a; (void)relu;
#endif
}

template <class T>
FASTBN_INLINE void normalize_span_nc(const T* xc, T* yc, idx sox, idx soy, Span s, const Affine<T>& a,
                                     const T* rc, idx sor, bool use_relu, bool stream) {
    for (idx r = s.r0; r < s.r1; ++r) {
        const T* xr = xc + r * sox + s.i0;
        const T* rr = rc ? rc + r * sor + s.i0 : (const T*)0;
        if (r + 1 < s.r1) prefetch_rows(xr + sox, sox, 1, 0, s.i1 - s.i0);
        T* yr = yc + r * soy + s.i0;
        if (stream && rows_stream_from_registers<T>(yr)) {
            stream_row_from_registers(xr, yr, rr, s.i1 - s.i0, a, use_relu);
            continue;
        }
        write_row(yr, s.i1 - s.i0, stream, [&](T* out, idx i, idx m) FASTBN_LAMBDA_INLINE {
            if (rr) {
                if (use_relu) normalize_row<T, true, true>(xr + i, out, rr + i, 0, m, a);
                else normalize_row<T, true, false>(xr + i, out, rr + i, 0, m, a);
            } else {
                if (use_relu) normalize_row<T, false, true>(xr + i, out, 0, 0, m, a);
                else normalize_row<T, false, false>(xr + i, out, 0, 0, m, a);
            }
        });
    }
}

template <class T>
FASTBN_CLONES void normalize_nc(const T* xc, T* yc, idx sox, idx soy, Span s, double mean, double scale,
                                double shift, Epilogue e, idx c) {
    normalize_span_nc(xc, yc, sox, soy, s, Affine<T>(mean, scale, shift), channel_ptr<T>(e.res, c, e.res_sc),
                      e.res_so, e.relu, e.stream);
    if (e.stream) stream_fence();
}

// Rows [w0, w1) of the (outer, C) grid of rows of an NC array, in memory order (row w is
// channel w % C of sample w / C), with constants from prepare_channel_constants(mean,
// scale, shift): one call per thread, so a short row (7x7 maps) costs no call, division or
// constant conversion of its own. Same arithmetic as normalize_nc.
template <class T>
FASTBN_CLONES void normalize_rows_nc(const T* x, T* y, idx sox, idx scx, idx soy, idx scy, idx C, idx inner,
                                     idx w0, idx w1, const void* buf, Epilogue e) {
    typedef typename compute_of<T>::type CT;
    if (w0 >= w1) return;
    const CT* mh = (const CT*)buf;
    idx o = w0 / C, c = w0 % C;
    for (idx w = w0; w < w1; ++w) {
        const Affine<T> a(mh[c], mh[C + c], mh[2 * C + c], mh[3 * C + c]);
        const Span row = {o, o + 1, 0, inner};
        normalize_span_nc(x + c * scx, y + c * scy, sox, soy, row, a, channel_ptr<T>(e.res, c, e.res_sc),
                          e.res_so, e.relu, e.stream);
        if (++c == C) { c = 0; ++o; }
    }
    if (e.stream) stream_fence();
}

// Fused training forward of one channel: statistics (reading the channel once from
// memory), then normalize it while it is still in cache. Returns the moments.
// Moments of a whole channel: chunk partials merged in chunk order.
template <class T> FASTBN_INLINE Moments channel_moments_nc(const T* xc, idx sox, NCGrid g) {
    Moments m = {0, 0, 0};
    for (idx k = 0; k < g.n_chunks; ++k) {
        Moments p = chunk_moments_nc_impl(xc, sox, nc_chunk(g, k));
        merge_into(m, p.n, p.mean, p.m2);
    }
    return m;
}

// [i0, i1) of an output row in pieces of about 1 KB whose ends (but the row's own) are
// 64-byte aligned in the output, so that asking for the next channel's bytes can be
// spread over the row (a whole row's worth at once outran the core's misses); one piece
// when there is nothing to ask for (split false).
template <class T, class F>
FASTBN_INLINE void for_each_row_piece(const T* out_row, idx i0, idx i1, bool split, F f) {
    const idx line = 64 / (idx)sizeof(T), piece = 1024 / (idx)sizeof(T);
    if (!split || i1 - i0 <= piece) {  // a row of one piece (7x7, 8x8): no alignment to find
        f(i0, i1);
        return;
    }
    const idx mis = (idx)(((uintptr_t)(out_row + i0) % 64) / sizeof(T));
    idx end = i0 + (mis ? line - mis : 0) + piece;
    for (idx a = i0; a < i1; end += piece) {
        const idx b = end < i1 ? end : i1;
        f(a, b);
        a = b;
    }
}

template <class T>
FASTBN_CLONES Moments train_forward_channel_nc(const T* xc, T* yc, idx sox, idx soy, NCGrid g, double weight,
                                               double bias, double eps, double* invstd_out, Epilogue e, idx c,
                                               const T* x_next) {
    Moments m = channel_moments_nc(xc, sox, g);
    double invstd = invstd_of(m.n, m.m2, eps);
    *invstd_out = invstd;
    Affine<T> a(m.mean, weight * invstd, bias);
    const T* rc = channel_ptr<T>(e.res, c, e.res_sc);
    for (idx k = 0; k < g.n_chunks; ++k) {
        Span s = nc_chunk(g, k);
        for (idx r = s.r0; r < s.r1; ++r)
            for_each_row_piece(yc + r * soy, s.i0, s.i1, x_next != 0, [&](idx p0, idx p1) FASTBN_LAMBDA_INLINE {
                prefetch_next_channel_row(x_next, sox, r, p0, p1);
                Span piece = {r, r + 1, p0, p1};
                normalize_span_nc(xc, yc, sox, soy, piece, a, rc, e.res_so, e.relu, e.stream);
            });
    }
    if (e.stream) stream_fence();
    return m;
}

// ---------------------------------------------------------------- nc backward
struct Sums {
    double dy, dy_xmu;  // sum(g), sum(g * (x - mean)); g = dy, masked by a fused ReLU
};

template <class T, bool MASK>
FASTBN_INLINE double masked_grad(const T* g, const T* y, idx i) {
    double gv = to_double(g[i]);
    if (MASK) gv = to_compute(y[i]) > 0 ? gv : 0.0;
    return gv;
}

// Element k of a row goes to lane k % LANES: full groups (n a multiple of LANES) ...
template <class T, bool MASK>
FASTBN_INLINE void sums_full(const T* g, const T* x, const T* y, idx n, double mean, double* a1, double* a2) {
    for (idx i = 0; i < n; i += LANES)
        for (int j = 0; j < LANES; ++j) {
            double gv = masked_grad<T, MASK>(g, y, i + j);
            a1[j] += gv;
            a2[j] += gv * (to_double(x[i + j]) - mean);
        }
}

// ... and a tail of n < LANES elements.
template <class T, bool MASK>
FASTBN_INLINE void sums_tail(const T* g, const T* x, const T* y, idx n, double mean, double* a1, double* a2) {
    for (int j = 0; j < n; ++j) {
        double gv = masked_grad<T, MASK>(g, y, j);
        a1[j] += gv;
        a2[j] += gv * (to_double(x[j]) - mean);
    }
}

#if FASTBN_HAVE_F16C
// sums_full<float> on float16 data converted in registers (see load_half16), n a multiple
// of LANES: accumulator lane j (a1[j], a2[j]) takes the elements k with k % LANES == j.
template <bool MASK>
FASTBN_AVX512_HALF void sums_half_in_registers(const half* g, const half* x, const half* y, idx n, double mean,
                                               double* a1, double* a2, bool stream_ahead) {
    __m512d s1[4], s2[4];
    load_lanes(a1, s1);
    load_lanes(a2, s2);
    const __m512d mu = _mm512_set1_pd(mean);
    for (idx i = 0; i < n; i += LANES) {
        if (stream_ahead && i % HALF_PIECE == 0) {
            const idx bytes = (n - i < HALF_PIECE ? n - i : HALF_PIECE) * (idx)sizeof(half);
            prefetch_past(g + i, bytes);
            prefetch_past(x + i, bytes);
            if (MASK) prefetch_past(y + i, bytes);
        }
        for (int q = 0; q < 4; ++q) {
            const __m512d gd = masked_grad_half8_wide<MASK>(g + i + 8 * q, MASK ? y + i + 8 * q : y);
            s1[q] = _mm512_add_pd(s1[q], gd);
            s2[q] = _mm512_add_pd(s2[q], _mm512_mul_pd(gd, _mm512_sub_pd(load_half8_wide(x + i + 8 * q), mu)));
        }
    }
    store_lanes(a1, s1);
    store_lanes(a2, s2);
}
#endif

// float16: pieces converted to float, the same lanes and order as float data;
// stream_ahead: each piece asks for the bytes STATS_PREFETCH_AHEAD past it (as sums_rows).
template <bool MASK, bool FULL>
FASTBN_INLINE void sums_half(const half* g, const half* x, const half* y, idx n, double mean, double* a1,
                             double* a2, bool stream_ahead = false) {
    alignas(64) float gf[HALF_PIECE], xf[HALF_PIECE], yf[MASK ? HALF_PIECE : 1];
    const HalfConverters& cv = half_converters();
#if FASTBN_HAVE_F16C
    if (FULL && cv.in_registers) {
        sums_half_in_registers<MASK>(g, x, y, n, mean, a1, a2, stream_ahead);
        return;
    }
#endif
    for (idx i = 0; i < n; i += HALF_PIECE) {
        idx m = n - i < HALF_PIECE ? n - i : HALF_PIECE;
        if (stream_ahead) {
            prefetch_past(g + i, m * (idx)sizeof(half));
            prefetch_past(x + i, m * (idx)sizeof(half));
            if (MASK) prefetch_past(y + i, m * (idx)sizeof(half));
        }
        cv.to_float(g + i, gf, m);
        cv.to_float(x + i, xf, m);
        if (MASK) cv.to_float(y + i, yf, m);
        if (FULL) sums_full<float, MASK>(gf, xf, yf, m, mean, a1, a2);
        else sums_tail<float, MASK>(gf, xf, yf, m, mean, a1, a2);
    }
}

// Sums over `rows` rows (strides sg, sx, sy) of n elements: the full LANES-groups of
// every row, then the rows' tails, so that the accumulators stay in registers across
// short rows (as in merge_block).
// stream_ahead (one long row): a piece of STREAM_PIECE elements at a time, each asking
// for the bytes STATS_PREFETCH_AHEAD past it, as merge_block does (the same bits).
template <class T, bool MASK>
FASTBN_INLINE void sums_rows(const T* g, const T* x, const T* y, idx sg, idx sx, idx sy, idx rows, idx n,
                             double mean, double* a1, double* a2, bool stream_ahead = false) {
    const idx full = n - n % LANES;
    if constexpr (!is_half<T>()) {
        if (stream_ahead && rows == 1) {
            for (idx i = 0; i < full; i += STREAM_PIECE) {
                const idx len = full - i < STREAM_PIECE ? full - i : STREAM_PIECE;
                prefetch_past(g + i, len * (idx)sizeof(T));
                prefetch_past(x + i, len * (idx)sizeof(T));
                if (MASK) prefetch_past(y + i, len * (idx)sizeof(T));
                sums_full<T, MASK>(g + i, x + i, MASK ? y + i : y, len, mean, a1, a2);
            }
            if (full < n) sums_tail<T, MASK>(g + full, x + full, MASK ? y + full : y, n - full, mean, a1, a2);
            return;
        }
    }
    for (idx r = 0; r < rows; ++r) {
        const T* yr = MASK ? y + r * sy : (const T*)0;
        if constexpr (is_half<T>()) sums_half<MASK, true>(g + r * sg, x + r * sx, yr, full, mean, a1, a2, stream_ahead && rows == 1);
        else sums_full<T, MASK>(g + r * sg, x + r * sx, yr, full, mean, a1, a2);
    }
    if (full < n)
        for (idx r = 0; r < rows; ++r) {
            const T* yr = MASK ? y + r * sy + full : (const T*)0;
            if constexpr (is_half<T>())
                sums_half<MASK, false>(g + r * sg + full, x + r * sx + full, yr, n - full, mean, a1, a2);
            else sums_tail<T, MASK>(g + r * sg + full, x + r * sx + full, yr, n - full, mean, a1, a2);
        }
}

// Rows in blocks of BLOCK elements (one row if longer), each block through sums_rows;
// float16 blocks are converted to float once, so float16 and float data of the same
// values give the same bits.
// dy_ahead, x_ahead (NULL: none): the channel whose span to ask for, block by block, as
// this one's is summed, where rows are short (see channel_range_moments_nc).
template <class T, bool MASK>
FASTBN_INLINE Sums chunk_sums_span(const T* dyc, const T* xc, const T* yc, idx sody, idx sox, idx soy, Span s,
                                   double mean, const T* dy_ahead = nullptr, const T* x_ahead = nullptr) {
    double a1[LANES] = {};
    double a2[LANES] = {};
    const idx n = s.i1 - s.i0;
    const idx block_rows = n >= BLOCK ? 1 : BLOCK / n;
    for (idx r = s.r0; r < s.r1; r += block_rows) {
        const idx rows = s.r1 - r < block_rows ? s.r1 - r : block_rows;
        if (dy_ahead && n < BLOCK) {
            prefetch_rows(dy_ahead + r * sody, sody, rows, s.i0, s.i1);
            prefetch_rows(x_ahead + r * sox, sox, rows, s.i0, s.i1);
        }
        const T* g = dyc + r * sody + s.i0;
        const T* x = xc + r * sox + s.i0;
        const T* y = MASK ? yc + r * soy + s.i0 : (const T*)0;
        if constexpr (is_half<T>()) {
            if (n < BLOCK) {
                alignas(64) float gf[BLOCK], xf[BLOCK], yf[MASK ? BLOCK : 1];
                const HalfConverters& cv = half_converters();
                for (idx k = 0; k < rows; ++k) {
                    cv.to_float(g + k * sody, gf + k * n, n);
                    cv.to_float(x + k * sox, xf + k * n, n);
                    if (MASK) cv.to_float(y + k * soy, yf + k * n, n);
                }
                sums_rows<float, MASK>(gf, xf, yf, n, n, n, rows, n, mean, a1, a2);
                continue;
            }
        }
        sums_rows<T, MASK>(g, x, y, sody, sox, soy, rows, n, mean, a1, a2, n >= BLOCK);
    }
    Sums out = {lane_total(a1), lane_total(a2)};
    return out;
}

template <class T>
FASTBN_INLINE Sums chunk_sums_nc_impl(const T* dyc, const T* xc, idx sody, idx sox, Span s, double mean,
                                      const Activation& act, idx c, const T* dy_ahead = nullptr,
                                      const T* x_ahead = nullptr) {
    const T* yc = channel_ptr<T>(act.y, c, act.y_sc);
    if (yc) return chunk_sums_span<T, true>(dyc, xc, yc, sody, sox, act.y_so, s, mean, dy_ahead, x_ahead);
    return chunk_sums_span<T, false>(dyc, xc, yc, sody, sox, 0, s, mean, dy_ahead, x_ahead);
}

// dy_ahead, x_ahead: as chunk_sums_span's, for the split primitive's items of short rows.
template <class T>
FASTBN_CLONES Sums chunk_sums_nc(const T* dyc, const T* xc, idx sody, idx sox, Span s, double mean,
                                 Activation act, idx c, const T* dy_ahead, const T* x_ahead) {
    return chunk_sums_nc_impl(dyc, xc, sody, sox, s, mean, act, c, dy_ahead, x_ahead);
}

// dx = A*g + B*(x - mean) + Cc  (training), or dx = A*g (frozen statistics: B = Cc = 0,
// x not read); g = dy masked by a fused ReLU.
template <class T> struct BackwardCoef {
    typedef typename compute_of<T>::type CT;
    CT a, b, c, mean_hi, mean_lo;
    BackwardCoef() = default;
    template <class U>  // the same constants for another type of one compute type
    explicit BackwardCoef(const BackwardCoef<U>& o) : a(o.a), b(o.b), c(o.c), mean_hi(o.mean_hi), mean_lo(o.mean_lo) {}
    BackwardCoef(double a_, double b_, double c_, double mean) {
        a = (CT)a_; b = (CT)b_; c = (CT)c_;
        mean_hi = (CT)mean;
        mean_lo = (CT)(mean - (double)mean_hi);
    }
};

#if FASTBN_HAVE_F16C
// backward_row<float> on 16 float16 values converted in registers (see load_half16), with
// the coefficients of their 16 columns (one channel's, broadcast, or 16 channels').
struct BackwardVectors {
    __m512 a, b, c, mean_hi, mean_lo;
};
template <bool MASK, bool DRES, bool FROZEN>
FASTBN_AVX512_HALF FASTBN_INLINE void backward_half16(const half* g, const half* x, const half* y, half* d, half* dr,
                                                      const BackwardVectors& k) {
    const __m512 gv = masked_grad_half16<MASK>(g, y);
    if (DRES) store_half16(dr, gv);
    if (FROZEN) {
        store_half16(d, _mm512_mul_ps(gv, k.a));
        return;
    }
    const __m512 xm = _mm512_sub_ps(_mm512_sub_ps(load_half16(x), k.mean_hi), k.mean_lo);
    const __m512 v = _mm512_add_ps(_mm512_mul_ps(gv, k.a), _mm512_mul_ps(xm, k.b));
    store_half16(d, _mm512_add_ps(v, k.c));
}

// backward_half16 over the last m < 16 columns of a row (constants already padded).
template <bool MASK, bool DRES, bool FROZEN>
FASTBN_AVX512_HALF FASTBN_INLINE void backward_half_tail(const half* g, const half* x, const half* y, half* d,
                                                         half* dr, idx m, const BackwardVectors& k) {
    HalfTail tg(g, m), tx(FROZEN ? nullptr : x, m), ty(MASK ? y : nullptr, m);
    HalfTail td(nullptr, m), tr(nullptr, m);
    backward_half16<MASK, DRES, FROZEN>(tg.v, tx.v, ty.v, td.v, tr.v, k);
    std::memcpy(d, td.v, (size_t)m * sizeof(half));
    if (DRES) std::memcpy(dr, tr.v, (size_t)m * sizeof(half));
}

template <bool MASK, bool DRES, bool FROZEN>
FASTBN_AVX512_HALF void backward_row_half_in_registers(const half* g, const half* x, const half* y, half* d,
                                                       half* dr, idx n, const BackwardCoef<float>& k) {
    const BackwardVectors kv = {_mm512_set1_ps(k.a), _mm512_set1_ps(k.b), _mm512_set1_ps(k.c),
                                _mm512_set1_ps(k.mean_hi), _mm512_set1_ps(k.mean_lo)};
    idx i = 0;
    for (; i + 16 <= n; i += 16)
        backward_half16<MASK, DRES, FROZEN>(g + i, FROZEN ? x : x + i, MASK ? y + i : y, d + i, DRES ? dr + i : dr, kv);
    if (i < n)
        backward_half_tail<MASK, DRES, FROZEN>(g + i, FROZEN ? x : x + i, MASK ? y + i : y, d + i, DRES ? dr + i : dr,
                                               n - i, kv);
}

// backward_row_nlc<half> in registers: channels [0, m) of a row, coefficients per channel.
template <bool MASK, bool DRES, bool FROZEN>
FASTBN_AVX512_HALF void backward_row_nlc_half_in_registers(const half* g, const half* x, const half* y, half* d,
                                                           half* dr, const float* mh, const float* ml,
                                                           const float* ka, const float* kb, const float* kc, idx m) {
    idx c = 0;
    for (; c + 16 <= m; c += 16) {
        const BackwardVectors kv = {_mm512_loadu_ps(ka + c), _mm512_loadu_ps(kb + c), _mm512_loadu_ps(kc + c),
                                    _mm512_loadu_ps(mh + c), _mm512_loadu_ps(ml + c)};
        backward_half16<MASK, DRES, FROZEN>(g + c, FROZEN ? x : x + c, MASK ? y + c : y, d + c, DRES ? dr + c : dr, kv);
    }
    if (c < m) {
        const idx r = m - c;
        FloatTail a(ka + c, r), b(kb + c, r), cc(kc + c, r), hi(mh + c, r), lo(ml + c, r);
        const BackwardVectors kv = {_mm512_load_ps(a.v), _mm512_load_ps(b.v), _mm512_load_ps(cc.v),
                                    _mm512_load_ps(hi.v), _mm512_load_ps(lo.v)};
        backward_half_tail<MASK, DRES, FROZEN>(g + c, FROZEN ? x : x + c, MASK ? y + c : y, d + c, DRES ? dr + c : dr,
                                               r, kv);
    }
}
#endif

#if FASTBN_HAVE_F16C
// 16 lanes of backward_row's arithmetic (see normalize16), and one NC row of 16-bit data
// (see normalize_row_lanes).
template <class T, bool MASK, bool DRES, bool FROZEN>
FASTBN_AVX512_TILES FASTBN_INLINE __m512 backward_value16(const T* g, const T* x, const T* y, T* dr, __m512 a,
                                                          __m512 b, __m512 c, __m512 mh, __m512 ml, bool masked,
                                                          __mmask16 k) {
    const __m512 gv = masked_grad16<T, MASK>(g, y, masked, k);
    if (DRES) {
        if (masked) Lanes16<T>::store(dr, gv, k);
        else Lanes16<T>::store(dr, gv);
    }
    if (FROZEN) return _mm512_mul_ps(gv, a);
    const __m512 xm = _mm512_sub_ps(_mm512_sub_ps(masked ? Lanes16<T>::load(x, k) : Lanes16<T>::load(x), mh), ml);
    return _mm512_add_ps(_mm512_add_ps(_mm512_mul_ps(gv, a), _mm512_mul_ps(xm, b)), c);
}
template <class T, bool MASK, bool DRES, bool FROZEN>
FASTBN_AVX512_TILES FASTBN_INLINE void backward16(const T* g, const T* x, const T* y, T* d, T* dr, __m512 a, __m512 b,
                                                  __m512 c, __m512 mh, __m512 ml, bool masked, __mmask16 k) {
    const __m512 v = backward_value16<T, MASK, DRES, FROZEN>(g, x, y, dr, a, b, c, mh, ml, masked, k);
    if (masked) Lanes16<T>::store(d, v, k);
    else Lanes16<T>::store(d, v);
}

// The values of stream_run for dx (backward_value16; constants mean_hi, mean_lo, a, b, c
// as prepare_channel_constants lays them out) ...
template <class T, bool MASK, bool DRES, bool FROZEN, class Consts> struct BackwardRun {
    const T* g;
    const T* x;
    const T* y;
    T* dr;
    Consts k;
    FASTBN_AVX512_TILES FASTBN_INLINE __m512 next(idx i, idx m) {
        __m512 kv[5];
        k.get(kv);
        const __m512 v = backward_value16<T, MASK, DRES, FROZEN>(g + i, FROZEN ? x : x + i, MASK ? y + i : y,
                                                                 DRES ? dr + i : dr, kv[2], kv[3], kv[4], kv[0], kv[1],
                                                                 m < 16, first_lanes16(m));
        k.advance(m);
        return v;
    }
};

// ... and for float64 dx, 8 lanes: backward_row<double>'s arithmetic in its order.
template <bool MASK, bool DRES, bool FROZEN> struct BackwardRunF64 {
    const double *g, *x, *y;
    double* dr;
    __m512d a, b, c, mh, ml;
    FASTBN_AVX512_TILES BackwardRunF64(const double* g_, const double* x_, const double* y_, double* dr_,
                                       const BackwardCoef<double>& k)
        : g(g_), x(x_), y(y_), dr(dr_), a(_mm512_set1_pd(k.a)), b(_mm512_set1_pd(k.b)), c(_mm512_set1_pd(k.c)),
          mh(_mm512_set1_pd(k.mean_hi)), ml(_mm512_set1_pd(k.mean_lo)) {}
    FASTBN_AVX512_TILES FASTBN_INLINE static __m512d load(const double* p, bool masked, __mmask8 k) {
        return masked ? _mm512_maskz_loadu_pd(k, p) : _mm512_loadu_pd(p);
    }
    FASTBN_AVX512_TILES FASTBN_INLINE __m512d next(idx i, idx m) {
        const bool masked = m < 8;
        const __mmask8 k = first_lanes8(m);
        __m512d gv = load(g + i, masked, k);
        if (MASK) gv = _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(load(y + i, masked, k), _mm512_setzero_pd(), _CMP_GT_OQ), gv);
        if (DRES) {
            if (masked) _mm512_mask_storeu_pd(dr + i, k, gv);
            else _mm512_storeu_pd(dr + i, gv);
        }
        if (FROZEN) return _mm512_mul_pd(gv, a);
        const __m512d xm = _mm512_sub_pd(_mm512_sub_pd(load(x + i, masked, k), mh), ml);
        return _mm512_add_pd(_mm512_add_pd(_mm512_mul_pd(gv, a), _mm512_mul_pd(xm, b)), c);
    }
};

template <class T, bool MASK, bool DRES, bool FROZEN>
FASTBN_AVX512_TILES void backward_row_lanes(const T* g, const T* x, const T* y, T* d, T* dr, idx n,
                                            const BackwardCoef<float>& k) {
    const __m512 a = _mm512_set1_ps(k.a), b = _mm512_set1_ps(k.b), c = _mm512_set1_ps(k.c);
    const __m512 mh = _mm512_set1_ps(k.mean_hi), ml = _mm512_set1_ps(k.mean_lo);
    idx i = 0;
    for (; i + 16 <= n; i += 16)
        backward16<T, MASK, DRES, FROZEN>(g + i, FROZEN ? x : x + i, MASK ? y + i : y, d + i, DRES ? dr + i : dr, a, b,
                                          c, mh, ml, false, 0);
    if (i < n)
        backward16<T, MASK, DRES, FROZEN>(g + i, FROZEN ? x : x + i, MASK ? y + i : y, d + i, DRES ? dr + i : dr, a, b,
                                          c, mh, ml, true, (__mmask16)((1u << (n - i)) - 1u));
}
#endif

template <class T, bool MASK, bool DRES, bool FROZEN>
FASTBN_INLINE void backward_row(const T* g, const T* x, const T* y, T* d, T* dr, idx i0, idx i1,
                                const BackwardCoef<T>& k) {
    typedef typename compute_of<T>::type CT;
#if FASTBN_HAVE_F16C
    if constexpr (is_half<T>() || std::is_same<T, bf16>::value) {
        if (channel_tiles_available() && (!is_half<T>() || half_converters().in_registers)) {
            backward_row_lanes<T, MASK, DRES, FROZEN>(g + i0, FROZEN ? x : x + i0, MASK ? y + i0 : y, d + i0,
                                                      DRES ? dr + i0 : dr, i1 - i0, BackwardCoef<float>(k));
            return;
        }
    }
#endif
    if constexpr (is_half<T>()) {
        alignas(64) float gf[HALF_PIECE], df[HALF_PIECE], xf[FROZEN ? 1 : HALF_PIECE];
        alignas(64) float yf[MASK ? HALF_PIECE : 1], rf[DRES ? HALF_PIECE : 1];
        const HalfConverters& cv = half_converters();
        const BackwardCoef<float> kf(k);
#if FASTBN_HAVE_F16C
        if (cv.in_registers) {
            backward_row_half_in_registers<MASK, DRES, FROZEN>(g + i0, FROZEN ? x : x + i0, MASK ? y + i0 : y, d + i0,
                                                               DRES ? dr + i0 : dr, i1 - i0, kf);
            return;
        }
#endif
        for (idx i = i0; i < i1; i += HALF_PIECE) {
            idx m = i1 - i < HALF_PIECE ? i1 - i : HALF_PIECE;
            cv.to_float(g + i, gf, m);
            if (!FROZEN) cv.to_float(x + i, xf, m);
            if (MASK) cv.to_float(y + i, yf, m);
            backward_row<float, MASK, DRES, FROZEN>(gf, xf, yf, df, rf, 0, m, kf);
            cv.to_half(df, d + i, m);
            if (DRES) cv.to_half(rf, dr + i, m);
        }
        return;
    }
    for (idx i = i0; i < i1; ++i) {
        CT gv = to_compute(g[i]);
        if (MASK) gv = to_compute(y[i]) > 0 ? gv : (CT)0;
        if (DRES) store(dr + i, gv);
        if (FROZEN) {
            store(d + i, gv * k.a);
        } else {
            CT xm = (to_compute(x[i]) - k.mean_hi) - k.mean_lo;
            store(d + i, (gv * k.a + xm * k.b) + k.c);
        }
    }
}

template <class T, bool FROZEN>
FASTBN_INLINE void backward_row_any(const T* g, const T* x, const T* y, T* d, T* dr, idx i0, idx i1,
                                    const BackwardCoef<T>& k) {
    if (!y) backward_row<T, false, false, FROZEN>(g, x, y, d, dr, i0, i1, k);
    else if (!dr) backward_row<T, true, false, FROZEN>(g, x, y, d, dr, i0, i1, k);
    else backward_row<T, true, true, FROZEN>(g, x, y, d, dr, i0, i1, k);
}

// f(mask, dres, frozen), each a std::bool_constant: the backward runs' mode chosen once
// (y, dr as in backward_row_any).
template <class F> FASTBN_INLINE void with_backward_mode(const void* y, const void* dr, bool frozen, const F& f) {
    auto with_activation = [&](auto fz) FASTBN_LAMBDA_INLINE {
        if (!y) f(std::false_type(), std::false_type(), fz);
        else if (!dr) f(std::true_type(), std::false_type(), fz);
        else f(std::true_type(), std::true_type(), fz);
    };
    if (frozen) with_activation(std::true_type());
    else with_activation(std::false_type());
}

// One NC row of dx streamed from registers (see stream_row_from_registers).
template <class T>
FASTBN_INLINE void stream_backward_row_from_registers(const T* g, const T* x, const T* y, T* d, T* dr, idx n,
                                                      const BackwardCoef<T>& k, bool frozen) {
#if FASTBN_HAVE_F16C
    with_backward_mode(y, dr, frozen, [&](auto mask, auto dres, auto fz) FASTBN_LAMBDA_INLINE {
        constexpr bool MASK = decltype(mask)::value, DRES = decltype(dres)::value, FROZEN = decltype(fz)::value;
        if constexpr (std::is_same<T, double>::value) {
            stream_run(d, n, BackwardRunF64<MASK, DRES, FROZEN>(g, x, y, dr, k));
        } else {
            const float kf[5] = {(float)k.mean_hi, (float)k.mean_lo, (float)k.a, (float)k.b, (float)k.c};
            stream_run(d, n, BackwardRun<T, MASK, DRES, FROZEN, OneChannel<5>>{g, x, y, dr, OneChannel<5>(kf)});
        }
    });
#else
    (void)g; (void)x; (void)y; (void)d; (void)dr; (void)n; (void)k; (void)frozen;
#endif
}

// Streamed rows go out from registers (stream_backward_row_from_registers) where that
// path exists and from_registers is set: reading dy and x from memory (the split
// primitive) that was faster (cold (32,64,56,56) float32, 2 threads, builds in turn:
// 2.90-3.10 -> 2.26-2.33 ms; float64 (16,256,28,28) 2.81-2.85 -> 2.50-2.54; float16
// 1.57-1.59 -> 1.45-1.48), but the fused backward, which reads them from L2, keeps the
// L1 stage: from registers it was no faster in float32 (2.52-2.74 -> 2.56-2.76 ms) and
// slower in float64 (2.17-2.31 -> 2.41-2.54).
template <class T>
FASTBN_INLINE void backward_span_nc(const T* dyc, const T* xc, T* dxc, idx sody, idx sox, idx sodx, Span s,
                                    const BackwardCoef<T>& k, bool frozen, const Activation& act, idx c,
                                    bool from_registers = true) {
    const T* yc = channel_ptr<T>(act.y, c, act.y_sc);
    T* drc = (T*)channel_ptr<T>(act.dres, c, act.dres_sc);
    for (idx r = s.r0; r < s.r1; ++r) {
        const T* g = dyc + r * sody + s.i0;
        const T* x = xc + r * sox + s.i0;
        const T* y = yc ? yc + r * act.y_so + s.i0 : (const T*)0;
        T* dr = drc ? drc + r * act.dres_so + s.i0 : (T*)0;
        T* d = dxc + r * sodx + s.i0;
        if (act.stream && from_registers && rows_stream_from_registers<T>(d)) {
            stream_backward_row_from_registers(g, x, y, d, dr, s.i1 - s.i0, k, frozen);
            continue;
        }
        write_row(d, s.i1 - s.i0, act.stream, [&](T* out, idx i, idx m) FASTBN_LAMBDA_INLINE {
            const T* yi = y ? y + i : (const T*)0;
            T* dri = dr ? dr + i : (T*)0;
            if (frozen) backward_row_any<T, true>(g + i, x + i, yi, out, dri, 0, m, k);
            else backward_row_any<T, false>(g + i, x + i, yi, out, dri, 0, m, k);
        });
    }
}

// dy_ahead, x_ahead, dx_ahead (NULL: none): the channel whose rows of the span to ask for
// row by row as this one's go, where rows are short (as chunk_sums_nc). Cold
// (128,512,7,7), 2 threads, builds in turn: float32 1.88-1.99 -> 1.22-1.27 ms, float16
// 1.68 -> 0.78
template <class T>
FASTBN_CLONES void backward_elementwise_nc(const T* dyc, const T* xc, T* dxc, idx sody, idx sox, idx sodx,
                                           Span s, double a, double b, double c, double mean, bool frozen,
                                           Activation act, idx ch, const T* dy_ahead, const T* x_ahead,
                                           const T* dx_ahead) {
    const BackwardCoef<T> k(a, b, c, mean);
    if (dy_ahead && s.i1 - s.i0 < BLOCK) {
        for (idx r = s.r0; r < s.r1; ++r) {
            prefetch_rows(dy_ahead + r * sody, sody, 1, s.i0, s.i1);
            prefetch_rows(x_ahead + r * sox, sox, 1, s.i0, s.i1);
            prefetch_rows(dx_ahead + r * sodx, sodx, 1, s.i0, s.i1);
            backward_span_nc(dyc, xc, dxc, sody, sox, sodx, Span{r, r + 1, s.i0, s.i1}, k, frozen, act, ch);
        }
    } else {
        backward_span_nc(dyc, xc, dxc, sody, sox, sodx, s, k, frozen, act, ch);
    }
    if (act.stream) stream_fence();
}

// Coefficients of dx from the channel's sums (DESIGN.md):
//   dx = w*invstd/m * (m*g - sum_g - xhat*dweight), xhat = (x-mean)*invstd,
//   dweight = invstd * sum_g_xmu.
// The split primitive fastbn.backward_elementwise uses the same expressions.
FASTBN_INLINE void backward_coefficients(Sums t, double invstd, double weight, double m, bool frozen,
                                         double* a, double* b, double* c) {
    *a = weight * invstd;
    if (frozen) {
        *b = 0; *c = 0;
        return;
    }
    double dweight = invstd * t.dy_xmu;
    *b = -(*a) * invstd * dweight / m;
    *c = -(*a) * t.dy / m;
}

// Inference scale weight / sqrt(running_var + eps) per channel: the NumPy expression's
// IEEE operations (the same bits), vectorized (NumPy took ~5 us for 2048 channels).
FASTBN_CLONES void inference_scales(idx C, const double* weight, const double* running_var, double eps,
                                   double* scale) {
    for (idx c = 0; c < C; ++c) scale[c] = weight[c] / std::sqrt(running_var[c] + eps);
}

// running = (1 - momentum) * running + momentum * batch statistic (unbiased variance),
// in place; running arrays with element strides sm, sv (not overlapping each other or
// mean/var). A clone of its own so that the contiguous case vectorizes.
template <class R>
FASTBN_CLONES void update_running_all(idx C, R* rm, idx sm, R* rv, idx sv, const double* mean, const double* var,
                                      double count, double momentum) {
    const double keep = 1.0 - momentum, unbias = count / (count - 1);
    if (sm == 1 && sv == 1) {
        R* __restrict__ m = rm;
        R* __restrict__ v = rv;
        for (idx c = 0; c < C; ++c) {
            m[c] = (R)(keep * (double)m[c] + momentum * mean[c]);
            v[c] = (R)(keep * (double)v[c] + momentum * (var[c] * unbias));
        }
        return;
    }
    for (idx c = 0; c < C; ++c) {
        rm[c * sm] = (R)(keep * (double)rm[c * sm] + momentum * mean[c]);
        rv[c * sv] = (R)(keep * (double)rv[c * sv] + momentum * (var[c] * unbias));
    }
}

// backward_coefficients of channels [0, n), the outputs apart from the inputs and the mode
// tested once, so that the loop vectorizes: written through the output pointers it ran one
// channel at a time, two scalar divisions each ((256, 2048) backward: 4.4 us of the serial
// step between the two passes, 2 us vectorized).
FASTBN_INLINE void backward_coefficients_range(idx n, const double* __restrict__ sdy,
                                               const double* __restrict__ sxmu, const double* __restrict__ invstd,
                                               const double* __restrict__ weight, double m, bool frozen,
                                               double* __restrict__ a, double* __restrict__ b,
                                               double* __restrict__ c) {
    auto each = [&](auto frozen_mode) FASTBN_LAMBDA_INLINE {
        for (idx ch = 0; ch < n; ++ch) {
            double ka, kb, kc;
            backward_coefficients(Sums{sdy[ch], sxmu[ch]}, invstd[ch], weight[ch], m, decltype(frozen_mode)::value,
                                  &ka, &kb, &kc);
            a[ch] = ka;
            b[ch] = kb;
            c[ch] = kc;
        }
    };
    if (frozen) each(std::true_type());
    else each(std::false_type());
}

// backward_coefficients of every channel (a clone of its own, as finalize_channels).
FASTBN_CLONES void backward_coefficients_all(idx C, const double* sdy, const double* sxmu, const double* invstd,
                                             const double* weight, double m, bool frozen, double* a, double* b,
                                             double* c) {
    backward_coefficients_range(C, sdy, sxmu, invstd, weight, m, frozen, a, b, c);
}

// Sums of a whole channel: chunk partials added in chunk order.
template <class T>
FASTBN_INLINE Sums channel_sums_nc(const T* dyc, const T* xc, idx sody, idx sox, NCGrid g, double mean,
                                   const Activation& act, idx c) {
    Sums t = {0, 0};
    for (idx ch = 0; ch < g.n_chunks; ++ch) {
        Sums p = chunk_sums_nc_impl(dyc, xc, sody, sox, nc_chunk(g, ch), mean, act, c);
        t.dy += p.dy; t.dy_xmu += p.dy_xmu;
    }
    return t;
}

// Fused backward of one channel: the reduction pass, then dx while the channel is still
// in cache. With frozen statistics dx does not depend on the sums, so each chunk's sums
// and dx are produced together.
template <class T>
FASTBN_CLONES Sums backward_channel_nc(const T* dyc, const T* xc, T* dxc, idx sody, idx sox, idx sodx, NCGrid g,
                                       double mean, double invstd, double weight, bool frozen, Activation act,
                                       idx c, const T* dy_next, const T* x_next) {
    Sums t = {0, 0};
    double a, b, cc;
    if (frozen) {
        backward_coefficients(t, invstd, weight, 0, true, &a, &b, &cc);
        BackwardCoef<T> k(a, b, cc, mean);
        for (idx ch = 0; ch < g.n_chunks; ++ch) {
            Span s = nc_chunk(g, ch);
            Sums p = chunk_sums_nc_impl(dyc, xc, sody, sox, s, mean, act, c);
            t.dy += p.dy; t.dy_xmu += p.dy_xmu;
            backward_span_nc(dyc, xc, dxc, sody, sox, sodx, s, k, true, act, c, false);
        }
        if (act.stream) stream_fence();
        return t;
    }
    t = channel_sums_nc(dyc, xc, sody, sox, g, mean, act, c);
    backward_coefficients(t, invstd, weight, (double)(g.outer * g.inner), false, &a, &b, &cc);
    BackwardCoef<T> k(a, b, cc, mean);
    // dx from the last row back: the rows the sums read last are the likeliest still in L2
    // (a channel's dy and x with the next channel's asked for do not fit). Builds called in
    // turn, cold, both orders: (32,64,56,56) float32 2 threads 1.85 -> 1.82 ms, 2.15 ->
    // 2.04, 2.07 -> 1.97; 1 thread 2.76 -> 2.53; 28x28 and 112x112 unchanged. The training
    // forward walked backwards was slower (1.16-1.26 -> 1.20-1.42 ms).
    for (idx ch = g.n_chunks - 1; ch >= 0; --ch) {
        Span s = nc_chunk(g, ch);
        for (idx r = s.r1 - 1; r >= s.r0; --r)
            for_each_row_piece(dxc + r * sodx, s.i0, s.i1, x_next != 0, [&](idx p0, idx p1) FASTBN_LAMBDA_INLINE {
                prefetch_next_channel_row(dy_next, sody, r, p0, p1);
                prefetch_next_channel_row(x_next, sox, r, p0, p1);
                Span piece = {r, r + 1, p0, p1};
                backward_span_nc(dyc, xc, dxc, sody, sox, sodx, piece, k, false, act, c, false);
            });
    }
    if (act.stream) stream_fence();
    return t;
}

// ---------------------------------------------------------------- nc channel blocks
// Short rows (7x7 maps: 196 bytes of float32) end and start inside cache lines. Written
// row by row with streaming stores, those partial lines are slow (cold (128,512,7,7)
// float32, 2 threads: backward 2.7 -> 8.2 ms); with ordinary stores every line of the
// output is read before it is overwritten. A block of adjacent channels, fused as one
// (statistics of each channel, then its outputs while the block sits in L2), writes row r
// of all its channels together: one contiguous run, staged in L1 and streamed but for its
// partial first and last lines. Each channel's arithmetic is the per-channel path's, in
// the same order: the same bits. Callers pass blocks whose run fits STAGE_BYTES; the
// block kernels always stream.
static const idx MAX_BLOCK_CHANNELS = 64;

// A run whose neighbours are written at other times: streamed in whole lines only (the
// partial lines at either end with ordinary stores).
FASTBN_INLINE void stream_copy_run(void* dst, const void* src, size_t bytes) {
    stream_copy_units<64>(dst, src, bytes);
}

// Training forward of channels [c0, c1) (x's channel stride scx, y's channels contiguous:
// row r of the block is y[r * soy + c0 * inner .. + (c1 - c0) * inner)). OUT mean, var,
// invstd: (C,), written at [c0, c1). x_next: the next block's first channel (NULL: none),
// asked for row by row while this block's outputs are written.
template <class T>
FASTBN_CLONES void train_forward_channels_nc(const T* x, T* y, idx sox, idx scx, idx soy, NCGrid g, idx c0,
                                             idx c1, const double* weight, const double* bias, double eps,
                                             double* mean, double* var, double* invstd, Epilogue e,
                                             const T* x_next) {
    const idx inner = g.inner, run = (c1 - c0) * inner;
    Affine<T> a[MAX_BLOCK_CHANNELS];
    for (idx c = c0; c < c1; ++c) {
        const Moments m = channel_moments_nc(x + c * scx, sox, g);
        mean[c] = m.mean;
        var[c] = m.m2 / m.n;
        invstd[c] = invstd_of(m.n, m.m2, eps);
        a[c - c0] = Affine<T>(m.mean, weight[c] * invstd[c], bias[c]);
    }
    alignas(64) T stage[STAGE_BYTES / sizeof(T)];
    for (idx r = 0; r < g.outer; ++r) {
        for (idx c = c0; c < c1; ++c) {
            // the next block's row r, a channel's share at a time (a whole run at once
            // outran the core's outstanding misses)
            if (x_next) prefetch_rows(x_next + r * sox + (c - c0) * inner, sox, 1, 0, inner);
            const T* rc = channel_ptr<T>(e.res, c, e.res_sc);
            Span row = {0, 1, 0, inner};
            normalize_span_nc(x + c * scx + r * sox, stage + (c - c0) * inner, 0, 0, row, a[c - c0],
                              rc ? rc + r * e.res_so : rc, 0, e.relu, false);
        }
        stream_copy_run(y + r * soy + c0 * inner, stage, (size_t)run * sizeof(T));
    }
    stream_fence();
}

// Fused backward of channels [c0, c1) (dx's channels contiguous, as above): each channel's
// sums, then dx of the block row by row. OUT sdy, sxmu at [c0, c1).
template <class T>
FASTBN_CLONES void backward_channels_nc(const T* dy, const T* x, T* dx, idx sody, idx scdy, idx sox, idx scx,
                                        idx sodx, NCGrid g, idx c0, idx c1, const double* mean,
                                        const double* invstd, const double* weight, bool frozen,
                                        Activation act, double* sdy, double* sxmu, const T* dy_next,
                                        const T* x_next) {
    const idx inner = g.inner, run = (c1 - c0) * inner;
    BackwardCoef<T> k[MAX_BLOCK_CHANNELS];
    for (idx c = c0; c < c1; ++c) {
        const Sums t = channel_sums_nc(dy + c * scdy, x + c * scx, sody, sox, g, mean[c], act, c);
        sdy[c] = t.dy;
        sxmu[c] = t.dy_xmu;
        double a, b, cc;
        backward_coefficients(t, invstd[c], weight[c], (double)(g.outer * g.inner), frozen, &a, &b, &cc);
        k[c - c0] = BackwardCoef<T>(a, b, cc, mean[c]);
    }
    alignas(64) T stage[STAGE_BYTES / sizeof(T)];
    if constexpr (std::is_same<T, float>::value || std::is_same<T, double>::value) {
        if (!frozen && !act.y && !act.dres && scdy == inner && scx == inner) {
            // Rows of the block's inputs are contiguous runs too: one loop over the run,
            // each element with its channel's coefficients (spread out once per block),
            // asking for a line of the next block per line written. The same arithmetic.
            // Cold, 2 threads, builds alternated: (128,512,7,7) float32 1.09 -> 1.01 ms,
            // float64 2.08 -> 1.86, (256,512,7,7) 1.96 -> 1.78, 14x14 -2 %. Asking for the
            // next block's whole run at the start of each row was slower than the channel
            // loop (+7-19 %), and so, unexpectedly, was this loop with its whole lines
            // split from the tail (1.12 vs 1.02 ms).
            const idx n = STAGE_BYTES / sizeof(T);
            alignas(64) T ka[n], kb[n], kc[n], mh[n], ml[n];
            for (idx c = c0; c < c1; ++c)
                for (idx i = (c - c0) * inner; i < (c - c0 + 1) * inner; ++i) {
                    ka[i] = k[c - c0].a; kb[i] = k[c - c0].b; kc[i] = k[c - c0].c;
                    mh[i] = k[c - c0].mean_hi; ml[i] = k[c - c0].mean_lo;
                }
            const idx line = 64 / sizeof(T);
            for (idx r = 0; r < g.outer; ++r) {
                const T* __restrict__ gr = dy + c0 * inner + r * sody;
                const T* __restrict__ xr = x + c0 * inner + r * sox;
                // the next block's row, a line of each input per line of the run
                for (idx i0 = 0; i0 < run; i0 += line) {
                    if (dy_next) prefetch_line(dy_next + r * sody + i0);
                    if (x_next) prefetch_line(x_next + r * sox + i0);
                    const idx i1 = run - i0 < line ? run : i0 + line;
                    for (idx i = i0; i < i1; ++i) {
                        const T xm = (xr[i] - mh[i]) - ml[i];
                        stage[i] = (gr[i] * ka[i] + xm * kb[i]) + kc[i];
                    }
                }
                stream_copy_run(dx + r * sodx + c0 * inner, stage, (size_t)run * sizeof(T));
            }
            stream_fence();
            return;
        }
    }
    for (idx r = 0; r < g.outer; ++r) {
        for (idx c = c0; c < c1; ++c) {
            if (dy_next) prefetch_rows(dy_next + r * sody + (c - c0) * inner, sody, 1, 0, inner);
            if (x_next) prefetch_rows(x_next + r * sox + (c - c0) * inner, sox, 1, 0, inner);
            const T* yc = channel_ptr<T>(act.y, c, act.y_sc);
            T* drc = (T*)channel_ptr<T>(act.dres, c, act.dres_sc);
            const T* xr = x + c * scx + r * sox;
            const T* yr = yc ? yc + r * act.y_so : yc;
            T* dr = drc ? drc + r * act.dres_so : drc;
            T* out = stage + (c - c0) * inner;
            if (frozen) backward_row_any<T, true>(dy + c * scdy + r * sody, xr, yr, out, dr, 0, inner, k[c - c0]);
            else backward_row_any<T, false>(dy + c * scdy + r * sody, xr, yr, out, dr, 0, inner, k[c - c0]);
        }
        stream_copy_run(dx + r * sodx + c0 * inner, stage, (size_t)run * sizeof(T));
    }
    stream_fence();
}

// ---------------------------------------------------------------- nlc (channels-last)
struct NLCGrid {
    idx rows, channels, block_rows, chunk_rows, n_chunks;
};

static const idx NLC_BLOCK_ELEMENTS = 131072;
inline NLCGrid nlc_grid(idx rows, idx channels) {
    NLCGrid g;
    g.rows = rows;
    g.channels = channels;
    // Blocks of 64 rows (or BLOCK elements, if more rows): the per-block merge of every
    // channel costs several rows' work, so with 8-row blocks it took half the time of
    // wide layers ((256, 2048) statistics, 1 thread, hot: 0.35 -> 0.17 ns per element).
    // At most NLC_BLOCK_ELEMENTS (the two passes re-read the block from L2), at least 8.
    // Few rows (a (64, 2048) batch): smaller blocks, so that there are four chunks for
    // the threads where the rows allow it.
    if (rows == 0 || channels == 0) {  // nothing to walk (and no division by zero)
        g.block_rows = 8; g.chunk_rows = 8; g.n_chunks = 0;
        return g;
    }
    const idx rows_cap = NLC_BLOCK_ELEMENTS / channels;
    idx block_rows = channels <= BLOCK / 64 ? BLOCK / channels : rows_cap >= 64 ? 64 : rows_cap;
    if (block_rows > rows / 4) block_rows = rows / 4;
    g.block_rows = block_rows >= 8 ? block_rows : 8;
    idx per_chunk = channels >= CHUNK ? 1 : CHUNK / channels;
    g.chunk_rows = per_chunk <= g.block_rows ? g.block_rows : (per_chunk / g.block_rows) * g.block_rows;
    g.n_chunks = (rows + g.chunk_rows - 1) / g.chunk_rows;
    return g;
}

// merge_into for every channel at once: (nb, bmean, bm2) into (n_acc, mean, m2). The
// counts are shared by all channels, so the loop vectorizes.
FASTBN_INLINE void merge_all_channels(idx C, double n_acc, double nb, const double* bmean, const double* bm2,
                                      double* mean, double* m2) {
    if (n_acc == 0) {
        for (idx c = 0; c < C; ++c) { mean[c] = bmean[c]; m2[c] = bm2[c]; }
        return;
    }
    double n = n_acc + nb, f = nb / n, w = n_acc * nb / n;
    for (idx c = 0; c < C; ++c) {
        double d = bmean[c] - mean[c];
        bool finite = d * 0.0 == 0.0;  // non-finite means: as merge_into
        double merged_mean = mean[c] + d * f, merged_m2 = m2[c] + (bm2[c] + (d * d) * w);
        mean[c] = finite ? merged_mean : mean[c] + bmean[c];
        m2[c] = finite ? merged_m2 : d * 0.0;
    }
}

// Channels-last block statistics, as merge_block: per channel, one pass of sums shifted
// by the channel's value in the block's first row, K (S1 = sum(x - K), S2 = sum((x -
// K)^2), M2 = S2 - S1^2/nb; K is a value of the channel's block, so at most log2(nb + 1)
// bits cancel). finish_shifted_nlc turns (S1, S2) in (bs, bq) into (mean, M2) and marks
// a channel whose check failed (Inf/NaN) with a NaN M2; two_pass_nlc redoes those.
template <class T>
FASTBN_INLINE void two_pass_nlc(const T* x, idx sr, idx c, idx r, idx rend, double nb, double* bs,
                                double* bq) {
    double s = 0;
    for (idx rr = r; rr < rend; ++rr) s += to_double(x[rr * sr + c]);
    const double mean = s / nb;
    double q = 0;
    for (idx rr = r; rr < rend; ++rr) {
        double d = to_double(x[rr * sr + c]) - mean;
        q += d * d;
    }
    bs[c] = mean;
    bq[c] = q;
}

template <class T>
FASTBN_INLINE void finish_shifted_nlc(const T* x, idx sr, idx C, idx r, idx rend, double nb,
                                      double* __restrict__ bs, double* __restrict__ bq) {
    const T* __restrict__ x0 = x + r * sr;
    const double nan = std::numeric_limits<double>::quiet_NaN();
    for (idx c = 0; c < C; ++c) {
        const double S1 = bs[c], S2 = bq[c];
        const double M2 = S2 - S1 * (S1 / nb);
        bs[c] = to_double(x0[c]) + S1 / nb;
        bq[c] = M2 >= S2 * 0x1p-20 ? M2 : nan;
    }
    // counted first: the count vectorizes, the search with its call per hit did not
    // (8 % of a hot (32, 2048) statistics call)
    idx marked = 0;
    for (idx c = 0; c < C; ++c) marked += bq[c] != bq[c];
    if (marked)
        for (idx c = 0; c < C; ++c)
            if (bq[c] != bq[c]) two_pass_nlc(x, sr, c, r, rend, nb, bs, bq);
}

// float32 rows wider than this are walked by the elementwise passes' four-row loops
// (tiles_take) and, wider than TILES_FLOAT_MAX_REDUCE, by the reductions' (statistics,
// backward sums): a strip of 64 channels down rows 8 KB apart is slower there to come from
// memory than whole rows (four at a time for the statistics, two for the sums). Cold, 2 threads, the builds called in turn in one process:
// (256, 2048) statistics 0.165-0.204 -> 0.132-0.172 ms, training forward 0.226-0.252 ->
// 0.209-0.231, backward 0.353-0.510 -> 0.348-0.468; (512, 1024) statistics 0.193-0.198 ->
// 0.174-0.187; at 512 channels within noise (statistics 0.275/0.368 vs 0.284/0.393 ms).
static const idx TILES_FLOAT_MAX_CHANNELS = 256;
static const idx TILES_FLOAT_MAX_REDUCE = 512;

#if FASTBN_HAVE_F16C
// Rows wider than one tile are walked a strip of channels at a time, down the block's
// rows: rows far apart, which the hardware prefetcher does not follow. While a strip is
// reduced, the strip walked next is asked for a row at a time (`next`, row k of it at
// next + k * sr, rows k < next_rows; NULL: none), so that memory streams under the
// arithmetic (the backward sums asked for nothing; the statistics asked for whole rows
// ahead from the first tile only, as rows of one tile do, and left memory idle in the
// others). Cold, 2 threads, the builds called in turn in one process: backward (256, 2048)
// float16 0.30-0.44 -> 0.23-0.32 ms, float32 0.34-0.43 -> 0.31-0.40 ms (such float32 rows
// have since left the tiles: TILES_FLOAT_MAX_REDUCE), (32,28,28,256) float32 6.9-7.0 ->
// 6.4-6.5 ms; statistics within noise.
struct NextStrip {
    const void* next;
    idx next_rows, sr;
    template <class T> FASTBN_INLINE void ask(idx k) const {
        if (next && k < next_rows) prefetch_rows((const T*)next + k * sr, sr, 1, 0, 64);
    }
};

// The strip after channels [c, c + w) of rows [r, rend) (rows [r, limit) may be asked
// for): the next tile's channels of the same rows, or after the row's last tile, the
// first tile of the rows that follow.
template <class T>
FASTBN_INLINE NextStrip next_strip(const T* x, idx sr, idx c_end, idx c, idx w, idx r, idx rend, idx limit) {
    if (c_end <= 64) return NextStrip{nullptr, 0, sr};  // rows of one tile: not strips
    if (c + w < c_end) return NextStrip{x + r * sr + c + w, rend - r, sr};
    return NextStrip{rend < limit ? x + rend * sr : nullptr, limit - rend, sr};
}

// chunk_moments_nlc's block sums for channels [c, c + 16 G) in registers: the block's rows
// walked once for G groups of 16 channels, the same additions in the same order per
// channel. Rows of one tile ask for the rows ahead; strips for the next strip. float32,
// float16 and bfloat16 data.
template <class T, int G>
FASTBN_AVX512_TILES void block_sums_nlc_tile(const T* x, idx sr, idx C, idx c, idx r, idx rend, idx r1,
                                             RowsAhead ahead, NextStrip strip, double* bs, double* bq) {
    __m512d k[G][2], s[G][2], q[G][2];
    for (int t = 0; t < G; ++t) {
        const __m512 kf = Lanes16<T>::load(x + r * sr + c + 16 * t);
        for (int h = 0; h < 2; ++h) {
            k[t][h] = widen_half_of(kf, h);
            s[t][h] = _mm512_setzero_pd();
            q[t][h] = _mm512_setzero_pd();
        }
    }
    const bool rows_ahead = c == 0 && !strip.next;
    idx rr = r;
    for (; rr + 4 <= rend; rr += 4) {
        if (rows_ahead)
            for (idx j = 0; j < 4; ++j) prefetch_ahead_nlc(x, sr, C, rr + j, r1, ahead);
        for (idx j = 0; j < 4; ++j) strip.ask<T>(rr - r + j);
        for (int t = 0; t < G; ++t) {
            const T* p = x + rr * sr + c + 16 * t;
            const Wide16<T> f[4] = {Wide16<T>(p), Wide16<T>(p + sr), Wide16<T>(p + 2 * sr), Wide16<T>(p + 3 * sr)};
            for (int h = 0; h < 2; ++h) {
                const __m512d d0 = _mm512_sub_pd(f[0].half(h), k[t][h]);
                const __m512d d1 = _mm512_sub_pd(f[1].half(h), k[t][h]);
                const __m512d d2 = _mm512_sub_pd(f[2].half(h), k[t][h]);
                const __m512d d3 = _mm512_sub_pd(f[3].half(h), k[t][h]);
                s[t][h] = _mm512_add_pd(s[t][h], _mm512_add_pd(_mm512_add_pd(d0, d1), _mm512_add_pd(d2, d3)));
                const __m512d q01 = _mm512_add_pd(_mm512_mul_pd(d0, d0), _mm512_mul_pd(d1, d1));
                const __m512d q23 = _mm512_add_pd(_mm512_mul_pd(d2, d2), _mm512_mul_pd(d3, d3));
                q[t][h] = _mm512_add_pd(q[t][h], _mm512_add_pd(q01, q23));
            }
        }
    }
    for (; rr < rend; ++rr) {
        if (rows_ahead) prefetch_ahead_nlc(x, sr, C, rr, r1, ahead);
        strip.ask<T>(rr - r);
        for (int t = 0; t < G; ++t) {
            const Wide16<T> f(x + rr * sr + c + 16 * t);
            for (int h = 0; h < 2; ++h) {
                const __m512d d = _mm512_sub_pd(f.half(h), k[t][h]);
                s[t][h] = _mm512_add_pd(s[t][h], d);
                q[t][h] = _mm512_add_pd(q[t][h], _mm512_mul_pd(d, d));
            }
        }
    }
    for (int t = 0; t < G; ++t)
        for (int h = 0; h < 2; ++h) {
            _mm512_storeu_pd(bs + c + 16 * t + 8 * h, s[t][h]);
            _mm512_storeu_pd(bq + c + 16 * t + 8 * h, q[t][h]);
        }
}

// Channels [0, C) in tiles of 64 (4 vectors of 16), then one of the rest (1-4 vectors, the
// last one partial when C % 16): walk(std::integral_constant<int, G>(), tail (a
// std::bool_constant), c, mask of the last vector's lanes) handles channels [c, ...).
template <class Walk>
FASTBN_INLINE void for_each_channel_tile(idx C, const Walk& walk) {
    idx c = 0;
    for (; c + 64 <= C; c += 64) walk(std::integral_constant<int, 4>(), std::false_type(), c, (__mmask16)0xffff);
    const idx n = C - c;
    if (n == 0) return;
    const __mmask16 k = (__mmask16)((1u << (n % 16 ? n % 16 : 16)) - 1u);
    const bool tail = n % 16 != 0;
    switch ((n + 15) / 16) {
        case 1: tail ? walk(std::integral_constant<int, 1>(), std::true_type(), c, k)
                     : walk(std::integral_constant<int, 1>(), std::false_type(), c, k); break;
        case 2: tail ? walk(std::integral_constant<int, 2>(), std::true_type(), c, k)
                     : walk(std::integral_constant<int, 2>(), std::false_type(), c, k); break;
        case 3: tail ? walk(std::integral_constant<int, 3>(), std::true_type(), c, k)
                     : walk(std::integral_constant<int, 3>(), std::false_type(), c, k); break;
        default: tail ? walk(std::integral_constant<int, 4>(), std::true_type(), c, k)
                      : walk(std::integral_constant<int, 4>(), std::false_type(), c, k); break;
    }
}
#endif

// The block sums of channels [0, C - C % 16) in register tiles where the CPU has them
// -> the first channel left to the caller's loops (0: all of them, prefetching included).
template <class T>
FASTBN_INLINE idx block_sums_nlc_in_tiles(const T* x, idx sr, idx C, idx r, idx rend, idx r1, RowsAhead ahead,
                                          double* bs, double* bq) {
#if FASTBN_HAVE_F16C
    if constexpr (!std::is_same<T, double>::value) {
        if (!channel_tiles_available() || C < 16) return 0;
        if (std::is_same<T, float>::value && C > TILES_FLOAT_MAX_REDUCE) return 0;
        const idx c_end = C - C % 16;
        for_each_channel_tile(c_end, [&](auto G, auto /*no tail: c_end % 16 == 0*/, idx c, __mmask16) {
            constexpr int g = decltype(G)::value;
            // after the last strip: the next block, as long as it is at most this one's height
            const NextStrip strip = next_strip(x, sr, c_end, c, 16 * g, r, rend,
                                               rend + (rend - r) < r1 ? rend + (rend - r) : r1);
            block_sums_nlc_tile<T, g>(x, sr, C, c, r, rend, r1, ahead, strip, bs, bq);
        });
        return c_end;
    }
#endif
    (void)x; (void)sr; (void)C; (void)r; (void)rend; (void)r1; (void)ahead; (void)bs; (void)bq;
    return 0;
}

// float16 block of rows [r, rend) for chunk_moments_nlc: the same sums in the same
// order (per channel: rows in groups of four, then single rows), on float pieces of
// HALF_PIECE / 4 channels converted with half_converters().
FASTBN_INLINE void block_moments_nlc_half(const half* x, idx sr, idx C, idx r, idx rend, idx r1, double nb,
                                          double* __restrict__ bs, double* __restrict__ bq) {
    const idx P = HALF_PIECE / 4;
    alignas(64) float f[4][HALF_PIECE / 4], k[HALF_PIECE / 4];
    const HalfConverters& cv = half_converters();
    const RowsAhead ahead = RowsAhead::of<half>(C, STATS_PREFETCH_AHEAD);
    const idx c_begin = cv.in_registers ? block_sums_nlc_in_tiles(x, sr, C, r, rend, r1, ahead, bs, bq) : 0;
    for (idx c0 = c_begin; c0 < C; c0 += P) {
        const idx n = C - c0 < P ? C - c0 : P;
        double* __restrict__ s = bs + c0;
        double* __restrict__ q = bq + c0;
        cv.to_float(x + r * sr + c0, k, n);
        for (idx c = 0; c < n; ++c) { s[c] = 0; q[c] = 0; }
        idx rr = r;
        for (; rr + 4 <= rend; rr += 4) {
            if (c0 == 0)
                for (idx j = 0; j < 4; ++j) prefetch_ahead_nlc(x, sr, C, rr + j, r1, ahead);
            for (int j = 0; j < 4; ++j) cv.to_float(x + (rr + j) * sr + c0, f[j], n);
            for (idx c = 0; c < n; ++c) {
                double K = (double)k[c];
                double d0 = (double)f[0][c] - K, d1 = (double)f[1][c] - K;
                double d2 = (double)f[2][c] - K, d3 = (double)f[3][c] - K;
                s[c] += (d0 + d1) + (d2 + d3);
                q[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
            }
        }
        for (; rr < rend; ++rr) {
            if (c0 == 0) prefetch_ahead_nlc(x, sr, C, rr, r1, ahead);
            cv.to_float(x + rr * sr + c0, f[0], n);
            for (idx c = 0; c < n; ++c) {
                double d = (double)f[0][c] - (double)k[c];
                s[c] += d;
                q[c] += d * d;
            }
        }
    }
    finish_shifted_nlc(x, sr, C, r, rend, nb, bs, bq);
}

// Moments of rows [r0, r1) for every channel: per block of rows, the block mean and M2
// (one shifted pass over the block, see finish_shifted_nlc), merged into (mean, m2) with
// the block's count. bmean/bm2 are caller-provided scratch of C doubles. Returns the
// count.
template <class T>
FASTBN_CLONES double chunk_moments_nlc(const T* x, idx sr, NLCGrid g, idx r0, idx r1, double* mean, double* m2,
                                       double* bmean, double* bm2, bool spread_ahead) {
    const idx C = g.channels;
    const RowsAhead ahead = RowsAhead::of<T>(C, STATS_PREFETCH_AHEAD);
    double n_acc = 0;
    for (idx r = r0; r < r1; r += g.block_rows) {
        idx nb_rows = r + g.block_rows < r1 ? g.block_rows : r1 - r;
        double nb = (double)nb_rows;
        // four rows per sweep over the channels: a quarter of the loads and stores of
        // the per-channel accumulators, which otherwise bound this loop
        double* __restrict__ bs = bmean;
        double* __restrict__ bq = bm2;
        if constexpr (is_half<T>()) {
            // the next block on its way from memory while this one is reduced (a piece of
            // channels at a time, from cache): the hardware prefetcher alone left the
            // loads waiting on DRAM
            block_moments_nlc_half(x, sr, C, r, r + nb_rows, r1, nb, bs, bq);
        } else {
            // each sweep asks for the rows STATS_PREFETCH_AHEAD bytes ahead of its own, so
            // that memory streams evenly under the arithmetic; the whole next block asked for
            // at once (as for float16) stalled the loop until it arrived. Cold, 2 threads,
            // float32 (C++ harness, one variant per process): (100352, 64) statistics
            // 0.95-0.99 -> 0.70-0.77 ms, (25088, 256) 1.09-1.15 -> 0.79-0.80 ms, (256, 2048)
            // 0.088-0.092 -> 0.080 ms. float64 rows too since the requests go in memory
            // order (RowsInOrder; (256, 2048) statistics 0.164-0.169 -> 0.117-0.120 ms).
            const T* __restrict__ xk = x + r * sr;
            idx rr = r, rend = r + nb_rows;
            const idx c_begin = block_sums_nlc_in_tiles(x, sr, C, r, rend, r1, ahead, bs, bq);
            const bool spread = std::is_floating_point<T>::value && spread_ahead && C * (idx)sizeof(T) >= 512;
            for (idx c = c_begin; c < C; ++c) { bs[c] = 0; bq[c] = 0; }
            for (; rr + 4 <= rend && c_begin < C; rr += 4) {
                const T* __restrict__ x0 = x + rr * sr;
                const T* __restrict__ x1 = x0 + sr;
                const T* __restrict__ x2 = x1 + sr;
                const T* __restrict__ x3 = x2 + sr;
                auto channels = [&](idx ca, idx cb) FASTBN_LAMBDA_INLINE {
                    for (idx c = ca; c < cb; ++c) {
                        double K = to_double(xk[c]);
                        double d0 = to_double(x0[c]) - K, d1 = to_double(x1[c]) - K;
                        double d2 = to_double(x2[c]) - K, d3 = to_double(x3[c]) - K;
                        bs[c] += (d0 + d1) + (d2 + d3);
                        bq[c] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3);
                    }
                };
                if (spread && rr + 4 + SPREAD_ROWS <= r1) {
                    RowsInOrder<T> next_x(x0 + 4 * sr, sr, c_begin, C);
                    sweep_asking_ahead(c_begin, C, 64 / (idx)sizeof(T), [&](idx) FASTBN_LAMBDA_INLINE {
                        next_x.ask();
                    }, channels);
                    continue;
                }
                if (c_begin == 0)
                    for (idx j = 0; j < 4; ++j) prefetch_ahead_nlc(x, sr, C, rr + j, r1, ahead);
                channels(c_begin, C);
            }
            for (; rr < rend && c_begin < C; ++rr) {
                const T* __restrict__ xr = x + rr * sr;
                if (c_begin == 0) prefetch_ahead_nlc(x, sr, C, rr, r1, ahead);
                for (idx c = c_begin; c < C; ++c) {
                    double d = to_double(xr[c]) - to_double(xk[c]);
                    bs[c] += d;
                    bq[c] += d * d;
                }
            }
            finish_shifted_nlc(x, sr, C, r, rend, nb, bs, bq);
        }
        merge_all_channels(C, n_acc, nb, bmean, bm2, mean, m2);
        n_acc += nb;
    }
    return n_acc;
}

// Fold chunk partials (chunk k at mean + k*C) in chunk order into out_mean/out_m2, for
// channels [c0, c0 + n), out_mean and out_m2 starting at channel c0; merge_chunks_nlc:
// every channel. Returns the count.
FASTBN_INLINE double merge_chunks_range(idx n_chunks, idx C, idx c0, idx n, const double* counts,
                                        const double* means, const double* m2s, double* out_mean,
                                        double* out_m2) {
    double n_acc = 0;
    for (idx k = 0; k < n_chunks; ++k) {
        double nb = counts[k];
        if (nb == 0) continue;
        merge_all_channels(n, n_acc, nb, means + k * C + c0, m2s + k * C + c0, out_mean, out_m2);
        n_acc += nb;
    }
    return n_acc;
}

FASTBN_CLONES double merge_chunks_nlc(idx n_chunks, idx C, const double* counts, const double* means,
                               const double* m2s, double* out_mean, double* out_m2) {
    return merge_chunks_range(n_chunks, C, 0, C, counts, means, m2s, out_mean, out_m2);
}

// The backward sums of every channel from the chunk partials (chunk k's at pd + k * C,
// pq + k * C), added in chunk order from zero, as channel_sums_nc adds its chunks. A loop
// over channels per chunk, so that it vectorizes (the per-channel loop over chunks did
// not, and ran serially between two parallel passes). Channels [c0, c0 + n), sdy and sxmu
// starting at channel c0; fold_chunk_sums: every channel.
FASTBN_INLINE void fold_chunk_sums_range(idx n_chunks, idx C, idx c0, idx n, const double* pd, const double* pq,
                                         double* sdy, double* sxmu) {
    double* __restrict__ sd = sdy;
    double* __restrict__ sq = sxmu;
    for (idx c = 0; c < n; ++c) { sd[c] = 0; sq[c] = 0; }
    for (idx k = 0; k < n_chunks; ++k) {
        const double* __restrict__ dk = pd + k * C + c0;
        const double* __restrict__ qk = pq + k * C + c0;
        for (idx c = 0; c < n; ++c) { sd[c] += dk[c]; sq[c] += qk[c]; }
    }
}

FASTBN_CLONES void fold_chunk_sums(idx n_chunks, idx C, const double* pd, const double* pq, double* sdy,
                                   double* sxmu) {
    fold_chunk_sums_range(n_chunks, C, 0, C, pd, pq, sdy, sxmu);
}

// ---------------------------------------------------------------- short rows as columns
// An NC array whose rows are short (a few elements: (N, C, 2) sequences, 2x2 maps) is
// walked as channels-last rows of C*group columns, channel c owning columns
// [c*group, (c+1)*group): per-row work over a handful of elements cost several times the
// arithmetic. These convert between per-column and per-channel values, in column order.

// Per channel, the moments of its columns (count n each), merged in column order.
inline void merge_column_groups(idx C, idx group, double n, const double* col_mean, const double* col_m2,
                                double* mean, double* m2) {
    for (idx c = 0; c < C; ++c) {
        Moments m = {0, 0, 0};
        for (idx i = 0; i < group; ++i) merge_into(m, n, col_mean[c * group + i], col_m2[c * group + i]);
        mean[c] = m.mean;
        m2[c] = m.m2;
    }
}

// Per channel, the sum of its columns' values, in column order.
inline void sum_column_groups(idx C, idx group, const double* col, double* out) {
    for (idx c = 0; c < C; ++c) {
        double t = 0;
        for (idx i = 0; i < group; ++i) t += col[c * group + i];
        out[c] = t;
    }
}

// A per-channel value for each of the channel's columns.
inline void expand_to_columns(idx C, idx group, const double* v, double* out) {
    for (idx c = 0; c < C; ++c)
        for (idx i = 0; i < group; ++i) out[c * group + i] = v[c];
}

// Channels [c0, c0 + n) of prepare_channel_constants' buffer (one column per channel, C
// channels in all) from mean, p0, p1, p2 (NULL: zeros), which start at channel c0.
template <class CT>
FASTBN_INLINE void put_channel_constants(CT* out, idx C, idx c0, idx n, const double* __restrict__ mean,
                                         const double* __restrict__ p0, const double* __restrict__ p1,
                                         const double* __restrict__ p2) {
    CT* __restrict__ hi = out + c0;
    CT* __restrict__ lo = out + C + c0;
    CT* __restrict__ a = out + 2 * C + c0;
    CT* __restrict__ b = out + 3 * C + c0;
    CT* __restrict__ d = out + 4 * C + c0;
    for (idx c = 0; c < n; ++c) {
        hi[c] = (CT)mean[c];
        lo[c] = (CT)(mean[c] - (double)hi[c]);
        a[c] = (CT)p0[c];
        b[c] = (CT)p1[c];
        d[c] = p2 ? (CT)p2[c] : (CT)0;
    }
}

// Per-channel constants of the elementwise passes, converted once to the compute type,
// for each of the channel's `group` columns (1, or the columns of short rows walked as
// channels-last). `buf` holds 5*C*group compute-type values: mean_hi, mean_lo, p0, p1, p2.
template <class T>
FASTBN_CLONES void prepare_channel_constants(const T* /*dtype_tag*/, idx C, idx group, const double* mean,
                                            const double* p0, const double* p1, const double* p2, void* buf) {
    typedef typename compute_of<T>::type CT;
    CT* out = (CT*)buf;
    const idx Cf = C * group;
    // One column per channel: a loop that vectorizes. The general loop below cost a wide
    // layer several microseconds a call: (8, 2048) float32 normalize, 1 thread, hot, 9.2 ->
    // 3.2 us; cold (256, 2048) inference, 2 threads, 0.095-0.098 -> 0.081 ms.
    if (group == 1) {
        put_channel_constants(out, C, 0, C, mean, p0, p1, p2);
        return;
    }
    for (idx c = 0; c < C; ++c) {
        const CT hi = (CT)mean[c], lo = (CT)(mean[c] - (double)hi);
        const CT a = (CT)p0[c], b = (CT)p1[c], d = p2 ? (CT)p2[c] : (CT)0;
        for (idx j = c * group; j < (c + 1) * group; ++j) {
            out[j] = hi;
            out[Cf + j] = lo;
            out[2 * Cf + j] = a;
            out[3 * Cf + j] = b;
            out[4 * Cf + j] = d;
        }
    }
}

// The serial steps between the channels-last passes in one walk over the channels, a block
// of FINISH_BLOCK at a time: the loops they were (the same expressions, so the same bits)
// wrote intermediate arrays to memory and read their inputs again, some of them from the
// other thread's cache. Builds called in turn, cold, 2 threads, float32: backward (64, 2048)
// 0.046-0.049 -> 0.042-0.044 ms, (256, 2048) 0.141-0.143 -> 0.136-0.140 ms (0.141 -> 0.140
// with this build called first); training forward unchanged within the noise.
static const idx FINISH_BLOCK = 256;

// Blocks of FINISH_BLOCK channels in C: the units the threads split the serial steps into
// (each channel's expressions are its own, so the same bits however they are split).
inline idx finish_blocks(idx C) { return (C + FINISH_BLOCK - 1) / FINISH_BLOCK; }

// A barrier of the enclosing OpenMP team (the parallel blocks of _bn_cpu.pyx): between the
// passes of one parallel block instead of ending the block, running the serial step on one
// thread and starting another. Nothing without OpenMP.
inline void team_barrier() {
#ifdef _OPENMP
#pragma omp barrier
#endif
}

// Training forward: the chunk partials (counts, then means and M2s at k*C) merged in chunk
// order (merge_chunks_nlc), finalized (finalize_channels: OUT mean, var (biased), invstd)
// and the normalize pass's constants (prepare_channel_constants(mean, weight * invstd,
// bias)) in buf; channel blocks [b0, b1) of finish_blocks(C).
template <class T>
FASTBN_CLONES void finish_statistics_nlc(const T* /*dtype_tag*/, idx n_chunks, idx C, const double* counts,
                                         const double* means, const double* m2s, double eps, const double* weight,
                                         const double* bias, double* mean, double* var, double* invstd,
                                         void* buf, idx b0, idx b1) {
    typedef typename compute_of<T>::type CT;
    double scale[FINISH_BLOCK];
    for (idx c0 = b0 * FINISH_BLOCK; c0 < C && c0 < b1 * FINISH_BLOCK; c0 += FINISH_BLOCK) {
        const idx n = C - c0 < FINISH_BLOCK ? C - c0 : FINISH_BLOCK;
        const double count = merge_chunks_range(n_chunks, C, c0, n, counts, means, m2s, mean + c0, var + c0);
        finalize_range(n, &count, 0, eps, var + c0, invstd + c0, weight + c0, scale);
        put_channel_constants((CT*)buf, C, c0, n, mean + c0, scale, bias + c0, (const double*)nullptr);
    }
}

// Backward: the chunk partials (sum(g) at pd + k*C, sum(g*(x - mean)) at pq + k*C) added in
// chunk order (fold_chunk_sums: OUT sdy, sxmu), the coefficients (backward_coefficients_all)
// and the dx pass's constants (prepare_channel_constants(mean, a, b, c)) in buf; channel
// blocks [b0, b1) of finish_blocks(C).
template <class T>
FASTBN_CLONES void finish_backward_sums_nlc(const T* /*dtype_tag*/, idx n_chunks, idx C, const double* pd,
                                            const double* pq, const double* mean, const double* invstd,
                                            const double* weight, double m, bool frozen, double* sdy,
                                            double* sxmu, void* buf, idx b0, idx b1) {
    typedef typename compute_of<T>::type CT;
    double ka[FINISH_BLOCK], kb[FINISH_BLOCK], kc[FINISH_BLOCK];
    for (idx c0 = b0 * FINISH_BLOCK; c0 < C && c0 < b1 * FINISH_BLOCK; c0 += FINISH_BLOCK) {
        const idx n = C - c0 < FINISH_BLOCK ? C - c0 : FINISH_BLOCK;
        fold_chunk_sums_range(n_chunks, C, c0, n, pd, pq, sdy + c0, sxmu + c0);
        backward_coefficients_range(n, sdy + c0, sxmu + c0, invstd + c0, weight + c0, m, frozen, ka, kb, kc);
        put_channel_constants((CT*)buf, C, c0, n, mean + c0, ka, kb, kc);
    }
}

// y = relu?(((x - mean_hi) - mean_lo) * scale + shift + res?) over rows [r0, r1); constants
// from prepare_channel_constants(mean, scale, shift).
// Channels [c0, c0 + m) of a row, written to y[0..m).
template <class T, bool RES, bool RELU>
FASTBN_INLINE void normalize_row_nlc(const T* x, T* y, const T* res, idx C, const void* buf, idx c0, idx m) {
    typedef typename compute_of<T>::type CT;
    // the constants live in a scratch buffer that no data array overlaps
    const CT* __restrict__ mh = (const CT*)buf + c0;
    const CT* __restrict__ ml = mh + C;
    const CT* __restrict__ sc = mh + 2 * C;
    const CT* __restrict__ sh = mh + 3 * C;
    x += c0;
    if (RES) res += c0;
    if constexpr (is_half<T>()) {  // float pieces (F16C where present), same arithmetic
        alignas(64) float xf[HALF_PIECE], yf[HALF_PIECE], rf[RES ? HALF_PIECE : 1];
        const HalfConverters& cv = half_converters();
#if FASTBN_HAVE_F16C
        if (cv.in_registers) {
            normalize_row_nlc_half_in_registers<RES, RELU>(x, y, res, mh, ml, sc, sh, m);
            return;
        }
#endif
        for (idx i = 0; i < m; i += HALF_PIECE) {
            idx n = m - i < HALF_PIECE ? m - i : HALF_PIECE;
            cv.to_float(x + i, xf, n);
            if (RES) cv.to_float(res + i, rf, n);
            for (idx c = 0; c < n; ++c) {
                float v = ((xf[c] - mh[i + c]) - ml[i + c]) * sc[i + c] + sh[i + c];
                if (RES) v = v + rf[c];
                if (RELU) v = relu(v);
                yf[c] = v;
            }
            cv.to_half(yf, y + i, n);
        }
        return;
    }
    for (idx c = 0; c < m; ++c) {
        CT v = ((to_compute(x[c]) - mh[c]) - ml[c]) * sc[c] + sh[c];
        if (RES) v = v + to_compute(res[c]);
        if (RELU) v = relu(v);
        store(y + c, v);
    }
}

// Four rows [r, r + 4) at once, channels [c0, c0 + m), written to y0..y3 (staging
// buffers): a channel's four constants are loaded once for the four rows, and the loop
// set-up is paid once per four rows, which for a few dozen channels costs as much as the
// arithmetic. Hot, 1 thread, float32: (1024, 64) 0.164 -> 0.146 ns per element, (1024,
// 16) 0.48 -> 0.28. The same arithmetic (the same bits). An output row is its input row
// or overlaps no input (the API copies otherwise), so iterations are independent: ivdep
// spares the vectorizer's alias checks, which for eight rows exceed what GCC versions a
// loop for. Only for streamed outputs: with ordinary stores, four interleaved output
// rows made a cold (100352, 64) inference slower (1.15 -> 1.64 ms, 2 threads).
template <class T, bool RES, bool RELU>
FASTBN_INLINE void normalize_four_rows_nlc(const T* x, idx srx, const T* res, idx srr, T* y0, T* y1, T* y2, T* y3,
                                           idx C, const void* buf, idx c0, idx m) {
    typedef typename compute_of<T>::type CT;
    const CT* __restrict__ mh = (const CT*)buf + c0;
    const CT* __restrict__ ml = mh + C;
    const CT* __restrict__ sc = mh + 2 * C;
    const CT* __restrict__ sh = mh + 3 * C;
    const T* x0 = x + c0;
    const T* x1 = x0 + srx;
    const T* x2 = x1 + srx;
    const T* x3 = x2 + srx;
    const T* q0 = RES ? res + c0 : (const T*)0;
    const T* q1 = RES ? q0 + srr : (const T*)0;
    const T* q2 = RES ? q1 + srr : (const T*)0;
    const T* q3 = RES ? q2 + srr : (const T*)0;
#pragma GCC ivdep
    for (idx c = 0; c < m; ++c) {
        const CT a = mh[c], b = ml[c], k = sc[c], d = sh[c];
        CT v0 = ((to_compute(x0[c]) - a) - b) * k + d;
        CT v1 = ((to_compute(x1[c]) - a) - b) * k + d;
        CT v2 = ((to_compute(x2[c]) - a) - b) * k + d;
        CT v3 = ((to_compute(x3[c]) - a) - b) * k + d;
        if (RES) {
            v0 = v0 + to_compute(q0[c]);
            v1 = v1 + to_compute(q1[c]);
            v2 = v2 + to_compute(q2[c]);
            v3 = v3 + to_compute(q3[c]);
        }
        if (RELU) {
            v0 = relu(v0);
            v1 = relu(v1);
            v2 = relu(v2);
            v3 = relu(v3);
        }
        store(y0 + c, v0);
        store(y1 + c, v1);
        store(y2 + c, v2);
        store(y3 + c, v3);
    }
}

template <class T, bool RES, bool RELU>
FASTBN_INLINE void normalize_four_rows_streamed(const T* x, T* y, idx srx, idx sry, const T* res, idx srr, idx C,
                                                const void* buf) {
    stream_four_rows(y, sry, C, [&](T* s0, T* s1, T* s2, T* s3, idx c0, idx m) FASTBN_LAMBDA_INLINE {
        normalize_four_rows_nlc<T, RES, RELU>(x, srx, res, srr, s0, s1, s2, s3, C, buf, c0, m);
    });
}

// float16, four contiguous rows of at most HALF_PIECE / 4 channels: converted with one
// call each way and computed by the float kernel (the arithmetic of normalize_row_nlc),
// then streamed. Row by row, the conversion calls and loop set-ups of a few dozen
// channels cost more than the arithmetic.
template <bool RES, bool RELU>
FASTBN_INLINE void normalize_four_rows_half_streamed(const half* x, half* y, const half* res, idx C,
                                                     const void* buf) {
    alignas(64) float xf[HALF_PIECE], yf[HALF_PIECE], rf[RES ? HALF_PIECE : 1];
    alignas(64) half out[HALF_PIECE];
    const HalfConverters& cv = half_converters();
    const idx n = 4 * C;
#if FASTBN_HAVE_F16C
    if (cv.in_registers) {
        const float* mh = (const float*)buf;
        for (idx j = 0; j < 4; ++j)
            normalize_row_nlc_half_in_registers<RES, RELU>(x + j * C, out + j * C, RES ? res + j * C : res, mh,
                                                           mh + C, mh + 2 * C, mh + 3 * C, C);
        stream_copy(y, out, (size_t)n * sizeof(half));
        return;
    }
#endif
    cv.to_float(x, xf, n);
    if (RES) cv.to_float(res, rf, n);
    normalize_four_rows_nlc<float, RES, RELU>(xf, C, RES ? rf : xf, C, yf, yf + C, yf + 2 * C, yf + 3 * C, C, buf,
                                              0, C);
    cv.to_half(yf, out, n);
    stream_copy(y, out, (size_t)n * sizeof(half));
}

// Four rows [r, r + 4) of y: streamed through staging, or written in place.
template <class T, bool RES, bool RELU>
FASTBN_INLINE void normalize_four_rows_to(const T* x, T* y, idx srx, idx sry, const T* res, idx srr, idx C,
                                          const void* buf, bool stream) {
    if (stream) normalize_four_rows_streamed<T, RES, RELU>(x, y, srx, sry, res, srr, C, buf);
    else normalize_four_rows_nlc<T, RES, RELU>(x, srx, res, srr, y, y + sry, y + 2 * sry, y + 3 * sry, C, buf, 0, C);
}

// normalize_four_rows_to with ordinary stores, asking for the next four rows of x (and
// of the residual) a line at a time as the rows are computed (sweep_asking_ahead). The
// epilogue is picked per line here: folded into normalize_four_rows_to's template
// dispatch instead, a cold (256, 2048) inference measured 0.058 -> 0.071 ms (2 threads,
// builds called in turn, both orders).
template <class T>
FASTBN_INLINE void normalize_four_rows_asking_ahead(const T* x, T* y, idx srx, idx sry, const T* res, idx srr,
                                                    bool relu, idx C, const void* buf) {
    RowsInOrder<T> next_x(x + 4 * srx, srx, 0, C), next_res(res ? res + 4 * srr : x, srr, 0, C);
    sweep_asking_ahead(0, C, 64 / (idx)sizeof(T), [&](idx) FASTBN_LAMBDA_INLINE {
        next_x.ask();
        if (res) next_res.ask();
    }, [&](idx ca, idx cb) FASTBN_LAMBDA_INLINE {
        T* y0 = y + ca;
        if (res) {
            if (relu) normalize_four_rows_nlc<T, true, true>(x, srx, res, srr, y0, y0 + sry, y0 + 2 * sry, y0 + 3 * sry, C, buf, ca, cb - ca);
            else normalize_four_rows_nlc<T, true, false>(x, srx, res, srr, y0, y0 + sry, y0 + 2 * sry, y0 + 3 * sry, C, buf, ca, cb - ca);
        } else {
            if (relu) normalize_four_rows_nlc<T, false, true>(x, srx, res, 0, y0, y0 + sry, y0 + 2 * sry, y0 + 3 * sry, C, buf, ca, cb - ca);
            else normalize_four_rows_nlc<T, false, false>(x, srx, res, 0, y0, y0 + sry, y0 + 2 * sry, y0 + 3 * sry, C, buf, ca, cb - ca);
        }
    });
}

// ---------------------------------------------------------------- channel tiles in registers
// Channels-last elementwise passes on AVX-512 CPUs: a tile of up to 64 channels keeps
// its per-channel constants in registers (four or five vectors of 16 per 16 channels)
// while it walks the rows, so an element costs a load, the arithmetic and a store, as in
// the NC layout. Row by row, every 16 elements also loaded their four or five constants,
// and each row paid a loop set-up of its own (a 64-channel row is four vectors). Rows
// wider than a tile are walked in blocks of rows (see tile_block_rows), each tile over
// the whole block. float32, float16 and bfloat16 data; the float code's operations in the
// same order on the same lanes (the same bits). FASTBN_CHANNEL_TILES=off (read once)
// turns it off, so that the tests can compare both on one machine.
#if FASTBN_HAVE_F16C
// Constant array j of prepare_channel_constants (C floats each) for a tile's G vectors,
// the last one's lanes in k when TAIL.
template <bool TAIL, int G>
FASTBN_AVX512_TILES FASTBN_INLINE void load_tile_constants(const float* buf, idx C, idx c, __mmask16 k, int j,
                                                           __m512* v) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) {
        const float* p = buf + j * C + c + 16 * g;
        v[g] = TAIL && g == G - 1 ? Lanes16<float>::load(p, k) : Lanes16<float>::load(p);
    }
}

// Channels [c, c + 16 (G - 1) + popcount(k)) of rows [r0, r1), row r written at y + (r -
// y_r0) * sry: y = relu?(((x - mh) - ml)
// * sc + sh + res?), the constants from prepare_channel_constants (normalize_row_nlc's
// arithmetic). ahead.rows > 0: ask for the rows that far ahead (the tile that walks a
// block first).
template <class T, int G, bool TAIL, bool RES, bool RELU>
FASTBN_AVX512_TILES void normalize_tile_nlc(const T* x, idx srx, const T* res, idx srr, T* y, idx sry, idx y_r0,
                                            idx C, const float* buf, idx c, __mmask16 k, idx r0, idx r1,
                                            idx r_end, RowsAhead ahead) {
    __m512 mh[G], ml[G], sc[G], sh[G];
    load_tile_constants<TAIL, G>(buf, C, c, k, 0, mh);
    load_tile_constants<TAIL, G>(buf, C, c, k, 1, ml);
    load_tile_constants<TAIL, G>(buf, C, c, k, 2, sc);
    load_tile_constants<TAIL, G>(buf, C, c, k, 3, sh);
    for (idx r = r0; r < r1; ++r) {
        if (ahead.rows) {
            prefetch_ahead_nlc(x, srx, C, r, r_end, ahead);
            prefetch_ahead_nlc(RES ? res : (const T*)0, srr, C, r, r_end, ahead);
        }
        const T* xr = x + r * srx + c;
        const T* rr = RES ? res + r * srr + c : res;
        T* yr = y + (r - y_r0) * sry + c;
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g)
            normalize16<T, RES, RELU>(xr + 16 * g, RES ? rr + 16 * g : rr, yr + 16 * g, mh[g], ml[g], sc[g], sh[g],
                                      TAIL && g == G - 1, k);
    }
}

// Rows per block when a row is wider than one tile: each tile loads its constants once per
// block, so at least 4 rows; the block's rows arrive while the first tile walks them
// (asking a row ahead) and wait in L2 for the others.
static const idx TILE_BLOCK_BYTES = 65536;
template <class T> FASTBN_INLINE idx tile_block_rows(idx C, idx rows) {
    if (C <= 64) return rows;
    const idx b = TILE_BLOCK_BYTES / (C * (idx)sizeof(T));
    return b >= 4 ? b : 4;
}

// Rows [r0, r1) of the output through the tiles, block by block: written in place, or
// (stream) into an L1 staging block of contiguous rows that is then streamed out.
// tiles(target, target row stride, target's first row, rb, re) runs every tile over rows
// [rb, re).
template <class T, class Tiles>
FASTBN_INLINE void walk_tile_blocks(T* y, idx sry, idx C, idx r0, idx r1, bool stream, const Tiles& tiles) {
    if (!stream) {
        const idx block = tile_block_rows<T>(C, r1 - r0);
        for (idx rb = r0; rb < r1; rb += block) tiles(y, sry, (idx)0, rb, rb + block < r1 ? rb + block : r1);
        return;
    }
    alignas(64) T stage[STAGE_BYTES / sizeof(T)];
    const idx block = (idx)(STAGE_BYTES / sizeof(T)) / C;  // at least 4 rows: see tiles_take
    for (idx rb = r0; rb < r1; rb += block) {
        const idx re = rb + block < r1 ? rb + block : r1;
        tiles(stage, C, rb, rb, re);
        if (sry == C) {
            stream_copy(y + rb * sry, stage, (size_t)((re - rb) * C) * sizeof(T));
        } else {
            for (idx r = rb; r < re; ++r) stream_copy(y + r * sry, stage + (r - rb) * C, (size_t)C * sizeof(T));
        }
    }
}

// Whether the tiles take a pass: AVX-512 (with BW and VL) present and not turned off;
// float32, float16 or bfloat16 data; streamed outputs only for rows of which the staging
// block holds four (a block per row would load the constants for every row). float32
// rows wider than TILES_FLOAT_MAX_CHANNELS keep the four-row loops, which were faster
// there (hot, 1 thread, processes alternated: (64, 2048) inference 0.16-0.18 ns per
// element against 0.23 in tiles, whose blocks walk each row a 64-channel slice at a
// time); 16-bit rows gain at every width from converting in registers.
template <class T> FASTBN_INLINE bool tiles_take(idx C, bool stream) {
    if constexpr (std::is_same<T, double>::value) {
        return false;
    } else {
        if (sizeof(T) == 4 && C > TILES_FLOAT_MAX_CHANNELS) return false;
        return channel_tiles_available() && (!stream || 4 * C * (idx)sizeof(T) <= STAGE_BYTES);
    }
}

template <class T, bool RES, bool RELU>
FASTBN_AVX512_TILES void normalize_tiles_nlc(const T* x, idx srx, const T* res, idx srr, T* y, idx sry, idx C,
                                             idx r0, idx r1, const void* buf, bool stream) {
    const float* consts = (const float*)buf;
    const RowsAhead ahead = RowsAhead::of<T>(C);
    walk_tile_blocks(y, sry, C, r0, r1, stream, [&](T* out, idx so, idx out_r0, idx rb, idx re) FASTBN_LAMBDA_INLINE {
        bool first = true;
        for_each_channel_tile(C, [&](auto G, auto tail, idx c, __mmask16 k) FASTBN_LAMBDA_INLINE {
            normalize_tile_nlc<T, decltype(G)::value, decltype(tail)::value, RES, RELU>(
                x, srx, res, srr, out, so, out_r0, C, consts, c, k, rb, re, r1, first ? ahead : RowsAhead{0});
            first = false;
        });
    });
}
#endif

// Whether normalize_tiles_nlc ran the pass (false: the caller's loops run it).
template <class T>
FASTBN_INLINE bool normalize_nlc_in_tiles(const T* x, T* y, idx srx, idx sry, idx C, idx r0, idx r1,
                                          const void* buf, const Epilogue& e) {
#if FASTBN_HAVE_F16C
    if (!tiles_take<T>(C, e.stream)) return false;
    if constexpr (!std::is_same<T, double>::value) {
        const T* res = (const T*)e.res;
        if (res) {
            if (e.relu) normalize_tiles_nlc<T, true, true>(x, srx, res, e.res_so, y, sry, C, r0, r1, buf, e.stream);
            else normalize_tiles_nlc<T, true, false>(x, srx, res, e.res_so, y, sry, C, r0, r1, buf, e.stream);
        } else {
            if (e.relu) normalize_tiles_nlc<T, false, true>(x, srx, res, 0, y, sry, C, r0, r1, buf, e.stream);
            else normalize_tiles_nlc<T, false, false>(x, srx, res, 0, y, sry, C, r0, r1, buf, e.stream);
        }
        if (e.stream) stream_fence();
        return true;
    }
#endif
    (void)x; (void)y; (void)srx; (void)sry; (void)C; (void)r0; (void)r1; (void)buf; (void)e;
    return false;
}

// Channels-last rows at least this wide take the four-row kernels with ordinary stores.
static const idx WIDE_NLC_CHANNELS = 1024;

// Wide rows of an x that is in cache (a training forward's second pass, small arrays): a
// strip of channels at a time down the rows, four rows at a time, so that the strip's
// constants (STRIP_CONSTANT_BYTES) stay in L1. Whole rows at a time reloaded 32 KB of
// constants from L2 every four rows (2048 float channels), which cost more than moving x
// and y: cold (256, 2048) float32 training forward, 2 threads, the second pass alone
// (C++ harness, the core's kernels): 28 -> 20.5 us, against 18-20 us for a plain copy.
// Strips of 16 KB of constants rather than 8: half as many returns to the first rows of a
// chunk, and the float32 training forward into a cold output (the common case: a new
// array) was faster in every pair, builds called in turn, both orders: (256, 2048)
// 0.1056-0.1093 -> 0.1018-0.1071 ms, (128, 4096) 0.1157-0.1176 -> 0.1104-0.1134, (512,
// 1024), now one strip, 0.1050-0.1079 -> 0.1028; output reused, float64 and the
// backward within the noise.
static const idx STRIP_CONSTANT_BYTES = 16384;
// Channels per strip: 1024 float32 or 512 float64 (four constant arrays in 16 KB, five in
// 20).
// For each strip [c0, c0 + m): four(r, c0, m) over rows [r, r + 4) while four rows are
// left, then one(r, c0, m) for each row left (normalize_strips_nlc, the backward strips).
template <class T, class Four, class One>
FASTBN_INLINE void walk_channel_strips(idx C, idx r0, idx r1, const Four& four, const One& one) {
    const idx strip = STRIP_CONSTANT_BYTES / (4 * (idx)sizeof(typename compute_of<T>::type));
    for (idx c0 = 0; c0 < C; c0 += strip) {
        const idx m = C - c0 < strip ? C - c0 : strip;
        idx r = r0;
        for (; r + 4 <= r1; r += 4) four(r, c0, m);
        for (; r < r1; ++r) one(r, c0, m);
    }
}

template <class T, bool RES, bool RELU>
FASTBN_INLINE void normalize_strips_nlc(const T* x, T* y, idx srx, idx sry, const T* res, idx srr, idx C, idx r0,
                                        idx r1, const void* buf) {
    walk_channel_strips<T>(C, r0, r1, [&](idx r, idx c0, idx m) FASTBN_LAMBDA_INLINE {
        T* y0 = y + r * sry + c0;
        normalize_four_rows_nlc<T, RES, RELU>(x + r * srx, srx, RES ? res + r * srr : res, srr, y0, y0 + sry,
                                              y0 + 2 * sry, y0 + 3 * sry, C, buf, c0, m);
    }, [&](idx r, idx c0, idx m) FASTBN_LAMBDA_INLINE {
        normalize_row_nlc<T, RES, RELU>(x + r * srx, y + r * sry + c0, RES ? res + r * srr : res, C, buf, c0, m);
    });
}

template <class T>
FASTBN_CLONES void normalize_nlc(const T* x, T* y, idx srx, idx sry, idx C, idx r0, idx r1, const void* buf,
                                 Epilogue e) {
#if FASTBN_HAVE_F16C
    // float32 rows that follow each other, streamed: one flat run from registers (cold
    // (32,56,56,64) inference, 2 threads, in turn in one process: 0.77-0.80x the stored
    // time against 0.87-0.89x through the four-row staging below; training forward
    // 0.91-0.99x the staged time). float16 that way was slower than staged (1.06-1.69x).
    if constexpr (std::is_same<T, float>::value) {
        if (e.stream && C >= 16 && srx == C && sry == C && (!e.res || e.res_so == C) &&
            rows_stream_from_registers<T>(y)) {
            const T* xs = x + r0 * C;
            T* ys = y + r0 * C;
            const T* rs = e.res ? (const T*)e.res + r0 * C : (const T*)0;
            const idx n = (r1 - r0) * C;
            const ChannelColumns<4> cols = {(const float*)buf, C, 0};
            with_epilogue(rs != nullptr, e.relu, [&](auto has_res, auto has_relu) FASTBN_LAMBDA_INLINE {
                stream_run(ys, n, NormalizedRun<T, decltype(has_res)::value, decltype(has_relu)::value,
                                                ChannelColumns<4>>{xs, rs, cols});
            });
            stream_fence();
            return;
        }
    }
#endif
    if (normalize_nlc_in_tiles(x, y, srx, sry, C, r0, r1, buf, e)) return;
    const RowsAhead ahead = RowsAhead::of<T>(C);
    idx r = r0;
    if constexpr (!is_half<T>()) {
        if (e.strips && !e.stream && C >= WIDE_NLC_CHANNELS) {
            const T* res = (const T*)e.res;
            if (res) {
                if (e.relu) normalize_strips_nlc<T, true, true>(x, y, srx, sry, res, e.res_so, C, r0, r1, buf);
                else normalize_strips_nlc<T, true, false>(x, y, srx, sry, res, e.res_so, C, r0, r1, buf);
            } else {
                if (e.relu) normalize_strips_nlc<T, false, true>(x, y, srx, sry, res, 0, C, r0, r1, buf);
                else normalize_strips_nlc<T, false, false>(x, y, srx, sry, res, 0, C, r0, r1, buf);
            }
            return;
        }
        // Four rows at a time: streamed outputs through L1 staging (cold (100352, 64)
        // float32 training forward, 2 threads, the two builds called in turn in one
        // process: 2.21-2.91 -> 1.61-2.54 ms, three runs, each faster), and wide rows
        // written in place, a channel's constants loaded once per four rows (cold float32,
        // 2 threads, builds called in turn: training forward (256, 2048) 0.152-0.162 ->
        // 0.135-0.140 ms, (512, 1024) 0.152-0.155 -> 0.123-0.134, (128, 4096) 0.190-0.197
        // -> 0.173-0.176; inference unchanged within the noise). Not for narrow rows
        // with ordinary stores: see normalize_four_rows_nlc.
        if (e.stream || C >= WIDE_NLC_CHANNELS) {
            const bool spread = std::is_floating_point<T>::value && e.spread && !e.stream && C * (idx)sizeof(T) >= 4096;
            for (; r + 4 <= r1; r += 4) {
                if (spread && r + 4 + SPREAD_ROWS <= r1) {
                    normalize_four_rows_asking_ahead(x + r * srx, y + r * sry, srx, sry,
                                                     e.res ? (const T*)e.res + r * e.res_so : (const T*)0, e.res_so,
                                                     e.relu, C, buf);
                    continue;
                }
                for (idx j = 0; j < 4; ++j) {
                    prefetch_ahead_nlc(x, srx, C, r + j, r1, ahead);
                    prefetch_ahead_nlc((const T*)e.res, e.res_so, C, r + j, r1, ahead);
                }
                const T* xr = x + r * srx;
                T* yr = y + r * sry;
                const T* rr = e.res ? (const T*)e.res + r * e.res_so : (const T*)0;
                if (rr) {
                    if (e.relu) normalize_four_rows_to<T, true, true>(xr, yr, srx, sry, rr, e.res_so, C, buf, e.stream);
                    else normalize_four_rows_to<T, true, false>(xr, yr, srx, sry, rr, e.res_so, C, buf, e.stream);
                } else {
                    if (e.relu) normalize_four_rows_to<T, false, true>(xr, yr, srx, sry, rr, 0, C, buf, e.stream);
                    else normalize_four_rows_to<T, false, false>(xr, yr, srx, sry, rr, 0, C, buf, e.stream);
                }
            }
        }
    }
    if constexpr (is_half<T>()) {
        if (e.stream && 4 * C <= HALF_PIECE && srx == C && sry == C && (!e.res || e.res_so == C)) {
            for (; r + 4 <= r1; r += 4) {
                for (idx j = 0; j < 4; ++j) {
                    prefetch_ahead_nlc(x, srx, C, r + j, r1, ahead);
                    prefetch_ahead_nlc((const T*)e.res, e.res_so, C, r + j, r1, ahead);
                }
                const half* xr = x + r * C;
                half* yr = y + r * C;
                const half* rr = e.res ? (const half*)e.res + r * C : (const half*)0;
                if (rr) {
                    if (e.relu) normalize_four_rows_half_streamed<true, true>(xr, yr, rr, C, buf);
                    else normalize_four_rows_half_streamed<true, false>(xr, yr, rr, C, buf);
                } else {
                    if (e.relu) normalize_four_rows_half_streamed<false, true>(xr, yr, rr, C, buf);
                    else normalize_four_rows_half_streamed<false, false>(xr, yr, rr, C, buf);
                }
            }
        }
    }
    for (; r < r1; ++r) {
        prefetch_ahead_nlc(x, srx, C, r, r1, ahead);
        prefetch_ahead_nlc((const T*)e.res, e.res_so, C, r, r1, ahead);
        const T* xr = x + r * srx;
        const T* rr = e.res ? (const T*)e.res + r * e.res_so : (const T*)0;
        write_row(y + r * sry, C, e.stream, [&](T* out, idx c0, idx m) FASTBN_LAMBDA_INLINE {
            if (rr) {
                if (e.relu) normalize_row_nlc<T, true, true>(xr, out, rr, C, buf, c0, m);
                else normalize_row_nlc<T, true, false>(xr, out, rr, C, buf, c0, m);
            } else {
                if (e.relu) normalize_row_nlc<T, false, true>(xr, out, 0, C, buf, c0, m);
                else normalize_row_nlc<T, false, false>(xr, out, 0, C, buf, c0, m);
            }
        });
    }
    if (e.stream) stream_fence();
}

#if FASTBN_HAVE_F16C
// sums_rows_nlc's sums for channels [c, c + 16 G) in registers (see normalize_tile_nlc):
// the rows walked once for G groups of 16 channels (a pass per group read each row G
// times), the same additions in the same order per channel. float32, float16 and
// bfloat16 data.
template <class T, bool MASK, int G>
FASTBN_AVX512_TILES void sums_rows_nlc_tile(const T* dy, const T* x, const T* y, idx srdy, idx srx, idx sry, idx c,
                                            idx r0, idx r1, const double* mean, double* sdy, double* sxmu,
                                            NextStrip dy_strip, NextStrip x_strip, NextStrip y_strip) {
    __m512d sg[G][2], sx[G][2], mu[G][2];
    for (int t = 0; t < G; ++t)
        for (int h = 0; h < 2; ++h) {
            sg[t][h] = _mm512_loadu_pd(sdy + c + 16 * t + 8 * h);
            sx[t][h] = _mm512_loadu_pd(sxmu + c + 16 * t + 8 * h);
            mu[t][h] = _mm512_loadu_pd(mean + c + 16 * t + 8 * h);
        }
    idx r = r0;
    for (; r + 2 <= r1; r += 2) {
        for (idx j = 0; j < 2; ++j) {
            dy_strip.ask<T>(r - r0 + j);
            x_strip.ask<T>(r - r0 + j);
            if (MASK) y_strip.ask<T>(r - r0 + j);
        }
        for (int t = 0; t < G; ++t) {
            const idx ct = c + 16 * t;
            const Wide16<T, MASK> ga(dy + r * srdy + ct, MASK ? y + r * sry + ct : y);
            const Wide16<T, MASK> gb(dy + (r + 1) * srdy + ct, MASK ? y + (r + 1) * sry + ct : y);
            const Wide16<T> xa(x + r * srx + ct), xb(x + (r + 1) * srx + ct);
            for (int h = 0; h < 2; ++h) {
                const __m512d a = ga.half(h), b = gb.half(h);
                sg[t][h] = _mm512_add_pd(sg[t][h], _mm512_add_pd(a, b));
                const __m512d pa = _mm512_mul_pd(a, _mm512_sub_pd(xa.half(h), mu[t][h]));
                const __m512d pb = _mm512_mul_pd(b, _mm512_sub_pd(xb.half(h), mu[t][h]));
                sx[t][h] = _mm512_add_pd(sx[t][h], _mm512_add_pd(pa, pb));
            }
        }
    }
    for (; r < r1; ++r)
        for (int t = 0; t < G; ++t) {
            const idx ct = c + 16 * t;
            const Wide16<T, MASK> ga(dy + r * srdy + ct, MASK ? y + r * sry + ct : y);
            const Wide16<T> xa(x + r * srx + ct);
            for (int h = 0; h < 2; ++h) {
                const __m512d a = ga.half(h);
                sg[t][h] = _mm512_add_pd(sg[t][h], a);
                sx[t][h] = _mm512_add_pd(sx[t][h], _mm512_mul_pd(a, _mm512_sub_pd(xa.half(h), mu[t][h])));
            }
        }
    for (int t = 0; t < G; ++t)
        for (int h = 0; h < 2; ++h) {
            _mm512_storeu_pd(sdy + c + 16 * t + 8 * h, sg[t][h]);
            _mm512_storeu_pd(sxmu + c + 16 * t + 8 * h, sx[t][h]);
        }
}
#endif

// The channels [0, C - C % 16) of sums_rows_nlc in register tiles where the CPU has them
// -> the first channel left to the caller's loops.
template <class T, bool MASK>
FASTBN_INLINE idx sums_rows_nlc_in_tiles(const T* dy, const T* x, const T* y, idx srdy, idx srx, idx sry, idx C,
                                         idx r0, idx r1, const double* mean, double* sdy, double* sxmu) {
#if FASTBN_HAVE_F16C
    if constexpr (!std::is_same<T, double>::value) {
        if (!channel_tiles_available() || C < 16) return 0;
        if (std::is_same<T, float>::value && C > TILES_FLOAT_MAX_REDUCE) return 0;
        const idx c_end = C - C % 16;
        for_each_channel_tile(c_end, [&](auto G, auto /*no tail: c_end % 16 == 0*/, idx c, __mmask16) {
            constexpr int g = decltype(G)::value;
            // strips within the chunk only (the next chunk may be another thread's)
            sums_rows_nlc_tile<T, MASK, g>(dy, x, y, srdy, srx, sry, c, r0, r1, mean, sdy, sxmu,
                                           next_strip(dy, srdy, c_end, c, 16 * g, r0, r1, r1),
                                           next_strip(x, srx, c_end, c, 16 * g, r0, r1, r1),
                                           next_strip(MASK ? y : dy, sry, c_end, c, 16 * g, r0, r1, r1));
        });
        return c_end;
    }
#endif
    (void)dy; (void)x; (void)y; (void)srdy; (void)srx; (void)sry; (void)C; (void)r0; (void)r1; (void)mean;
    (void)sdy; (void)sxmu;
    return 0;
}

// float16 rows for sums_rows_nlc: the same sums in the same order (per channel: rows in
// pairs, then a single row), on float pieces of HALF_PIECE / 2 channels.
template <bool MASK>
FASTBN_INLINE void sums_rows_nlc_half(const half* dy, const half* x, const half* y, idx srdy, idx srx, idx sry,
                                      idx C, idx r0, idx r1, const double* __restrict__ mean,
                                      double* __restrict__ sdy, double* __restrict__ sxmu) {
    const idx P = HALF_PIECE / 2;
    alignas(64) float g[2][HALF_PIECE / 2], xf[2][HALF_PIECE / 2], yf[2][MASK ? HALF_PIECE / 2 : 1];
    const HalfConverters& cv = half_converters();
    const idx c_begin = cv.in_registers ? sums_rows_nlc_in_tiles<half, MASK>(dy, x, y, srdy, srx, sry, C, r0, r1,
                                                                             mean, sdy, sxmu)
                                        : 0;
    for (idx c0 = c_begin; c0 < C; c0 += P) {
        const idx n = C - c0 < P ? C - c0 : P;
        idx r = r0;
        for (; r + 2 <= r1; r += 2) {
            for (int k = 0; k < 2; ++k) {
                cv.to_float(dy + (r + k) * srdy + c0, g[k], n);
                cv.to_float(x + (r + k) * srx + c0, xf[k], n);
                if (MASK) cv.to_float(y + (r + k) * sry + c0, yf[k], n);
            }
            for (idx c = 0; c < n; ++c) {
                double a = (double)g[0][c], b = (double)g[1][c];
                if (MASK) {
                    a = yf[0][c] > 0 ? a : 0.0;
                    b = yf[1][c] > 0 ? b : 0.0;
                }
                double mu = mean[c0 + c];
                sdy[c0 + c] += a + b;
                sxmu[c0 + c] += a * ((double)xf[0][c] - mu) + b * ((double)xf[1][c] - mu);
            }
        }
        for (; r < r1; ++r) {
            cv.to_float(dy + r * srdy + c0, g[0], n);
            cv.to_float(x + r * srx + c0, xf[0], n);
            if (MASK) cv.to_float(y + r * sry + c0, yf[0], n);
            for (idx c = 0; c < n; ++c) {
                double gv = (double)g[0][c];
                if (MASK) gv = yf[0][c] > 0 ? gv : 0.0;
                sdy[c0 + c] += gv;
                sxmu[c0 + c] += gv * ((double)xf[0][c] - mean[c0 + c]);
            }
        }
    }
}

// Rows are swept whole (the channels left after the register tiles), four at a time; a
// channel's order of terms is rows in pairs, then a single row, as in the float16 path
// and the tiles. Sweeping 512-channel slices down the rows instead (so that their
// accumulators stayed in L1) was slower, hot and cold: (256, 2048) backward sums, 2
// threads, cold 0.212-0.237 -> 0.197-0.219 ms, hot 0.112 -> 0.108; (256, 4096) cold
// 0.515 -> 0.455; (64, 16384) 0.604 -> 0.538 (one process, the widths alternated).

template <class T, bool MASK>
FASTBN_INLINE void sums_rows_nlc(const T* dy, const T* x, const T* y, idx srdy, idx srx, idx sry, idx C, idx r0,
                                 idx r1, const double* __restrict__ mean, double* __restrict__ sdy,
                                 double* __restrict__ sxmu, bool spread_ahead) {
    if constexpr (is_half<T>()) {
        sums_rows_nlc_half<MASK>(dy, x, y, srdy, srx, sry, C, r0, r1, mean, sdy, sxmu);
        return;
    }
    // float32 rows of 256 B+ (64+ channels) of arrays that are not cache-resident skip the
    // register tiles: the four-row sweeps below, asking for the next rows in memory order
    // (RowsInOrder), came from memory faster. Cold, 2 threads, builds called in turn, both
    // orders: backward sums (100352, 64) 1.26-1.27 -> 1.08-1.11 ms, backward 2.43-2.50 ->
    // 2.23-2.32 ms; (4096, 256) backward 0.297-0.299 -> 0.262-0.264, (8192, 128) 0.295-0.296
    // -> 0.262; rows of 128 B ((200704, 32)) were 10 % slower that way and keep the tiles.
    // The same bits: the tiles add a channel's terms in the same order.
    const bool in_order = std::is_same<T, float>::value && spread_ahead && C * (idx)sizeof(T) >= 256;
    const idx c0 = in_order ? 0 : sums_rows_nlc_in_tiles<T, MASK>(dy, x, y, srdy, srx, sry, C, r0, r1, mean, sdy, sxmu);
    if (c0 < C) {
        const idx n = C - c0;
        const T* dyt = dy + c0;
        const T* xt = x + c0;
        const T* yt = MASK ? y + c0 : (const T*)0;
        const double* __restrict__ mt = mean + c0;
        double* __restrict__ st = sdy + c0;
        double* __restrict__ qt = sxmu + c0;
        const RowsAhead ahead = RowsAhead::of<T>(n);
        idx r = r0;
        // four rows per sweep over the channels: a quarter of the accumulator loads and
        // stores; a channel's terms are still added a pair of rows at a time, in row
        // order, so the bits are those of two-row sweeps
        // float32 rows of arrays that are not cache-resident (in_order) ask for the next
        // sweep's rows as the sweep goes (RowsInOrder), instead of whole rows at its start
        // (a burst of 128+ requests per row). Builds called in turn, cold, 2 threads, when
        // the requests went a line of each row per step: (256,2048) backward 0.168-0.176 ->
        // 0.161-0.168 ms, (512,1024) 0.165 -> 0.160, (64,16384) 0.627 -> 0.600; float64 rows
        // were slower that way ((256,2048) 0.338-0.352 -> 0.364-0.371) and within 2 % in
        // memory order, so they do not ask; hot (32,2048), below the size: unchanged.
        // Same bits.
        const idx line = 64 / (idx)sizeof(T);
        for (; r + 4 <= r1; r += 4) {
            if (!in_order)
                for (idx j = 1; j < 4; j += 2) {
                    prefetch_ahead_nlc(dyt, srdy, n, r + j, r1, ahead);
                    prefetch_ahead_nlc(xt, srx, n, r + j, r1, ahead);
                    if (MASK) prefetch_ahead_nlc(yt, sry, n, r + j, r1, ahead);
                }
            const T* __restrict__ g0 = dyt + r * srdy;
            const T* __restrict__ g1 = g0 + srdy;
            const T* __restrict__ g2 = g1 + srdy;
            const T* __restrict__ g3 = g2 + srdy;
            const T* __restrict__ x0 = xt + r * srx;
            const T* __restrict__ x1 = x0 + srx;
            const T* __restrict__ x2 = x1 + srx;
            const T* __restrict__ x3 = x2 + srx;
            const T* y0 = MASK ? yt + r * sry : (const T*)0;
            const T* y1 = MASK ? y0 + sry : (const T*)0;
            const T* y2 = MASK ? y1 + sry : (const T*)0;
            const T* y3 = MASK ? y2 + sry : (const T*)0;
            auto channels = [&](idx c0, idx c1) FASTBN_LAMBDA_INLINE {
                for (idx c = c0; c < c1; ++c) {
                    const double a = masked_grad<T, MASK>(g0, y0, c), b = masked_grad<T, MASK>(g1, y1, c);
                    const double d = masked_grad<T, MASK>(g2, y2, c), e = masked_grad<T, MASK>(g3, y3, c);
                    const double mu = mt[c];
                    double sg = st[c], sq = qt[c];
                    sg += a + b;
                    sq += a * (to_double(x0[c]) - mu) + b * (to_double(x1[c]) - mu);
                    sg += d + e;
                    sq += d * (to_double(x2[c]) - mu) + e * (to_double(x3[c]) - mu);
                    st[c] = sg;
                    qt[c] = sq;
                }
            };
            if (in_order && r + 4 + SPREAD_ROWS <= r1) {
                RowsInOrder<T> next_g(g0 + 4 * srdy, srdy, 0, n), next_x(x0 + 4 * srx, srx, 0, n);
                RowsInOrder<T> next_y(MASK ? y0 + 4 * sry : g0, sry, 0, n);
                sweep_asking_ahead(0, n, line, [&](idx) FASTBN_LAMBDA_INLINE {
                    next_g.ask();
                    next_x.ask();
                    if (MASK) next_y.ask();
                }, channels);
            } else {
                channels(0, n);
            }
        }
        for (; r + 2 <= r1; r += 2) {
            prefetch_ahead_nlc(dyt, srdy, n, r + 1, r1, ahead);
            prefetch_ahead_nlc(xt, srx, n, r + 1, r1, ahead);
            if (MASK) prefetch_ahead_nlc(yt, sry, n, r + 1, r1, ahead);
            const T* __restrict__ g0 = dyt + r * srdy;
            const T* __restrict__ g1 = g0 + srdy;
            const T* __restrict__ x0 = xt + r * srx;
            const T* __restrict__ x1 = x0 + srx;
            const T* y0 = MASK ? yt + r * sry : (const T*)0;
            const T* y1 = MASK ? y0 + sry : (const T*)0;
            for (idx c = 0; c < n; ++c) {
                double a = masked_grad<T, MASK>(g0, y0, c), b = masked_grad<T, MASK>(g1, y1, c);
                st[c] += a + b;
                qt[c] += a * (to_double(x0[c]) - mt[c]) + b * (to_double(x1[c]) - mt[c]);
            }
        }
        for (; r < r1; ++r) {
            const T* g = dyt + r * srdy;
            const T* xr = xt + r * srx;
            const T* yr = MASK ? yt + r * sry : (const T*)0;
            for (idx c = 0; c < n; ++c) {
                double gv = masked_grad<T, MASK>(g, yr, c);
                st[c] += gv;
                qt[c] += gv * (to_double(xr[c]) - mt[c]);
            }
        }
    }
}

// Per-channel sum(g) and sum(g*(x-mean)) over rows [r0, r1), written to sdy/sxmu.
template <class T>
FASTBN_CLONES void chunk_sums_nlc(const T* dy, const T* x, idx srdy, idx srx, idx C, idx r0, idx r1,
                                  const double* mean, double* sdy, double* sxmu, Activation act,
                                  bool spread_ahead) {
    for (idx c = 0; c < C; ++c) { sdy[c] = 0; sxmu[c] = 0; }
    if (act.y)
        sums_rows_nlc<T, true>(dy, x, (const T*)act.y, srdy, srx, act.y_so, C, r0, r1, mean, sdy, sxmu,
                               spread_ahead);
    else sums_rows_nlc<T, false>(dy, x, 0, srdy, srx, 0, C, r0, r1, mean, sdy, sxmu, spread_ahead);
}

// Channels [c0, c0 + m) of a row (g, x, y, dr all start at channel 0), dx to d[0..m).
template <class T, bool MASK, bool DRES, bool FROZEN>
FASTBN_INLINE void backward_row_nlc(const T* g, const T* x, const T* y, T* d, T* dr, idx C, const void* buf,
                                    idx c0, idx m) {
    typedef typename compute_of<T>::type CT;
    // the constants live in a scratch buffer that no data array overlaps
    const CT* __restrict__ mh = (const CT*)buf + c0;
    const CT* __restrict__ ml = mh + C;
    const CT* __restrict__ ka = mh + 2 * C;
    const CT* __restrict__ kb = mh + 3 * C;
    const CT* __restrict__ kc = mh + 4 * C;
    g += c0;
    x += c0;
    if (MASK) y += c0;
    if (DRES) dr += c0;
    if constexpr (is_half<T>()) {  // float pieces (F16C where present), same arithmetic
        alignas(64) float gf[HALF_PIECE], df[HALF_PIECE], xf[FROZEN ? 1 : HALF_PIECE];
        alignas(64) float yf[MASK ? HALF_PIECE : 1];
        const HalfConverters& cv = half_converters();
#if FASTBN_HAVE_F16C
        if (cv.in_registers) {
            backward_row_nlc_half_in_registers<MASK, DRES, FROZEN>(g, x, y, d, dr, mh, ml, ka, kb, kc, m);
            return;
        }
#endif
        for (idx i = 0; i < m; i += HALF_PIECE) {
            idx n = m - i < HALF_PIECE ? m - i : HALF_PIECE;
            cv.to_float(g + i, gf, n);
            if (!FROZEN) cv.to_float(x + i, xf, n);
            if (MASK) cv.to_float(y + i, yf, n);
            for (idx c = 0; c < n; ++c) {
                float gv = gf[c];
                if (MASK) gv = yf[c] > 0 ? gv : 0.0f;
                gf[c] = gv;
                if (FROZEN) {
                    df[c] = gv * ka[i + c];
                } else {
                    float xm = (xf[c] - mh[i + c]) - ml[i + c];
                    df[c] = (gv * ka[i + c] + xm * kb[i + c]) + kc[i + c];
                }
            }
            cv.to_half(df, d + i, n);
            if (DRES) cv.to_half(gf, dr + i, n);
        }
        return;
    }
    for (idx c = 0; c < m; ++c) {
        CT gv = to_compute(g[c]);
        if (MASK) gv = to_compute(y[c]) > 0 ? gv : (CT)0;
        if (DRES) store(dr + c, gv);
        if (FROZEN) {
            store(d + c, gv * ka[c]);
        } else {
            CT xm = (to_compute(x[c]) - mh[c]) - ml[c];
            store(d + c, (gv * ka[c] + xm * kb[c]) + kc[c]);
        }
    }
}

template <class T, bool FROZEN>
FASTBN_INLINE void backward_row_nlc_any(const T* g, const T* x, const T* y, T* d, T* dr, idx C, const void* buf,
                                        idx c0, idx m) {
    if (!y) backward_row_nlc<T, false, false, FROZEN>(g, x, y, d, dr, C, buf, c0, m);
    else if (!dr) backward_row_nlc<T, true, false, FROZEN>(g, x, y, d, dr, C, buf, c0, m);
    else backward_row_nlc<T, true, true, FROZEN>(g, x, y, d, dr, C, buf, c0, m);
}

// Four rows [r, r + 4) at once, channels [c0, c0 + m) (no fused ReLU, statistics not
// frozen), dx written to d0..d3, as normalize_four_rows_nlc: a channel's five constants
// loaded once for four rows; the same arithmetic.
template <class T>
FASTBN_INLINE void backward_four_rows_nlc(const T* g, idx srg, const T* x, idx srx, T* d0, T* d1, T* d2, T* d3,
                                          idx C, const void* buf, idx c0, idx m) {
    typedef typename compute_of<T>::type CT;
    const CT* __restrict__ mh = (const CT*)buf + c0;
    const CT* __restrict__ ml = mh + C;
    const CT* __restrict__ ka = mh + 2 * C;
    const CT* __restrict__ kb = mh + 3 * C;
    const CT* __restrict__ kc = mh + 4 * C;
    const T* g0 = g + c0;
    const T* g1 = g0 + srg;
    const T* g2 = g1 + srg;
    const T* g3 = g2 + srg;
    const T* x0 = x + c0;
    const T* x1 = x0 + srx;
    const T* x2 = x1 + srx;
    const T* x3 = x2 + srx;
#pragma GCC ivdep
    for (idx c = 0; c < m; ++c) {
        const CT a = mh[c], b = ml[c], p = ka[c], q = kb[c], k = kc[c];
        store(d0 + c, (to_compute(g0[c]) * p + ((to_compute(x0[c]) - a) - b) * q) + k);
        store(d1 + c, (to_compute(g1[c]) * p + ((to_compute(x1[c]) - a) - b) * q) + k);
        store(d2 + c, (to_compute(g2[c]) * p + ((to_compute(x2[c]) - a) - b) * q) + k);
        store(d3 + c, (to_compute(g3[c]) * p + ((to_compute(x3[c]) - a) - b) * q) + k);
    }
}

// float16, four contiguous rows of at most HALF_PIECE / 4 channels (as
// normalize_four_rows_half_streamed): dx of backward_four_rows_nlc, streamed.
FASTBN_INLINE void backward_four_rows_half_streamed(const half* g, const half* x, half* dx, idx C, const void* buf) {
    alignas(64) float gf[HALF_PIECE], xf[HALF_PIECE], df[HALF_PIECE];
    alignas(64) half out[HALF_PIECE];
    const HalfConverters& cv = half_converters();
    const idx n = 4 * C;
#if FASTBN_HAVE_F16C
    if (cv.in_registers) {
        const float* mh = (const float*)buf;
        for (idx j = 0; j < 4; ++j)
            backward_row_nlc_half_in_registers<false, false, false>(g + j * C, x + j * C, nullptr, out + j * C,
                                                                    nullptr, mh, mh + C, mh + 2 * C, mh + 3 * C,
                                                                    mh + 4 * C, C);
        stream_copy(dx, out, (size_t)n * sizeof(half));
        return;
    }
#endif
    cv.to_float(g, gf, n);
    cv.to_float(x, xf, n);
    backward_four_rows_nlc<float>(gf, C, xf, C, df, df + C, df + 2 * C, df + 3 * C, C, buf, 0, C);
    cv.to_half(df, out, n);
    stream_copy(dx, out, (size_t)n * sizeof(half));
}

// ---------------------------------------------------------------- backward in channel tiles
#if FASTBN_HAVE_F16C
// dx over channels [c, c + 16 (G - 1) + popcount(k)) of rows [r0, r1), row r of dx written
// at d + (r - d_r0) * srd, constants from prepare_channel_constants(mean, a, b, c) in
// registers (see normalize_tile_nlc): backward_row_nlc's arithmetic, the same bits.
template <class T, int G, bool TAIL, bool MASK, bool DRES, bool FROZEN>
FASTBN_AVX512_TILES void backward_tile_nlc(const T* dy, idx srg, const T* x, idx srx, const T* y, idx sry,
                                           T* dres, idx srr, T* d, idx srd, idx d_r0, idx C, const float* buf,
                                           idx c, __mmask16 k, idx r0, idx r1, idx r_end, RowsAhead ahead) {
    __m512 mh[G], ml[G], ka[G], kb[G], kc[G];
    load_tile_constants<TAIL, G>(buf, C, c, k, 2, ka);
    if (!FROZEN) {
        load_tile_constants<TAIL, G>(buf, C, c, k, 0, mh);
        load_tile_constants<TAIL, G>(buf, C, c, k, 1, ml);
        load_tile_constants<TAIL, G>(buf, C, c, k, 3, kb);
        load_tile_constants<TAIL, G>(buf, C, c, k, 4, kc);
    }
    for (idx r = r0; r < r1; ++r) {
        if (ahead.rows) {
            prefetch_ahead_nlc(dy, srg, C, r, r_end, ahead);
            prefetch_ahead_nlc(FROZEN ? (const T*)0 : x, srx, C, r, r_end, ahead);
            prefetch_ahead_nlc(MASK ? y : (const T*)0, sry, C, r, r_end, ahead);
        }
        const T* gr = dy + r * srg + c;
        const T* xr = x + r * srx + c;
        const T* yr = MASK ? y + r * sry + c : y;
        T* rr = DRES ? dres + r * srr + c : dres;
        T* dr = d + (r - d_r0) * srd + c;
#pragma GCC unroll 4
        for (int g = 0; g < G; ++g) {
            // frozen statistics use a alone (the other vectors are not loaded)
            const __m512 b = FROZEN ? ka[g] : kb[g], cc = FROZEN ? ka[g] : kc[g];
            const __m512 h = FROZEN ? ka[g] : mh[g], l = FROZEN ? ka[g] : ml[g];
            backward16<T, MASK, DRES, FROZEN>(gr + 16 * g, xr + 16 * g, MASK ? yr + 16 * g : yr, dr + 16 * g,
                                              DRES ? rr + 16 * g : rr, ka[g], b, cc, h, l, TAIL && g == G - 1, k);
        }
    }
}

template <class T, bool MASK, bool DRES, bool FROZEN>
FASTBN_AVX512_TILES void backward_tiles_nlc(const T* dy, idx srg, const T* x, idx srx, const T* y, idx sry,
                                            T* dres, idx srr, T* dx, idx srd, idx C, idx r0, idx r1,
                                            const void* buf, bool stream) {
    const float* consts = (const float*)buf;
    const RowsAhead ahead = RowsAhead::of<T>(C);
    walk_tile_blocks(dx, srd, C, r0, r1, stream, [&](T* out, idx so, idx out_r0, idx rb, idx re) FASTBN_LAMBDA_INLINE {
        bool first = true;
        for_each_channel_tile(C, [&](auto G, auto tail, idx c, __mmask16 k) FASTBN_LAMBDA_INLINE {
            backward_tile_nlc<T, decltype(G)::value, decltype(tail)::value, MASK, DRES, FROZEN>(
                dy, srg, x, srx, y, sry, dres, srr, out, so, out_r0, C, consts, c, k, rb, re, r1, first ? ahead : RowsAhead{0});
            first = false;
        });
    });
}

template <class T, bool FROZEN>
FASTBN_INLINE void backward_tiles_nlc_any(const T* dy, idx srg, const T* x, idx srx, T* dx, idx srd, idx C,
                                          idx r0, idx r1, const void* buf, const Activation& act) {
    const T* y = (const T*)act.y;
    T* dres = (T*)act.dres;
    if (!y) backward_tiles_nlc<T, false, false, FROZEN>(dy, srg, x, srx, y, 0, dres, 0, dx, srd, C, r0, r1, buf, act.stream);
    else if (!dres) backward_tiles_nlc<T, true, false, FROZEN>(dy, srg, x, srx, y, act.y_so, dres, 0, dx, srd, C, r0, r1, buf, act.stream);
    else backward_tiles_nlc<T, true, true, FROZEN>(dy, srg, x, srx, y, act.y_so, dres, act.dres_so, dx, srd, C, r0, r1, buf, act.stream);
}
#endif

// Whether backward_tiles_nlc ran the pass (false: the caller's loops run it).
template <class T>
FASTBN_INLINE bool backward_nlc_in_tiles(const T* dy, const T* x, T* dx, idx srdy, idx srx, idx srdx, idx C, idx r0,
                                         idx r1, const void* buf, bool frozen, const Activation& act) {
#if FASTBN_HAVE_F16C
    if (!tiles_take<T>(C, act.stream)) return false;
    if constexpr (!std::is_same<T, double>::value) {
        if (frozen) backward_tiles_nlc_any<T, true>(dy, srdy, x, srx, dx, srdx, C, r0, r1, buf, act);
        else backward_tiles_nlc_any<T, false>(dy, srdy, x, srx, dx, srdx, C, r0, r1, buf, act);
        if (act.stream) stream_fence();
        return true;
    }
#endif
    (void)dy; (void)x; (void)dx; (void)srdy; (void)srx; (void)srdx; (void)C; (void)r0; (void)r1; (void)buf;
    (void)frozen; (void)act;
    return false;
}

#if FASTBN_HAVE_F16C
// n values of dx of float32 channels-last rows that follow each other (row stride C
// everywhere), streamed from registers: a flat run, each vector with its columns'
// constants (ChannelColumns; see normalize_nlc).
FASTBN_INLINE void backward_flat_run_nlc(const float* g, const float* x, const float* y, float* d, float* dr, idx n,
                                         idx C, const float* k, bool frozen) {
    with_backward_mode(y, dr, frozen, [&](auto mask, auto dres, auto fz) FASTBN_LAMBDA_INLINE {
        stream_run(d, n, BackwardRun<float, decltype(mask)::value, decltype(dres)::value, decltype(fz)::value,
                                     ChannelColumns<5>>{g, x, y, dr, ChannelColumns<5>{k, C, 0}});
    });
}
#endif

// dx over rows [r0, r1); constants from prepare_channel_constants(mean, a, b, c).
template <class T>
FASTBN_CLONES void backward_elementwise_nlc(const T* dy, const T* x, T* dx, idx srdy, idx srx, idx srdx, idx C,
                                            idx r0, idx r1, const void* buf, bool frozen, Activation act) {
#if FASTBN_HAVE_F16C
    // float32 rows that follow each other, streamed: one flat run from registers (see
    // normalize_nlc).
    if constexpr (std::is_same<T, float>::value) {
        if (act.stream && C >= 16 && srdy == C && srx == C && srdx == C && (!act.y || act.y_so == C) &&
            (!act.dres || act.dres_so == C) && rows_stream_from_registers<T>(dx)) {
            backward_flat_run_nlc(dy + r0 * C, x + r0 * C, act.y ? (const T*)act.y + r0 * C : (const T*)0,
                                  dx + r0 * C, act.dres ? (T*)act.dres + r0 * C : (T*)0, (r1 - r0) * C, C,
                                  (const float*)buf, frozen);
            stream_fence();
            return;
        }
    }
#endif
    if (backward_nlc_in_tiles(dy, x, dx, srdy, srx, srdx, C, r0, r1, buf, frozen, act)) return;
    const RowsAhead ahead = RowsAhead::of<T>(C);
    idx r = r0;
    if constexpr (!is_half<T>()) {
        // Four rows at a time (see normalize_nlc): streamed dx through L1 staging (cold
        // (100352, 64) float32, 2 threads, called in turn in one process: 3.28-3.40 ->
        // 3.02-3.16 ms), or wide rows in place (cold (256, 2048) float32, 2 threads:
        // 0.271-0.277 -> 0.248-0.262 ms).
        if (act.strips && !frozen && !act.y && !act.dres && !act.stream && C >= WIDE_NLC_CHANNELS) {
            // a strip of channels at a time (see normalize_strips_nlc): cold (256, 2048)
            // float32 backward, 2 threads, builds called in turn: 0.144-0.159 ->
            // 0.137-0.158 ms; the pass alone on cold inputs 0.113 -> 0.098-0.099 ms
            walk_channel_strips<T>(C, r0, r1, [&](idx rs, idx c0, idx m) FASTBN_LAMBDA_INLINE {
                T* d0 = dx + rs * srdx + c0;
                backward_four_rows_nlc(dy + rs * srdy, srdy, x + rs * srx, srx, d0, d0 + srdx, d0 + 2 * srdx,
                                       d0 + 3 * srdx, C, buf, c0, m);
            }, [&](idx rs, idx c0, idx m) FASTBN_LAMBDA_INLINE {
                backward_row_nlc<T, false, false, false>(dy + rs * srdy, x + rs * srx, nullptr, dx + rs * srdx + c0,
                                                         nullptr, C, buf, c0, m);
            });
            return;
        }
        if (!frozen && !act.y && !act.dres && (act.stream || C >= WIDE_NLC_CHANNELS)) {
            for (; r + 4 <= r1; r += 4) {
                for (idx j = 0; j < 4; ++j) {
                    prefetch_ahead_nlc(dy, srdy, C, r + j, r1, ahead);
                    prefetch_ahead_nlc(x, srx, C, r + j, r1, ahead);
                }
                const T* g = dy + r * srdy;
                const T* xr = x + r * srx;
                T* d0 = dx + r * srdx;
                if (act.stream)
                    stream_four_rows(d0, srdx, C, [&](T* s0, T* s1, T* s2, T* s3, idx c0, idx m) FASTBN_LAMBDA_INLINE {
                        backward_four_rows_nlc(g, srdy, xr, srx, s0, s1, s2, s3, C, buf, c0, m);
                    });
                else
                    backward_four_rows_nlc(g, srdy, xr, srx, d0, d0 + srdx, d0 + 2 * srdx, d0 + 3 * srdx, C, buf, 0, C);
            }
        }
    }
    if constexpr (is_half<T>()) {
        if (act.stream && !frozen && !act.y && !act.dres && 4 * C <= HALF_PIECE && srdy == C && srx == C &&
            srdx == C) {
            for (; r + 4 <= r1; r += 4) {
                for (idx j = 0; j < 4; ++j) {
                    prefetch_ahead_nlc(dy, srdy, C, r + j, r1, ahead);
                    prefetch_ahead_nlc(x, srx, C, r + j, r1, ahead);
                }
                backward_four_rows_half_streamed(dy + r * C, x + r * C, dx + r * C, C, buf);
            }
        }
    }
    for (; r < r1; ++r) {
        prefetch_ahead_nlc(dy, srdy, C, r, r1, ahead);
        if (!frozen) prefetch_ahead_nlc(x, srx, C, r, r1, ahead);
        prefetch_ahead_nlc((const T*)act.y, act.y_so, C, r, r1, ahead);
        const T* g = dy + r * srdy;
        const T* xr = x + r * srx;
        const T* y = act.y ? (const T*)act.y + r * act.y_so : (const T*)0;
        T* dr = act.dres ? (T*)act.dres + r * act.dres_so : (T*)0;
        write_row(dx + r * srdx, C, act.stream, [&](T* out, idx c0, idx m) FASTBN_LAMBDA_INLINE {
            if (frozen) backward_row_nlc_any<T, true>(g, xr, y, out, dr, C, buf, c0, m);
            else backward_row_nlc_any<T, false>(g, xr, y, out, dr, C, buf, c0, m);
        });
    }
    if (act.stream) stream_fence();
}


// ---------------------------------------------------------------- memory floor (benchmarks)
// Passes with a batch-norm call's memory traffic and next to no arithmetic, for
// benchmarks/compare.py: the time the bytes alone take on this machine, in the same loop
// as the libraries. Bytes [b0, b1) of each array: a read (an xor of 8-byte words, kept so
// that the loads are not dropped), or out = a ^ b (b NULL: a copy), with 16-byte streaming
// stores (the stores of the streamed outputs above) or ordinary ones.
FASTBN_INLINE uint64_t floor_read_span(const unsigned char* a, idx b0, idx b1) {
    idx i = b0;
    uint64_t r = 0;
#if FASTBN_HAVE_STREAM
    __m128i acc[4] = {_mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128(), _mm_setzero_si128()};
    for (; i + 64 <= b1; i += 64)
        for (int k = 0; k < 4; ++k) acc[k] = _mm_xor_si128(acc[k], _mm_loadu_si128((const __m128i*)(a + i + 16 * k)));
    alignas(16) uint64_t w[2];
    _mm_store_si128((__m128i*)w, _mm_xor_si128(_mm_xor_si128(acc[0], acc[1]), _mm_xor_si128(acc[2], acc[3])));
    r = w[0] ^ w[1];
#endif
    for (; i + 8 <= b1; i += 8) {
        uint64_t w8;
        std::memcpy(&w8, a + i, 8);
        r ^= w8;
    }
    for (; i < b1; ++i) r ^= a[i];
    return r;
}

// Ordinary stores of out = a ^ b (b NULL: a copy of a) over bytes [b0, b1).
FASTBN_INLINE void floor_store_plain(const unsigned char* a, const unsigned char* b, unsigned char* out, idx b0,
                                     idx b1) {
    idx i = b0;
    if (b) {
        for (; i + 8 <= b1; i += 8) {
            uint64_t u, v;
            std::memcpy(&u, a + i, 8);
            std::memcpy(&v, b + i, 8);
            u ^= v;
            std::memcpy(out + i, &u, 8);
        }
        for (; i < b1; ++i) out[i] = a[i] ^ b[i];
    } else {
        std::memcpy(out + i, a + i, (size_t)(b1 - i));
    }
}

// floor_write's stores without the closing fence (one piece of a pass). Streamed: whole
// 64-byte lines only, the partial lines at either end with ordinary stores, as the
// passes' streamed runs (stream_copy_run): a line streamed in parts is slow.
FASTBN_INLINE void floor_write_span(const unsigned char* a, const unsigned char* b, unsigned char* out, idx b0,
                                    idx b1, bool stream) {
    idx i = b0;
#if FASTBN_HAVE_STREAM
    if (stream) {
        const idx mis = (idx)((uintptr_t)(out + i) & 63);
        const idx first = mis ? i + 64 - mis : i;
        if (first + 64 <= b1) {
            floor_store_plain(a, b, out, i, first);
            for (i = first; i + 64 <= b1; i += 64)
                for (int k = 0; k < 64; k += 16) {
                    __m128i v = _mm_loadu_si128((const __m128i*)(a + i + k));
                    if (b) v = _mm_xor_si128(v, _mm_loadu_si128((const __m128i*)(b + i + k)));
                    _mm_stream_si128((__m128i*)(out + i + k), v);
                }
        }
    }
#endif
    floor_store_plain(a, b, out, i, b1);
}

FASTBN_CLONES uint64_t floor_read(const unsigned char* a, idx b0, idx b1) { return floor_read_span(a, b0, b1); }

FASTBN_CLONES void floor_write(const unsigned char* a, const unsigned char* b, unsigned char* out, idx b0, idx b1,
                               bool stream) {
    floor_write_span(a, b, out, b0, b1, stream);
    if (stream) stream_fence();
}

// The access pattern of the fused per-channel passes (train_forward_channel_nc,
// backward_channel_nc; with short rows, the channel blocks of backward_channels_nc and
// train_forward_channels_nc) with next to no arithmetic: blocks [u0, u1) of `block`
// adjacent channels of (outer, C, inner_bytes) byte arrays (block 1: one channel). Each
// block's rows of a (and b unless NULL) are read a piece at a time (ask_ahead: asking
// for the bytes STATS_PREFETCH_AHEAD past it, as the statistics do on long rows), then
// out = a ^ b (or a copy) is written from cache from the last row back, in
// for_each_row_piece's pieces, each asking for the same piece of the next block: what the
// bytes alone take in the order those passes must move them (a channel's reduction before
// its writes). Returns the reads' xor.
FASTBN_CLONES uint64_t floor_fused_channels(const unsigned char* a, const unsigned char* b, unsigned char* out,
                                            idx outer, idx C, idx inner_bytes, idx block, idx u0, idx u1,
                                            bool ask_ahead, bool stream) {
    const idx so = C * inner_bytes, piece = STREAM_PIECE * (idx)sizeof(float);
    uint64_t r = 0;
    for (idx u = u0; u < u1; ++u) {
        const idx c0 = u * block, c1 = c0 + block < C ? c0 + block : C;
        const idx base = c0 * inner_bytes, run = (c1 - c0) * inner_bytes;
        for (idx row = 0; row < outer; ++row)
            for (idx i = 0; i < run; i += piece) {
                const idx end = run - i < piece ? run : i + piece;
                const idx off = base + row * so;
                if (ask_ahead) prefetch_past(a + off + i, end - i);
                r ^= floor_read_span(a + off, i, end);
                if (b) {
                    if (ask_ahead) prefetch_past(b + off + i, end - i);
                    r ^= floor_read_span(b + off, i, end);
                }
            }
        const unsigned char* a_next = u + 1 < u1 ? a + base + run : nullptr;
        const unsigned char* b_next = b && u + 1 < u1 ? b + base + run : nullptr;
        for (idx row = outer - 1; row >= 0; --row) {
            const idx off = base + row * so;
            for_each_row_piece(out + off, 0, run, a_next != nullptr, [&](idx p0, idx p1) FASTBN_LAMBDA_INLINE {
                prefetch_next_channel_row(a_next, so, row, p0, p1);
                prefetch_next_channel_row(b_next, so, row, p0, p1);
                floor_write_span(a + off, b ? b + off : nullptr, out + off, p0, p1, stream);
            });
        }
    }
    if (stream) stream_fence();
    return r;
}

// The access pattern of the channels-last passes (nlc statistics or backward sums over
// every row, then the outputs from the same rows again; short NC rows walked as columns)
// with next to no arithmetic, in pieces of `piece` bytes (the passes' row chunks): the
// first pass reads pieces [k0, k1) of a (and b unless NULL) and returns their xor ...
FASTBN_CLONES uint64_t floor_pieces_read(const unsigned char* a, const unsigned char* b, idx n, idx piece, idx k0,
                                         idx k1) {
    uint64_t r = 0;
    for (idx k = k0; k < k1; ++k) {
        const idx b0 = k * piece, b1 = b0 + piece < n ? b0 + piece : n;
        r ^= floor_read_span(a, b0, b1);
        if (b) r ^= floor_read_span(b, b0, b1);
    }
    return r;
}

// ... the second writes them (out = a ^ b, or a copy), the last piece first where
// most_recent_first (as the training forward walks back over the rows it reduced).
FASTBN_CLONES void floor_pieces_write(const unsigned char* a, const unsigned char* b, unsigned char* out, idx n,
                                      idx piece, idx k0, idx k1, bool most_recent_first, bool stream) {
    for (idx k = k0; k < k1; ++k) {
        const idx kk = most_recent_first ? k1 - 1 - (k - k0) : k;
        const idx b0 = kk * piece, b1 = b0 + piece < n ? b0 + piece : n;
        floor_write_span(a, b, out, b0, b1, stream);
    }
    if (stream) stream_fence();
}

}  // namespace fastbn
