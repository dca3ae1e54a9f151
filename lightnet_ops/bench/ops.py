"""How each op is benchmarked: one description per op builds the timed callable of every
implementation (a lightnet_ops backend, the ``stock`` composition, ``torch.compile`` of it, and for
whole-model inference ONNX Runtime's CPU provider when it is installed) for a case and a mode, plus
the op's compulsory work (FLOPs, bytes) for the roofline columns, and declares the op's cases.

An op's own entry is declared with the op: the ``BENCH`` class of ``lightnet_ops/api/<op>.py`` (its
cases, stock composition, seeded inputs and cost; see :class:`FunctionalOpBench`), which :data:`OPS`
collects, so adding an op needs no edit here. ``cases.CASES`` collects the cases, and
``benchmarks/bench_ops.py`` times them.
"""

from __future__ import annotations

import importlib.util
import io
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

import lightnet_ops as lo
from lightnet_ops import api

from .problems import Case

#: Implementations that are not lightnet_ops backends: stock eager and torch.compile of stock.
PEERS = ("stock", "compile")
#: ONNX Runtime (CPU execution provider) running the stock model exported with torch.onnx.export:
#: an optional peer of the whole-model inference cases, listed by default when onnxruntime and onnx
#: are importable.
ORT = "onnxruntime"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


@dataclass
class Runner:
    """fn: the timed callable. exclude: tensors whose storages do not count as activations.
    forward_with_grad: a forward that builds the autograd graph (for the saved-tensor measurement).
    flops / min_bytes: work and compulsory memory traffic of one call, when the op defines them.
    torch_memory: whether the call allocates through PyTorch, so that its peak memory can be measured
    (False for ONNX Runtime, whose allocations PyTorch does not see)."""

    fn: Callable[[], Any]
    exclude: list
    forward_with_grad: Optional[Callable[[], Any]] = None
    flops: Optional[float] = None
    min_bytes: Optional[float] = None
    torch_memory: bool = True


def _compile(fn: Callable) -> Callable:
    # dynamic=False: one static graph per shape, as a user with fixed shapes gets.
    return torch.compile(fn, dynamic=False)


def _uniform(shape: tuple, bound: float, g: torch.Generator) -> torch.Tensor:
    """nn.Linear / nn.Conv2d style initialisation: U(-bound, bound)."""
    return (torch.rand(shape, generator=g) * 2 - 1) * bound


class OpBench:
    """How one op is benchmarked. Subclasses set `name` (the Case.op that selects them) and `modes`
    and implement `runner`. `cases`: the cases declared with this entry (usually its own; an op's
    entry also declares its per-call cases, which name a CallBench entry). `fused_op`: the
    lightnet_ops op (contract name) the entry times alone, None for a model or the per-call cost."""

    name: str
    modes: tuple
    cases: tuple = ()
    fused_op: Optional[str] = None

    def runner(self, case: Case, impl: str, mode: str, device: torch.device) -> Runner:
        raise NotImplementedError

    def supports(self, case: Case, impl: str, mode: str) -> bool:
        """Whether `impl` is measured on (case, mode); the harness leaves the others out of the group.
        Default: every backend and the stock / compile peers, not ONNX Runtime."""
        return impl != ORT

    def _check_mode(self, case: Case, mode: str) -> None:
        if mode not in self.modes:
            raise ValueError(f"mode {mode!r} does not apply to case {case.name}")


class FunctionalOpBench(OpBench):
    """A fused op called as ``f(x, weight, bias, *args)``: the fused op of a backend
    (``lightnet_ops.functional.<fused_op>``) against its stock composition and ``torch.compile`` of
    that composition, in inference (``fwd``) and with the gradients of (x, weight, bias) (``fwd+bwd``).

    What differs per op is declared with the op, as the ``BENCH`` class of its API module
    (``lightnet_ops/api/<op>.py``): `name`, ``make_cases()``, `stock` (the composition), `inputs`,
    `cost`, and for the per-call cases (:class:`CallBench`) `first_op`, ``first_module(case)`` and
    ``fused_module(case, backend)``. :func:`op_bench` mixes that class into this one."""

    modes = ("fwd", "fwd+bwd")

    def __init__(self) -> None:
        self.cases = tuple(self.make_cases())

    def make_cases(self) -> tuple:
        """The op's cases (its own, and the per-call cases it declares for CallBench)."""
        return ()

    @staticmethod
    def stock(*args: Any) -> torch.Tensor:
        raise NotImplementedError

    def fused(self, backend: str) -> Callable[..., torch.Tensor]:
        """The op's public function with `backend`, called with the stock composition's arguments."""
        op = getattr(lo.functional, self.fused_op)

        def f(*args, _backend=backend):
            return op(*args, backend=_backend)

        return f

    def inputs(self, case: Case, device: torch.device, dtype: torch.dtype) -> tuple[tuple, tuple, tuple]:
        """((x, weight, bias), fixed trailing arguments, output shape), seeded."""
        raise NotImplementedError

    def cost(self, case: Case, mode: str) -> tuple[Optional[float], Optional[float]]:
        """(FLOPs, compulsory bytes) of one call: every input read once, every output written once."""
        return None, None

    @staticmethod
    def uniform(shape: tuple, bound: float, g: torch.Generator) -> torch.Tensor:
        """nn.Linear / nn.Conv2d style initialisation: U(-bound, bound)."""
        return _uniform(shape, bound, g)

    @staticmethod
    def element_size(case: Case) -> int:
        """Bytes per element of the case's dtype."""
        return torch.empty((), dtype=DTYPES[case.dtype]).element_size()

    def implementation(self, impl: str) -> Callable[..., torch.Tensor]:
        if impl == "stock":
            return self.stock
        if impl == "compile":
            return _compile(self.stock)
        return self.fused(impl)

    def runner(self, case: Case, impl: str, mode: str, device: torch.device) -> Runner:
        tensors, args, out_shape = self.inputs(case, device, DTYPES[case.dtype])
        f = self.implementation(impl)
        flops, nbytes = self.cost(case, mode)
        if mode == "fwd":
            x, w, b = tensors

            def fwd():
                with torch.no_grad():
                    return f(x, w, b, *args)

            return Runner(fwd, [x, w, b], None, flops, nbytes)
        self._check_mode(case, mode)
        leaves = [t.detach().requires_grad_(True) for t in tensors]
        g = torch.Generator().manual_seed(1)
        grad_out = torch.randn(out_shape, generator=g).to(tensors[0].device, tensors[0].dtype)

        def forward_with_grad():
            return f(*leaves, *args)

        def fwd_bwd():
            out = f(*leaves, *args)
            return torch.autograd.grad(out, leaves, grad_out)

        return Runner(fwd_bwd, list(leaves), forward_with_grad, flops, nbytes)


def op_bench(fused_op: str, spec: type) -> FunctionalOpBench:
    """The benchmark entry of `fused_op` (a contract name): `spec`, the ``BENCH`` class of the op's API
    module, mixed into FunctionalOpBench (the op's module stays free of the harness's imports)."""
    cls = type(spec.__name__, (spec, FunctionalOpBench), {"fused_op": fused_op, "__doc__": spec.__doc__,
                                                         "__module__": spec.__module__})
    return cls()


class CallBench(OpBench):
    """Per-call host cost on a tiny problem: one fused call of a backend against ONE stock call, the
    first op of the chain it replaces (``F.conv2d`` / ``F.linear``, or the ``nn.Conv2d`` /
    ``nn.Linear`` module call when `modules`), inference under ``torch.no_grad()``. The case's shape
    picks the op (the fused op's entry that declares cases of that shape type: its ``first_op``,
    ``first_module`` and ``fused_module``); the problem is small enough that the time is argument
    handling, dispatch and output allocation. No torch.compile peer: it would time a graph guard.

    Fused functional calls pass only the tensors and ``backend``, as a user calling with the
    defaults does; modules are built with the stock module's weights."""

    modes = ("fwd",)

    def __init__(self, name: str, modules: bool) -> None:
        self.name, self.modules = name, modules

    def supports(self, case: Case, impl: str, mode: str) -> bool:
        return impl not in ("compile", ORT) and mode in self.modes

    @staticmethod
    def op_of(case: Case) -> FunctionalOpBench:
        """The fused op's entry whose cases have the shape type of `case`."""
        for bench in OPS.values():
            if isinstance(bench, FunctionalOpBench) and any(type(c.shape) is type(case.shape) for c in bench.cases):
                return bench
        raise ValueError(f"no fused op's entry declares cases of shape {type(case.shape).__name__} ({case.name})")

    def stock_module(self, case: Case) -> torch.nn.Module:
        """The stock module of the case's first op (nn.Conv2d / nn.Linear), seeded."""
        torch.manual_seed(0)
        return self.op_of(case).first_module(case)

    def fused_module(self, case: Case, backend: str) -> torch.nn.Module:
        """The fused module of the case (Conv2dReLUMaxPool2d / LinearReLU) with stock_module's weights."""
        m = self.op_of(case).fused_module(case, backend)
        m.load_state_dict(self.stock_module(case).state_dict())
        return m

    def input(self, case: Case, device: torch.device) -> torch.Tensor:
        """The seeded input the op's own cases get: (batch, C, H, W) for a conv, (batch, in_features) for a
        linear."""
        return self.op_of(case).inputs(case, device, DTYPES[case.dtype])[0][0]

    def runner(self, case: Case, impl: str, mode: str, device: torch.device) -> Runner:
        self._check_mode(case, mode)
        if not self.supports(case, impl, mode):
            raise ValueError(f"{impl} is not measured on the per-call case {case.name}")
        dtype = DTYPES[case.dtype]
        x = self.input(case, device)
        stock = self.stock_module(case).to(device, dtype)
        if self.modules:
            f = stock if impl == "stock" else self.fused_module(case, impl).to(device, dtype)

            def call():
                with torch.no_grad():
                    return f(x)

            return Runner(call, [x, *stock.parameters()])
        w, b = stock.weight.detach(), stock.bias.detach()
        op = self.op_of(case)
        if impl == "stock":
            first = op.first_op

            def call():
                with torch.no_grad():
                    return first(x, w, b)
        else:
            fused = getattr(lo.functional, op.fused_op)

            def call(_backend=impl):
                with torch.no_grad():
                    return fused(x, w, b, backend=_backend)

        return Runner(call, [x, w, b])


def ort_missing() -> list[str]:
    """The packages the ONNX Runtime peer needs that are not importable: onnxruntime, and onnx for
    torch.onnx.export (the peer is optional; the harness runs without both)."""
    return [p for p in ("onnxruntime", "onnx") if importlib.util.find_spec(p) is None]


def ort_available() -> bool:
    """Whether the ONNX Runtime peer can run here (see ort_missing)."""
    return not ort_missing()


def onnx_export(model: torch.nn.Module, x: torch.Tensor) -> bytes:
    """`model` (eval mode) exported to an ONNX model for input `x`'s shape (static shapes).

    Uses the TorchScript-based exporter (``dynamo=False``: needs the ``onnx`` package), else the
    torch.export-based one (needs ``onnx`` and ``onnxscript``). Raises RuntimeError naming the
    missing packages when neither can run."""
    errors = []
    for dynamo in (False, True):
        buf = io.BytesIO()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dynamo:
                    torch.onnx.export(model, (x,), buf, dynamo=True, input_names=["input"],
                                      output_names=["output"], verbose=False)
                else:
                    torch.onnx.export(model, (x,), buf, dynamo=False, input_names=["input"],
                                      output_names=["output"])
            return buf.getvalue()
        except Exception as e:  # noqa: BLE001 - try the other exporter, then say what is missing
            errors.append(f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}")
    missing = [p for p in ("onnx", "onnxscript") if importlib.util.find_spec(p) is None]
    hint = f" (not installed: {', '.join(missing)}; pip install {' '.join(missing)})" if missing else ""
    raise RuntimeError(f"torch.onnx.export failed{hint}: " + "; ".join(errors))


def ort_session(onnx_model: bytes, threads: int) -> Any:
    """An ONNX Runtime CPU-provider session with `threads` intra-op threads (as torch uses),
    sequential execution, every graph optimisation."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3
    return ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])


@dataclass(frozen=True)
class ModelBench(OpBench):
    """A whole classifier: the fused model of a backend against the stock model (eager and
    ``torch.compile``), same initial weights; inference (``fwd``) and an SGD training step (``step``:
    zero_grad, forward, cross-entropy, backward, SGD step).

    stock_model() builds the stock model; fused_model(backend) the fused one (loads its state dict).
    input_shape: one sample's shape; classes: label range of the cross-entropy targets; cases: its cases."""

    name: str
    stock_model: Callable[[], torch.nn.Module]
    fused_model: Callable[[str], torch.nn.Module]
    input_shape: tuple
    classes: int
    modes: tuple = ("fwd", "step")
    cases: tuple = ()

    def supports(self, case: Case, impl: str, mode: str) -> bool:
        """Every backend and peer; ONNX Runtime for float32 inference."""
        return impl != ORT or (mode == "fwd" and case.dtype == "float32")

    def ort_runner(self, case: Case, mode: str, device: torch.device) -> Runner:
        """ONNX Runtime (CPU provider, torch's intra-op thread count) running the stock model exported
        for the case's batch; the input is converted to numpy once, outside the timed call."""
        if mode != "fwd" or device.type != "cpu" or case.dtype != "float32":
            raise ValueError(f"the ONNX Runtime peer runs float32 CPU inference only, not {case.name} {mode} "
                             f"on {device.type}")
        if "onnxruntime" in ort_missing():
            raise RuntimeError("onnxruntime is not installed (pip install onnxruntime)")
        torch.manual_seed(0)
        stock = self.stock_model().eval()
        g = torch.Generator().manual_seed(0)
        x = torch.randn(case.batch, *self.input_shape, generator=g)
        session = ort_session(onnx_export(stock, x), torch.get_num_threads())
        feed = {session.get_inputs()[0].name: x.numpy()}

        def fwd():
            return torch.from_numpy(session.run(None, feed)[0])

        return Runner(fwd, list(stock.parameters()) + [x], torch_memory=False)

    def runner(self, case: Case, impl: str, mode: str, device: torch.device) -> Runner:
        if impl == ORT:
            return self.ort_runner(case, mode, device)
        dtype = DTYPES[case.dtype]
        torch.manual_seed(0)
        stock = self.stock_model()
        if impl in PEERS:
            model = stock
        else:
            model = self.fused_model(impl)
            model.load_state_dict(stock.state_dict())
        model = model.to(device, dtype)
        net = _compile(model) if impl == "compile" else model
        g = torch.Generator().manual_seed(0)
        x = torch.randn(case.batch, *self.input_shape, generator=g).to(device, dtype)
        y = torch.randint(0, self.classes, (case.batch,), generator=g).to(device)
        params = list(model.parameters())
        if mode == "fwd":
            def fwd():
                with torch.no_grad():
                    return net(x)

            return Runner(fwd, params + [x])
        self._check_mode(case, mode)
        opt = torch.optim.SGD(params, lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            loss.backward()
            opt.step()
            return loss

        def forward_with_grad():
            return F.cross_entropy(net(x), y)

        return Runner(step, params + [x], forward_with_grad)


_FWD = ("fwd",)
_LIGHTNET = "LightNet 1x32x32 -> 10: inference forward / SGD training step"
#: Every benchmarked op by the name cases use (Case.op): each fused op's entry, declared with the op
#: (``BENCH`` in ``lightnet_ops/api/<op>.py``, in op name order), then the whole model and the per-call cost.
OPS: dict[str, OpBench] = {
    op.name: op
    for op in (
        *(op_bench(name, module.BENCH) for name, module in api.MODULES.items() if hasattr(module, "BENCH")),
        ModelBench("lightnet", lo.StockLightNet, lambda backend: lo.LightNet(backend=backend), (1, 32, 32), 10,
                   cases=(
                       Case("lightnet_b64", "lightnet", 64, f"{_LIGHTNET}, batch 64", quick=("cpu",)),
                       Case("lightnet_b256", "lightnet", 256, f"{_LIGHTNET}, batch 256", quick=("cuda",)),
                       # Small-batch inference.
                       Case("lightnet_b1", "lightnet", 1, "LightNet 1x32x32 -> 10, batch 1, inference",
                            only_modes=_FWD, quick=("cpu",)),
                       Case("lightnet_b8", "lightnet", 8, "LightNet 1x32x32 -> 10, batch 8, inference",
                            only_modes=_FWD),
                   )),
        CallBench("call_fn", modules=False),
        CallBench("call_module", modules=True),
    )
}


def build_runner(case: Case, impl: str, mode: str, device: torch.device | str) -> Runner:
    """The timed callable for `impl` (a lightnet_ops backend, "stock", "compile" or "onnxruntime")
    on `case`."""
    return OPS[case.op].runner(case, impl, mode, torch.device(device))


def default_backends(device_kind: str) -> list[str]:
    """Backends of this install that run on the device, then the peers (ONNX Runtime on CPU when
    onnxruntime and onnx are installed).

    On CPU, ``triton`` is listed only when TRITON_INTERPRET is set (the interpreter is not a
    performance path); ``cuda`` only on CUDA and ``cpu`` only on CPU."""
    names = [b for b in lo.backends() if b != ("cuda" if device_kind == "cpu" else "cpu")]
    order = {"cpu": 0, "cuda": 0, "triton": 1, "reference": 2}
    peers = list(PEERS) + ([ORT] if device_kind == "cpu" and ort_available() else [])
    return sorted(names, key=order.get) + peers
