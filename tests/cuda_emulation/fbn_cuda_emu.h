// A small emulation of the CUDA execution model, enough to run fastbn/cuda/bn.cu on the
// CPU: every thread of a block is a real std::thread, __syncthreads is a barrier over the
// block, warp shuffles exchange values through per-lane slots between two warp barriers,
// __shared__ variables are shared by the running block (blocks run one at a time).
// Kernels that call __syncthreads or a shuffle where not every thread arrives deadlock
// here as they would misbehave on a GPU.
#pragma once
#include <barrier>
#include <cmath>
#include <cstring>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(n)
#define __shared__ static

struct fbn_dim3 {
    unsigned x, y, z;
};
inline thread_local fbn_dim3 threadIdx, blockIdx;
inline fbn_dim3 blockDim, gridDim;
using std::sqrt;

namespace fbn_emu {
inline std::barrier<>* block_barrier = nullptr;
inline std::vector<std::unique_ptr<std::barrier<>>> warp_barriers;
}  // namespace fbn_emu

inline void __syncthreads() { fbn_emu::block_barrier->arrive_and_wait(); }

template <class T>
T __shfl_down_sync(unsigned mask, T v, int offset) {
    static T slots[1024];  // one per thread of the running block
    (void)mask;            // the kernels use full masks only
    unsigned t = threadIdx.x, lane = t % 32;
    std::barrier<>& warp = *fbn_emu::warp_barriers[t / 32];
    slots[t] = v;
    warp.arrive_and_wait();
    T r = lane + offset < 32 ? slots[t + offset] : v;
    warp.arrive_and_wait();
    return r;
}

inline float fbn_emu_half_to_float(unsigned short bits) {
    _Float16 h;
    std::memcpy(&h, &bits, 2);
    return (float)h;
}
inline unsigned short fbn_emu_float_to_half(float v) {
    _Float16 h = (_Float16)v;
    unsigned short bits;
    std::memcpy(&bits, &h, 2);
    return bits;
}

// Run kernel<<<grid, block>>>(args...): blocks one after another, each block's threads
// concurrently. The block's threads are created once per launch and run every block in
// turn, meeting at a barrier of their own between blocks (so __shared__ variables belong
// to one block at a time).
template <class... A, class... B>
void fbn_emu_launch(void (*kernel)(A...), fbn_dim3 grid, fbn_dim3 block, B... args) {
    gridDim = grid;
    blockDim = block;
    unsigned n = block.x * block.y * block.z;
    std::barrier<> bb(n), block_done(n);
    fbn_emu::block_barrier = &bb;
    fbn_emu::warp_barriers.clear();
    for (unsigned w = 0; w < (n + 31) / 32; ++w)
        fbn_emu::warp_barriers.emplace_back(new std::barrier<>(n - 32 * w < 32 ? n - 32 * w : 32));
    std::vector<std::thread> threads;
    for (unsigned t = 0; t < n; ++t)
        threads.emplace_back([=, &block_done] {
            threadIdx = {t, 0, 0};
            for (unsigned bz = 0; bz < grid.z; ++bz)
                for (unsigned by = 0; by < grid.y; ++by)
                    for (unsigned bx = 0; bx < grid.x; ++bx) {
                        blockIdx = {bx, by, bz};
                        kernel(args...);
                        block_done.arrive_and_wait();
                    }
        });
    for (auto& th : threads) th.join();
}
