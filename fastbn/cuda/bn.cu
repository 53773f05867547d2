// fastbn's CUDA kernels (CuPy RawModule, compiled lazily with NVRTC; see
// fastbn/_backend_cupy.py). Templates over the data type T: float, double, fbn_half
// (IEEE binary16 as raw bits, converted with PTX cvt so no CUDA header is needed).
// Statistics and per-channel sums accumulate in double (a Welford/Chan merge tree of
// fixed shape: the same bits for the same launch, whatever the GPU); elementwise passes
// compute in float for float/half data and in double for double data.
//
// Arrays are 3-D views (outer, C, inner) with element strides (so, sc, si): element j of
// channel c (0 <= j < outer*inner) sits at (j / inner)*so + c*sc + (j % inner)*si.
// Every index is 64-bit. Kernels use full-mask warp shuffles and barriers that every
// thread of the block reaches.

#define FBN_THREADS 256
#define FBN_WARPS (FBN_THREADS / 32)

typedef long long i64;

struct fbn_half { unsigned short bits; };

template <class T> struct fbn_compute { typedef float type; };
template <> struct fbn_compute<double> { typedef double type; };

__device__ __forceinline__ float fbn_load(const float* p) { return *p; }
__device__ __forceinline__ double fbn_load(const double* p) { return *p; }
// FBN_CPU_EMULATION: the same source compiled as C++ for the CPU emulation tests.
__device__ __forceinline__ float fbn_load(const fbn_half* p) {
#ifdef FBN_CPU_EMULATION
    return fbn_emu_half_to_float(p->bits);
#else
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(p->bits));
    return f;
#endif
}
__device__ __forceinline__ void fbn_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void fbn_store(double* p, double v) { *p = v; }
__device__ __forceinline__ void fbn_store(fbn_half* p, float v) {
#ifdef FBN_CPU_EMULATION
    p->bits = fbn_emu_float_to_half(v);
#else
    unsigned short h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(v));
    p->bits = h;
#endif
}

// ------------------------------------------------------------------ Chan merges
struct fbn_moments { double n, mean, m2; };

__device__ __forceinline__ fbn_moments fbn_merge(fbn_moments a, fbn_moments b) {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    double n = a.n + b.n, d = b.mean - a.mean;
    fbn_moments r;
    r.n = n;
    // an Inf or NaN mean: the sum of the means, as a plain sum gives (Inf + finite =
    // Inf, Inf - Inf = NaN), and M2 NaN -- the CPU core's rule (merge_into); selects,
    // not branches (a branch here made ptxas spill in the finalize kernel)
    const bool finite = d * 0.0 == 0.0;
    const double mean = a.mean + d * (b.n / n), m2 = a.m2 + (b.m2 + (d * d) * (a.n * b.n / n));
    r.mean = finite ? mean : a.mean + b.mean;
    r.m2 = finite ? m2 : d * 0.0;
    return r;
}

// One element into a thread's Welford accumulator (non-finite values as fbn_merge).
__device__ __forceinline__ void fbn_welford_add(fbn_moments& acc, double v) {
    acc.n += 1;
    double d = v - acc.mean;
    if (d * 0.0 == 0.0) {
        acc.mean += d / acc.n;
        acc.m2 += d * (v - acc.mean);
    } else {
        acc.mean += v;
        acc.m2 = d * 0.0;
    }
}

// Merge the moments of all threads of the block; the result is valid in thread 0.
__device__ fbn_moments fbn_block_merge(fbn_moments m) {
    __shared__ double sh[3][FBN_WARPS];
    for (int off = 16; off > 0; off >>= 1) {
        fbn_moments o;
        o.n = __shfl_down_sync(0xffffffffu, m.n, off);
        o.mean = __shfl_down_sync(0xffffffffu, m.mean, off);
        o.m2 = __shfl_down_sync(0xffffffffu, m.m2, off);
        m = fbn_merge(m, o);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sh[0][warp] = m.n;
        sh[1][warp] = m.mean;
        sh[2][warp] = m.m2;
    }
    __syncthreads();
    fbn_moments total = {0, 0, 0};
    if (threadIdx.x == 0)
        for (int w = 0; w < FBN_WARPS; ++w) {
            fbn_moments p = {sh[0][w], sh[1][w], sh[2][w]};
            total = fbn_merge(total, p);
        }
    return total;
}

__device__ void fbn_block_sum2(double& a, double& b) {
    __shared__ double sh[2][FBN_WARPS];
    for (int off = 16; off > 0; off >>= 1) {
        a += __shfl_down_sync(0xffffffffu, a, off);
        b += __shfl_down_sync(0xffffffffu, b, off);
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) {
        sh[0][warp] = a;
        sh[1][warp] = b;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        a = 0;
        b = 0;
        for (int w = 0; w < FBN_WARPS; ++w) {
            a += sh[0][w];
            b += sh[1][w];
        }
    }
}

// (o, c, i) of the flat element index e = (o*C + c)*inner + i, advanced by a fixed
// step (the grid-stride) with no 64-bit division per element: c + step_c + carry is
// below 2*C, so one subtraction carries it.
struct fbn_index {
    i64 o, c, i, step_o, step_c, step_i;
    __device__ __forceinline__ fbn_index(i64 e, i64 step, i64 C, i64 inner) {
        i64 q = e / inner, sq = step / inner;
        i = e - q * inner;
        o = q / C;
        c = q - o * C;
        step_i = step - sq * inner;
        step_o = sq / C;
        step_c = sq - step_o * C;
    }
    __device__ __forceinline__ void advance(i64 C, i64 inner) {
        i += step_i;
        i64 carry = 0;
        if (i >= inner) {
            i -= inner;
            carry = 1;
        }
        c += step_c + carry;
        if (c >= C) {
            c -= C;
            ++o;
        }
        o += step_o;
    }
};

// ------------------------------------------------------------------ statistics
// grid (C, splits): block (c, s) reduces elements [s*chunk, (s+1)*chunk) of channel c;
// per-thread Welford, then a shuffle/shared-memory Chan tree. part: [C][splits][3].
template <class T>
__global__ void __launch_bounds__(FBN_THREADS)
fbn_moments_partial(const T* x, i64 inner, i64 so, i64 sc, i64 si, i64 m, i64 chunk, double* part) {
    i64 c = blockIdx.x, s = blockIdx.y;
    i64 begin = s * chunk, end = begin + chunk < m ? begin + chunk : m;
    fbn_moments acc = {0, 0, 0};
    i64 j = begin + threadIdx.x, o = j / inner, i = j - o * inner;
    const i64 step_o = FBN_THREADS / inner, step_i = FBN_THREADS - step_o * inner;
    for (; j < end; j += FBN_THREADS) {
        double v = (double)fbn_load(x + o * so + c * sc + i * si);
        o += step_o;
        i += step_i;
        if (i >= inner) {
            i -= inner;
            ++o;
        }
        fbn_welford_add(acc, v);
    }
    fbn_moments total = fbn_block_merge(acc);
    if (threadIdx.x == 0) {
        double* p = part + 3 * (c * gridDim.y + s);
        p[0] = total.n;
        p[1] = total.mean;
        p[2] = total.m2;
    }
}

// Channels-last (inner == 1, also 2-D input): a warp reads 32 neighbouring channels of
// one row, coalesced when channels are contiguous. grid (ceil(C/32), splits): thread
// (lane, row_lane) = (threadIdx.x % 32, threadIdx.x / 32) of block (b, s) reduces channel
// 32*b + lane over rows s*chunk + row_lane, + FBN_WARPS, ...; the FBN_WARPS row lanes
// then merge in order through shared memory. part: [C][splits][3] as above.
template <class T>
__global__ void __launch_bounds__(FBN_THREADS)
fbn_moments_partial_cl(const T* x, i64 C, i64 so, i64 sc, i64 m, i64 chunk, double* part) {
    __shared__ double sh[3][FBN_WARPS][32];
    const int lane = threadIdx.x & 31, row_lane = threadIdx.x >> 5;
    const i64 c = (i64)blockIdx.x * 32 + lane, s = blockIdx.y;
    const i64 begin = s * chunk, end = begin + chunk < m ? begin + chunk : m;
    fbn_moments acc = {0, 0, 0};
    if (c < C)
        for (i64 r = begin + row_lane; r < end; r += FBN_WARPS)
            fbn_welford_add(acc, (double)fbn_load(x + r * so + c * sc));
    sh[0][row_lane][lane] = acc.n;
    sh[1][row_lane][lane] = acc.mean;
    sh[2][row_lane][lane] = acc.m2;
    __syncthreads();
    if (row_lane == 0 && c < C) {
        fbn_moments total = {0, 0, 0};
        for (int w = 0; w < FBN_WARPS; ++w) {
            fbn_moments p = {sh[0][w][lane], sh[1][w][lane], sh[2][w][lane]};
            total = fbn_merge(total, p);
        }
        double* p = part + 3 * (c * gridDim.y + s);
        p[0] = total.n;
        p[1] = total.mean;
        p[2] = total.m2;
    }
}

// One thread per channel: fold the splits in order -> count, mean, M2, and (eps >= 0)
// biased var and invstd. out: [C][5] = n, mean, m2, var, invstd.
__global__ void __launch_bounds__(FBN_THREADS)
fbn_moments_finalize(const double* part, i64 C, i64 splits, double eps, double* out) {
    i64 c = (i64)blockIdx.x * FBN_THREADS + threadIdx.x;
    if (c >= C) return;
    fbn_moments total = {0, 0, 0};
    for (i64 s = 0; s < splits; ++s) {
        const double* p = part + 3 * (c * splits + s);
        fbn_moments q = {p[0], p[1], p[2]};
        total = fbn_merge(total, q);
    }
    double var = total.m2 / total.n;
    double* o = out + 5 * c;
    o[0] = total.n;
    o[1] = total.mean;
    o[2] = total.m2;
    o[3] = var;
    o[4] = 1.0 / sqrt(var + eps);
}

// ------------------------------------------------------------------ elementwise forward
// y = relu?(((x - mean_hi) - mean_lo) * scale + shift + res?) over every element.
template <class T>
__global__ void __launch_bounds__(FBN_THREADS)
fbn_normalize(const T* x, T* y, const T* res, i64 n_total, i64 C, i64 inner,
              i64 sox, i64 scx, i64 six, i64 soy, i64 scy, i64 siy, i64 sor, i64 scr, i64 sir,
              const double* mean, const double* scale, const double* shift, int relu) {
    typedef typename fbn_compute<T>::type CT;
    const i64 step = (i64)gridDim.x * FBN_THREADS;
    i64 e = (i64)blockIdx.x * FBN_THREADS + threadIdx.x;
    for (fbn_index k(e, step, C, inner); e < n_total; e += step, k.advance(C, inner)) {
        const i64 o = k.o, c = k.c, i = k.i;
        double md = mean[c];
        CT mh = (CT)md, ml = (CT)(md - (double)mh);
        CT v = ((fbn_load(x + o * sox + c * scx + i * six) - mh) - ml) * (CT)scale[c] + (CT)shift[c];
        if (res) v = v + fbn_load(res + o * sor + c * scr + i * sir);
        if (relu) v = v < 0 ? (CT)0 : v;
        fbn_store(y + o * soy + c * scy + i * siy, v);
    }
}

// ------------------------------------------------------------------ backward
// grid (C, splits): per-channel sum(g) and sum(g*(x-mean)), g = dy masked by y > 0 when
// y is given (fused ReLU). part: [C][splits][2].
template <class T>
__global__ void __launch_bounds__(FBN_THREADS)
fbn_backward_partial(const T* dy, const T* x, const T* y, i64 inner, i64 sog, i64 scg, i64 sig,
                     i64 sox, i64 scx, i64 six, i64 soy, i64 scy, i64 siy, i64 m, i64 chunk,
                     const double* mean, double* part) {
    i64 c = blockIdx.x, s = blockIdx.y;
    i64 begin = s * chunk, end = begin + chunk < m ? begin + chunk : m;
    double a = 0, b = 0, mu = mean[c];
    // (o, i) of element j, advanced without a 64-bit division per element
    i64 j = begin + threadIdx.x, o = j / inner, i = j - o * inner;
    const i64 step_o = FBN_THREADS / inner, step_i = FBN_THREADS - step_o * inner;
    for (; j < end; j += FBN_THREADS) {
        double g = (double)fbn_load(dy + o * sog + c * scg + i * sig);
        if (y && !(fbn_load(y + o * soy + c * scy + i * siy) > 0)) g = 0;
        a += g;
        b += g * ((double)fbn_load(x + o * sox + c * scx + i * six) - mu);
        o += step_o;
        i += step_i;
        if (i >= inner) {
            i -= inner;
            ++o;
        }
    }
    fbn_block_sum2(a, b);
    if (threadIdx.x == 0) {
        double* p = part + 2 * (c * gridDim.y + s);
        p[0] = a;
        p[1] = b;
    }
}

// Channels-last backward sums, laid out as fbn_moments_partial_cl. part: [C][splits][2].
template <class T>
__global__ void __launch_bounds__(FBN_THREADS)
fbn_backward_partial_cl(const T* dy, const T* x, const T* y, i64 C, i64 sog, i64 scg, i64 sox,
                        i64 scx, i64 soy, i64 scy, i64 m, i64 chunk, const double* mean,
                        double* part) {
    __shared__ double sh[2][FBN_WARPS][32];
    const int lane = threadIdx.x & 31, row_lane = threadIdx.x >> 5;
    const i64 c = (i64)blockIdx.x * 32 + lane, s = blockIdx.y;
    const i64 begin = s * chunk, end = begin + chunk < m ? begin + chunk : m;
    double a = 0, b = 0;
    if (c < C) {
        const double mu = mean[c];
        for (i64 r = begin + row_lane; r < end; r += FBN_WARPS) {
            double g = (double)fbn_load(dy + r * sog + c * scg);
            if (y && !(fbn_load(y + r * soy + c * scy) > 0)) g = 0;
            a += g;
            b += g * ((double)fbn_load(x + r * sox + c * scx) - mu);
        }
    }
    sh[0][row_lane][lane] = a;
    sh[1][row_lane][lane] = b;
    __syncthreads();
    if (row_lane == 0 && c < C) {
        a = 0;
        b = 0;
        for (int w = 0; w < FBN_WARPS; ++w) {
            a += sh[0][w][lane];
            b += sh[1][w][lane];
        }
        double* p = part + 2 * (c * gridDim.y + s);
        p[0] = a;
        p[1] = b;
    }
}

// One thread per channel: fold the splits in order. out: [C][2] = sum(g), sum(g*(x-mean)).
__global__ void __launch_bounds__(FBN_THREADS)
fbn_backward_finalize(const double* part, i64 C, i64 splits, double* out) {
    i64 c = (i64)blockIdx.x * FBN_THREADS + threadIdx.x;
    if (c >= C) return;
    double a = 0, b = 0;
    for (i64 s = 0; s < splits; ++s) {
        a += part[2 * (c * splits + s)];
        b += part[2 * (c * splits + s) + 1];
    }
    out[2 * c] = a;
    out[2 * c + 1] = b;
}

// dx = ka*g + kb*((x - mean_hi) - mean_lo) + kc; dres = g when given.
template <class T>
__global__ void __launch_bounds__(FBN_THREADS)
fbn_backward_elementwise(const T* dy, const T* x, const T* y, T* dx, T* dres, i64 n_total, i64 C,
                         i64 inner, i64 sog, i64 scg, i64 sig, i64 sox, i64 scx, i64 six,
                         i64 soy, i64 scy, i64 siy, i64 sod, i64 scd, i64 sid, i64 sor, i64 scr,
                         i64 sir, const double* mean, const double* ka, const double* kb,
                         const double* kc) {
    typedef typename fbn_compute<T>::type CT;
    const i64 step = (i64)gridDim.x * FBN_THREADS;
    i64 e = (i64)blockIdx.x * FBN_THREADS + threadIdx.x;
    for (fbn_index k(e, step, C, inner); e < n_total; e += step, k.advance(C, inner)) {
        const i64 o = k.o, c = k.c, i = k.i;
        CT g = fbn_load(dy + o * sog + c * scg + i * sig);
        if (y && !(fbn_load(y + o * soy + c * scy + i * siy) > 0)) g = 0;
        if (dres) fbn_store(dres + o * sor + c * scr + i * sir, g);
        double md = mean[c];
        CT mh = (CT)md, ml = (CT)(md - (double)mh);
        CT xm = (fbn_load(x + o * sox + c * scx + i * six) - mh) - ml;
        fbn_store(dx + o * sod + c * scd + i * sid, (g * (CT)ka[c] + xm * (CT)kb[c]) + (CT)kc[c]);
    }
}
