"""Development timing of the C++ CPU kernels against stock PyTorch eager (issue 3's CPU table).

Every case is timed stock vs fused (backend="cpu") in the same process with torch.utils.benchmark
(warm-up, then blocked_autorange; median reported). Both sides run with the same thread count.
The official numbers come from the benchmark suite (`python -m lightnet_ops.bench`); this script is
for quick iteration on the kernels.

    .venv/bin/python scripts/time_cpu_kernels.py [--threads 2] [--min-run-time 1.0] [--cases conv1,vgg,...]
"""

from __future__ import annotations

import argparse
import os
import sys

# Time the lightnet_ops of this checkout (an editable install elsewhere would shadow it).
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils import benchmark  # noqa: E402

import lightnet_ops as lo  # noqa: E402

# (name, batch, in_ch, out_ch, size, kernel, padding, target fwd, target fwd+bwd)
CONV_CASES = [
    ("conv1", 64, 1, 6, 32, 3, 0, 3.0, 2.0),
    ("conv2", 64, 6, 16, 15, 3, 0, 3.0, 2.0),
    ("vgg", 8, 64, 64, 56, 3, 1, 1.5, 1.2),
]
# (name, batch, in_features, out_features, target fwd+bwd)
LINEAR_CASES = [
    ("linear_small", 256, 576, 120, 1.1),
    ("linear_large", 4096, 1024, 4096, 1.0),
]
# (name, batch, target)
TRAIN_CASES = [("train_b64", 64, 3.0), ("train_b256", 256, 3.0)]


def _median(stmt, globals_, min_run_time: float, threads: int) -> float:
    t = benchmark.Timer(stmt=stmt, globals=globals_, num_threads=threads)
    t.timeit(3)  # warm-up
    return t.blocked_autorange(min_run_time=min_run_time).median


def conv_cases(min_run_time: float, threads: int, names) -> list[tuple]:
    rows = []
    for name, n, c, k, size, r, pad, t_fwd, t_bwd in CONV_CASES:
        if names and name not in names:
            continue
        torch.manual_seed(0)
        x = torch.randn(n, c, size, size)
        w = (torch.randn(k, c, r, r) / (c * r * r) ** 0.5).requires_grad_()
        b = (torch.randn(k) * 0.1).requires_grad_()
        xg = x.clone().requires_grad_()
        g = dict(x=x, xg=xg, w=w, b=b, F=F, lo=lo, pad=pad, torch=torch)
        g["go"] = torch.randn_like(lo.conv2d_relu_maxpool2d(x, w.detach(), b.detach(), padding=pad, backend="cpu"))
        stock_fwd = "with torch.no_grad(): F.max_pool2d(F.relu(F.conv2d(x, w, b, 1, pad)), 2)"
        fused_fwd = "with torch.no_grad(): lo.conv2d_relu_maxpool2d(x, w, b, padding=pad, backend='cpu')"
        # Forward + backward with gradients for input, weight and bias (the layer inside a network).
        stock_bwd = ("torch.autograd.grad(F.max_pool2d(F.relu(F.conv2d(xg, w, b, 1, pad)), 2), (xg, w, b), go)")
        fused_bwd = ("torch.autograd.grad(lo.conv2d_relu_maxpool2d(xg, w, b, padding=pad, backend='cpu'), "
                     "(xg, w, b), go)")
        for kind, s, f, target in (("fwd", stock_fwd, fused_fwd, t_fwd), ("fwd+bwd", stock_bwd, fused_bwd, t_bwd)):
            ts = _median(s, g, min_run_time, threads)
            tf = _median(f, g, min_run_time, threads)
            rows.append((f"{name} {kind}", ts, tf, target))
    return rows


def linear_cases(min_run_time: float, threads: int, names) -> list[tuple]:
    rows = []
    for name, m, kin, kout, target in LINEAR_CASES:
        if names and name not in names:
            continue
        torch.manual_seed(0)
        x = torch.randn(m, kin).requires_grad_()
        w = (torch.randn(kout, kin) / kin**0.5).requires_grad_()
        b = (torch.randn(kout) * 0.1).requires_grad_()
        go = torch.randn(m, kout)
        g = dict(x=x, w=w, b=b, go=go, F=F, lo=lo, torch=torch)
        s = "torch.autograd.grad(F.relu(F.linear(x, w, b)), (x, w, b), go)"
        f = "torch.autograd.grad(lo.linear_relu(x, w, b, backend='cpu'), (x, w, b), go)"
        ts = _median(s, g, min_run_time, threads)
        tf = _median(f, g, min_run_time, threads)
        rows.append((f"{name} fwd+bwd", ts, tf, target))
    return rows


def train_cases(min_run_time: float, threads: int, names) -> list[tuple]:
    rows = []
    for name, n, target in TRAIN_CASES:
        if names and name not in names:
            continue
        torch.manual_seed(0)
        stock = lo.StockLightNet()
        fused = lo.LightNet(backend="cpu")
        fused.load_state_dict(stock.state_dict())
        x = torch.randn(n, 1, 32, 32)
        y = torch.randint(0, 10, (n,))
        opts = {m: torch.optim.SGD(m.parameters(), lr=1e-3) for m in (stock, fused)}

        def step(model, opt=None):
            opt = opts[model]
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()

        g = dict(step=step, stock=stock, fused=fused)
        ts = _median("step(stock)", g, min_run_time, threads)
        tf = _median("step(fused)", g, min_run_time, threads)
        rows.append((f"{name} step", ts, tf, target))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-run-time", type=float, default=1.0)
    p.add_argument("--cases", default="", help="comma-separated subset of: conv1,conv2,vgg,linear_small,"
                   "linear_large,train_b64,train_b256")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    names = set(filter(None, a.cases.split(",")))
    rows = conv_cases(a.min_run_time, a.threads, names)
    rows += linear_cases(a.min_run_time, a.threads, names)
    rows += train_cases(a.min_run_time, a.threads, names)
    print(f"torch {torch.__version__}, threads {a.threads}, medians")
    print(f"{'case':<24}{'stock ms':>10}{'fused ms':>10}{'ratio':>8}{'target':>8}  ok")
    for case, ts, tf, target in rows:
        ratio = ts / tf
        print(f"{case:<24}{ts * 1e3:>10.3f}{tf * 1e3:>10.3f}{ratio:>8.2f}{target:>8.2f}  {'yes' if ratio >= target else 'NO'}")


if __name__ == "__main__":
    main()
