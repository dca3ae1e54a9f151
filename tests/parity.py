"""Tolerance rules shared by the parity tests.

float64: tight (1e-9 abs/rel). Lower precisions: the fused result's error against a float64
reference may be at most K times stock PyTorch's own error against it (in the same dtype), plus a
small floor relative to the values' magnitude for when stock happens to be exact.
"""

from __future__ import annotations

import torch

#: The dtypes each (backend, device) pair is tested in.
DTYPES = {
    ("reference", "cpu"): [torch.float64, torch.float32],
    ("cpu", "cpu"): [torch.float64, torch.float32],
    ("triton", "cpu"): [torch.float32],  # Triton's interpreter; the triton backend has no float64
    ("reference", "cuda"): [torch.float32],
    ("cuda", "cuda"): [torch.float64, torch.float32, torch.float16, torch.bfloat16],
    ("triton", "cuda"): [torch.float32, torch.float16, torch.bfloat16],
}
#: Multiple of stock's own error allowed, per dtype.
ERROR_MULTIPLE = {torch.float32: 4.0, torch.float16: 4.0, torch.bfloat16: 4.0}
#: Absolute floor, relative to the reference's magnitude, per dtype (covers stock error ~ 0).
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def max_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    if a.numel() == 0:
        return 0.0
    both_nan = torch.isnan(a.double()) & torch.isnan(ref)
    diff = (a.double() - ref).abs().masked_fill(both_nan, 0)
    return float(diff.max())


def assert_matches(fused: torch.Tensor, stock: torch.Tensor, ref64: torch.Tensor, what: str) -> None:
    """`fused` and `stock` computed in the same dtype, `ref64` the same quantity in float64."""
    assert fused.shape == ref64.shape, f"{what}: shape {tuple(fused.shape)} != {tuple(ref64.shape)}"
    assert fused.dtype == stock.dtype, f"{what}: dtype {fused.dtype} != stock's {stock.dtype}"
    # NaN exactly where the reference has NaN.
    assert torch.equal(torch.isnan(fused.double()), torch.isnan(ref64)), f"{what}: NaN positions differ"
    if fused.dtype == torch.float64:
        torch.testing.assert_close(fused, ref64, rtol=1e-9, atol=1e-9, equal_nan=True, msg=lambda m: f"{what}: {m}")
        return
    scale = float(ref64.nan_to_num().abs().max()) if ref64.numel() else 0.0
    fused_err, stock_err = max_err(fused, ref64), max_err(stock, ref64)
    bound = ERROR_MULTIPLE[fused.dtype] * stock_err + FLOOR[fused.dtype] * max(scale, 1.0)
    assert fused_err <= bound, (
        f"{what}: max error {fused_err:.3g} vs float64 reference exceeds bound {bound:.3g} "
        f"(stock's own error {stock_err:.3g}, scale {scale:.3g})"
    )
