"Issue 19 part B: streamed merges equal whole-tensor ones, memory stays flat, and mergekit_compat gives mergekit's own output."
from __future__ import annotations
import json, os, shutil, subprocess, sys, textwrap
from pathlib import Path

import pytest, torch
from safetensors.torch import save_file, load_file

from vlm_merge.methods import merge_tensors
from vlm_merge.streaming import stream_tensor, STREAMED, _not_streamed
from vlm_merge.writer import ShardedWriter

ROOT = Path(__file__).resolve().parents[1]

def _inputs(shape, n, seed, levels=None, sparse=1.0):
    "A bf16 base and `n` fine-tunes; `levels` makes few distinct task-vector magnitudes (many ties at a trim threshold)."
    g = torch.Generator().manual_seed(seed)
    b = torch.randn(shape, generator=g).bfloat16()
    def noise():
        z = torch.randint(-levels, levels + 1, shape, generator=g) / levels if levels else torch.randn(shape, generator=g)
        return 0.05 * z * (torch.rand(shape, generator=g) < sparse)
    return b, [(b.float() + noise()).bfloat16() for _ in range(n)]

CASES = [('linear', {}), ('task_arithmetic', {'lambda': 0.8}), ('ties', {'normalize': True}), ('ties', {'normalize': False, 'lambda': 1.3}),
         ('dare_ties', {'rescale': False}), ('dare_linear', {'rescale': True, 'rescale_mode': 'inverse_density'}),
         ('breadcrumbs', {}), ('breadcrumbs_ties', {'normalize': True})]

@pytest.mark.parametrize('method,gp', CASES)
@pytest.mark.parametrize('shape,n,chunk,levels', [((33, 17), 2, 40, None), ((48, 9), 3, 9, 3), ((70,), 2, 16, 2), ((5, 4, 6), 2, 24, None)])
def test_streamed_equals_whole_tensor(method, gp, shape, n, chunk, levels):
    "Every streamed method = merge_tensors bit for bit, whatever the chunk size (ties at the trim threshold included)."
    b, xs = _inputs(shape, n, seed=len(shape) * 7 + n, levels=levels, sparse=0.5)
    ps = [{'weight': 0.3 + j / 5, 'density': 0.3 + j / 10, 'gamma': 0.05} for j in range(n)]
    ins, base = (xs, None) if method == 'linear' else ([b] + xs, b)
    want = merge_tensors(method, base, xs, ps, dict(gp, tensor_name='t'), seed=11).bfloat16()
    for c, cache in ((chunk, 0), (1 << 20, 0), (chunk, 1 << 20)):   # cache 0: every pass reads the inputs again; else held in memory
        got = stream_tensor(ins, method, ps, gp, torch.bfloat16, chunk=c, seed=11, name='t', cache=cache)
        assert torch.equal(got, want), (method, c, cache)

@pytest.mark.parametrize('method,ps,gp', [('slerp', [{}], {'t': 0.35}), ('dare_ties', [{'weight': 1.0, 'density': 0.4}], {}),
                                          ('dare_linear', [{'weight': 0.7, 'density': 0.6}], {'rescale': True})])
def test_streamed_reductions_chunk_independent(method, ps, gp):
    "slerp and DARE's L1 rescale reduce in float64: the same output for every chunking, within 1 bf16 ulp of merge_tensors."
    b, (x,) = _inputs((61, 23), 1, seed=3)
    outs = [stream_tensor([b, x], method, ps, gp, torch.bfloat16, chunk=c, seed=2, name='t', cache=cache)
            for c in (23, 100, 1 << 20) for cache in (0, 1 << 20)]
    for o in outs[1:]: assert torch.equal(o, outs[0])
    want = merge_tensors(method, b, [x], ps, dict(gp, tensor_name='t'), seed=2).bfloat16()
    assert (outs[0].view(torch.int16).int() - want.view(torch.int16).int()).abs().max() <= 1

def test_every_streamed_method_is_listed():
    assert set(STREAMED) == {'linear', 'task_arithmetic', 'ties', 'dare_ties', 'dare_linear', 'breadcrumbs', 'breadcrumbs_ties', 'slerp'}
    assert _not_streamed('ties', [{'weight': 1, 'importance': 1}], {}) == 'SparseGPT importance'

def _ckpt(folder: Path, sd: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True); save_file(sd, str(folder / 'model.safetensors'), metadata={'format': 'pt'}); return folder

def _child_peak(code: str) -> dict:
    "Run `code` in a fresh interpreter that prints JSON; its `peak(x)` reads ru_maxrss (KiB) so far."
    pre = 'import json, resource, torch\ndef peak(): return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024\n'
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get('PYTHONPATH', ''))
    r = subprocess.run([sys.executable, '-c', pre + textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])

@pytest.mark.parametrize('method', ['ties', 'linear'])
def test_flat_memory_for_a_tensor_much_larger_than_a_chunk(tmp_path, method):
    "A 3 x 64 MiB float32 merge into one 10GB shard (float32 out) raises the peak RSS by far less than one input tensor."
    g = torch.Generator().manual_seed(0)
    b = torch.randn(2048, 8192, generator=g)
    for i, name in enumerate(['base', 'ft1', 'ft2']):
        _ckpt(tmp_path / name, {'big.weight': b + 0.01 * i * torch.randn(2048, 8192, generator=g) if i else b, 'small': torch.ones(4)})
    del b
    per = "{'weight': 0.5, 'density': 0.3}"
    cfg = {'merge_method': method, 'dtype': 'float32',
           'models': [{'model': str(tmp_path / n), 'parameters': {'weight': 0.5, 'density': 0.3}} for n in ('ft1', 'ft2')]}
    if method == 'ties': cfg['base_model'] = str(tmp_path / 'base')
    (tmp_path / 'cfg.json').write_text(json.dumps(cfg))
    res = _child_peak(f'''
        import warnings; warnings.simplefilter('ignore')
        from vlm_merge.engine import run_merge
        from vlm_merge.plan import build_plan
        from vlm_merge.merge_config import MergeConfig
        c = json.load(open({str(tmp_path / 'cfg.json')!r}))
        build_plan(MergeConfig.from_dict(c)).close()   # imports and headers: the baseline
        torch.empty(1 << 16).add_(1)
        before = peak()
        run_merge(c, {str(tmp_path / 'out')!r}, shard_size='10GB', progress=False)
        print(json.dumps({{'before': before, 'after': peak()}}))''')
    grew = res['after'] - res['before']
    assert grew < 40 * 2**20, f'{method}: merging 64 MiB tensors raised the peak RSS by {grew / 2**20:.0f} MiB'
    out = load_file(str(tmp_path / 'out' / 'model.safetensors'))
    assert out['big.weight'].dtype == torch.float32 and out['big.weight'].shape == (2048, 8192)

# ---------------------------------------------------------------- mergekit_compat through the CLI
def _compat_models(tmp_path):
    "A tiny Llama (every tensor mergekit's architecture table asks for) in bf16: a base and two fine-tunes."
    sys.path.insert(0, str(ROOT / 'benchmarks'))
    from ties_vs_mergekit import llama_shapes, llama_config
    geom = dict(hidden=32, layers=1, intermediate=48, vocab=64, heads=4, kv_heads=4)
    g = torch.Generator().manual_seed(5)
    base = {k: (torch.randn(s, generator=g) * (0.05 if len(s) == 2 else 1.0) + (0 if len(s) == 2 else 1.0)).bfloat16()
            for k, s in llama_shapes(geom).items()}
    fts = [{k: (v.float() + 0.003 * torch.randn(v.shape, generator=g)).bfloat16() for k, v in base.items()} for _ in range(2)]
    paths = [_ckpt(tmp_path / n, m) for n, m in zip(('base', 'ft1', 'ft2'), [base] + fts)]
    for p in paths: (p / 'config.json').write_text(json.dumps(llama_config(geom)))
    return paths, base, fts

def _cli_merge(cfg: dict, out: Path):
    from vlm_merge.cli import main
    p = out.parent / (out.name + '.yml'); p.write_text(json.dumps(cfg))
    assert main(['merge', str(p), str(out), '--no-progress']) == 0
    out_sd = {}
    for f in out.glob('*.safetensors'): out_sd.update(load_file(str(f)))
    return out_sd

def test_mergekit_compat_computes_in_the_config_dtype_through_the_cli(tmp_path):
    "mergekit_compat: task arithmetic computed in bf16 (the config's dtype) as mergekit does, on the streaming path; off: float32, rounded once."
    (base_p, f1, f2), base, fts = _compat_models(tmp_path)
    w, lam = [0.3, 0.55], 0.9
    cfg = {'merge_method': 'task_arithmetic', 'base_model': str(base_p), 'dtype': 'bfloat16', 'parameters': {'lambda': lam},
           'models': [{'model': str(f1), 'parameters': {'weight': w[0]}}, {'model': str(f2), 'parameters': {'weight': w[1]}}]}
    plain = _cli_merge(cfg, tmp_path / 'plain')
    compat = _cli_merge({**cfg, 'parameters': {'lambda': lam, 'mergekit_compat': True}}, tmp_path / 'compat')
    for k, b in base.items():   # mergekit 0.1.5's generalized task arithmetic, in bf16, written out by hand
        d = torch.stack([f[k] - b for f in fts])
        wt = torch.tensor(w, dtype=torch.bfloat16).view(-1, *([1] * b.dim()))
        mk = (b + (d * wt).sum(dim=0) * lam).to(torch.bfloat16)
        f32 = (b.float() + lam * sum(wi * (f[k].float() - b.float()) for wi, f in zip(w, fts))).bfloat16()
        assert torch.equal(compat[k], mk), k
        assert (plain[k].float() - f32.float()).abs().max() <= (f32.float().abs().max() * 2 ** -7), k
    assert any(not torch.equal(plain[k], compat[k]) for k in base)   # the switch acts on the streaming path (today's code ignored it there)

def _mergekit_python():
    py = os.environ.get('MERGEKIT_PYTHON')
    if py: return py
    try:
        import mergekit  # noqa: F401
        return sys.executable
    except ImportError: return None

@pytest.mark.parametrize('method', ['linear', 'task_arithmetic', 'ties'])
def test_mergekit_compat_is_element_exact_against_mergekit(tmp_path, method):
    "With mergekit installed (or MERGEKIT_PYTHON naming an interpreter that has it): mergekit_compat output = mergekit's, element for element."
    py = _mergekit_python()
    if py is None: pytest.skip('mergekit is not installed (set MERGEKIT_PYTHON to an interpreter that has it)')
    (base_p, f1, f2), base, fts = _compat_models(tmp_path)
    per = {'linear': {'weight': 0.34}, 'task_arithmetic': {'weight': 0.45}, 'ties': {'weight': 0.6, 'density': 0.3}}[method]
    models = [{'model': str(base_p), **({'parameters': per} if method == 'linear' else {})}] + \
             [{'model': str(p), 'parameters': per} for p in (f1, f2)]
    cfg = {'merge_method': method, 'models': models, 'dtype': 'bfloat16'}
    if method != 'linear': cfg['base_model'] = str(base_p)
    (tmp_path / 'mk.yml').write_text(json.dumps(cfg))
    r = subprocess.run([py, '-c', 'import sys; from mergekit.scripts.run_yaml import main; sys.exit(main())', str(tmp_path / 'mk.yml'),
                        str(tmp_path / 'mk'), '--no-copy-tokenizer', '--quiet', '--no-write-model-card'], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    mk = {}
    for f in (tmp_path / 'mk').glob('*.safetensors'): mk.update(load_file(str(f)))
    ours = _cli_merge({**cfg, 'parameters': {'mergekit_compat': True}}, tmp_path / 'ours')
    for k in base:
        assert torch.equal(ours[k], mk[k]), (method, k, int((ours[k] != mk[k]).sum()))
