"""Where does a prefill's wall time go beyond its kernels? (issue 10 experiment)

    python scripts/ttft_probe.py [--model llama-2-7b] [--lengths 10,256,300,500]

For each prompt length: which graph serves it, the TTFT the engine gives (host ids in,
token id out), the served graph's replay alone (CUDA events) and the rest of the
prefill step pieces timed on the host, so a gap between TTFT and the kernels is placed.
With --trace, one request is profiled: the host's runtime calls and the GPU's work on one
clock, so the GPU's wait for the host before the graph and the tail after it are placed;
and the graph's replay from an idle GPU against queued behind other work (launch_cost).
With --events, requests are timed on the GPU's clock (events at the request's start, around
the graph's replay and after the finish, and once the host holds the token), so the
TTFT the host sees is split into GPU-side pieces; with --stamps, the host's µs between
the points before the graph's launch, and the prefill's pieces timed alone. With --gaps,
one replay of each served graph is profiled: GPU busy against the replay's
span, and the largest idle gaps between consecutive kernels with their neighbours. With
--idle, TTFT after 0.2 s of idle, the host sleeping or spinning, the GPU left idle or fed a
tiny kernel every 5 ms, and --events' and --stamps' pieces back to back and after 0.2 s
asleep: which side's wake a spaced request pays.
"""

from __future__ import annotations

import statistics
import time

import torch
from probe_common import probe_engine, probe_parser  # scripts/: beside this file

from hybridgraph.bench.table import make_prompt


def med(xs: list[float]) -> float:
    return round(statistics.median(xs), 3)


def gaps(graph: torch.cuda.CUDAGraph, top: int = 12) -> dict[str, object]:
    """Profile one replay of `graph`: busy vs span, idle between kernels, the worst gaps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from hybridgraph.bench.profile import family

    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        graph.replay()
        torch.cuda.synchronize()
    ks = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                if e.device_type == DeviceType.CUDA)
    if not ks:
        return {"kernels": 0}
    busy = sum(b - a for a, b, _ in ks)
    holes = [(ks[i + 1][0] - ks[i][1], ks[i][2], ks[i + 1][2]) for i in range(len(ks) - 1)]
    idle = sum(max(0.0, h) for h, _, _ in holes)
    fams: dict[str, float] = {}
    per: dict[str, list[float]] = {}
    for a, b, name in ks:
        fams[family(name)] = fams.get(family(name), 0.0) + b - a
        per.setdefault(name[:70], []).append(b - a)
    by_next: dict[str, float] = {}
    for h, _, nxt in holes:
        by_next[family(nxt)] = by_next.get(family(nxt), 0.0) + max(0.0, h)
    return {"kernels": len(ks), "span_us": round(ks[-1][1] - ks[0][0], 1),
            "busy_us": round(busy, 1), "idle_us": round(idle, 1),
            "idle_before_family_us": {k: round(v, 1) for k, v in
                                      sorted(by_next.items(), key=lambda kv: -kv[1])},
            "busy_by_family_us": {k: round(v, 1) for k, v in
                                  sorted(fams.items(), key=lambda kv: -kv[1])},
            "top_kernels": [(k, len(v), round(sum(v) / len(v), 1)) for k, v in
                            sorted(per.items(), key=lambda kv: -sum(kv[1]))[:8]],
            "gaps_over_5us": sum(1 for h, _, _ in holes if h > 5),
            "worst": [(round(h, 1), a[:60], b[:60]) for h, a, b in sorted(holes)[-top:]]}


def host_split(engine, prompt: list[int], runs: int) -> dict[str, float]:
    """Median host µs per generate(prompt, 1) spent in each piece of the prefill path
    (methods wrapped with timers; the GPU is idle until the graph launches)."""
    acc: dict[str, list[float]] = {}
    undo = []

    def wrap(obj, name: str, label: str) -> None:
        fn = getattr(obj, name)
        undo.append((obj, name, fn))

        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                acc.setdefault(label, []).append((time.perf_counter() - t0) * 1e6)
        object.__setattr__(obj, name, timed)   # DynamicOps is a frozen dataclass

    wrap(engine, "_load_sampling", "load_sampling")
    wrap(engine, "_prefill", "prefill_host_total")
    if hasattr(engine.ops, "fit_to_bucket"):   # older trees fitted prompts on the device
        wrap(engine.ops, "fit_to_bucket", "fit_to_bucket")
    wrap(engine.runner, "plan", "plan")
    wrap(engine.runner.cache.graphs[engine.runner.plan("prefill", 1, len(prompt),
                                                       "greedy").served].graph,
         "replay", "graph_replay_launch")
    wrap(engine.steps, "finish_prefill", "finish_prefill")
    wrap(engine.reader, "read", "read_token (sync)")
    total = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        engine.generate(prompt, 1, stop_ids=[])
        total.append((time.perf_counter() - t0) * 1e6)
    for obj, name, fn in reversed(undo):
        object.__setattr__(obj, name, fn)
    out = {k: round(statistics.median(v), 1) for k, v in acc.items()}
    out["generate_total"] = round(statistics.median(total), 1)
    return out


def gpu_clock(engine, prompt: list[int], runs: int, gap_s: float = 0.0) -> dict[str, float]:
    """Median ms of generate(prompt, 1)'s pieces on the GPU's clock: request start (an event
    on the idle GPU) -> graph start -> graph end -> finish end -> an event the host records
    once it holds the token. Beside them the engine's TTFT and the host's wall time.
    gap_s: the host sleeps that long before each request (the canaries run before it)."""
    plan = engine.runner.plan("prefill", 1, len(prompt), "greedy")
    graph = engine.runner.cache.graphs[plan.served].graph
    steps = engine.steps
    marks: list[torch.cuda.Event] = []
    stamps: list[float] = []  # the host's clock at each mark

    def mark() -> None:
        e = torch.cuda.Event(enable_timing=True)
        stamps.append(time.perf_counter())
        e.record()
        marks.append(e)
    replay, finish = graph.replay, steps.finish_prefill

    def timed_replay() -> None:
        mark()
        replay()
        mark()

    def timed_finish(*a, **k):
        out = finish(*a, **k)
        mark()
        return out
    graph.replay = timed_replay
    object.__setattr__(steps, "finish_prefill", timed_finish)
    cols: dict[str, list[float]] = {}
    try:
        for _ in range(runs):
            cols.setdefault("cpu_canary_us", []).append(canary_us())
            cols.setdefault("wake_us", []).append(wake_us())
            torch.cuda.synchronize()
            rest(gap_s)
            marks.clear()
            stamps.clear()
            t0 = time.perf_counter()
            mark()
            res = engine.generate(prompt, 1, stop_ids=[])
            mark()
            wall = (time.perf_counter() - t0) * 1e3
            torch.cuda.synchronize()
            start, g0, g1, fin, held = marks
            for k, v in (("to_graph", start.elapsed_time(g0)), ("graph", g0.elapsed_time(g1)),
                         ("finish", g1.elapsed_time(fin)), ("to_host", fin.elapsed_time(held)),
                         ("gpu_span", start.elapsed_time(held)), ("ttft", res.ttft_ms),
                         ("host_wall", wall),
                         ("host_to_graph", (stamps[1] - stamps[0]) * 1e3),
                         ("host_graph_to_held", (stamps[4] - stamps[1]) * 1e3)):
                cols.setdefault(k, []).append(v)
    finally:
        del graph.replay
        object.__setattr__(steps, "finish_prefill", finish)
    return {k: med(v) for k, v in cols.items()}


def rest(gap_s: float, spin: bool = False) -> None:
    """gap_s of host idle: asleep, or spinning on the clock (the core kept busy)."""
    if not spin:
        time.sleep(gap_s)
        return
    end = time.perf_counter() + gap_s
    while time.perf_counter() < end:
        pass


def stamps(engine, prompt: list[int], runs: int, gap_s: float = 0.0, spin: bool = False,
           ) -> dict[str, float]:
    """Median host µs between points of generate(prompt, 1) before the graph launches:
    the call, _generate's entry, _prefill's entry, the runner's run, the graph's replay;
    beside them the prefill's own pieces timed alone (fitting and copying the prompt).
    gap_s: the host rests that long before each request and each piece (`rest`)."""
    plan = engine.runner.plan("prefill", 1, len(prompt), "greedy")
    graph = engine.runner.cache.graphs[plan.served].graph
    marks: list[float] = []
    undo = []

    def stamp(obj, name: str) -> None:
        fn = getattr(obj, name)
        undo.append((obj, name, fn))

        def stamped(*a, **k):
            marks.append(time.perf_counter())
            return fn(*a, **k)
        object.__setattr__(obj, name, stamped)
    for obj, name in ((engine, "_generate"), (engine, "_prefill"), (engine.runner, "run"),
                      (graph, "replay")):
        stamp(obj, name)
    names = ("call_to_generate", "generate_to_prefill", "prefill_to_run", "run_to_replay")
    cols: dict[str, list[float]] = {}
    try:
        for _ in range(runs):
            torch.cuda.synchronize()
            rest(gap_s, spin)
            marks.clear()
            marks.append(time.perf_counter())
            engine.generate(prompt, 1, stop_ids=[])
            for k, a, b in zip(names, marks[:4], marks[1:5], strict=True):
                cols.setdefault(k, []).append((b - a) * 1e6)
    finally:
        for obj, name, _ in reversed(undo):  # the class's method again
            object.__delattr__(obj, name)
    bufs, t = engine.bufs, plan.length
    alone = {"load_prompts": lambda: bufs.load_prompts([prompt], 1, t, 0),
             "copy_ids": lambda: bufs.prompt_ids[:1, :t].copy_(bufs._stage_ids[:t].view(1, t),
                                                             non_blocking=True),
             "event_record": lambda: torch.cuda.Event().record(),
             "plan": lambda: engine.runner.plan("prefill", 1, len(prompt), "greedy")}
    for k, fn in alone.items():
        if k in ("load_prompts", "copy_ids") and not hasattr(bufs, "load_prompts"):
            continue
        for _ in range(runs):
            torch.cuda.synchronize()
            rest(gap_s, spin)
            t0 = time.perf_counter()
            fn()
            cols.setdefault(k + "_alone", []).append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return {k: round(statistics.median(v), 1) for k, v in cols.items()}


def canary_us() -> float:
    """Host µs of a fixed piece of pure Python: the CPU's own speed at this moment."""
    t0 = time.perf_counter()
    x = 0
    for i in range(2000):
        x += i
    return (time.perf_counter() - t0) * 1e6


def wake_us() -> float:
    """GPU µs from an event the host waits for (behind ~0.5 ms of sleep) to the next event
    the host records on waking: how long the host takes to see the GPU done and act."""
    torch.cuda._sleep(500_000)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    a.synchronize()
    b.record()
    b.synchronize()
    return a.elapsed_time(b) * 1e3


def idle_ttft(engine, prompt: list[int], runs: int, gap_s: float = 0.2) -> dict[str, float]:
    """Median TTFT (ms) back to back and after gap_s of idle, the host asleep (time.sleep)
    or spinning on its clock, the GPU idle or running a ~10 us kernel every 5 ms; and
    asleep, then one small copy each way (untimed) just before the request: whether the
    copies' wake after idle is what the request pays."""
    host = torch.zeros(8, dtype=torch.int64).pin_memory()
    dev = torch.zeros(8, dtype=torch.int64, device="cuda")

    def wait(spin: bool, feed: bool, copies: bool = False) -> None:
        end = time.perf_counter() + gap_s
        while (left := end - time.perf_counter()) > 0:
            if feed:
                torch.cuda._sleep(10_000)  # ~10 us of GPU clock cycles
            rest(min(0.005, left), spin)
        if feed:
            torch.cuda.synchronize()
        if copies:
            dev.copy_(host, non_blocking=True)
            host.copy_(dev, non_blocking=True)
            torch.cuda.synchronize()
    modes = {"back_to_back": None, "sleep": (False, False), "spin": (True, False),
             "sleep_gpu_fed": (False, True), "spin_gpu_fed": (True, True),
             "sleep_then_copies": (False, False, True)}
    out = {}
    for label, how in modes.items():
        ts = []
        for _ in range(runs):
            if how is not None:
                wait(*how)
            ts.append(engine.generate(prompt, 1, stop_ids=[]).ttft_ms)
        out[label] = med(ts)
    return out


def trace(engine, prompt: list[int], calls: int = 5) -> list[str]:
    """One request's timeline from torch.profiler (host runtime calls and GPU work on one
    clock), relative to the request's start: where the GPU waits on the host before the
    graph, and what runs between the graph's last kernel and the token on the host. The
    last of `calls` profiled requests; GPU kernels in a row are shown first 2, last 4."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            torch.cuda.synchronize()
            with record_function("request"):
                engine.generate(prompt, 1, stop_ids=[])
    evs = prof.events()
    req = [e for e in evs if e.name == "request"][-1]
    t0, t1 = req.time_range.start, req.time_range.end
    rows = sorted((e.time_range.start, e.time_range.end, e.name,
                   "gpu" if e.device_type == DeviceType.CUDA else "cpu") for e in evs
                  if (e.device_type == DeviceType.CUDA or e.name.startswith(("cuda", "cu")))
                  and t0 <= e.time_range.start <= t1 + 2000)
    out, run = [f"request: {t1 - t0:.1f} us"], []

    def flush() -> None:
        skipped = [f"    ... {len(run) - 6} kernels"]
        out.extend(run if len(run) <= 6 else run[:2] + skipped + run[-4:])
        run.clear()
    for a, b, name, where in rows:
        line = f"  {where} {a - t0:8.1f} -> {b - t0:8.1f}  {name[:60]}"
        if where == "gpu" and "memcpy" not in name.lower():
            run.append(line)
            continue
        flush()
        out.append(line)
    flush()
    return out


def launch_cost(graph: torch.cuda.CUDAGraph, runs: int) -> dict[str, float]:
    """The graph's replay timed from an idle GPU, and queued behind ~1 ms of GPU work (a
    sleep kernel), so the host's launch is done before the GPU reaches it: the difference
    is what launching the graph costs a request that finds the GPU idle. Also the host's
    own time in replay() (µs)."""
    idle = [replay_ms(graph) for _ in range(runs)]
    queued = [replay_ms(graph, queued=True) for _ in range(runs)]
    call = []
    for _ in range(runs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        graph.replay()
        call.append((time.perf_counter() - t0) * 1e6)
    torch.cuda.synchronize()
    return {"replay_idle_ms": med(idle), "replay_queued_ms": med(queued),
            "replay_call_us": med(call)}


def replay_ms(graph: torch.cuda.CUDAGraph, rest_s: float = 0.0, queued: bool = False,
              ) -> float:
    """One replay of `graph` timed with CUDA events, after rest_s of idle; queued: behind
    ~1 ms of GPU work, so the launch is done before the GPU reaches the graph."""
    time.sleep(rest_s)
    if queued:
        torch.cuda._sleep(2_000_000)
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    graph.replay()
    b.record()
    b.synchronize()
    return a.elapsed_time(b)


def main() -> None:
    ap = probe_parser(lengths="10,256,300,500", runs=20)
    ap.add_argument("--gaps", action="store_true", help="profile one replay per graph")
    ap.add_argument("--host", action="store_true", help="host µs per prefill piece")
    ap.add_argument("--trace", action="store_true", help="one request's timeline")
    ap.add_argument("--events", action="store_true", help="a request on the GPU's clock")
    ap.add_argument("--stamps", action="store_true", help="host µs before the graph")
    ap.add_argument("--idle", action="store_true", help="TTFT after idle: host or GPU wake")
    ap.add_argument("--coverage", default=None, help="EngineConfig.coverage (default: its)")
    args = ap.parse_args()
    engine = probe_engine(args.model, **({"coverage": args.coverage} if args.coverage else {}))
    runner = engine.runner
    for n in (int(x) for x in args.lengths.split(",")):
        prompt = make_prompt(n, engine.config.vocab_size)
        for _ in range(3):
            engine.generate(prompt, 1, stop_ids=[])
        plan = runner.plan("prefill", 1, n, "greedy")
        ttft = [engine.generate(prompt, 1, stop_ids=[]).ttft_ms for _ in range(args.runs)]
        wall = []
        for _ in range(args.runs):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.generate(prompt, 1, stop_ids=[])
            torch.cuda.synchronize()
            wall.append((time.perf_counter() - t0) * 1e3)
        replay, rested = [], []
        if plan.served is not None:
            graph = runner.cache.graphs[plan.served].graph
            replay = [replay_ms(graph) for _ in range(args.runs)]
            # each replay after 0.3 s idle: the clocks a first request finds
            rested = [replay_ms(graph, rest_s=0.3) for _ in range(5)]
        step = []
        for _ in range(args.runs):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize()
            a.record()
            runner.run(plan)
            b.record()
            b.synchronize()
            step.append(a.elapsed_time(b))
        print({"len": n, "served": str(plan.served), "length": plan.length,
               "ttft_ms": med(ttft), "generate_wall_ms": med(wall),
               "replay_ms": med(replay) if replay else None,
               "rested_replay_ms": med(rested) if rested else None, "run_step_ms": med(step)},
              flush=True)
        if args.host and plan.served is not None:
            print({"len": n, "host_us": host_split(engine, prompt, args.runs)}, flush=True)
        if args.stamps and plan.served is not None:
            print({"len": n, "stamps_us": stamps(engine, prompt, args.runs)}, flush=True)
        if args.idle:
            print({"len": n, "idle_ttft_ms": idle_ttft(engine, prompt, args.runs)}, flush=True)
            if plan.served is not None:
                for gap in (0.0, 0.2):
                    print({"len": n, "gap_s": gap,
                           "gpu_clock_ms": gpu_clock(engine, prompt, args.runs, gap),
                           "stamps_us": stamps(engine, prompt, args.runs, gap)}, flush=True)
                print({"len": n, "gap_s": 0.2, "spin": True,
                       "stamps_us": stamps(engine, prompt, args.runs, 0.2, spin=True)},
                      flush=True)
        if args.events and plan.served is not None:
            print({"len": n, "gpu_clock_ms": gpu_clock(engine, prompt, args.runs)}, flush=True)
        if args.trace and plan.served is not None:
            # Before the profiler: once it has run, launches in this process cost more.
            graph = runner.cache.graphs[plan.served].graph
            print({"len": n, "launch": launch_cost(graph, args.runs)}, flush=True)
            print("\n".join([f"len {n}, traced:"] + trace(engine, prompt)), flush=True)
        if args.gaps and plan.served is not None:
            print({"len": n, "gaps": gaps(runner.cache.graphs[plan.served].graph)}, flush=True)
    print(engine.stats().get("graphs"))


if __name__ == "__main__":
    main()
