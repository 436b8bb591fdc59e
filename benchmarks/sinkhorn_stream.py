"""Streaming log-domain Sinkhorn on an N x N correlation-distance cost that is never stored whole
(default N = 14336, the FFN width of Llama-3-8B: a dense float32 cost would be 822 MB, float64 1.6 GB,
and the dual updates of an in-memory Sinkhorn hold several such matrices).

    python benchmarks/sinkhorn_stream.py                     # CPU, 14336 x 14336, 3 iterations
    python benchmarks/sinkhorn_stream.py --n 4096 --iters 20 --json
    python benchmarks/sinkhorn_stream.py --device cuda       # the same on a GPU, when one is present

The cost is `vlm_merge.transport.CorrCost` of two random activation matrices [tokens, N] (tokens = 256
by default), computed block by block (--block rows/columns, 2048 by default) inside each of the two
log-sum-exp passes of an iteration. Reports the peak resident memory of the process (getrusage
ru_maxrss: the high-water mark, so a transient block counts), the seconds per iteration, the marginal
error, and the load average next to the timings: on a shared machine the wall time per iteration
depends on what else runs (compare `cpu_s_per_iter`, the process CPU time, with `s_per_iter`).
Target: peak RSS < 2 GB on the CPU.
"""
from __future__ import annotations
import argparse, json, os, resource, sys, time


def peak_rss_mb() -> float:
    "Peak resident memory of this process so far (MB; ru_maxrss is in kB on Linux)."
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--n', type=int, default=14336, help='neurons on each side')
    p.add_argument('--tokens', type=int, default=256, help='tokens (rows) of the activation matrices')
    p.add_argument('--iters', type=int, default=3, help='Sinkhorn iterations (each is two passes over the cost)')
    p.add_argument('--block', type=int, default=2048, help='block size')
    p.add_argument('--eps', type=float, default=0.05, help='regularisation')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (None: torch default)')
    p.add_argument('--json', action='store_true', help='print one JSON line only')
    a = p.parse_args(argv)
    import torch
    from vlm_merge.transport import CorrCost, sinkhorn_stream
    if a.threads: torch.set_num_threads(a.threads)
    base = peak_rss_mb()
    g = torch.Generator().manual_seed(0)
    X = torch.randn(a.tokens, a.n, generator=g); Y = X[:, torch.randperm(a.n, generator=g)] + 0.5 * torch.randn(a.tokens, a.n, generator=g)
    cost = CorrCost(X, Y, device=a.device); del X, Y
    if a.device.startswith('cuda'): torch.cuda.synchronize(); torch.cuda.reset_peak_memory_stats()
    c0, t0 = time.process_time(), time.perf_counter()
    r = sinkhorn_stream(cost, eps=a.eps, n_iter=a.iters, tol=0.0, block=a.block)
    if a.device.startswith('cuda'): torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = dict(n=a.n, tokens=a.tokens, block=a.block, device=a.device, iters=r.n_iter, s_per_iter=round(wall / r.n_iter, 2),
               cpu_s_per_iter=round(cpu / r.n_iter, 2), threads=torch.get_num_threads(), err=r.err,
               peak_rss_mb=round(peak_rss_mb(), 1), rss_after_imports_mb=round(base, 1),
               dense_cost_fp32_mb=round(a.n * a.n * 4 / 2**20, 1), loadavg=[round(x, 2) for x in os.getloadavg()], cpus=os.cpu_count())
    if a.device.startswith('cuda'): out['gpu_peak_mb'] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    if not a.json:
        print(f"{a.n} x {a.n} streaming Sinkhorn on {a.device} ({out['threads']} threads): {out['s_per_iter']} s/iter wall, "
              f"{out['cpu_s_per_iter']} s/iter CPU, peak RSS {out['peak_rss_mb']} MB (target < 2048), "
              f"load average {out['loadavg']} on {out['cpus']} CPUs (a shared machine: wall times vary with the load)", file=sys.stderr)
    print(json.dumps(out))
    return 0 if out['peak_rss_mb'] < 2048 else 1


if __name__ == '__main__': sys.exit(main())
