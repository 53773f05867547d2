# Stub of the compiled CPU core (src/_bn_cpu.pyx). Arguments are validated
# (outer, C, inner) views and preallocated float64 (C,) arrays; see _backend_cpu.py.
import numpy as np
import numpy.typing as npt

SHORT_ROW_MAX: int  # NC rows up to this long are walked as channels-last columns

def openmp_enabled() -> bool: ...
def set_num_threads(n: int) -> None: ...  # fastbn.set_num_threads's count; 0: OpenMP's default
def num_threads() -> int: ...  # threads of a large call (fastbn.get_num_threads)
def threads_for(size: int) -> int: ...  # threads of a call on `size` elements
def thresholds(parallel_min_elements: int | None = None, stream_min_bytes: int | None = None,
               spread_ahead_min_bytes: int | None = None,
               strips_max_bytes_per_thread: int | None = None) -> tuple[int, int, int, int]: ...
def stream_output(out3: np.ndarray) -> bool: ...  # training/backward output streamed
def empty_output(shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray: ...  # aligned 64 KiB-8 MiB
def half_conversion() -> str: ...  # 'avx512', 'f16c' or 'plain'
def channel_tiles() -> bool: ...  # channels-last register tiles (AVX-512 BW/VL, FASTBN_CHANNEL_TILES)
def channel_block(outer: int, C: int, inner: int, itemsize: int, n_inputs: int,
                  n_threads: int) -> int: ...  # channels per streamed block of short NC rows (0: none)
def moments(x3: np.ndarray, mean: np.ndarray, m2: np.ndarray, n_threads: int) -> int: ...
def train_forward(x3: np.ndarray, y3: np.ndarray, weight: np.ndarray, bias: np.ndarray,
                  eps: float, mean: np.ndarray, var: np.ndarray, invstd: np.ndarray,
                  n_threads: int, res3: np.ndarray | None = None, relu: bool = False,
                  stream: bool = False) -> None: ...
def normalize(x3: np.ndarray, y3: np.ndarray, mean: np.ndarray, scale: np.ndarray,
              shift: np.ndarray, n_threads: int, res3: np.ndarray | None = None,
              relu: bool = False, stream: bool = False) -> None: ...
def backward(dy3: np.ndarray, x3: np.ndarray, dx3: np.ndarray, mean: np.ndarray,
             invstd: np.ndarray, weight: np.ndarray, frozen: bool, sdy: np.ndarray,
             sxmu: np.ndarray, n_threads: int, y3: np.ndarray | None = None,
             dres3: np.ndarray | None = None, stream: bool = False) -> None: ...
def backward_reduce(dy3: np.ndarray, x3: np.ndarray, mean: np.ndarray, sdy: np.ndarray,
                    sxmu: np.ndarray, n_threads: int, y3: np.ndarray | None = None) -> None: ...
def backward_apply(dy3: np.ndarray, x3: np.ndarray, dx3: np.ndarray, mean: np.ndarray,
                   a: np.ndarray, b: np.ndarray, c: np.ndarray, frozen: bool, n_threads: int,
                   y3: np.ndarray | None = None, dres3: np.ndarray | None = None,
                   stream: bool = False) -> None: ...
def inference_scale(weight: np.ndarray, running_var: np.ndarray, eps: float,
                    scale: np.ndarray) -> None: ...
def update_running(running_mean: np.ndarray, running_var: np.ndarray, mean: np.ndarray,
                   var: np.ndarray, count: float, momentum: float) -> None: ...

# Plain calls: the public call checked and run in compiled code; None for any other
# arguments (which fastbn._api then checks). See _api's module docstring.
def plain_train(x, weight, bias, running_mean, running_var, momentum, eps, axis, activation,
                residual, statistics: bool, out=None): ...
def plain_inference(x, running_mean, running_var, weight, bias, momentum, eps, axis,
                    activation, residual, out=None): ...
def plain_backward(dy, x, mean, invstd, weight, training, axis, activation, y,
                   return_residual_grad, out=None): ...
def plain_welford(x, axis): ...  # -> (count, mean, m2)
def plain_moments(x, axis, ddof): ...  # -> (mean, var)

# benchmarks/compare.py's memory floors (next to no arithmetic): a read, a copy or a ^ b
# over the bytes; the same bytes in the fused per-channel passes' order, and in the
# channels-last passes' two passes over row chunks.
def floor_pass(a: np.ndarray, b: np.ndarray | None, out: np.ndarray | None, n_threads: int,
               stream: bool) -> int: ...
def floor_fused(a: np.ndarray, b: np.ndarray | None, out: np.ndarray, outer: int, C: int,
                block: int, ask_ahead: bool, n_threads: int, stream: bool) -> int: ...
def floor_two_pass(a: np.ndarray, b: np.ndarray | None, out: np.ndarray, piece_bytes: int,
                   most_recent_first: bool, n_threads: int, stream: bool) -> int: ...
def nlc_chunk_rows(rows: int, channels: int) -> int: ...  # rows per channels-last chunk
