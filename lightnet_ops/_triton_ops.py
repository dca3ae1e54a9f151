"""The ``triton`` backend: the Triton kernels registered as torch ops through ``torch.library``.

Ops: for every contract in lightnet_ops/ops that has a kernel module ``triton_kernels/<op>.py``,
``lightnet_ops::triton_<op>`` and ``lightnet_ops::triton_<op>_backward``, with the contract's schema
strings (as the C++ ops) and the module's ``forward`` / ``backward`` launchers; today
triton_conv2d_relu_maxpool2d[_backward] and triton_linear_relu[_backward]. They are
``torch.library.custom_op``s with fake kernels, so ``torch.compile(fullgraph=True)`` treats them
as opaque ops with known output shapes (this also works for CPU tensors under Triton's interpreter,
where Inductor could not compile a user Triton kernel).

Runs on CUDA tensors, and on CPU tensors when Triton's interpreter is on (TRITON_INTERPRET=1 set
before triton is imported). float32, float16 and bfloat16; float64 raises.

Importing this module imports triton; backend_registry guards the import, so lightnet_ops imports
without triton.

Where the kernels come from: setup.py ships the top-level ``triton_kernels/`` directory as the
subpackage ``lightnet_ops.triton_kernels`` (package_dir); a regular install has it at
lightnet_ops/triton_kernels/. A source tree (``setup.py build_ext --inplace``, or an editable install)
has no ``lightnet_ops/triton_kernels``; there `_import_kernels` loads ``<repo>/triton_kernels`` under
that same name, so the kernels are one module, with one name, either way.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any, Callable, Optional

import torch

from .backend_registry import Backend, OpKernels
from .ops import CONTRACTS

_KERNELS_NAME = f"{__package__}.triton_kernels"


def _import_kernels() -> ModuleType:
    """``lightnet_ops.triton_kernels``, from the tree this lightnet_ops package belongs to.

    Installed (regular install): the subpackage lightnet_ops/triton_kernels/ that setup.py ships.
    Source tree (``build_ext --inplace``, or an editable install of this tree): ``<repo>/triton_kernels``,
    loaded by path under the same module name. The source tree is checked before a plain import because
    an editable install of *another* checkout registers a finder that maps the name
    ``lightnet_ops.triton_kernels`` to that checkout's directory, whatever ``lightnet_ops`` is imported.
    """
    if _KERNELS_NAME in sys.modules:
        return sys.modules[_KERNELS_NAME]
    pkg_dir = Path(__file__).resolve().parent
    tree = pkg_dir.parent / "triton_kernels"
    if (pkg_dir / "triton_kernels" / "__init__.py").is_file() or not (tree / "__init__.py").is_file():
        return importlib.import_module(_KERNELS_NAME)
    spec = importlib.util.spec_from_file_location(_KERNELS_NAME, tree / "__init__.py",
                                                  submodule_search_locations=[str(tree)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[_KERNELS_NAME] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[_KERNELS_NAME]
        raise
    setattr(sys.modules[__package__], "triton_kernels", module)
    return module


_kernels = _import_kernels()
INTERPRET: bool = _kernels.INTERPRET


def _input_index(name: str, schema: str) -> int:
    """Position of the argument named ``input`` in a schema: the tensor whose dtype and device the
    launch checks look at."""
    args = torch._C.parse_schema(f"lightnet_ops::{name}{schema}").arguments
    return next(i for i, a in enumerate(args) if a.name == "input")


def _register(name: str, schema: str, launcher: Callable, validate: Optional[Callable], fake: Callable) -> Callable:
    """``lightnet_ops::triton_<name>``: `launcher` (which checks its arguments, then launches) with the
    fake `fake` after the launcher's extra argument checks `validate` and the dtype check."""
    at = _input_index(name, schema)

    def fake_kernel(*args: Any) -> Any:
        if validate is not None:
            validate(*args)
        _kernels._common.check_dtype(name, args[at])
        return fake(*args)

    op = torch.library.custom_op(f"lightnet_ops::triton_{name}", launcher, mutates_args=(), schema=schema)
    op.register_fake(fake_kernel)
    return op


#: op name -> its Triton kernel module, for every contract that has one (CONTRACTS order).
KERNEL_MODULES: dict[str, ModuleType] = {op: _kernels.OP_MODULES[op] for op in CONTRACTS if op in _kernels.OP_MODULES}
#: "triton_<op>" / "triton_<op>_backward" -> the registered custom op.
CUSTOM_OPS: dict[str, Callable] = {}
for _op, _module in KERNEL_MODULES.items():
    _c = CONTRACTS[_op]
    CUSTOM_OPS[f"triton_{_op}"] = _register(_op, _c.schema, _module.forward, getattr(_module, "validate", None),
                                            _c.fake)
    CUSTOM_OPS[f"triton_{_c.backward_name}"] = _register(_c.backward_name, _c.backward_schema, _module.backward,
                                                         getattr(_module, "validate_backward", None), _c.backward_fake)

_lib = torch.ops.lightnet_ops
BACKEND = Backend(
    "triton",
    {op: OpKernels(getattr(_lib, f"triton_{op}"), getattr(_lib, f"triton_{CONTRACTS[op].backward_name}"))
     for op in KERNEL_MODULES},
)
