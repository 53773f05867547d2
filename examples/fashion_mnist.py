"""Batch normalization on real data: Fashion-MNIST with fastbn layers in a NumPy MLP.

Reproduces, on Fashion-MNIST, what the batch-norm literature shows (Ioffe & Szegedy 2015;
the d2l and CS231n treatments):

1. Fig. 1(a) analogue: a 784-100-100-100-10 sigmoid MLP, batch 60, small Gaussian
   initialization, trained with and without BN; test accuracy every few hundred steps,
   plus the 15/50/85th percentiles of one sigmoid's input over training (Fig. 1(b, c)).
2. Weight-initialization scale sweep: BN is robust to the scale, the plain net is not.
3. Batch size (5, 10, 50): BN's batch statistics get noisier as batches shrink.

The data are read from IDX files (gzipped or not), by default where Debian's
``dataset-fashion-mnist`` package installs them, and verified by SHA-256. Nothing is
downloaded.

Run:  python examples/fashion_mnist.py             (about two minutes on 2 cores)
      python examples/fashion_mnist.py --full      (the paper's 50,000 steps, longer)
"""
import argparse
import gzip
import hashlib
import os
import sys
import time

import numpy as np

import fastbn as fbn

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
# SHA-256 of the decompressed IDX files
FILES = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}
HOW_TO_GET = ("Fashion-MNIST was not found in {dir!r}. Install Debian's package "
              "(sudo apt-get install dataset-fashion-mnist, files in "
              f"{DEFAULT_DATA_DIR}) or pass --data-dir DIR with the four IDX files "
              "(train-images-idx3-ubyte[.gz], ...) from the Fashion-MNIST release.")


# ---------------------------------------------------------------------------- data

class DataError(RuntimeError):
    pass


def _read(path_base):
    for path, opener in ((path_base, open), (path_base + ".gz", gzip.open)):
        if os.path.exists(path):
            with opener(path, "rb") as f:
                return f.read()
    return None


def parse_idx(raw):
    """An IDX file (uint8 data) as a NumPy array."""
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError("not an IDX file of unsigned bytes")
    ndim = raw[3]
    dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    offset = 4 + 4 * ndim
    data = np.frombuffer(raw, dtype=np.uint8, offset=offset)
    if data.size != int(np.prod(dims)):
        raise DataError(f"IDX size mismatch: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def load_fashion_mnist(data_dir=DEFAULT_DATA_DIR):
    """(train_x, train_y, test_x, test_y): float32 images in [0, 1] flattened to 784,
    int64 labels. Raises DataError with instructions when files are missing or corrupt."""
    arrays = {}
    for name, digest in FILES.items():
        raw = _read(os.path.join(data_dir, name))
        if raw is None:
            raise DataError(HOW_TO_GET.format(dir=data_dir))
        got = hashlib.sha256(raw).hexdigest()
        if got != digest:
            raise DataError(f"{name} in {data_dir!r} has SHA-256 {got}, expected {digest}: "
                            "the file is corrupt or not Fashion-MNIST")
        arrays[name] = parse_idx(raw)

    def images(a):
        return (a.reshape(len(a), -1).astype(np.float32) / 255.0)

    return (images(arrays["train-images-idx3-ubyte"]),
            arrays["train-labels-idx1-ubyte"].astype(np.int64),
            images(arrays["t10k-images-idx3-ubyte"]),
            arrays["t10k-labels-idx1-ubyte"].astype(np.int64))


# ---------------------------------------------------------------------------- network

class Linear:
    def __init__(self, n_in, n_out, init_std, rng):
        self.W = (rng.standard_normal((n_in, n_out)) * init_std).astype(np.float32)
        self.b = np.zeros(n_out, np.float32)

    def forward(self, x):
        self.x = x
        return x @ self.W + self.b

    def backward(self, g):
        self.dW = self.x.T @ g
        self.db = g.sum(axis=0)
        return g @ self.W.T

    def params(self):
        return [(self.W, "dW"), (self.b, "db")]


class Sigmoid:
    def forward(self, x):
        self.y = 0.5 * (1.0 + np.tanh(0.5 * x))  # the logistic sigmoid, without overflow
        return self.y

    def backward(self, g):
        return g * self.y * (1.0 - self.y)


class BN:
    """fastbn.BatchNorm as a network layer (channels = features, axis=1 of (N, C));
    `make` builds the fastbn layer (fastbn.SyncBatchNorm for data-parallel training)."""

    def __init__(self, n, make=fbn.BatchNorm):
        self.layer = make(n)

    def forward(self, x):
        return self.layer(x)

    def backward(self, g):
        return self.layer.backward(g)

    def params(self):
        return [(self.layer.weight, "grad_weight"), (self.layer.bias, "grad_bias")]

    def owner(self):
        return self.layer


class MLP:
    """784-100-100-100-10 sigmoid network, with BN before each sigmoid or without."""

    def __init__(self, batch_norm, init_std, seed, hidden=(100, 100, 100), make_bn=fbn.BatchNorm):
        rng = np.random.default_rng(seed)
        sizes = (784,) + tuple(hidden)
        self.layers = []
        for n_in, n_out in zip(sizes[:-1], sizes[1:]):
            self.layers.append(Linear(n_in, n_out, init_std, rng))
            if batch_norm:
                self.layers.append(BN(n_out, make_bn))
            self.layers.append(Sigmoid())
        self.layers.append(Linear(sizes[-1], 10, init_std, rng))
        self.probe_index = len(self.layers) - 2  # the last sigmoid: watch its input

    def train(self, mode=True):
        for layer in self.layers:
            if isinstance(layer, BN):
                layer.layer.train(mode)

    def forward(self, x, probe=False):
        probed = None
        for i, layer in enumerate(self.layers):
            if probe and i == self.probe_index:
                probed = x
            x = layer.forward(x)
        return (x, probed) if probe else x

    def step(self, x, labels, lr, batch_total=None, reduce_grad=None):
        """One SGD step. Data-parallel: `batch_total` is the global batch size and
        `reduce_grad(array)` sums an affine layer's gradient over the processes (the BN
        layers' gradients are global already)."""
        logits = self.forward(x)
        loss, g = softmax_cross_entropy(logits, labels, batch_total)
        for layer in reversed(self.layers):
            g = layer.backward(g)
        for layer in self.layers:
            if hasattr(layer, "params"):
                owner = layer.owner() if isinstance(layer, BN) else layer
                for p, grad_name in layer.params():
                    grad = getattr(owner, grad_name)
                    if reduce_grad is not None and isinstance(layer, Linear):
                        grad = reduce_grad(grad)
                    p -= lr * grad
        return loss

    def parameters(self):
        out = []
        for layer in self.layers:
            if hasattr(layer, "params"):
                out.extend(p for p, _ in layer.params())
        return out


def softmax_cross_entropy(logits, labels, batch_total=None):
    """Mean cross-entropy over the (global) batch and its gradient for these rows."""
    z = logits - logits.max(axis=1, keepdims=True)
    p = np.exp(z)
    p /= p.sum(axis=1, keepdims=True)
    n = len(labels)
    total = batch_total or n
    loss = -np.log(p[np.arange(n), labels] + 1e-12).sum() / total
    p[np.arange(n), labels] -= 1.0
    return float(loss), (p / total).astype(np.float32)


def accuracy(net, x, labels, probe=False):
    net.train(False)
    out = net.forward(x, probe=probe)
    net.train(True)
    logits, probed = out if probe else (out, None)
    acc = float((logits.argmax(axis=1) == labels).mean())
    return (acc, probed) if probe else acc


def train(data, *, batch_norm, init_std, batch_size, steps, lr, seed, eval_every=None,
          progress=None):
    """Train one network; -> dict with the accuracy curve (and sigmoid-input percentiles)."""
    train_x, train_y, test_x, test_y = data
    net = MLP(batch_norm, init_std, seed)
    rng = np.random.default_rng(seed + 1000)
    curve, percentiles = [], []
    eval_every = eval_every or steps
    order = rng.permutation(len(train_x))
    pos = 0
    for step in range(1, steps + 1):
        if pos + batch_size > len(order):
            order, pos = rng.permutation(len(train_x)), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        net.step(train_x[idx], train_y[idx], lr)
        if step % eval_every == 0 or step == steps:
            acc, probed = accuracy(net, test_x, test_y, probe=True)
            curve.append((step, acc))
            percentiles.append(np.percentile(probed[:, 0], [15, 50, 85]))
        if progress is not None:
            progress.update(1)
    return {"curve": np.array(curve), "percentiles": np.array(percentiles),
            "final": curve[-1][1]}


# ---------------------------------------------------------------------------- experiments

def _progress(total, desc):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, disable=not sys.stderr.isatty())


def run(data, *, steps, sweep_steps, lr, seed, init_std, inits, batch_sizes, eval_every,
        out_dir, plot=True):
    results = {}
    t0 = time.perf_counter()

    # 1. Fig. 1(a): accuracy over training, with and without BN
    print(f"\n[1] 784-100-100-100-10 sigmoid MLP, batch 60, init N(0, {init_std}^2), "
          f"SGD lr={lr}, {steps} steps")
    bar = _progress(2 * steps, "figure 1")
    fig1 = {bn: train(data, batch_norm=bn, init_std=init_std, batch_size=60, steps=steps,
                      lr=lr, seed=seed, eval_every=eval_every, progress=bar)
            for bn in (False, True)}
    if bar is not None:
        bar.close()
    print(f"{'step':>8} {'without BN':>11} {'with BN':>9}")
    for (s, a0), (_, a1) in zip(fig1[False]["curve"], fig1[True]["curve"]):
        print(f"{int(s):8d} {a0:11.4f} {a1:9.4f}")
    results["figure1"] = fig1

    # 2. initialization scale
    print(f"\n[2] initialization scale sweep, batch 60, {sweep_steps} steps each: test accuracy")
    bar = _progress(2 * len(inits) * sweep_steps, "init sweep")
    sweep = {(std, bn): train(data, batch_norm=bn, init_std=std, batch_size=60,
                              steps=sweep_steps, lr=lr, seed=seed, progress=bar)["final"]
             for std in inits for bn in (False, True)}
    if bar is not None:
        bar.close()
    print(f"{'init std':>9} {'without BN':>11} {'with BN':>9}")
    for std in inits:
        print(f"{std:9.3g} {sweep[(std, False)]:11.4f} {sweep[(std, True)]:9.4f}")
    results["init_sweep"] = sweep

    # 3. batch size
    print(f"\n[3] batch size, init N(0, {init_std}^2), {sweep_steps} steps each: test accuracy")
    bar = _progress(2 * len(batch_sizes) * sweep_steps, "batch sizes")
    sizes = {(bs, bn): train(data, batch_norm=bn, init_std=init_std, batch_size=bs,
                             steps=sweep_steps, lr=lr, seed=seed, eval_every=max(1, sweep_steps // 10),
                             progress=bar)
             for bs in batch_sizes for bn in (False, True)}
    if bar is not None:
        bar.close()
    print(f"{'batch':>6} {'without BN':>11} {'with BN':>9}")
    for bs in batch_sizes:
        print(f"{bs:6d} {sizes[(bs, False)]['final']:11.4f} {sizes[(bs, True)]['final']:9.4f}")
    results["batch_sizes"] = sizes
    print(f"\ntotal time {time.perf_counter() - t0:.0f} s "
          f"({fbn.get_num_threads()} fastbn threads)")

    if plot:
        paths = save_plots(results, out_dir, init_std=init_std, inits=inits,
                           batch_sizes=batch_sizes)
        print("saved " + ", ".join(paths))
    return results


def save_plots(results, out_dir, *, init_std, inits, batch_sizes):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    fig1 = results["figure1"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for bn, style in ((False, "--"), (True, "-")):
        c = fig1[bn]["curve"]
        axes[0].plot(c[:, 0], c[:, 1], style, label="with BN" if bn else "without BN")
    axes[0].set(xlabel="training step", ylabel="test accuracy", title="(a) test accuracy")
    axes[0].legend()
    for ax, bn, title in ((axes[1], False, "(b) without BN"), (axes[2], True, "(c) with BN")):
        c, p = fig1[bn]["curve"], fig1[bn]["percentiles"]
        for j, q in enumerate((15, 50, 85)):
            ax.plot(c[:, 0], p[:, j], label=f"{q}th pct")
        ax.set(xlabel="training step", title=f"{title}: input to a last-layer sigmoid")
        ax.legend(fontsize=8)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "fashion_mnist_fig1.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    sweep = results["init_sweep"]
    for bn, style in ((False, "o--"), (True, "o-")):
        axes[0].semilogx(inits, [sweep[(s, bn)] for s in inits], style,
                         label="with BN" if bn else "without BN")
    axes[0].set(xlabel="initial weight std", ylabel="test accuracy",
                title="initialization scale", ylim=(0, 1))
    axes[0].legend()
    sizes = results["batch_sizes"]
    for bs in batch_sizes:
        for bn, style in ((False, "--"), (True, "-")):
            c = sizes[(bs, bn)]["curve"]
            axes[1].plot(c[:, 0], c[:, 1], style,
                         label=f"batch {bs}, {'BN' if bn else 'no BN'}")
    axes[1].set(xlabel="training step", ylabel="test accuracy",
                title=f"batch size (init std {init_std})")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    paths.append(os.path.join(out_dir, "fashion_mnist_sweeps.png"))
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)
    return paths


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=DEFAULT_DATA_DIR)
    p.add_argument("--out", default="fastbn_example_output", help="where the PNGs go")
    p.add_argument("--full", action="store_true", help="the paper's 50,000 steps")
    p.add_argument("--steps", type=int, help="steps of experiment 1")
    p.add_argument("--sweep-steps", type=int, help="steps of each run in experiments 2-3")
    p.add_argument("--lr", type=float, default=0.5)
    p.add_argument("--init-std", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    steps = args.steps or (50000 if args.full else 20000)
    sweep_steps = args.sweep_steps or (20000 if args.full else 3000)
    try:
        data = load_fashion_mnist(args.data_dir)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"Fashion-MNIST from {args.data_dir}: {len(data[0])} training and {len(data[2])} "
          "test images (SHA-256 verified)")
    run(data, steps=steps, sweep_steps=sweep_steps, lr=args.lr, seed=args.seed,
        init_std=args.init_std, inits=[0.01, 0.05, 0.3, 1.0, 3.0],
        batch_sizes=[5, 10, 50], eval_every=max(1, steps // 20), out_dir=args.out,
        plot=not args.no_plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
