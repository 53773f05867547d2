// The CPU stand-in of cuLaunchKernel for fastbn/cuda/bn.cu: kernels are looked up by
// their RawModule name expression and launched with kernelParams (an array of pointers
// to the argument values), the call shape CuPy's RawKernel uses underneath.
#include "fbn_cuda_emu.h"
#define FBN_CPU_EMULATION 1
#include "../../fastbn/cuda/bn.cu"

#include <map>
#include <string>
#include <functional>
#include <utility>

typedef std::function<void(fbn_dim3, fbn_dim3, void**)> Launcher;

template <class... A, std::size_t... I>
static void launch_unpacked(void (*k)(A...), fbn_dim3 g, fbn_dim3 b, void** p, std::index_sequence<I...>) {
    fbn_emu_launch(k, g, b, *static_cast<A*>(p[I])...);
}

template <class... A>
static Launcher launcher(void (*k)(A...)) {
    return [k](fbn_dim3 g, fbn_dim3 b, void** p) { launch_unpacked(k, g, b, p, std::index_sequence_for<A...>{}); };
}

#define FBN_TYPED(name)                                      \
    {#name "<float>", launcher(&name<float>)},               \
    {#name "<double>", launcher(&name<double>)},             \
    {#name "<fbn_half>", launcher(&name<fbn_half>)}

static const std::map<std::string, Launcher>& table() {
    static const std::map<std::string, Launcher> t = {
        FBN_TYPED(fbn_moments_partial), FBN_TYPED(fbn_moments_partial_cl), FBN_TYPED(fbn_normalize),
        FBN_TYPED(fbn_backward_partial), FBN_TYPED(fbn_backward_partial_cl), FBN_TYPED(fbn_backward_elementwise),
        {"fbn_moments_finalize", launcher(&fbn_moments_finalize)},
        {"fbn_backward_finalize", launcher(&fbn_backward_finalize)},
    };
    return t;
}

extern "C" int fbn_emu_launch_kernel(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                     unsigned by, unsigned bz, void** params) {
    auto it = table().find(name);
    if (it == table().end()) return -1;
    it->second(fbn_dim3{gx, gy, gz}, fbn_dim3{bx, by, bz}, params);
    return 0;
}

extern "C" int fbn_emu_has_kernel(const char* name) { return table().count(name) ? 1 : 0; }
