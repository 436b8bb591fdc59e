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

# ---------------------------------------------------------------- speed paths: the same bits, the same refusals
def _tail_cases(n_cases=120):
    "Task vectors with zeros, negative zeros, ties in sign, zero and cancelling weights (the corners of the float-only tails)."
    g = torch.Generator().manual_seed(7)
    for t in range(n_cases):
        N, sh = 1 + t % 4, (1 + t % 9, 3 + t % 5)
        base = torch.randn(sh, generator=g)
        if t % 4 == 3: base = torch.where(torch.rand(sh, generator=g) < 0.3, torch.full(sh, -0.0), base)
        ds = []
        for _ in range(N):
            d = torch.randint(-2, 3, sh, generator=g).float() * 0.25 if t % 4 == 3 else torch.randn(sh, generator=g) * 0.01
            d = torch.where(torch.rand(sh, generator=g) < 0.3, torch.zeros(sh), d)
            ds.append(torch.where(torch.rand(sh, generator=g) < 0.3, torch.full(sh, -0.0), d))
        ws = (torch.rand(N, generator=g) * 2 - (0.5 if t % 5 == 0 else 0)).tolist()
        if t % 7 == 0 and N > 1: ws[1] = -ws[0]
        if t % 11 == 0: ws[0] = 0.0
        yield base, ds, [{'weight': w} for w in ws]

def _stacked_gta(base, ds, per, gp, consensus):
    "methods.generalized_task_arithmetic's tail as written there (stacked tensors), the reference."
    wd = torch.stack(ds) * torch.tensor([p['weight'] for p in per]).view(-1, *([1] * base.dim()))
    w = torch.tensor([p['weight'] for p in per]).view(-1, *([1] * base.dim()))
    if consensus:
        mask = (wd.sign() == (wd.sum(dim=0) >= 0).float() * 2 - 1).float()
        mixed, div = (wd * mask).sum(dim=0), (w * mask).sum(dim=0); div[div == 0] = 1
    else:
        mixed, div = wd.sum(dim=0), w.sum(dim=0); div[div.abs() < 1e-8] = 1
    if gp.get('normalize'): mixed = mixed / div
    if gp.get('lambda', 1.0) != 1.0: mixed = mixed * gp['lambda']
    return base + mixed

def test_float_only_tails_are_bit_for_bit_the_stacked_ones():
    "The TIES sign election without boolean tensors, and the sums without stacked copies: every bit (signed zeros included) as before."
    from vlm_merge.streaming import _ties_tail, _sum_tail, _linear_chunk
    from vlm_merge.methods import linear
    bits = lambda t: t.view(torch.int32)
    for base, ds, per in _tail_cases():
        for gp in ({'normalize': True}, {'normalize': False}, {'normalize': True, 'lambda': 0.7}, {'lambda': -1.3}):
            assert torch.equal(bits(_ties_tail(base, [d.clone() for d in ds], per, gp)), bits(_stacked_gta(base, ds, per, gp, True)))
            assert torch.equal(bits(_sum_tail(base, ds, per, gp)), bits(_stacked_gta(base, ds, per, gp, False)))
            if abs(sum(p['weight'] for p in per)) > 1e-3 or not gp.get('normalize'):
                assert torch.equal(bits(_linear_chunk(ds, per, gp)), bits(linear(None, ds, per, gp, 0, None)))

@pytest.mark.parametrize('method', ['linear', 'task_arithmetic', 'ties', 'slerp'])
@pytest.mark.parametrize('cache', [0, 1 << 20])
@pytest.mark.parametrize('same', [False, True])
def test_nan_input_refused_naming_the_input(method, cache, same):
    "A NaN in an input is refused naming that input, whether checked as read (trims, slerp) or when the output is not finite (linear, task arithmetic); identical inputs too."
    from vlm_merge.merge_config import MergeRefused
    b = torch.randn(6, 5).bfloat16(); x = b.clone(); x[2, 3] = float('nan')
    per = {'linear': [{'weight': 1.0}] * 3, 'task_arithmetic': [{'weight': 0.5}] * 2, 'ties': [{'weight': 0.5, 'density': 0.5}] * 2, 'slerp': [{}]}[method]
    ins = [x, x.clone(), x.clone()] if same else [b, x, b]
    ins = ins[:2] if method == 'slerp' else ins
    with pytest.raises(MergeRefused, match=rf'NaN/Inf in input: 1 non-finite value\(s\) in t \(input {0 if same else 1}\)'):
        stream_tensor(ins, method, per, {'t': 0.3} if method == 'slerp' else {}, torch.bfloat16, chunk=8, cache=cache, name='t')

UNNEEDED = ('transformers', 'pandas', 'matplotlib', 'scipy', 'PIL', 'datasets', 'accelerate', 'huggingface_hub.repocard', 'huggingface_hub.hf_api')

def test_the_merge_command_imports_nothing_it_does_not_use(tmp_path):
    "Start-up (issue 19): importing the engine, and then a whole `vlm-merge merge` through the CLI, load none of these (huggingface_hub's Hub client alone was about 0.2 s of every merge)."
    (base_p, f1, f2), base, fts = _compat_models(tmp_path)
    cfg = {'merge_method': 'ties', 'base_model': str(base_p), 'dtype': 'bfloat16',
           'models': [{'model': str(p), 'parameters': {'weight': 0.5, 'density': 0.5}} for p in (f1, f2)]}
    (tmp_path / 'cfg.json').write_text(json.dumps(cfg))
    res = _child_peak(f'''
        import sys
        loaded = lambda: sorted(m for m in {UNNEEDED!r} if m in sys.modules)
        import vlm_merge.engine
        at_import = loaded()
        from vlm_merge.cli import main
        rc = main(['merge', {str(tmp_path / 'cfg.json')!r}, {str(tmp_path / 'out')!r}, '--no-progress'])
        print(json.dumps({{'rc': rc, 'import': at_import, 'merge': loaded()}}))''')
    assert res == {'rc': 0, 'import': [], 'merge': []}
    assert set(load_file(str(tmp_path / 'out' / 'model.safetensors'))) == set(base)   # the output is complete
    assert (tmp_path / 'out' / 'README.md').read_text().startswith('---\nbase_model: []\n')

def test_the_engine_card_is_make_model_cards_text(tmp_path):
    "The card the engine writes without huggingface_hub's Hub client is, byte for byte, the text of `make_model_card` (through `ModelCard.from_template`), licence read from the sources' cards included."
    from vlm_merge.engine import MergeConfig, build_plan, card_text
    from vlm_merge.hub import make_model_card, _card_text
    (base_p, f1, f2), _, _ = _compat_models(tmp_path)
    for p in (base_p, f1, f2): (p / 'README.md').write_text(f'---\nlicense: mit\ntags:\n- x\n---\n# {p.name}\n')
    cfg = MergeConfig.from_dict({'merge_method': 'ties', 'base_model': str(base_p), 'dtype': 'bfloat16', 'name': 'a soup',
                                 'models': [{'model': str(p), 'parameters': {'weight': 0.5, 'density': 0.5}} for p in (f1, f2)]})
    plan = build_plan(cfg)
    try:
        got = card_text(cfg, plan, repo_id='me/soup')
        want = _card_text(make_model_card(cfg, plan=plan, model_name=cfg.name, repo_id='me/soup',
                                          model_config=plan.readers[plan.output_model].config))
    finally: plan.close()
    assert got == want
    assert 'license: mit' in got and '# a soup' in got and 'model_id = "me/soup"' in got

def test_sizes_read_off_the_config_are_head_geometrys():
    "The architecture check reads the sizes off a config that states them (no transformers); they are what head_geometry (with transformers' defaults) gives."
    from vlm_merge.plan import _stated_geometry
    from vlm_merge.anatomy import head_geometry
    llama = {'model_type': 'llama', 'hidden_size': 96, 'intermediate_size': 160, 'num_hidden_layers': 3, 'num_attention_heads': 6}
    qwen2 = {'model_type': 'qwen2', 'hidden_size': 192, 'intermediate_size': 320, 'num_hidden_layers': 3, 'num_attention_heads': 6,
             'num_key_value_heads': 2, 'head_dim': 32}
    gemma = {'model_type': 'gemma', 'hidden_size': 96, 'intermediate_size': 160, 'num_hidden_layers': 3, 'num_attention_heads': 6}
    for cfg in (llama, {**llama, 'num_key_value_heads': 2}, qwen2, {'model_type': 'llava', 'text_config': qwen2, 'vision_config': {}}):
        g = head_geometry(cfg)
        assert _stated_geometry(cfg) == dict(hidden_size=g.hidden_size, n_layers=g.n_layers, n_heads=g.n_heads, n_kv_heads=g.n_kv_heads,
                                             head_dim=g.head_dim, intermediate_size=g.intermediate_size), cfg
    assert _stated_geometry(gemma) is None   # a default only transformers knows (gemma's head_dim): asked there
    assert _stated_geometry({**qwen2, 'num_key_value_heads': 4}) is None   # 6 heads in 4 groups: not a geometry

def test_text_model_types_are_not_vlms():
    "is_vlm_config answers text LLM types without importing transformers; none of them is an image-text-to-text type there."
    from vlm_merge.model_card import _TEXT_TYPES, is_vlm_config
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES as vlm_types
    assert not _TEXT_TYPES & set(vlm_types)
    assert not is_vlm_config({'model_type': 'llama'}) and is_vlm_config({'model_type': 'llama', 'vision_config': {}})
