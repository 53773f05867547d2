// Standalone driver for the ThreadSanitizer/AddressSanitizer runs of the emulated kernels
// (a sanitized shared library does not load into an uninstrumented Python reliably):
// launches the statistics, forward and backward kernels of bn.cu on small arrays, with
// several blocks and splits, and checks them against plain double loops.
//   g++ -std=c++20 -O1 -g -pthread -fsanitize=thread sanitize_driver.cpp -o driver && ./driver
#include "fbn_cuda_emu.h"
#define FBN_CPU_EMULATION 1
#include "../../fastbn/cuda/bn.cu"

#include <cstdio>
#include <random>

static int check(i64 outer, i64 C, i64 inner, i64 splits) {
    i64 m = outer * inner, n = outer * C * inner;
    std::vector<float> x(n), y(n), dy(n), dx(n);
    std::mt19937 rng(7);
    std::normal_distribution<float> dist(3.0f, 2.0f);
    for (auto& v : x) v = dist(rng);
    for (auto& v : dy) v = dist(rng);
    i64 chunk = (m + splits - 1) / splits;
    std::vector<double> part(C * splits * 3), stats(C * 5), bpart(C * splits * 2), sums(C * 2);
    fbn_dim3 block = {FBN_THREADS, 1, 1};
    fbn_emu_launch(&fbn_moments_partial<float>, fbn_dim3{(unsigned)C, (unsigned)splits, 1}, block,
                   (const float*)x.data(), inner, C * inner, inner, (i64)1, m, chunk, part.data());
    fbn_emu_launch(&fbn_moments_finalize, fbn_dim3{1, 1, 1}, block, (const double*)part.data(), C, splits,
                   1e-5, stats.data());
    std::vector<double> mean(C), scale(C), shift(C, 0.0), a(C), b(C), c(C);
    int bad = 0;
    for (i64 ch = 0; ch < C; ++ch) {
        double s = 0, q = 0;
        for (i64 j = 0; j < m; ++j) s += x[(j / inner) * C * inner + ch * inner + j % inner];
        double mu = s / m;
        for (i64 j = 0; j < m; ++j) {
            double d = x[(j / inner) * C * inner + ch * inner + j % inner] - mu;
            q += d * d;
        }
        if (std::fabs(stats[5 * ch + 1] - mu) > 1e-9 || std::fabs(stats[5 * ch + 2] / q - 1) > 1e-9) ++bad;
        mean[ch] = stats[5 * ch + 1];
        scale[ch] = stats[5 * ch + 4];
    }
    unsigned blocks = (unsigned)((n + FBN_THREADS - 1) / FBN_THREADS);
    fbn_emu_launch(&fbn_normalize<float>, fbn_dim3{blocks, 1, 1}, block, (const float*)x.data(), y.data(),
                   (const float*)nullptr, n, C, inner, C * inner, inner, (i64)1, C * inner, inner, (i64)1,
                   (i64)0, (i64)0, (i64)0, (const double*)mean.data(), (const double*)scale.data(),
                   (const double*)shift.data(), 1);
    fbn_emu_launch(&fbn_backward_partial<float>, fbn_dim3{(unsigned)C, (unsigned)splits, 1}, block,
                   (const float*)dy.data(), (const float*)x.data(), (const float*)y.data(), inner, C * inner,
                   inner, (i64)1, C * inner, inner, (i64)1, C * inner, inner, (i64)1, m, chunk,
                   (const double*)mean.data(), bpart.data());
    fbn_emu_launch(&fbn_backward_finalize, fbn_dim3{1, 1, 1}, block, (const double*)bpart.data(), C, splits,
                   sums.data());
    for (i64 ch = 0; ch < C; ++ch) {
        double g = 0;
        for (i64 j = 0; j < m; ++j) {
            i64 e = (j / inner) * C * inner + ch * inner + j % inner;
            if (y[e] > 0) g += dy[e];
        }
        if (std::fabs(sums[2 * ch] - g) > 1e-6 * (1 + std::fabs(g))) ++bad;
        a[ch] = 1.0; b[ch] = 0.0; c[ch] = 0.0;
    }
    fbn_emu_launch(&fbn_backward_elementwise<float>, fbn_dim3{blocks, 1, 1}, block, (const float*)dy.data(),
                   (const float*)x.data(), (const float*)y.data(), dx.data(), (float*)nullptr, n, C, inner,
                   C * inner, inner, (i64)1, C * inner, inner, (i64)1, C * inner, inner, (i64)1, C * inner,
                   inner, (i64)1, (i64)0, (i64)0, (i64)0, (const double*)mean.data(), (const double*)a.data(),
                   (const double*)b.data(), (const double*)c.data());
    for (i64 e = 0; e < n; ++e)
        if (dx[e] != (y[e] > 0 ? dy[e] : 0.0f)) ++bad;
    std::printf("outer=%lld C=%lld inner=%lld splits=%lld: %s\n", outer, C, inner, splits, bad ? "FAIL" : "ok");
    return bad;
}

int main() {
    int bad = check(5, 3, 7, 1) + check(1, 2, 9001, 3) + check(37, 4, 1, 2);
    return bad ? 1 : 0;
}
