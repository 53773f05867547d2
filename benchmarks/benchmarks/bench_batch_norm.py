"""asv: fastbn's CPU core per op, dtype, layout, shape and thread count."""
import numpy as np

import fastbn as fbn

from .common import Benchmark, channel_axis, get_array

SHAPES = ["32x64x56x56", "128x512x7x7", "16x32x8x8", "2048x256x4"]


def _shape(text):
    return tuple(int(v) for v in text.split("x"))


class BatchNorm(Benchmark):
    params = [SHAPES, ["float32", "float64"], ["nchw", "nhwc"], [1, 2]]
    param_names = ["shape", "dtype", "layout", "n_threads"]

    def setup(self, shape, dtype, layout, n_threads):
        fbn.set_num_threads(n_threads)
        self.axis = channel_axis(layout)
        self.x = get_array(_shape(shape), dtype, layout)
        self.dy = get_array(_shape(shape), dtype, layout) * 0.5
        C = self.x.shape[self.axis]
        self.rm, self.rv = np.zeros(C, dtype), np.ones(C, dtype)
        self.w, self.b = np.ones(C, dtype), np.zeros(C, dtype)
        # written here so that its page faults are paid here, not in the timing: asv runs
        # setup before every sample, and an untouched np.empty_like faults in the timed call
        # ((32,64,56,56) float64 backward: 8.4 ms timed against 2.9 ms without the faults)
        self.out = np.empty_like(self.x)
        self.out.fill(0)
        _, self.mean, self.invstd = fbn.batch_norm_forward(self.x, axis=self.axis)
        self.count = self.x.size // C
        self.sums = fbn.backward_reduce(self.dy, self.x, self.mean, self.invstd, axis=self.axis)

    def teardown(self, *args):
        fbn.set_num_threads(None)

    def time_moments(self, *args):
        fbn.moments(self.x, self.axis)

    def time_training_forward(self, *args):
        fbn.batch_norm_forward(self.x, self.w, self.b, self.rm, self.rv, axis=self.axis,
                               out=self.out)

    def time_inference_forward(self, *args):
        fbn.batch_norm(self.x, self.rm, self.rv, self.w, self.b, axis=self.axis, out=self.out)

    def time_backward(self, *args):
        fbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                axis=self.axis, out=self.out)

    def time_backward_reduce(self, *args):
        # the split backward (multi-process statistics): the sums ...
        fbn.backward_reduce(self.dy, self.x, self.mean, self.invstd, axis=self.axis)

    def time_backward_elementwise(self, *args):
        # ... and dx from them
        fbn.backward_elementwise(self.dy, self.x, self.mean, self.invstd, self.w, *self.sums,
                                 self.count, axis=self.axis, out=self.out)

    def peakmem_training_forward(self, *args):
        fbn.batch_norm_forward(self.x, self.w, self.b, self.rm, self.rv, axis=self.axis)


class BatchNormCuPy(Benchmark):
    """The same operations on CuPy arrays (skipped without CuPy and a GPU); the stream is
    synchronized inside each timed call."""
    params = [["32x64x56x56", "128x512x7x7"], ["float32", "float16"], ["nchw", "nhwc"]]
    param_names = ["shape", "dtype", "layout"]

    def setup(self, shape, dtype, layout):
        try:
            import cupy
        except ImportError:
            raise NotImplementedError("CuPy is not installed")
        if not cupy.is_available():
            raise NotImplementedError("no GPU")
        self.cupy = cupy
        self.axis = channel_axis(layout)
        self.x = cupy.asarray(get_array(_shape(shape), dtype, layout))
        self.dy = self.x * 0.5
        C = self.x.shape[self.axis]
        self.rm, self.rv = cupy.zeros(C, "float32"), cupy.ones(C, "float32")
        self.w, self.b = cupy.ones(C, "float32"), cupy.zeros(C, "float32")
        _, self.mean, self.invstd = fbn.batch_norm_forward(self.x, axis=self.axis)
        self.cupy.cuda.get_current_stream().synchronize()

    def _sync(self):
        self.cupy.cuda.get_current_stream().synchronize()

    def time_moments(self, *args):
        fbn.moments(self.x, self.axis)
        self._sync()

    def time_training_forward(self, *args):
        fbn.batch_norm_forward(self.x, self.w, self.b, self.rm, self.rv, axis=self.axis)
        self._sync()

    def time_inference_forward(self, *args):
        fbn.batch_norm(self.x, self.rm, self.rv, self.w, self.b, axis=self.axis)
        self._sync()

    def time_backward(self, *args):
        fbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w, axis=self.axis)
        self._sync()
