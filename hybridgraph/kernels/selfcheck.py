"""May the Triton decode kernels run here? Import, device and a small numerical check.

`check_kernels` answers (ok, reason): Triton imports, the device is a CUDA GPU, and every
kernel, run once on small random inputs of the model dtype, matches its float32 reference
within that dtype's tolerance. Programmatic dependent launch is asked for separately
(`pdl_supported`): it needs Hopper (sm_90) or newer. The answer is cached per
(device, dtype, pdl): the check costs a few compilations, once per process.

On a fresh machine those compilations take seconds (3.8 s of an 11.9 s cold start on an
H200, KERNELS.md run 18), and they need only the device and dtype, not the model:
`check_kernels_soon` starts the check on a thread while the weights load, and
`check_kernels` then waits for its answer.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

import torch

from hybridgraph.kernels import triton_import_error

# ‖out − ref‖ / ‖ref‖ bounds against a float32 reference, per model dtype: fp16 and bf16
# operands with float32 accumulation land near 2^-11 and 2^-8 of the norm.
TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float32: 1e-4}

Answer = tuple[bool, str]
_CACHE: dict[tuple[str, torch.dtype, bool], Future[Answer]] = {}
_LOCK = threading.Lock()


def pdl_supported(device: torch.device) -> bool:
    return (device.type == "cuda" and torch.cuda.is_available()
            and torch.cuda.get_device_capability(device)[0] >= 9)


def check_kernels(device: torch.device, dtype: torch.dtype, pdl: bool = False) -> Answer:
    """(True, "ok") when the kernel path may run on device in dtype, else (False, why).
    Waits for a check that `check_kernels_soon` started."""
    device = _indexed(device)
    answer, mine = _entry(device, dtype, pdl)
    if mine:
        _run(answer, device, dtype, pdl)
    return answer.result()


def check_kernels_soon(device: torch.device, dtype: torch.dtype, pdl: bool = False) -> None:
    """Start check_kernels(device, dtype, pdl) on a thread and return at once (nothing
    if it ran or started already): its compiles overlap what the caller does meanwhile,
    e.g. loading the weights."""
    device = _indexed(device)
    answer, mine = _entry(device, dtype, pdl)
    if mine:
        threading.Thread(target=_run, args=(answer, device, dtype, pdl), daemon=True,
                         name="hybridgraph-kernel-check").start()


def _indexed(device: torch.device | str) -> torch.device:
    """"cuda" as "cuda:<current device>": one cache entry, and the device a thread of the
    check must select (a new thread starts on device 0)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and torch.cuda.is_available():
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def _entry(device: torch.device, dtype: torch.dtype, pdl: bool) -> tuple[Future[Answer], bool]:
    """The answer's future for this key, and whether the caller must compute it."""
    key = (str(device), dtype, pdl)
    with _LOCK:
        if key in _CACHE:
            return _CACHE[key], False
        _CACHE[key] = answer = Future()
        return answer, True


def _run(answer: Future[Answer], device: torch.device, dtype: torch.dtype, pdl: bool) -> None:
    try:
        if device.type == "cuda" and torch.cuda.is_available():
            with torch.cuda.device(device):
                answer.set_result(_check(device, dtype, pdl))
        else:
            answer.set_result(_check(device, dtype, pdl))
    except Exception as e:  # never leave a waiter hanging
        answer.set_result((False, f"the kernel self-check failed: {type(e).__name__}: {e}"))


def cannot_run(device: torch.device, dtype: torch.dtype, pdl: bool = False) -> str | None:
    """Why the kernels cannot run here, from what needs no kernel run (Triton's import,
    the device, the dtype, PDL); None where only the numerical check can tell."""
    err = triton_import_error()
    if err is not None:
        return err
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"the Triton kernels need a CUDA GPU (device is {device})"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"the Triton kernels serve float16 and bfloat16, not {dtype}"
    if pdl and not pdl_supported(device):
        return "programmatic dependent launch needs sm_90 or newer"
    return None


def _check(device: torch.device, dtype: torch.dtype, pdl: bool) -> tuple[bool, str]:
    why = cannot_run(device, dtype, pdl)
    if why is not None:
        return False, why
    try:
        from hybridgraph.kernels.launch import compile_ahead
        with compile_ahead() as ahead:  # compile the kernels at once, on a thread pool
            if ahead:  # (launches only compile here; unsupported, the run below does both)
                _numerics(device, dtype, pdl)
        worst, name = _numerics(device, dtype, pdl)
    except Exception as e:  # a compile or launch error: the kernels cannot run here
        return False, f"a Triton kernel failed to run: {type(e).__name__}: {e}"
    if not worst <= TOLERANCE[dtype]:
        return False, f"{name} differs from its reference by {worst:.2e} (> {TOLERANCE[dtype]})"
    return True, "ok"


def _numerics(device: torch.device, dtype: torch.dtype, pdl: bool) -> tuple[float, str]:
    """The worst relative error over one run of each kernel, and which kernel gave it."""
    from hybridgraph.kernels import attention, ffn, gemv, glue
    from hybridgraph.kernels import reference as ref
    from hybridgraph.kernels.workspace import Workspace

    g = torch.Generator(device=device).manual_seed(0)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(dtype)

    b, k, heads, kv, d, seq = 3, 256, 4, 2, 64, 256
    ws = Workspace(1 << 20, 4096, device)
    x, nw = rnd(b, k), 1 + rnd(k, scale=0.2)
    errs: dict[str, float] = {}
    cfg = gemv.GemvConfig(half=16, block_k=64, split_k=2)
    wqkv = rnd((heads + 2 * kv) * d, k, scale=0.05)
    kc, vc = rnd(b, kv, seq, d), rnd(b, kv, seq, d)
    pos = torch.tensor([0, 100, seq - 1], device=device)
    ang = torch.rand(seq, d // 2, generator=g, device=device) * 6  # RoPE tables
    cos, sin = ang.cos().repeat(1, 2).to(dtype), ang.sin().repeat(1, 2).to(dtype)
    q = torch.empty(b, heads * d, device=device, dtype=dtype)
    gemv.gemv(x, wqkv, q, ws, cfg, epi=gemv.EPI_ROPE, norm_w=nw,
              rope=gemv.RopeArgs(cos, sin, pos, kc, vc, heads, kv), pdl=pdl)
    q_ref, k_ref, v_ref = ref.qkv_rope_ref(x, wqkv, cos[pos], sin[pos], heads, kv, nw)
    rows = torch.arange(b, device=device)
    errs["gemv rope q"] = ref.rel_err(q, q_ref)
    errs["gemv rope k"] = ref.rel_err(kc[rows, :, pos], k_ref)
    errs["gemv rope v"] = ref.rel_err(vc[rows, :, pos], v_ref)
    w13 = rnd(2 * 96, k, scale=0.05)
    h = torch.empty(b, 96, device=device, dtype=dtype)
    gemv.gemv(x, w13, h, ws, cfg, epi=gemv.EPI_SILU, norm_w=nw, pdl=pdl)
    errs["gemv silu"] = ref.rel_err(h, ref.swiglu_ref(x, w13, nw))
    w2, res = rnd(k, 96, scale=0.05), rnd(b, k)
    y = torch.empty(b, k, device=device, dtype=dtype)
    gemv.gemv(h, w2, y, ws, gemv.GemvConfig(half=16, block_k=32), epi=gemv.EPI_RESID,
              residual=res, pdl=pdl)
    errs["gemv resid"] = ref.rel_err(y, ref.gemv_ref(h, w2, residual=res))
    # The LM head: float32 logits, each the model dtype's value widened.
    logits = torch.empty(b, 96, device=device, dtype=torch.float32)
    gemv.gemv(y, w2.t().contiguous(), logits, ws, cfg, norm_w=h.new_ones(k), pdl=pdl)
    errs["gemv head"] = (ref.rel_err(logits, ref.gemv_ref(y, w2.t(), h.new_ones(k)))
                         if torch.equal(logits, logits.to(dtype).float()) else float("inf"))
    one = gemv.GemvConfig(half=8, block_k=64, dot=False)  # one row: gate/up, then down
    y1 = ffn.ffn(x[:1], w13, nw, w2, res[:1], h[:1], y[:1].clone(), ws, one,
                 one._replace(block_k=32, split_k=2), pdl=pdl)
    errs["ffn"] = ref.rel_err(y1, ref.gemv_ref(ref.swiglu_ref(x[:1], w13, nw), w2,
                                               residual=res[:1]))
    o = torch.empty_like(q)
    attention.decode_attention(q, kc, vc, pos, seq, o, ws, block_t=32, pdl=pdl)
    errs["attention"] = ref.rel_err(o, ref.decode_attention_ref(q, kc, vc, pos, seq))
    xn, xs = torch.empty_like(x), torch.empty_like(x)
    glue.add_rmsnorm(x, nw, 1e-5, xn, residual=res[:, :k], sum_out=xs, pdl=pdl)
    errs["add_rmsnorm"] = ref.rel_err(xn, ref.rmsnorm_ref(x.float() + res.float(), nw, 1e-5))
    errs.update(_samplers(rnd(4, 5000).float(), ws, pdl))
    torch.cuda.synchronize(device)
    if int(ws.counters.abs().sum()) != 0:
        return float("inf"), "split counters (not reset)"
    name = max(errs, key=lambda n: errs[n])
    return errs[name], name


def _samplers(logits: torch.Tensor, ws, pdl: bool) -> dict[str, float]:
    """Both samplers on float32 logits [4, V], as the runtime calls them (0 or inf each).
    Sampling is checked where its token is certain: temperature 0, top-k 1 and a top-p
    below the best token's probability all draw the argmax; top-k 40 draws one of the 40
    best. (Its draws against runtime.dynamic.sample: tests/test_sampling.py.)"""
    from hybridgraph.kernels import argmax, sampling

    dev, best = logits.device, logits.argmax(-1)
    tok = argmax.argmax(logits, torch.empty(4, dtype=torch.int64, device=dev), ws, pdl=pdl)
    errs = {"argmax": 0.0 if torch.equal(tok, best) else float("inf")}
    temperature = torch.tensor([0.0, 0.7, 1.0, 1.0], device=dev)
    top_k = torch.tensor([0, 1, 0, 40], device=dev)
    top_p = torch.tensor([1.0, 1.0, 1e-6, 1.0], device=dev)
    seed, counter = torch.arange(4, device=dev) + 7, torch.zeros(4, dtype=torch.int64, device=dev)
    drawn = sampling.sample(logits, temperature, top_k, top_p, seed, counter,
                            torch.empty(4, dtype=torch.int64, device=dev), ws, pdl=pdl)
    top40 = logits[3].topk(40).indices
    ok = torch.equal(drawn[:3], best[:3]) and bool((top40 == drawn[3]).any())
    errs["sample"] = 0.0 if ok else float("inf")
    return errs
