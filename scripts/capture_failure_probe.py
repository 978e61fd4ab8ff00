"""Probe: what state does a failed CUDA-graph capture leave behind (torch's allocator)?"""

import torch

pool = torch.cuda.graph_pool_handle()
stream = torch.cuda.Stream()
x = torch.randn(1024, device="cuda")
with torch.cuda.stream(stream):
    (x * 2).sum()
torch.cuda.synchronize()
g = torch.cuda.CUDAGraph()
try:
    with torch.cuda.graph(g, pool=pool, stream=stream):
        y = x * 2
        y.sum().item()
except Exception as e:
    print("capture failed:", type(e).__name__, str(e)[:120])
try:
    torch.cuda.memory._cuda_endAllocateToPool(torch.cuda.current_device(), pool)
    print("endAllocateToPool: ok")
except Exception as e:
    print("endAllocateToPool raised:", type(e).__name__, str(e)[:200])
for label, p in (("same pool", pool), ("new pool", torch.cuda.graph_pool_handle())):
    g2 = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(g2, pool=p, stream=stream):
            z = x * 3
        g2.replay()
        torch.cuda.synchronize()
        print(label, "capture after failure: ok", bool((z == x * 3).all()))
    except Exception as e:
        print(label, "capture after failure raised:", type(e).__name__, str(e)[:160])
