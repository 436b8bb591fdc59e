"""Agreement of vlm_merge.methods with mergekit (0.1.x) on random bf16 tensors, and timings.

Run: PYTHONPATH=/path/to/mergekit-site python benchmarks/methods_mergekit_parity.py [--numel N]
mergekit (a bench requirement) is called through its own merge-method objects (GTATask.execute);
prints the fraction of identical output elements for TIES / task arithmetic / linear / slerp.
"""
from __future__ import annotations
import argparse, time
import torch
from vlm_merge.methods import merge_tensors

def mergekit_merge(method, base, tensors, weights, densities, global_params):
    from mergekit.common import ImmutableMap, ModelReference
    from mergekit.architecture import WeightInfo
    from mergekit.merge_methods.registry import REGISTERED_MERGE_METHODS as R
    m = R[method]
    refs = [ModelReference.parse(f'model{i}') for i in range(len(tensors))]
    bref = ModelReference.parse('base')
    tp = {r: ImmutableMap({'weight': w, 'density': d}) for r, w, d in zip(refs, weights, densities)}
    gp = {p.name: p.default_value for p in m.parameters()}
    gp.update(global_params)
    from mergekit.merge_methods.generalized_task_arithmetic import GTATask
    from mergekit.sparsify import RescaleNorm
    # GTATask validates its `tensors` input task; model_construct skips that (we call execute directly)
    task = GTATask.model_construct(method=m, tensors=None, base_model=bref, weight_info=WeightInfo(name='w'),
                                   tensor_parameters=ImmutableMap(tp), int8_mask=gp['int8_mask'], normalize=gp['normalize'],
                                   lambda_=gp['lambda'], rescale_norm=RescaleNorm.l1 if gp['rescale'] else None)
    ts = {bref: base.clone(), **{r: t.clone() for r, t in zip(refs, tensors)}}
    return task.execute(tensors=ts)

def agreement(a, b): return (a == b).float().mean().item()

def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument('--numel', type=int, default=4_000_000)
    ap.add_argument('--models', type=int, default=2)
    ap.add_argument('--seed', type=int, default=0)
    ap.add_argument('--finetune_scale', type=float, default=0.1, help='task vector std relative to the base std')
    a = ap.parse_args(argv)
    g = torch.Generator().manual_seed(a.seed)
    rows, cols = 2048, a.numel // 2048
    base = (torch.randn(rows, cols, generator=g) * 0.02).to(torch.bfloat16)
    tensors = [(base.float() + torch.randn(rows, cols, generator=g) * 0.02 * a.finetune_scale).to(torch.bfloat16) for _ in range(a.models)]
    w, d = [0.5] * a.models, [0.2] * a.models
    print(f'{rows}x{cols} bf16, {a.models} models, TIES density 0.2 weight 0.5 normalize true')
    mergekit_merge('ties', base[:8, :8], [t[:8, :8] for t in tensors], w, d, {'normalize': True})   # warm-up: imports
    merge_tensors('ties', base[:8, :8], [t[:8, :8] for t in tensors], [{'weight': x, 'density': y} for x, y in zip(w, d)])
    t = time.perf_counter(); ref = mergekit_merge('ties', base, tensors, w, d, {'normalize': True}); t_mk = time.perf_counter() - t
    params = [{'weight': x, 'density': y} for x, y in zip(w, d)]
    for mode, gp in [('float32 (default)', {}), ("compute_dtype='input'", {'compute_dtype': 'input'}),
                     ("compute_dtype='input', tie_break='sort'", {'compute_dtype': 'input', 'tie_break': 'sort'})]:
        t = time.perf_counter(); out = merge_tensors('ties', base, tensors, params, {'normalize': True, **gp}); dt = time.perf_counter() - t
        out = out.to(torch.bfloat16)
        print(f'  ties {mode:42s} identical elements {agreement(out, ref):.6f}  time {dt:.2f}s (mergekit {t_mk:.2f}s, ratio {t_mk/dt:.2f}x)')
    ref = mergekit_merge('task_arithmetic', base, tensors, w, [1.0] * a.models, {})
    out = merge_tensors('task_arithmetic', base, tensors, [{'weight': x} for x in w], {'compute_dtype': 'input'}).to(torch.bfloat16)
    print(f"  task_arithmetic compute_dtype='input' identical {agreement(out, ref):.6f}")

if __name__ == '__main__': main()
