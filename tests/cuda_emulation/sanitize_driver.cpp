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

// max_blocks < the blocks the elementwise kernels need: their grid-stride loops step
static int check(i64 outer, i64 C, i64 inner, i64 splits, unsigned max_blocks) {
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
    if (blocks > max_blocks) blocks = max_blocks;
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

// The channels-last reductions: rows x C contiguous, against plain double loops.
static int check_channels_last(i64 rows, i64 C, i64 splits) {
    i64 n = rows * C, chunk = (rows + splits - 1) / splits;
    std::vector<float> x(n), dy(n);
    std::mt19937 rng(11);
    std::normal_distribution<float> dist(-1.0f, 3.0f);
    for (auto& v : x) v = dist(rng);
    for (auto& v : dy) v = dist(rng);
    std::vector<double> part(C * splits * 3), stats(C * 5), bpart(C * splits * 2), sums(C * 2);
    fbn_dim3 block = {FBN_THREADS, 1, 1}, grid = {(unsigned)((C + 31) / 32), (unsigned)splits, 1};
    fbn_emu_launch(&fbn_moments_partial_cl<float>, grid, block, (const float*)x.data(), C, C, (i64)1, rows,
                   chunk, part.data());
    fbn_emu_launch(&fbn_moments_finalize, fbn_dim3{1, 1, 1}, block, (const double*)part.data(), C, splits,
                   0.0, stats.data());
    std::vector<double> mean(C);
    for (i64 ch = 0; ch < C; ++ch) mean[ch] = stats[5 * ch + 1];
    fbn_emu_launch(&fbn_backward_partial_cl<float>, grid, block, (const float*)dy.data(), (const float*)x.data(),
                   (const float*)nullptr, C, C, (i64)1, C, (i64)1, (i64)0, (i64)0, rows, chunk,
                   (const double*)mean.data(), bpart.data());
    fbn_emu_launch(&fbn_backward_finalize, fbn_dim3{1, 1, 1}, block, (const double*)bpart.data(), C, splits,
                   sums.data());
    int bad = 0;
    for (i64 ch = 0; ch < C; ++ch) {
        double s = 0, q = 0, g = 0, gx = 0;
        for (i64 r = 0; r < rows; ++r) s += x[r * C + ch];
        double mu = s / rows;
        for (i64 r = 0; r < rows; ++r) {
            double d = x[r * C + ch] - mu;
            q += d * d;
            g += dy[r * C + ch];
            gx += dy[r * C + ch] * d;
        }
        if (stats[5 * ch] != rows || std::fabs(stats[5 * ch + 1] - mu) > 1e-9 ||
            std::fabs(stats[5 * ch + 2] / q - 1) > 1e-9)
            ++bad;
        if (std::fabs(sums[2 * ch] - g) > 1e-9 * (1 + std::fabs(g)) ||
            std::fabs(sums[2 * ch + 1] - gx) > 1e-9 * (1 + std::fabs(gx)))
            ++bad;
    }
    std::printf("channels-last rows=%lld C=%lld splits=%lld: %s\n", rows, C, splits, bad ? "FAIL" : "ok");
    return bad;
}

int main() {
    int bad = check(5, 3, 7, 1, 1000) + check(1, 2, 9001, 3, 5) + check(37, 4, 1, 2, 1000) +
              check(13, 5, 11, 2, 2) + check_channels_last(301, 40, 3) + check_channels_last(9, 33, 1);
    return bad ? 1 : 0;
}
