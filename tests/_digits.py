"""scikit-learn's digits (1797 8x8 images, 10 classes, ships inside scikit-learn) as LightNet inputs:
each image upsampled 4x (nearest) to 1x32x32, scaled to [0, 1], then normalised with the training
set's mean and standard deviation. Shared by the training and DDP tests."""

from __future__ import annotations

import numpy as np
import torch


def digits_32(test_fraction: float = 0.2, seed: int = 0, dtype: torch.dtype = torch.float32):
    """(x_train (N,1,32,32), y_train (N,), x_test, y_test); stratified split, fixed seed."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = digits.images.astype(np.float64) / 16.0                     # (1797, 8, 8) in [0, 1]
    images = images.repeat(4, axis=1).repeat(4, axis=2)[:, None]         # (1797, 1, 32, 32)
    x_tr, x_te, y_tr, y_te = train_test_split(images, digits.target, test_size=test_fraction,
                                              random_state=seed, stratify=digits.target)
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dtype)  # noqa: E731
    return as_t(x_tr), torch.from_numpy(y_tr).long(), as_t(x_te), torch.from_numpy(y_te).long()
