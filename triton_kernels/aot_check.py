"""Compiles the Triton kernels ahead of time for a GPU architecture, without a GPU.

The interpreter (TRITON_INTERPRET=1) runs the kernels' Python on CPU tensors, but it does not check what
only the compiler checks: constexpr-ness, power-of-two blocks, ``tl.dot`` shape and dtype rules, loop-carried
types, shared-memory use. This compiles every kernel through Triton's full pipeline (TTIR -> TTGIR -> LLVM ->
PTX -> cubin with ptxas) for ``--arch`` (default sm_90, the H100), so those errors show up on a CPU-only
machine. It cannot check run-time behaviour (results, out-of-resources at launch).

    TRITON_INTERPRET=0 python -m lightnet_ops.triton_kernels.aot_check [--arch 90] [--all-configs] [--dtypes fp16,...]

Exit status 0 when everything compiled.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import TYPE_CHECKING, Iterator

if TYPE_CHECKING:
    from ._common import AotJob


def jobs(dtypes: list[str], all_configs: bool) -> Iterator[AotJob]:
    """Every compile job: per dtype, each op module's `aot_jobs` (OP_MODULES order), then the shared kernels'."""
    from . import OP_MODULES, _common

    for dt in dtypes:
        for module in OP_MODULES.values():
            yield from module.aot_jobs([dt], all_configs)
        yield from _common.aot_jobs([dt], all_configs)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="CUDA compute capability as an int (90 = H100)")
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--all-configs", action="store_true", help="every autotune config, not just the defaults")
    args = ap.parse_args(argv)

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ._common import INTERPRET

    if INTERPRET:
        print("aot_check: run with TRITON_INTERPRET=0 (the interpreter compiles nothing)", file=sys.stderr)
        return 2
    target = GPUTarget("cuda", args.arch, 32)
    n, t0 = 0, time.time()
    for fn, ptrs, consts in jobs(args.dtypes.split(","), args.all_configs):
        consts = dict(consts)
        opts = {"num_warps": consts.pop("num_warps"), "num_stages": consts.pop("num_stages")}
        sig = {name: "constexpr" if name in consts else ptrs.get(name, "i32") for name in fn.arg_names}
        t = time.time()
        try:
            compiled = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=target, options=opts)
        except Exception as e:  # noqa: BLE001 - report which kernel failed, with the compiler's message
            print(f"FAILED {fn.__name__} {ptrs} {consts} {opts}:\n{type(e).__name__}: {e}", file=sys.stderr)
            return 1
        n += 1
        print(f"ok {fn.__name__:26s} {ptrs.get('x_ptr', ptrs.get('a_ptr', ptrs.get('go_ptr')))} "
              f"{consts} {opts} shared={compiled.metadata.shared} ({time.time() - t:.1f}s)", flush=True)
    print(f"aot_check: compiled {n} kernels for sm_{args.arch} with triton {triton.__version__} "
          f"in {time.time() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
