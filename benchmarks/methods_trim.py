"""Time TIES trimming (top-k mask by |delta|) on one large tensor: vlm_merge's kthvalue threshold vs
torch.topk vs mergekit's full argsort. Prints seconds and ratios against argsort, measured in the same run.

Run: python benchmarks/methods_trim.py [--numel 100000000] [--density 0.2] [--device cpu] [--dtype float32]
"""
from __future__ import annotations
import argparse, time
import torch
from vlm_merge.methods import topk_mask, merge_tensors

def timeit(fn, reps, sync):
    best = float('inf')
    for _ in range(reps):
        sync(); t = time.perf_counter(); out = fn(); sync(); best = min(best, time.perf_counter() - t)
        del out
    return best

def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument('--numel', type=int, default=100_000_000)
    ap.add_argument('--density', type=float, default=0.2)
    ap.add_argument('--device', default='cpu')
    ap.add_argument('--dtype', default='float32')
    ap.add_argument('--reps', type=int, default=2)
    ap.add_argument('--ties', action='store_true', help='also time a whole 2-model TIES merge of the tensor')
    a = ap.parse_args(argv)
    dt = getattr(torch, a.dtype)
    sync = torch.cuda.synchronize if a.device.startswith('cuda') else (lambda: None)
    g = torch.Generator(device=a.device).manual_seed(0)
    d = (torch.randn(a.numel, generator=g, device=a.device) * 1e-3).to(dt)
    k = int(a.density * a.numel)
    s = d.abs()
    print(f'{a.numel:,} elements {a.dtype} on {a.device}, keep {k:,} (threads {torch.get_num_threads()})')
    def argsort_mask():
        w = s.float() if s.device.type == 'cpu' else s
        m = torch.zeros(a.numel, dtype=torch.bool, device=a.device); m[torch.argsort(w, descending=True)[:k]] = True; return m
    def topk():
        w = s.float() if s.device.type == 'cpu' else s
        m = torch.zeros(a.numel, dtype=torch.bool, device=a.device); m[torch.topk(w, k, sorted=False).indices] = True; return m
    def kth_only():
        w = s.float() if s.device.type == 'cpu' else s
        return w >= torch.kthvalue(w, a.numel - k + 1).values
    res = {'vlm_merge topk_mask (band + kthvalue)': timeit(lambda: topk_mask(s, k), a.reps, sync),
           'plain torch.kthvalue threshold': timeit(kth_only, a.reps, sync),
           'torch.topk(sorted=False)': timeit(topk, a.reps, sync),
           'argsort (mergekit magnitude)': timeit(argsort_mask, a.reps, sync)}
    ref = res['argsort (mergekit magnitude)']
    for n, t in res.items(): print(f'  {n:42s} {t:8.3f} s   {ref / t:6.2f}x vs argsort')
    assert int(topk_mask(s, k).sum()) == k
    if a.ties:
        base = torch.randn(a.numel, generator=g, device=a.device).to(dt) * 0.02
        xs = [base + torch.randn(a.numel, generator=g, device=a.device).to(dt) * 1e-3 for _ in range(2)]
        p = [{'weight': .5, 'density': a.density}] * 2
        for gp in ({}, {'tie_break': 'sort'}):
            t = timeit(lambda: merge_tensors('ties', base, xs, p, dict(gp)), 1, sync)
            print(f'  whole TIES merge, 2 models, {gp or "default"}: {t:.2f} s')

if __name__ == '__main__': main()
