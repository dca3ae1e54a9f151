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


def _jobs(dtypes: list[str], all_configs: bool):
    from . import _common, conv2d_relu_maxpool2d as conv, linear_relu as lin

    def configs(launcher):
        cs = launcher.configs if all_configs else [launcher.default]
        return [dict(c.kwargs, num_warps=c.num_warps, num_stages=c.num_stages) for c in cs]

    for dt in dtypes:
        p = "*" + dt
        flags = {"FP32_IEEE": dt == "fp32", "UPCAST": False}
        for c in configs(conv._conv_fwd_kernel):
            for has_bias, need_argmax in ((True, True), (False, False)):
                ptrs = {"x_ptr": p, "w_ptr": p, "b_ptr": p, "out_ptr": p, "am_ptr": "*u8" if need_argmax else p}
                yield conv._conv_fwd_kernel.fn, ptrs, dict(c, HAS_BIAS=has_bias, NEED_ARGMAX=need_argmax, **flags)
        yield conv._route_kernel, {"go_ptr": p, "am_ptr": "*u8", "gc_ptr": p}, dict(BLOCK=1024, num_warps=4,
                                                                                    num_stages=1)
        for c in configs(conv._conv_bwd_input_kernel):
            yield conv._conv_bwd_input_kernel.fn, {"gc_ptr": p, "w_ptr": p, "gi_ptr": p}, dict(c, **flags)
        for c in configs(conv._conv_bwd_weight_kernel):
            for part, bias_grad in (("*fp32", True), (p, True), ("*fp32", False)):
                ptrs = {"gc_ptr": p, "x_ptr": p, "gw_ptr": part, "gb_ptr": part}
                yield conv._conv_bwd_weight_kernel.fn, ptrs, dict(c, BIAS_GRAD=bias_grad, **flags)
        for c in configs(lin._gemm_kernel):
            # forward (bias+ReLU), forward without bias, grad_input (gated), grad_weight split / unsplit
            for has_bias, relu, gate, bias_grad, part in ((True, True, False, False, p), (False, True, False, False, p),
                                                          (False, False, True, False, p),
                                                          (False, False, True, True, "*fp32"),
                                                          (False, False, True, True, p)):
                ptrs = {"a_ptr": p, "gate_ptr": p, "b_ptr": p, "c_ptr": part, "bias_ptr": p, "rs_ptr": part}
                yield lin._gemm_kernel.fn, ptrs, dict(c, HAS_BIAS=has_bias, RELU=relu, GATE_A=gate,
                                                      BIAS_GRAD=bias_grad, **flags)
        for gated in (True, False):
            for block_k, block_l in ((16, 128), (64, 1), (64, 16)):
                yield _common._channel_sum_kernel, {"x_ptr": p, "gate_ptr": p, "out_ptr": p}, dict(
                    GATED=gated, BLOCK_K=block_k, BLOCK_L=block_l, num_warps=4, num_stages=1)


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
    for fn, ptrs, consts in _jobs(args.dtypes.split(","), args.all_configs):
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
