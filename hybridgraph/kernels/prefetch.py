"""An L2 prefetch from inside a Triton kernel (PTX `prefetch.global.L2`).

Kernels launched early under programmatic dependent launch use it before their
`gdc_wait`, on what the kernel before them does not write (the GEMV's weights, attention's
keys of earlier steps), so HBM works while that kernel finishes.
"""

import triton
import triton.language as tl


@triton.jit
def prefetch_l2(ptrs):
    """One prefetch per pointer (one per 128-byte line is enough); the asm's dummy output
    keeps it from being dropped."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1]; mov.u32 $0, 0;", "=r,l", [ptrs],
                              dtype=tl.int32, is_pure=False, pack=1)
