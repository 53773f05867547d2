"""Compile fastbn's CUDA kernels with NVRTC (no GPU needed): the compile gate of the
CUDA backend. NVRTC comes from the nvidia-cuda-nvrtc-cu12 wheel and is driven directly
through ctypes (CuPy's own compile path needs a device)."""
import ctypes
import glob
import os
import re


def load_nvrtc():
    try:
        import nvidia.cuda_nvrtc as pkg
    except ImportError:
        return None
    for base in pkg.__path__:
        for path in sorted(glob.glob(os.path.join(base, "lib", "libnvrtc.so.*"))):
            if "alt" not in path and "builtins" not in path:
                return ctypes.CDLL(path)
    return None


def _check(lib, status, what, prog=None):
    if status != 0:
        msg = lib.nvrtcGetErrorString(status)
        log = program_log(lib, prog) if prog is not None else ""
        raise RuntimeError(f"{what} failed: {msg.decode()}\n{log}")


def program_log(lib, prog):
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    buf = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, buf)
    return buf.value.decode(errors="replace")


def compile_cubin(lib, source, name_expressions, arch, extra_options=()):
    """-> (cubin bytes, program log, {name expression: lowered name})."""
    lib.nvrtcGetErrorString.restype = ctypes.c_char_p
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"bn.cu", 0, None,
                                       None), "nvrtcCreateProgram")
    for name in name_expressions:
        _check(lib, lib.nvrtcAddNameExpression(prog, name.encode()), "nvrtcAddNameExpression")
    options = [f"--gpu-architecture={arch}", "--std=c++11", "-Xptxas", "-v",
               *extra_options]
    argv = (ctypes.c_char_p * len(options))(*[o.encode() for o in options])
    status = lib.nvrtcCompileProgram(prog, len(options), argv)
    log = program_log(lib, prog)
    _check(lib, status, f"nvrtcCompileProgram ({arch})", prog)
    size = ctypes.c_size_t()
    _check(lib, lib.nvrtcGetCUBINSize(prog, ctypes.byref(size)), "nvrtcGetCUBINSize")
    cubin = ctypes.create_string_buffer(size.value)
    _check(lib, lib.nvrtcGetCUBIN(prog, cubin), "nvrtcGetCUBIN")
    lowered = {}
    for name in name_expressions:
        out = ctypes.c_char_p()
        _check(lib, lib.nvrtcGetLoweredName(prog, name.encode(), ctypes.byref(out)),
               "nvrtcGetLoweredName")
        lowered[name] = out.value.decode()
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return cubin.raw, log, lowered


def ptxas_resources(log):
    """{mangled kernel: {'registers': n, 'spill_stores': b, 'spill_loads': b,
    'stack': b, 'smem': b}} from the -Xptxas -v log."""
    out = {}
    current = None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current = out.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
            s = re.search(r"(\d+) bytes smem", line)
            current["smem"] = int(s.group(1)) if s else 0
    return out
