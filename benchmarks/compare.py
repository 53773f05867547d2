"""Side-by-side: fastbn vs PyTorch CPU vs naive NumPy, against this machine's bandwidth.

One process, same thread count for every library; enough input buffers are rotated that
inputs are not cache-resident (more than 3x the last-level cache in total); peers are
interleaved call by call and each figure is the median of many repeats (more for short
calls: scaled_repeats). The machine's
bandwidth is measured here too: before and after the cases, a 2-thread copy with
streaming stores (read + write bytes) and a 2-thread read over 256 MB; within each case,
a pass with the case's own traffic on its own buffers, interleaved with the peers
(measure_bandwidth, fastbn's floor_pass: next to no arithmetic). Percentages are against
the highest of these. For the training forward and backward cases a further peer moves
the same bytes in the core's order with next to no arithmetic ("fused floor"): per channel
where the core runs fused per-channel passes (a channel's reduction read from memory,
then its output written from cache; floor_fused), in two passes over row chunks where it
runs channels-last passes (every row's reduction, then the outputs from the rows again;
floor_two_pass). The targets table says what that access pattern alone reaches.

Per case it prints: ms per call for each peer (and for the fused floor, where there is
one), GB/s of ideal traffic (the bytes the
op must move: training forward and inference read x and write y, backward reads dy and
x and writes dx, moments reads x), that as % of the measured copy (or read) bandwidth,
speed-ups of fastbn over PyTorch and NumPy, fastbn's 2-thread over 1-thread speed-up, and
the peak memory a fastbn call allocates beyond its outputs (tracemalloc). Writes JSON
and a bar-chart PNG.

Run:  python benchmarks/compare.py [--threads 2] [--repeats 25] [--quick] [--only TEXT]
                                   [--json compare.json] [--png compare.png] [--markdown]
      python benchmarks/compare.py --from-json compare.json     (re-print a run)
      python benchmarks/compare.py --summary a.json b.json ...  (targets over runs)

After the table it prints the performance issue's targets per case (case_targets): the
value reached, whether it was met, and for a speed-up not reached the bandwidth it would
take (target_rows).
"""
import argparse
import json
import math
import os
import platform
import time
import tracemalloc

import numpy as np

import fastbn as fbn
from fastbn._bn_cpu import (SHORT_ROW_MAX, channel_block, floor_fused, floor_pass, floor_two_pass,
                            nlc_chunk_rows, stream_output)

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # the comparison still runs, without the torch column
    torch = None

LLC_BYTES = 32 * 2 ** 20
EPS = 1e-5


# ------------------------------------------------------------------ machine bandwidth

def measure_bandwidth(threads, nbytes=256 * 2 ** 20, repeats=9):
    """The machine's bandwidth over nbytes at `threads` threads, GB/s: a copy with streaming
    stores (read + write bytes) and a read, both fastbn's memory floor (floor_pass: next to
    no arithmetic). NumPy's copy (glibc memcpy) and integer max moved 25-40 % less than
    these here, which made every % of bandwidth look better than it was."""
    src = np.arange(nbytes // 4, dtype=np.uint32)  # distinct pages (no shared zero pages)
    dst = np.empty_like(src)
    dst.fill(0)
    out = {}
    for name, fn, mult in (("copy", lambda: floor_pass(src, None, dst, threads, True), 2),
                           ("read", lambda: floor_pass(src, None, None, threads, False), 1)):
        fn()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        out[name] = mult * src.nbytes / float(np.median(times)) / 1e9
    return out


# ------------------------------------------------------------------ cases

def _axes(ndim, axis):
    return tuple(i for i in range(ndim) if i != axis % ndim)


def _bcast(v, ndim, axis):
    shape = [1] * ndim
    shape[axis % ndim] = -1
    return v.reshape(shape)


class Case:
    def __init__(self, op, shape, dtype="float32", layout="nchw", torch_dtype=None, label=None):
        self.op, self.shape, self.dtype, self.layout = op, shape, np.dtype(dtype), layout
        self.torch_dtype = torch_dtype
        self.axis = -1 if layout == "nhwc" else 1
        self.label = label or f"{op} {'x'.join(map(str, shape))} {layout} {dtype}"

    @property
    def passes(self):
        return {"train": 2, "infer": 2, "backward": 3, "moments": 1}[self.op]

    def unavoidable_passes(self, nbytes):
        """Passes over memory no implementation avoids: channels-last statistics (sums)
        need every row before any output element, so training forward reads x twice and
        backward reads dy and x twice, unless they stay cached between the passes -- not
        for arrays beyond half the last-level cache (measured here: (32,56,56,64) raw
        training time = statistics + normalize)."""
        if self.layout == "nhwc" and nbytes > LLC_BYTES // 2 and self.op in ("train", "backward"):
            return {"train": 3, "backward": 5}[self.op]
        return self.passes

    def fused_rows(self, n_threads):
        """(outer, C, block, stream) where the CPU core runs this case as fused per-channel
        passes (NC layout, training forward or backward: a channel's reduction read from
        memory, then its output written while the channel is in cache; rows under 4 KB in
        blocks of `block` adjacent channels, written a run of the block at a time), else
        None (channels-last, inference, moments, rows short enough to be walked as
        columns). stream: whether the output is streamed."""
        if self.layout != "nchw" or self.op not in ("train", "backward") or len(self.shape) < 3:
            return None
        outer, C = self.shape[:2]
        inner, size = int(np.prod(self.shape[2:])), self.dtype.itemsize
        if inner <= SHORT_ROW_MAX:
            return None
        stream = stream_output(np.empty((outer, C, inner), self.dtype))
        if inner * size >= 4096:
            return outer, C, 1, stream
        block = channel_block(outer, C, inner, size, 2 if self.op == "backward" else 1, n_threads)
        return (outer, C, block, True) if block and stream else None

    def two_pass_pieces(self):
        """(piece_bytes, stream) where the CPU core runs this case's training forward or
        backward as two channels-last passes over row chunks (the statistics or sums of
        every row, then the outputs from the same rows again; channels-last layouts, 2-D
        arrays, NC rows short enough to be walked as columns), else None. piece_bytes:
        one chunk of rows (nlc_chunk_rows); stream: whether the output is streamed."""
        if self.op not in ("train", "backward"):
            return None
        C, size = self.shape[1], self.dtype.itemsize
        inner = int(np.prod(self.shape[2:]))
        if self.layout == "nhwc":
            rows, columns, shape3 = self.shape[0] * inner, C, (self.shape[0] * inner, C, 1)
        elif inner <= SHORT_ROW_MAX:  # 2-D arrays (inner 1) and rows walked as columns
            rows, columns, shape3 = self.shape[0], C * inner, (self.shape[0], C, inner)
        else:
            return None
        stream = stream_output(np.empty(shape3, self.dtype))
        return nlc_chunk_rows(rows, columns) * columns * size, stream


def default_cases(quick):
    big = (32, 64, 56, 56)
    cases = [Case(op, big, layout=lay) for op in ("train", "infer", "backward", "moments")
             for lay in ("nchw", "nhwc")]
    if not quick:
        for shape, dtype in (((128, 512, 7, 7), "float32"), ((8, 256, 28, 28), "float64"),
                             ((256, 2048), "float32")):
            cases += [Case(op, shape, dtype) for op in ("train", "infer", "backward")]
        # (N, C, L) with short rows, which the CPU core walks as channels-last columns
        cases += [Case(op, (2048, 256, 4), label=f"{op} 2048x256x4 ncl float32")
                  for op in ("train", "infer", "backward")]
        cases += [Case(op, big, "float16", torch_dtype="bfloat16",
                       label=f"{op} {'x'.join(map(str, big))} float16 (torch bfloat16)")
                  for op in ("train", "infer", "backward")]
        cases += [Case(op, big, "float16", layout="nhwc", torch_dtype="bfloat16",
                       label=f"{op} {'x'.join(map(str, big))} nhwc float16 (torch bfloat16)")
                  for op in ("train", "infer", "backward")]
    cases += [Case("train", (16, 32, 8, 8), label="small train 16x32x8x8 (whole call)")]
    return cases


def _n_buffers(nbytes):
    return int(min(64, max(2, math.ceil(3 * LLC_BYTES / max(nbytes, 1)) + 1)))


def build(case, rng):
    """Rotating inputs and the callables of each peer (each takes the buffer index)."""
    shape = case.shape
    if case.layout == "nhwc":
        shape = (shape[0],) + shape[2:] + (shape[1],)
    nbytes = int(np.prod(shape)) * case.dtype.itemsize
    k = _n_buffers(nbytes)
    xs = [rng.standard_normal(shape, dtype=np.float32).astype(case.dtype) for _ in range(k)]
    dys = [rng.standard_normal(shape, dtype=np.float32).astype(case.dtype) for _ in range(k)] \
        if case.op == "backward" else None
    C = case.shape[1]
    ax = case.axis
    w = np.ones(C, np.float32)
    b = np.zeros(C, np.float32)
    rm, rv = np.zeros(C, np.float32), np.ones(C, np.float32)
    _, mean, invstd = fbn.batch_norm_forward(xs[0], w, b, axis=ax)
    peers = {}

    if case.op == "train":
        peers["fastbn"] = lambda i: fbn.batch_norm(xs[i], rm, rv, w, b, training=True, axis=ax)
    elif case.op == "infer":
        peers["fastbn"] = lambda i: fbn.batch_norm(xs[i], rm, rv, w, b, axis=ax)
    elif case.op == "backward":
        peers["fastbn"] = lambda i: fbn.batch_norm_backward(dys[i], xs[i], mean, invstd, w, axis=ax)
    else:
        peers["fastbn"] = lambda i: fbn.moments(xs[i], ax)

    axes = _axes(len(shape), ax)
    wb, bb = _bcast(w, len(shape), ax), _bcast(b, len(shape), ax)

    def np_train(i):
        x = xs[i]
        m, v = x.mean(axis=axes, keepdims=True), x.var(axis=axes, keepdims=True)
        return ((x - m) / np.sqrt(v + EPS) * wb + bb).astype(x.dtype)

    def np_infer(i):
        return ((xs[i] - _bcast(rm, len(shape), ax)) / np.sqrt(_bcast(rv, len(shape), ax) + EPS)
                * wb + bb).astype(case.dtype)

    def np_backward(i):
        x, g = xs[i], dys[i]
        m = x.size // C
        mu, inv = _bcast(mean, len(shape), ax), _bcast(invstd, len(shape), ax)
        xhat = (x - mu) * inv
        db = g.sum(axis=axes, keepdims=True)
        dw = (g * xhat).sum(axis=axes, keepdims=True)
        return (wb * inv / m * (m * g - db - xhat * dw)).astype(x.dtype)

    peers["numpy"] = {"train": np_train, "infer": np_infer, "backward": np_backward,
                      "moments": lambda i: (xs[i].mean(axis=axes), xs[i].var(axis=axes))}[case.op]

    if torch is not None:
        tdt = getattr(torch, case.torch_dtype) if case.torch_dtype else None

        def tt(a):
            t = torch.from_numpy(a)
            if tdt is not None:
                t = t.to(tdt)
            return t.permute(0, 3, 1, 2) if case.layout == "nhwc" else t

        txs = [tt(x) for x in xs]
        tdys = [tt(d) for d in dys] if dys is not None else None
        pdt = torch.float64 if case.dtype == np.float64 else torch.float32
        tw, tb = torch.ones(C, dtype=pdt), torch.zeros(C, dtype=pdt)
        trm, trv = torch.zeros(C, dtype=pdt), torch.ones(C, dtype=pdt)
        tmean, tinv = torch.from_numpy(mean.astype(np.float64)).to(pdt), torch.from_numpy(
            invstd.astype(np.float64)).to(pdt)
        if case.op == "train":
            peers["torch"] = lambda i: F.batch_norm(txs[i], trm, trv, tw, tb, training=True)
        elif case.op == "infer":
            peers["torch"] = lambda i: F.batch_norm(txs[i], trm, trv, tw, tb, training=False)
        elif case.op == "backward":
            peers["torch"] = lambda i: torch.ops.aten.native_batch_norm_backward(
                tdys[i], txs[i], tw, trm, trv, tmean, tinv, True, EPS, [True, True, True])
        else:
            peers["torch"] = lambda i: torch.var_mean(txs[i], dim=[0, 2, 3] if len(shape) == 4
                                                      else [0], correction=0)

    def one_thread(i, f=peers["fastbn"]):
        n = fbn.get_num_threads()
        fbn.set_num_threads(1)
        try:
            return f(i)
        finally:
            fbn.set_num_threads(n)

    peers["fastbn 1 thread"] = one_thread
    # the machine's bandwidth in the same interleaved loop, on the same buffers: the case's
    # ideal traffic with next to no arithmetic (fastbn's floor_pass: moments read x; the
    # forward passes copy x to a fresh output, as the peers return one; backward writes
    # dy ^ x), with streaming stores and with ordinary ones (the faster counts). A shared
    # machine's bandwidth drifts during a run; this moves with it.
    nt = fbn.get_num_threads()
    if case.op == "moments":
        peers["floor"] = lambda i: floor_pass(xs[i], None, None, nt, False)
    else:
        def floor_inputs(i):  # the bytes the case reads: dy and x (backward), or x
            return (dys[i], xs[i]) if dys is not None else (xs[i], None)

        def floor(i, stream):
            out = np.empty_like(xs[i])
            floor_pass(*floor_inputs(i), out, nt, stream)
            return out

        # the fused per-channel passes' order of the same bytes (floor_fused): what that
        # access pattern alone takes, its reads asking for the bytes ahead of them or not
        # (the faster counts). It runs after the 1-thread call, whose outputs are streamed
        # (no dirty lines to write back), so it is measured at its fastest.
        fused = case.fused_rows(nt)
        if fused:
            f_outer, f_channels, f_block, f_stream = fused

            def fused_floor(i, ask_ahead):
                out = np.empty_like(xs[i])
                floor_fused(*floor_inputs(i), out, f_outer, f_channels, f_block, ask_ahead, nt,
                            f_stream)
                return out

            peers["fused floor"] = lambda i: fused_floor(i, True)
            peers["fused floor plain"] = lambda i: fused_floor(i, False)
        # the channels-last passes' order (floor_two_pass), counted as their fused floor
        two_pass = case.two_pass_pieces()
        if two_pass:
            piece_bytes, t_stream = two_pass

            def two_pass_floor(i):
                out = np.empty_like(xs[i])
                floor_two_pass(*floor_inputs(i), out, piece_bytes, True, nt, t_stream)
                return out

            peers["fused floor"] = two_pass_floor
        peers["floor"] = lambda i: floor(i, True)
        peers["floor cached"] = lambda i: floor(i, False)
    return peers, k, nbytes, (xs, dys)


def peak_extra_bytes(fn):
    """Peak bytes a call allocates (tracemalloc sees NumPy's allocations) minus what it
    returns: hidden full-size temporaries show up here."""
    fn(0)
    tracemalloc.start()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    result = fn(0)
    peak = tracemalloc.get_traced_memory()[1] - base
    tracemalloc.stop()
    out = result if isinstance(result, tuple) else (result,)
    returned = sum(getattr(a, "nbytes", 0) for a in out)
    return peak - returned


def scaled_repeats(repeats, nbytes):
    """Repeats for a case of nbytes per array: `repeats` from 8 MB up, more below (at most
    16x): a call of a few microseconds is over before a scheduler tick or a neighbour's
    burst has passed, so its median needs more samples to settle (the small case's
    fastbn time moved 7.5 -> 9.5 us between runs of 25 repeats, 7.5-8.3 us with 400)."""
    return repeats * int(min(16, max(1, (8 << 20) // max(nbytes, 1))))


def run_case(case, repeats, rng):
    peers, k, nbytes, _ = build(case, rng)
    repeats = scaled_repeats(repeats, nbytes)
    for f in peers.values():  # warm up (page faults, lazy init, thread pools)
        f(0)
        f(1 % k)
    times = {name: [] for name in peers}
    i = 0
    for _ in range(repeats):
        for name, f in peers.items():
            t = time.perf_counter()
            f(i % k)
            times[name].append(time.perf_counter() - t)
            i += 1
    med = {name: float(np.median(v)) for name, v in times.items()}
    floor = min(med.pop(name) for name in ("floor", "floor cached") if name in med)
    if "fused floor plain" in med:
        med["fused floor"] = min(med["fused floor"], med.pop("fused floor plain"))
    return {"bw_gbs": case.passes * nbytes / floor / 1e9,
            "case": case.label, "op": case.op, "shape": list(case.shape),
            "dtype": case.dtype.name, "layout": case.layout, "buffers": k, "repeats": repeats,
            "bytes_per_pass": nbytes, "ideal_bytes": case.passes * nbytes,
            "unavoidable_bytes": case.unavoidable_passes(nbytes) * nbytes,
            "median_s": med, "extra_bytes": peak_extra_bytes(peers["fastbn"])}


COLUMNS = ("case", "fastbn ms", "torch ms", "numpy ms", "fused ms", "GB/s", "bw GB/s", "% bw",
           "vs torch", "vs numpy", "2t/1t", "extra MB")


def case_bandwidth(r, bw):
    """The bandwidth a case is measured against: the higher of the machine-wide
    measurement (before/after the cases) and the copy (moments: read) of the case's own
    buffers interleaved with it -- the less flattering figure."""
    machine = bw["read"] if r["op"] == "moments" else bw["copy"]
    return max(machine, r.get("bw_gbs", 0.0))


def table_rows(rows, bw):
    """Per case: the values of COLUMNS, as strings."""
    out = []
    for r in rows:
        med = r["median_s"]
        f = med["fastbn"]
        gbs = r["ideal_bytes"] / f / 1e9
        ref = case_bandwidth(r, bw)
        t, fused = med.get("torch"), med.get("fused floor")
        out.append((r["case"], f"{f * 1e3:.3f}", f"{t * 1e3:.3f}" if t else "-",
                    f"{med['numpy'] * 1e3:.3f}", f"{fused * 1e3:.3f}" if fused else "-",
                    f"{gbs:.1f}", f"{r['bw_gbs']:.1f}" if "bw_gbs" in r else "-",
                    f"{100 * gbs / ref:.0f}",
                    f"{t / f:.2f}" if t else "-", f"{med['numpy'] / f:.1f}",
                    f"{med['fastbn 1 thread'] / f:.2f}", f"{r['extra_bytes'] / 1e6:.2f}"))
    return out


def print_table(columns, body, widths, markdown=False, numbers=False):
    """Rows of string cells as Markdown, or as fixed-width text (numbers: cells after the
    first right-aligned and cut to the width)."""
    if markdown:
        print("| " + " | ".join(columns) + " |")
        print("|" + "---|" * len(columns))
        for cells in body:
            print("| " + " | ".join(cells) + " |")
        return
    for cells in (tuple(columns),) + tuple(body):
        print(" ".join(f"{c[:w]:>{w}}" if numbers and i else f"{c:{w}}"
                       for i, (c, w) in enumerate(zip(cells, widths))))


# ------------------------------------------------------------------ targets
# The targets of the performance issue, per case: fastbn over PyTorch (same threads), over
# the naive NumPy formulas, % of the measured bandwidth, and 2 threads over 1.
TORCH_TARGETS = {("train", "nchw"): 3.0, ("train", "nhwc"): 2.5, ("infer", "nchw"): 1.2,
                 ("infer", "nhwc"): 1.2, ("backward", "nchw"): 1.8, ("backward", "nhwc"): 3.0}
BW_TARGETS = {"train": 70, "infer": 80, "backward": 70, "moments": 80}
NUMPY_TARGET = 10.0
THREADS_TARGET = 1.6
LARGE_BYTES = 8 * 2 ** 20  # "large shapes" for the 2-vs-1-thread target


def case_targets(r):
    """[(name, peer or None, target)] for one result row."""
    shape, op = tuple(r["shape"]), r["op"]
    big = shape == (32, 64, 56, 56)
    out = []
    if r["case"].startswith("small"):
        out.append(("<= 0.5x torch's time", "torch", 2.0))
    elif big and r["dtype"] == "float16":
        out.append(("1.5x torch bfloat16", "torch", 1.5))
    elif big and (op, r["layout"]) in TORCH_TARGETS:
        t = TORCH_TARGETS[op, r["layout"]]
        out.append((f"{t:g}x torch", "torch", t))
    elif shape in ((128, 512, 7, 7), (8, 256, 28, 28), (256, 2048)):
        out.append(("1.5x torch", "torch", 1.5))
    if big and r["dtype"] == "float32" and op in BW_TARGETS:
        out.append((f"{BW_TARGETS[op]}% of bw", None, BW_TARGETS[op]))
    out.append((f"{NUMPY_TARGET:g}x numpy", "numpy", NUMPY_TARGET))
    if r["bytes_per_pass"] >= LARGE_BYTES:
        out.append((f"{THREADS_TARGET:g}x 2t/1t", "fastbn 1 thread", THREADS_TARGET))
    return out


def unavoidable_bytes(r):
    """A row's unavoidable traffic (computed for runs saved before it was recorded)."""
    if "unavoidable_bytes" in r:
        return r["unavoidable_bytes"]
    case = Case(r["op"], tuple(r["shape"]), r["dtype"], r["layout"])
    return case.unavoidable_passes(r["bytes_per_pass"]) * r["bytes_per_pass"]


def target_rows(rows, bw, bw1=None):
    """Per case and target: the value reached, and for a speed-up not reached what it
    would take: fastbn at peer time / target moves the traffic it cannot avoid (the ideal
    traffic; channels-last training and backward: Case.unavoidable_passes) at `need` GB/s, shown
    as % of the case's bandwidth (case_bandwidth). Above 100 %, the target asks fastbn to
    move its bytes faster than this machine copied (read) memory at any point of the run.
    Where the case has a fused floor (Case.fused_rows, Case.two_pass_pieces), it also
    shows what that access pattern alone reaches: a target beyond it is beyond the core's
    order of passes (a reduction finished before the outputs it feeds are written) --
    where the floor was at least as fast as fastbn in that run; a floor slower than fastbn
    (its place in the loop, the machine's drift) bounds nothing and says so.
    For 2 threads over 1 the bound is how much the machine's own 256 MB copy (read) gained
    from the second thread: a memory-bound operation cannot gain more."""
    out = []
    for r in rows:
        med = r["median_s"]
        f = med["fastbn"]
        ref = case_bandwidth(r, bw)
        for name, peer, target in case_targets(r):
            if peer is None:
                value = 100 * r["ideal_bytes"] / f / 1e9 / ref
            elif peer not in med:
                continue
            else:
                value = med[peer] / f
            need = ""
            extra = unavoidable_bytes(r) / r["ideal_bytes"]
            if value < target and peer is None and extra > 1:
                need = f"{target * extra:.0f}% of bw on its unavoidable traffic"
            elif value < target and peer in ("torch", "numpy") and not r["case"].startswith("small"):
                gbs = unavoidable_bytes(r) / (med[peer] / target) / 1e9
                need = f"{gbs:.0f} GB/s = {100 * gbs / ref:.0f}% of bw"
            elif value < target and peer == "fastbn 1 thread" and bw1:
                key = "read" if r["op"] == "moments" else "copy"
                need = f"the machine's {key}: {bw[key] / bw1[key]:.2f}x"
            fused = med.get("fused floor")
            if value < target and fused and peer in (None, "torch", "numpy"):
                alone = 100 * r["ideal_bytes"] / fused / 1e9 / ref if peer is None else med[peer] / fused
                fused_need = (f"its access pattern alone: {alone:.0f}%" if peer is None
                              else f"its access pattern alone: {alone:.2f}x")
                if fused > f:  # a floor slower than fastbn itself bounds nothing
                    fused_need += " (slower than fastbn: no bound)"
                elif alone < target:
                    fused_need += " (beyond it)"
                need = f"{need}; {fused_need}" if need else fused_need
            out.append((r["case"], name, f"{value:.2f}" if peer else f"{value:.0f}%",
                        "yes" if value >= target else "no", need))
    return out


TARGET_COLUMNS = ("case", "target", "reached", "met", "what it would take")


def report_targets(rows, bw, bw1, markdown=False):
    body = target_rows(rows, bw, bw1)
    print_table(TARGET_COLUMNS, body, (44, 22, 8, 4, 30), markdown)


def report_summary(paths, markdown=False):
    """The targets over several saved runs: per case and target, the value reached in each
    run, in how many runs it was met, and what it would have taken in the runs that
    missed it."""
    runs = []
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        meta = saved["meta"]
        runs.append(target_rows(saved["rows"], meta["bandwidth_gbs"], meta.get("bandwidth_1thread_gbs")))
    merged = {}
    for rows in runs:
        for case, target, reached, met, need in rows:
            merged.setdefault((case, target), []).append((reached, met, need))
    columns = ("case", "target", "reached (each run)", "met", "what it would take (runs that missed)")
    body = []
    for (case, target), vals in merged.items():
        needs = [v[2] for v in vals if v[1] == "no" and v[2]]
        body.append((case, target, " / ".join(v[0] for v in vals),
                     f"{sum(v[1] == 'yes' for v in vals)}/{len(vals)}", "; ".join(needs)))
    print_table(columns, body, (44, 22, 24, 5, 60), markdown)


def report(rows, bw, threads, markdown=False):
    print_table(COLUMNS, table_rows(rows, bw), [44] + [9] * (len(COLUMNS) - 1), markdown,
                numbers=True)
    print(f"(ms per call, medians; {threads} threads; fused ms: the core's access pattern "
          f"alone (floor_fused, floor_two_pass); bw GB/s: a {threads}-thread pass with the "
          f"case's ideal traffic on its buffers, next to no arithmetic, interleaved with it; % bw "
          f"against the higher of that and the machine-wide copy {bw['copy']:.1f} GB/s (read "
          f"{bw['read']:.1f} GB/s))")


def plot(rows, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [r["case"] for r in rows]
    vs_torch = [r["median_s"].get("torch", np.nan) / r["median_s"]["fastbn"] for r in rows]
    fig, ax = plt.subplots(figsize=(10, 0.35 * len(rows) + 1.5))
    y = np.arange(len(rows))
    ax.barh(y, vs_torch, color="tab:blue")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel("speed-up of fastbn over PyTorch CPU (same threads)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def pin_heap():
    """Keep large allocations on glibc's heap and freed memory in the process.

    Every peer returns a freshly allocated output. By default glibc hands big blocks back
    to the OS when they are freed (heap trimming, and an mmap threshold that moves with
    the sizes freed), so whichever peer runs after the naive NumPy formulas (which free
    several full-size temporaries) pays page faults on its output: measured 630 faults
    and 3.0 -> 4.4 ms on a (32,64,56,56) backward. That is the allocator reacting to the
    previous peer, not the kernel being measured, so the fixed thresholds below give
    every peer a warm heap. Linux/glibc only; elsewhere (or with --no-heap-pin) nothing
    changes."""
    import ctypes
    import ctypes.util
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    # 32 MiB is the largest mmap threshold glibc accepts on 64-bit (larger blocks are
    # always mapped fresh); the cases' outputs are smaller
    ok = mallopt(M_MMAP_THRESHOLD, 32 << 20) and mallopt(M_TRIM_THRESHOLD, (1 << 31) - 1)
    return bool(ok)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=25)
    p.add_argument("--quick", action="store_true", help="the (32,64,56,56) cases only")
    p.add_argument("--only", default="", help="run the cases whose label contains this")
    p.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    p.add_argument("--from-json", help="print the table of an earlier run's JSON, run nothing")
    p.add_argument("--summary", nargs="+", metavar="JSON",
                   help="print the targets over several earlier runs' JSON, run nothing")
    p.add_argument("--no-heap-pin", dest="heap_pin", action="store_false",
                   help="leave glibc's malloc thresholds alone (see pin_heap)")
    p.add_argument("--json", default="compare.json")
    p.add_argument("--png", default="compare.png")
    args = p.parse_args()
    if args.summary:
        report_summary(args.summary, args.markdown)
        return
    if args.from_json:
        with open(args.from_json) as f:
            saved = json.load(f)
        meta = saved["meta"]
        report(saved["rows"], meta["bandwidth_gbs"], meta["threads"], args.markdown)
        if "bandwidth_1thread_gbs" in meta:
            print()
            report_targets(saved["rows"], meta["bandwidth_gbs"], meta["bandwidth_1thread_gbs"],
                           args.markdown)
        return
    if args.heap_pin:
        pin_heap()
    fbn.set_num_threads(args.threads)
    if torch is not None:
        torch.set_num_threads(args.threads)
    before = measure_bandwidth(args.threads)
    one_before = measure_bandwidth(1)
    rng = np.random.default_rng(0)
    rows = [run_case(c, args.repeats, rng) for c in default_cases(args.quick)
            if args.only in c.label]
    after = measure_bandwidth(args.threads)
    one_after = measure_bandwidth(1)
    # a shared machine's bandwidth drifts within a run: % of bandwidth is taken against
    # the higher of the two measurements (the less flattering figure)
    bw = {k: max(before[k], after[k]) for k in before}
    bw1 = {k: max(one_before[k], one_after[k]) for k in one_before}
    print(f"bandwidth before the cases: copy {before['copy']:.1f}, read {before['read']:.1f} "
          f"GB/s; after: copy {after['copy']:.1f}, read {after['read']:.1f} GB/s; 1 thread: "
          f"copy {bw1['copy']:.1f}, read {bw1['read']:.1f} GB/s")
    report(rows, bw, args.threads, args.markdown)
    print()
    report_targets(rows, bw, bw1, args.markdown)
    meta = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
            "threads": args.threads, "torch": getattr(torch, "__version__", None),
            "numpy": np.__version__, "fastbn": fbn.__version__, "bandwidth_gbs": bw,
            "bandwidth_before_gbs": before, "bandwidth_after_gbs": after,
            "bandwidth_1thread_gbs": bw1,
            "date": time.strftime("%Y-%m-%d")}
    with open(args.json, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)
    if args.png:
        plot(rows, args.png)
    print(f"wrote {args.json}" + (f", {args.png}" if args.png else ""))


if __name__ == "__main__":
    main()
