"""The process group of a tensor-parallel run: who this rank is, its device, the all-reduce.

One process per rank, on one host. The ranks find each other through the environment
torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); our own launcher
(parallel/launch.py) sets the same variables, so both start the same code. Two groups:
`group` carries the all-reduces (NCCL on GPUs, gloo on CPUs) and the per-step inputs,
`control` (always gloo, host memory) carries the leader's step headers, so a follower
learns what to run without synchronising its GPU. On GPUs the all-reduce is NCCL's or
our one-shot Triton kernel over symmetric memory (parallel/symm.py), chosen once per group
by `choose_allreduce` from EngineConfig.allreduce. Every wait is bounded: a rank that
dies or hangs brings the others down with an error, never a silent hang.
"""

from __future__ import annotations

import atexit
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import Tensor

from hybridgraph.engine_config import ALLREDUCE_CHOICES
from hybridgraph.model.config import ModelConfig
from hybridgraph.parallel import symm

log = logging.getLogger(__name__)

# NVLink multicast (NVLS) must stay off on shared hosts, for NCCL and for PyTorch's
# symmetric memory alike: every process we start gets these, overriding the caller's.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            # A collective past its timeout aborts the process instead of hanging it.
            "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
ENV_KEYS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
# Collectives (and joining the group) give up after this long. Generous: ranks load and
# compile concurrently, so they meet within seconds of each other, but a 70B checkpoint
# read from a slow disk can take minutes. HG_TP_TIMEOUT_S overrides.
DEFAULT_TIMEOUT_S = 300.0
# A follower waits this long for the leader's next header before it gives up (the leader
# is hung); HG_TP_CONTROL_TIMEOUT_S overrides. The leader sends a header at least every
# control timeout / HEARTBEATS_PER_TIMEOUT even when idle, so an idle server never trips it.
CONTROL_TIMEOUT_S = 60.0
HEARTBEATS_PER_TIMEOUT = 20


def set_safe_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Force SAFE_ENV into env (default os.environ); returns it."""
    target = os.environ if env is None else env
    target.update(SAFE_ENV)
    return target  # type: ignore[return-value]


def in_worker() -> bool:
    """True inside a rank process (started by torchrun or by our launcher)."""
    return all(k in os.environ for k in ENV_KEYS)


def check_tp(tp: object, config: ModelConfig, device_type: str) -> int:
    """`tp` as an int, or ValueError naming the field and why: below 1, more ranks than
    visible GPUs (CUDA), or a count that doesn't divide the heads, KV heads or the
    feed-forward width (each rank holds whole heads and an equal slice)."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise ValueError(f"tp must be an integer >= 1, got {tp!r}")
    if device_type == "cuda" and tp > 1:
        visible = torch.cuda.device_count()
        if tp > visible:
            raise ValueError(f"tp {tp} needs {tp} GPUs, one per rank; {visible} visible "
                             f"(CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r})")
    for field in ("num_heads", "num_kv_heads", "intermediate_size"):
        value = getattr(config, field)
        if value % tp:
            raise ValueError(f"tp {tp} does not divide {config.name}'s {field} ({value}): "
                             f"each rank must hold an equal share")
    return tp


def _seconds(var: str, default: float) -> float:
    raw = os.environ.get(var)
    try:
        value = float(raw) if raw is not None else default
    except ValueError:
        raise ValueError(f"{var} must be a number of seconds, got {raw!r}") from None
    if value <= 0:
        raise ValueError(f"{var} must be positive, got {raw!r}")
    return value


def control_timeout_s() -> float:
    return _seconds("HG_TP_CONTROL_TIMEOUT_S", CONTROL_TIMEOUT_S)


def heartbeat_s() -> float:
    return control_timeout_s() / HEARTBEATS_PER_TIMEOUT


# auto takes the one-shot kernel up to this many ranks: measured winning on whole models at
# 2 and 4 (llama-2-70b fp16 TP=4 on 4x H200, one machine, 2026-11-27: 11.89 against 12.86
# ms/token over NCCL, 8.2 against 25.0 us a call, with a barrier; without one, 11.39 and
# 4.2 us: KERNELS.md runs 9 and 12). Not measured beyond 4 ranks, so auto keeps NCCL there.
AUTO_ONESHOT_MAX_RANKS = 4


def choose_allreduce(asked: str, device_type: str, start: Callable[[], symm.Staging],
                     ranks: int) -> tuple[str, str, symm.Staging | None]:
    """(method, why, staging) for EngineConfig.allreduce `asked`: the one owner of the
    choice. CPU ranks always sum over gloo. On CUDA, nccl is NCCL; symm_mem and auto call
    `start` (collective: every rank must reach the same answer) and take our one-shot
    Triton kernel over symmetric memory (parallel/symm.py, kernels/oneshot.py; float16,
    bfloat16 and float32 alike) where it succeeds, NCCL where it raises (symm_mem, asked
    for, warns).

    Why auto takes it (2x H200, NVLink, one `bench tp` run each, 2026-11-27): 6.5 us a
    call inside a CUDA graph for an 8 KB float16 message against NCCL's 18.9, and
    llama-2-7b fp16 TP=2 decoded in 3.03 ms/token against 3.23 over NCCL, on two machines.
    (The 10-token TTFT swung by ~0.3 ms either way between them: 4.43 against 4.13, then
    4.10 against 4.36.) At 4 ranks (4x H200): llama-2-70b fp16 TP=4 11.89 against 12.86.
    The barrier-free kernel since (KERNELS.md run 12): 7B TP=2 2.86, 70B TP=4 11.39.
    Beyond AUTO_ONESHOT_MAX_RANKS ranks auto keeps NCCL, without setting up symmetric
    memory."""
    if asked not in ALLREDUCE_CHOICES:
        raise ValueError(f"unknown allreduce {asked!r}; choose from {', '.join(ALLREDUCE_CHOICES)}")
    if device_type != "cuda":
        return "gloo", f"{asked}: CPU ranks sum over gloo", None
    if asked == "nccl":
        return "nccl", "asked for", None
    if asked == "auto" and ranks > AUTO_ONESHOT_MAX_RANKS:
        return "nccl", (f"auto: NCCL at {ranks} ranks (the one-shot kernel is measured up to "
                        f"{AUTO_ONESHOT_MAX_RANKS}; --allreduce symm_mem forces it)"), None
    try:
        staging = start()
    except Exception as e:  # noqa: BLE001 - no symmetric memory here is an answer, not a crash
        why = f"{asked}: symmetric memory unavailable ({type(e).__name__}: {e})"[:300]
        if asked == "symm_mem":
            log.warning("all-reduce over NCCL, not symm_mem: %s", why)
        return "nccl", why, None
    return "symm_mem", (f"{asked}: one-shot Triton kernel over symmetric memory for "
                        f"messages up to {staging.nbytes} bytes, NCCL above"), staging


@dataclass
class TPGroup:
    rank: int
    size: int
    device: torch.device
    group: dist.ProcessGroup      # all-reduces and step inputs (NCCL or gloo)
    control: dist.ProcessGroup    # step headers, host memory (gloo)
    # The all-reduce Block calls (gloo | nccl | symm_mem) and why: `use_allreduce` sets them.
    allreduce: str = "nccl"
    allreduce_reason: str = "default, until use_allreduce"
    staging: symm.Staging | None = None   # the symmetric buffers, when allreduce is symm_mem

    @property
    def leader(self) -> bool:
        return self.rank == 0

    def use_allreduce(self, asked: str, hidden: int, max_batch: int,
                      dtypes: Sequence[torch.dtype]) -> None:
        """Choose this group's all-reduce (collective: every rank calls it together) for
        [rows, hidden] messages of `dtypes`, its symmetric buffer holding
        max(max_batch, STAGING_ROWS) rows in the widest of them."""
        numel = max(max_batch, symm.STAGING_ROWS) * hidden
        self.allreduce, self.allreduce_reason, self.staging = choose_allreduce(
            asked, self.device.type, lambda: self._staging(numel, dtypes), self.size)

    def _staging(self, numel: int, dtypes: Sequence[torch.dtype]) -> symm.Staging:
        """symm.create on every rank, or an error on every rank: the ranks agree (over
        the control group) before any of them uses it, so none sums alone. They also
        agree that their buffers sit at the same offset in their symmetric blocks, which
        the kernel's peer addresses assume (symm.tables)."""
        staging, error = None, None
        try:
            staging = symm.create(self.group, self.device, numel, dtypes)
        except Exception as e:  # noqa: BLE001 - reported below, on every rank
            error = e
        offset = staging.offset if staging is not None else 0
        # MIN of [ok, offset, -offset]: every rank ok, and the smallest and largest offset.
        agree = torch.tensor([0 if error else 1, offset, -offset], dtype=torch.int64)
        dist.all_reduce(agree, op=dist.ReduceOp.MIN, group=self.control)
        if error is not None:
            raise error
        ok, low, high = agree[0].item(), agree[1].item(), -agree[2].item()
        if staging is None or not ok or low != high:
            symm.drop(self.group.group_name)
            raise RuntimeError("symmetric memory failed on another rank" if not ok else
                               f"symmetric buffers sit at offsets {low}..{high} of their "
                               "blocks on different ranks; the kernel needs one offset")
        return staging

    def all_reduce(self, x: Tensor) -> Tensor:
        """Sum x over ranks: the hook Block calls after attention and feed-forward.

        symm_mem: the custom op (parallel/symm.py), eagerly and under torch.compile alike;
        eagerly a message its staging refuses goes straight to NCCL, in place (compiled,
        the op itself falls back). NCCL/gloo: under torch.compile the functional collective
        (traceable, lowered by Inductor); eagerly the in-place one, which NCCL records into
        a CUDA graph under capture.
        """
        if self.staging is not None and (torch.compiler.is_compiling()
                                         or not self.staging.refusal(x)):
            return torch.ops.hybridgraph.symm_all_reduce(x, self.staging.name)
        if torch.compiler.is_compiling():
            return funcol.all_reduce(x, "sum", self.group)
        dist.all_reduce(x, group=self.group)
        return x

    def all_reduce_add(self, x: Tensor, residual: Tensor) -> Tensor:
        """residual + the sum of x over ranks: Block.reduce_add, the residual add after an
        all-reduce. symm_mem: fused into the one-shot kernel (one launch, the same bits as
        the sum and then the add); NCCL/gloo: `all_reduce`, then the add."""
        if self.staging is not None and (torch.compiler.is_compiling()
                                         or not self.staging.refusal(x, residual)):
            return torch.ops.hybridgraph.symm_all_reduce_add(x, residual, self.staging.name)
        return residual + self.all_reduce(x)

    def close(self) -> None:
        # After NCCL work was captured in CUDA graphs, destroying the group can hang
        # (pytorch#115388); the process is about to exit, which frees it anyway.
        if self.staging is not None:
            symm.drop(self.staging.name)
        if self.device.type != "cuda" and dist.is_initialized():
            dist.destroy_process_group()
        _JOINED.clear()


def rank_device(device: str, local_rank: int) -> torch.device:
    """The device of local rank `local_rank`: cuda:local_rank, or the CPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    kind = torch.device(device)
    if kind.type == "cuda":
        if kind.index is not None:
            raise ValueError(f"device {device!r}: with tp > 1 rank r uses cuda:r; choose the "
                             "GPUs with CUDA_VISIBLE_DEVICES instead")
        return torch.device("cuda", local_rank)
    if kind.type != "cpu":
        raise ValueError(f"device {device!r}: tensor parallelism runs on cuda or cpu")
    return kind


_JOINED: list[TPGroup] = []


def init_group(tp: int, device: str) -> TPGroup:
    """Join the group described by the environment (torchrun's variables); a process
    joins once, and later calls return the same group."""
    if _JOINED:
        if _JOINED[0].size != tp:
            raise ValueError(f"tp {tp} but this process already joined a group of "
                             f"{_JOINED[0].size}")
        return _JOINED[0]
    if not in_worker():
        raise RuntimeError("tp > 1 needs a rank process: run through `hybridgraph ... --tp N` "
                           "(which starts the ranks) or under torchrun "
                           f"(missing {', '.join(k for k in ENV_KEYS if k not in os.environ)})")
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ["LOCAL_RANK"])
    if size != tp:
        raise ValueError(f"tp {tp} but this run has WORLD_SIZE {size}: they must match")
    if int(os.environ.get("LOCAL_WORLD_SIZE", size)) != size:
        raise ValueError(f"WORLD_SIZE {size} spans several hosts (LOCAL_WORLD_SIZE "
                         f"{os.environ['LOCAL_WORLD_SIZE']}): tensor parallelism runs on one host")
    set_safe_env()
    dev = rank_device(device, local)
    timeout = timedelta(seconds=_seconds("HG_TP_TIMEOUT_S", DEFAULT_TIMEOUT_S))
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        # device_id: connect NCCL now, so a missing peer shows up here, not mid-step.
        dist.init_process_group("nccl", rank=rank, world_size=size, timeout=timeout,
                                device_id=dev)
    else:
        dist.init_process_group("gloo", rank=rank, world_size=size, timeout=timeout)
    control = dist.new_group(backend="gloo", timeout=timedelta(seconds=control_timeout_s()))
    method = "nccl" if dev.type == "cuda" else "gloo"
    joined = TPGroup(rank, size, dev, dist.group.WORLD, control, method)
    _JOINED.append(joined)
    # Closed at exit at the latest (close is idempotent): a gloo group left to the
    # interpreter's teardown can abort the process with SIGABRT, "terminate called without
    # an active exception" (pytorch#190489; seen on a CPU follower that returned early).
    atexit.register(joined.close)
    return joined
