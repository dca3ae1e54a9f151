"""LightNet under torch.nn.parallel.DistributedDataParallel: two CPU processes (gloo) each take half
of every global batch; DDP averages the gradients, so training must match one process that sees
the whole batch (same init, same batches, same SGD). float64, so the comparison is tight."""

from __future__ import annotations

import socket
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

import lightnet_ops as lo

from _digits import digits_32

WORLD, GLOBAL_BATCH, STEPS, LR, MOMENTUM = 2, 32, 12, 0.02, 0.9


def _batches(n_train: int) -> list[torch.Tensor]:
    order = torch.Generator().manual_seed(1)
    perm = torch.randperm(n_train, generator=order)
    return [perm[i * GLOBAL_BATCH:(i + 1) * GLOBAL_BATCH] for i in range(STEPS)]


def _make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return lo.LightNet(backend="cpu").double()


def _worker(rank: int, port: int, out_path: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        x_tr, y_tr, _, _ = digits_32(dtype=torch.float64)
        model = torch.nn.parallel.DistributedDataParallel(_make_model())
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        per_rank = GLOBAL_BATCH // WORLD
        losses = []
        for idx in _batches(len(x_tr)):
            mine = idx[rank * per_rank:(rank + 1) * per_rank]
            opt.zero_grad()
            loss = F.cross_entropy(model(x_tr[mine]), y_tr[mine])
            loss.backward()  # DDP all-reduces (averages) the gradients here
            opt.step()
            global_loss = loss.detach().clone()
            dist.all_reduce(global_loss)
            losses.append(global_loss.item() / WORLD)
        if rank == 0:
            torch.save({"state": model.module.state_dict(), "losses": losses}, out_path)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_two_processes_match_single_process(tmp_path):
    t0 = time.perf_counter()
    out = tmp_path / "rank0.pt"
    mp.spawn(_worker, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    ddp = torch.load(out)

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        x_tr, y_tr, _, _ = digits_32(dtype=torch.float64)
        model = _make_model()
        init = {k: v.clone() for k, v in model.state_dict().items()}
        opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
        losses = []
        for idx in _batches(len(x_tr)):
            opt.zero_grad()
            loss = F.cross_entropy(model(x_tr[idx]), y_tr[idx])
            loss.backward()
            opt.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(n)

    assert len(ddp["losses"]) == STEPS
    torch.testing.assert_close(torch.tensor(ddp["losses"]), torch.tensor(losses), rtol=1e-10, atol=0)
    assert losses[-1] < losses[0]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(ddp["state"][k], v, rtol=1e-9, atol=1e-12, msg=k)
        assert not torch.equal(v, init[k]), f"{k} did not move"
    print(f"DDP test: {time.perf_counter() - t0:.1f} s")
