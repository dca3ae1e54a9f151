"""Train the drop-in fused LightNet on scikit-learn's handwritten digits.

    python examples/train_digits.py                    # 10 epochs, plot in examples/out/
    python examples/train_digits.py --epochs 3 --out /tmp/digits --backend reference
    python examples/train_digits.py --stock            # the same recipe with stock torch.nn

The digits dataset ships inside scikit-learn (1797 8x8 images); each image is upsampled 4x to
1x32x32, the input size of the seed tutorial's LightNet. Recipe: SGD (lr 0.02, momentum 0.9),
batch 32, cross-entropy. Prints the held-out accuracy and saves a loss/accuracy plot (PNG).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from sklearn.model_selection import train_test_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

import lightnet_ops as lo  # noqa: E402


def load_data(device: torch.device):
    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0                 # (1797, 8, 8) in [0, 1]
    images = images.repeat(4, axis=1).repeat(4, axis=2)[:, None]     # (1797, 1, 32, 32)
    x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=0.2, random_state=0,
                                              stratify=digits.target)
    mean, std = x_tr.mean(), x_tr.std()
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray((a - mean) / std)).to(device)  # noqa: E731
    return to_t(x_tr), torch.from_numpy(y_tr).to(device), to_t(x_te), torch.from_numpy(y_te).to(device)


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train()
    return acc


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.02)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--backend", default="auto", help="lightnet_ops backend: auto, cpu, cuda, triton, reference")
    p.add_argument("--stock", action="store_true", help="train StockLightNet (torch.nn) instead")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "out",
                   help="folder for the plot (created if missing)")
    args = p.parse_args()

    device = torch.device(args.device)
    x_tr, y_tr, x_te, y_te = load_data(device)
    torch.manual_seed(args.seed)
    model = (lo.StockLightNet() if args.stock else lo.LightNet(backend=args.backend)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=args.momentum)
    order = torch.Generator().manual_seed(args.seed + 1)

    losses, accs = [], []
    steps_per_epoch = (len(x_tr) + args.batch_size - 1) // args.batch_size
    t0 = time.perf_counter()
    with tqdm(total=args.epochs * steps_per_epoch, unit="step") as bar:
        for epoch in range(args.epochs):
            perm = torch.randperm(len(x_tr), generator=order).to(device)
            for i in range(0, len(x_tr), args.batch_size):
                idx = perm[i:i + args.batch_size]
                opt.zero_grad()
                loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
                loss.backward()
                opt.step()
                losses.append(loss.item())
                bar.set_postfix(epoch=epoch + 1, loss=f"{losses[-1]:.4f}")
                bar.update()
            accs.append(accuracy(model, x_te, y_te))
            bar.write(f"epoch {epoch + 1}: held-out accuracy {accs[-1]:.4f}")
    elapsed = time.perf_counter() - t0

    name = "StockLightNet" if args.stock else f"LightNet (backend={args.backend})"
    print(f"{name}: held-out accuracy {accs[-1]:.4f} after {args.epochs} epochs ({elapsed:.1f} s on {device})")

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / ("digits_stock.png" if args.stock else "digits_lightnet.png")
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    ax1.plot(np.arange(1, len(losses) + 1) / steps_per_epoch, losses, lw=0.8)
    ax1.set(xlabel="epoch", ylabel="training loss (cross-entropy)", yscale="log", title="loss")
    ax2.plot(np.arange(1, len(accs) + 1), accs, marker="o")
    ax2.set(xlabel="epoch", ylabel="held-out accuracy", ylim=(min(accs + [0.9]) - 0.01, 1.0), title="accuracy")
    fig.suptitle(f"{name} on scikit-learn digits")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot saved to {path}")


if __name__ == "__main__":
    main()
