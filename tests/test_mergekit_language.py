"mergekit's config language in vlm_merge: the added merge methods (hand-computed cases and invariants; against mergekit when it is installed), slices / passthrough, token-aligned embeddings, chat template names, multi-document configs."
from __future__ import annotations
import json, math, types
from pathlib import Path

import pytest, torch, yaml
from safetensors.torch import load_file

from vlm_merge.methods import merge_tensors, MERGE_METHODS, sparsify
from vlm_merge.merge_config import MergeConfig, MergeConfigError, CHAT_TEMPLATES
from vlm_merge.engine import run_merge, build_plan, merge_cli
from vlm_merge.checkpoints import CheckpointReader

NEW = ['nuslerp', 'model_stock', 'della', 'della_linear', 'sce', 'multislerp', 'karcher', 'nearswap', 'arcee_fusion', 'ram', 'ramplus_tl', 'passthrough']

def rand(shape, seed, scale=1.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale

# ---------------------------------------------------------------- methods, without mergekit
def test_registry_has_mergekit_methods():
    assert set(NEW) <= set(MERGE_METHODS)
    assert MERGE_METHODS['nuslerp'].optional_base and not MERGE_METHODS['nuslerp'].needs_base
    assert MERGE_METHODS['della'].tensor_defaults == {'density': 1.0, 'epsilon': 0.15} and MERGE_METHODS['della'].random

def test_nuslerp_ends_and_midpoint():
    x, y = rand((6, 5), 1), rand((6, 5), 2)
    w = lambda a, b: [{'weight': a}, {'weight': b}]
    assert torch.allclose(merge_tensors('nuslerp', None, [x, y], w(1, 0)), x, atol=1e-5)
    assert torch.allclose(merge_tensors('nuslerp', None, [x, y], w(0, 1)), y, atol=1e-5)
    # flat SLERP of two orthogonal unit vectors at equal weights: the normalised sum
    e0, e1 = torch.tensor([1., 0., 0.]), torch.tensor([0., 1., 0.])
    assert torch.allclose(merge_tensors('nuslerp', None, [e0, e1], w(1, 1)), (e0 + e1) / math.sqrt(2), atol=1e-6)
    # row-wise: each column is its own vector (mergekit's nuslerp_row_wise transposes dim 0 to the end)
    a, b = torch.tensor([[1., 2.], [0., 0.]]), torch.tensor([[0., 0.], [1., 2.]])
    r = merge_tensors('nuslerp', None, [a, b], w(1, 1), {'nuslerp_flatten': False, 'nuslerp_row_wise': True})
    assert torch.allclose(r, torch.tensor([[1., 2.], [1., 2.]]) / math.sqrt(2), atol=1e-6)
    base = rand((6, 5), 3)
    assert torch.allclose(merge_tensors('nuslerp', base, [x, y], w(1, 0)), x, atol=1e-5)
    with pytest.raises(ValueError, match='exactly two'): merge_tensors('nuslerp', None, [x, y, base], [{'weight': 1}] * 3)

def test_model_stock_cases():
    b = rand((4, 8), 0)
    assert torch.equal(merge_tensors('model_stock', b, [b.clone(), b.clone()]), b)          # identical models: the base
    d = rand((4, 8), 1)
    assert torch.allclose(merge_tensors('model_stock', b, [b + d, b + d]), b + d, atol=1e-5)   # cos 1: t = 1, the models
    # two task vectors at 60 degrees: cos 0.5, t = 2 * 0.5 / 1.5 = 2/3 of the way to their mean
    u, v = torch.tensor([1., 0.]), torch.tensor([0.5, math.sqrt(3) / 2])
    r = merge_tensors('model_stock', torch.zeros(2), [u, v])
    assert torch.allclose(r, (2 / 3) * (u + v) / 2, atol=1e-6)
    # filter_wise: a t per row
    B = torch.zeros(2, 2); X = torch.tensor([[1., 0.], [1., 0.]]); Y = torch.tensor([[0., 1.], [1., 0.]])
    r = merge_tensors('model_stock', B, [X, Y], global_params={'filter_wise': True})
    assert torch.allclose(r, torch.tensor([[0., 0.], [1., 0.]]), atol=1e-6)   # row 0 orthogonal (t 0), row 1 identical (t 1)

def test_della_density_one_is_task_arithmetic_and_ties():
    b, xs = rand((8, 16), 0), [rand((8, 16), i) for i in (1, 2, 3)]
    ps = [{'weight': w, 'density': 1.0} for w in (0.3, 0.5, 0.9)]
    assert torch.allclose(merge_tensors('della_linear', b, xs, ps), merge_tensors('task_arithmetic', b, xs, ps))
    assert torch.allclose(merge_tensors('della', b, xs, ps), merge_tensors('ties', b, xs, ps))

def test_della_keeps_large_entries_more_often_and_rescales():
    d = torch.linspace(0.01, 1, 4000).repeat(8, 1)   # every row the same ramp of magnitudes
    b = torch.zeros_like(d)
    out = merge_tensors('della_linear', b, [d], [{'weight': 1.0, 'density': 0.5, 'epsilon': 0.4}], seed=3)
    kept = out != 0
    assert abs(kept.float().mean().item() - 0.5) < 0.03
    lo, hi = kept[:, :1000].float().mean().item(), kept[:, -1000:].float().mean().item()
    assert lo < 0.25 and hi > 0.75          # p runs 0.1 -> 0.9 along the ramp
    assert torch.allclose(out.abs().sum(), d.abs().sum(), rtol=1e-4)   # L1 rescale
    again = merge_tensors('della_linear', b, [d], [{'weight': 1.0, 'density': 0.5, 'epsilon': 0.4}], seed=3)
    assert torch.equal(out, again)          # seeded: reproducible
    with pytest.raises(ValueError, match='epsilon'):
        merge_tensors('della', b, [d], [{'weight': 1.0, 'density': 0.9, 'epsilon': 0.2}])

def test_sce_by_hand():
    b = torch.zeros(4)
    x1, x2 = torch.tensor([1., 2., -1., 0.]), torch.tensor([3., -2., -1., 0.])
    # weights: mean squares 1.5 and 3.5 -> 0.3, 0.7; signs: sum 4, 0, -2 -> +, +, -
    # entry 0: both +: (0.3*1 + 0.7*3) / 1 = 2.4; entry 1: only x1 agrees (+): 2.0; entry 2: both -: -1
    r = merge_tensors('sce', b, [x1, x2])
    assert torch.allclose(r, torch.tensor([2.4, 2.0, -1.0, 0.0]), atol=1e-6)
    # select_topk 0.5: variances 1, 4, 0, 0 -> k = int(2 * 0.5) = 1 entry kept (the second); its signs tie (+2, -2) -> + wins
    r = merge_tensors('sce', b, [x1, x2], global_params={'select_topk': 0.5})
    assert torch.allclose(r, torch.tensor([0.0, 2.0, 0.0, 0.0]), atol=1e-6)

def test_multislerp_karcher_nearswap_arcee_ram():
    e0, e1 = torch.tensor([1., 0.]), torch.tensor([0., 1.])
    h = torch.tensor([1., 1.]) / math.sqrt(2)
    assert torch.allclose(merge_tensors('multislerp', None, [e0, e1], [{'weight': 1}, {'weight': 1}]), h, atol=1e-6)
    assert torch.allclose(merge_tensors('karcher', None, [e0, e1]), h, atol=1e-5)
    assert torch.allclose(merge_tensors('karcher', None, [2 * e0, 4 * e0]), 3 * e0, atol=1e-6)
    r = merge_tensors('nearswap', torch.zeros(3), [torch.tensor([0.5, 2.0, 0.05])], global_params={'t': 0.1})
    assert torch.allclose(r, torch.tensor([0.1, 0.1, 0.05]), atol=1e-6)
    with pytest.raises(ValueError, match='parameters.t'): merge_tensors('nearswap', torch.zeros(2), [torch.ones(2)])
    b = torch.zeros(2, 40); x = b.clone(); x[0, :] = 0.01; x[0, 7] = 3.0   # one outlier change among small ones
    r = merge_tensors('arcee_fusion', b, [x])
    assert r[0, 7] == 3.0 and int((r != 0).sum()) == 1
    r = merge_tensors('ram', torch.zeros(3), [torch.tensor([1., 2., 0.]), torch.tensor([0., 4., 1e-7])])
    assert torch.allclose(r, torch.tensor([1., 3., 0.]))          # 1e-7 is below epsilon
    # ramplus_tl: model 0 has 1 unique and 1 shared entry: rho 1 -> lambda 1 + 0.1 * min(1, 0.2) = 1.02
    r = merge_tensors('ramplus_tl', torch.zeros(3), [torch.tensor([1., 2., 0.]), torch.tensor([0., 4., 1.])])
    assert torch.allclose(r, torch.tensor([1.02, 3., 1.02]))

def test_passthrough_scale():
    x = rand((3, 3), 0)
    assert torch.equal(merge_tensors('passthrough', None, [x]), x)
    assert torch.allclose(merge_tensors('passthrough', None, [x], [{'scale': 0.5}]), x * 0.5)
    with pytest.raises(ValueError, match='exactly one'): merge_tensors('passthrough', None, [x, x + 1])

# ---------------------------------------------------------------- methods against mergekit (skipped without it)
def _mk_self(**kw):
    return types.SimpleNamespace(weight_info=types.SimpleNamespace(is_embed=False, name='w', optional=False), **kw)

def _mergekit_results(b, xs):
    "mergekit's output of each method on base `b` and models `xs` (float32)."
    mk = pytest.importorskip('mergekit')
    from mergekit.merge_methods import nuslerp as nus, model_stock as ms, multislerp as msl, karcher as ka, nearswap as ns, sce, ram, arcee_fusion as af
    out = {}
    out['nuslerp'] = nus.nuslerp(0.7 / 1.0, xs[0], xs[1], dim=-1, flatten=True)
    out['nuslerp_rows'] = nus.nuslerp(0.7, xs[0], xs[1], dim=-1, flatten=False)
    out['nuslerp_base'] = b + nus.nuslerp(0.7, xs[0] - b, xs[1] - b, dim=-1, flatten=True)
    s = _mk_self(base_model='b', filter_wise=False)
    s.get_rectified_weights = lambda t: ms.ModelStockMergeTask.get_rectified_weights(s, t)
    out['model_stock'] = ms.ModelStockMergeTask.execute(s, {'b': b, 'x0': xs[0], 'x1': xs[1], 'x2': xs[2]})
    s.filter_wise = True
    out['model_stock_fw'] = ms.ModelStockMergeTask.execute(s, {'b': b, 'x0': xs[0], 'x1': xs[1], 'x2': xs[2]})
    f = lambda fn: getattr(fn, '__wrapped__', fn)
    out['multislerp'] = f(msl.multislerp)(list(xs), [0.2, 0.3, 0.5], base_tensor=b)
    out['karcher'] = f(ka.karcher_merge_tensors)(list(xs), [1 / 3] * 3, max_iter=10, tol=1e-5)
    out['nearswap'] = f(ns.nearswap_merge)([xs[0]], b, 0.5)
    out['sce'] = f(sce.sce_merge)(list(xs), b, select_topk=0.5)
    out['ram'] = f(ram.ram_merge)(list(xs), b, epsilon=0.3)
    out['ramplus_tl'] = f(ram.ramplus_tl_merge)(list(xs), b, r=0.1, alpha=0.2, epsilon=0.3)
    s = _mk_self(base_model='b')
    s._compute_importance = lambda p, q, eps=1e-8: af.ArceeFusionMergeTask._compute_importance(s, p, q, eps)
    out['arcee_fusion'] = af.ArceeFusionMergeTask.execute(s, {'b': b, 'x': xs[0]})
    return out

def _ours(b, xs):
    w = lambda *a: [{'weight': x} for x in a]
    return {'nuslerp': merge_tensors('nuslerp', None, xs[:2], w(0.3, 0.7)),
            'nuslerp_rows': merge_tensors('nuslerp', None, xs[:2], w(0.3, 0.7), {'nuslerp_flatten': False}),
            'nuslerp_base': merge_tensors('nuslerp', b, xs[:2], w(0.3, 0.7)),
            'model_stock': merge_tensors('model_stock', b, xs),
            'model_stock_fw': merge_tensors('model_stock', b, xs, global_params={'filter_wise': True}),
            'multislerp': merge_tensors('multislerp', b, xs, w(0.2, 0.3, 0.5)),
            'karcher': merge_tensors('karcher', None, xs),
            'nearswap': merge_tensors('nearswap', b, xs[:1], global_params={'t': 0.5}),
            'sce': merge_tensors('sce', b, xs, global_params={'select_topk': 0.5}),
            'ram': merge_tensors('ram', b, xs, global_params={'epsilon': 0.3}),
            'ramplus_tl': merge_tensors('ramplus_tl', b, xs, global_params={'epsilon': 0.3}),
            'arcee_fusion': merge_tensors('arcee_fusion', b, xs[:1])}

def test_methods_match_mergekit():
    b = rand((64, 48), 0)
    xs = [b + rand((64, 48), i, 0.1) * (torch.rand(64, 48, generator=torch.Generator().manual_seed(10 + i)) < 0.5) for i in (1, 2, 3)]
    theirs, ours = _mergekit_results(b, xs), _ours(b, xs)
    for k in theirs:
        d = (theirs[k].float() - ours[k]).abs().max().item()
        assert d < 1e-5, f'{k}: max abs diff {d} against mergekit'

# ---------------------------------------------------------------- end to end: tiny Llamas with their own tokenizers
def save_llama(path, seed, vocab:list, layers=3, template=None):
    "A tiny Llama whose tokenizer is a word-level one over `vocab` (the embedding has one row per token)."
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    from tokenizers import Tokenizer, models, pre_tokenizers
    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                      vocab_size=len(vocab), max_position_embeddings=32, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token='<unk>')); tk.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='<unk>')
    if template: t.chat_template = template
    t.save_pretrained(path)
    return Path(path)

def tensors(p): return load_file(str(Path(p) / 'model.safetensors'))

V1 = ['<unk>', 'a', 'b', 'c', 'd', 'e']
V2 = ['<unk>', 'c', 'a', 'x', 'b', 'e']          # a, b, c at other ids; 'x' new; 'd' missing

@pytest.fixture(scope='module')
def models(tmp_path_factory):
    r = tmp_path_factory.mktemp('mk')
    return {'base': save_llama(r / 'base', 0, V1, template='{{ base }} template x'), 'ft': save_llama(r / 'ft', 1, V1, template='{{ ft }} template xx'),
            'ft2': save_llama(r / 'ft2', 3, V1, template='{{ ft }} template xx'), 'other': save_llama(r / 'other', 2, V2), 'deep': save_llama(r / 'deep', 4, V1, layers=5)}

def test_slices_passthrough_stack_layers_with_scale(models, tmp_path):
    cfg = {'merge_method': 'passthrough', 'dtype': 'float32',
           'slices': [{'sources': [{'model': str(models['base']), 'layer_range': [0, 2]}]},
                      {'sources': [{'model': str(models['deep']), 'layer_range': [2, 5],
                                    'parameters': {'scale': [{'filter': 'o_proj', 'value': 0.0}, {'value': 1.0}]}}]}]}
    out = run_merge(cfg, tmp_path / 'out', progress=False)
    o, b, d = tensors(out), tensors(models['base']), tensors(models['deep'])
    assert json.loads((out / 'config.json').read_text())['num_hidden_layers'] == 5
    k = lambda l, x='mlp.up_proj.weight': f'model.layers.{l}.{x}'
    assert torch.equal(o[k(1)], b[k(1)]) and torch.equal(o[k(2)], d[k(2)]) and torch.equal(o[k(4)], d[k(4)])
    assert torch.equal(o[k(3, 'self_attn.o_proj.weight')], torch.zeros_like(d[k(3, 'self_attn.o_proj.weight')]))
    assert torch.equal(o[k(0, 'self_attn.o_proj.weight')], b[k(0, 'self_attn.o_proj.weight')])
    assert torch.equal(o['model.embed_tokens.weight'], b['model.embed_tokens.weight'])   # before the layers: the first slice's
    assert torch.equal(o['lm_head.weight'], d['lm_head.weight'])                          # after: the last slice's
    from transformers import LlamaForCausalLM
    assert LlamaForCausalLM.from_pretrained(out).config.num_hidden_layers == 5

def test_slices_with_a_method_equal_models_form(models, tmp_path):
    src = lambda m: {'model': str(models[m]), 'layer_range': [0, 3]}
    common = {'merge_method': 'slerp', 'base_model': str(models['base']), 'dtype': 'float32', 'parameters': {'t': [0.0, 0.5, 1.0]}}
    a = run_merge({**common, 'slices': [{'sources': [src('base'), src('ft')]}]}, tmp_path / 'a', progress=False)
    b = run_merge({**common, 'models': [{'model': str(models['base'])}, {'model': str(models['ft'])}]}, tmp_path / 'b', progress=False)
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

def test_slices_refusals(models, tmp_path):
    bad = {'merge_method': 'passthrough', 'slices': [{'sources': [{'model': str(models['base']), 'layer_range': [0, 7]}]}]}
    with pytest.raises(MergeConfigError, match='past the 3 layers'): run_merge(bad, tmp_path / 'o', progress=False)
    assert not (tmp_path / 'o').exists()

def _row(t, vocab, w): return t[vocab.index(w)]

def test_tokenizer_union_aligns_rows_by_token(models, tmp_path):
    cfg = {'merge_method': 'linear', 'dtype': 'float32', 'tokenizer_source': 'union',
           'models': [{'model': str(models['base']), 'parameters': {'weight': 0.5}}, {'model': str(models['other']), 'parameters': {'weight': 0.5}}]}
    out = run_merge(cfg, tmp_path / 'u', progress=False)
    from transformers import AutoTokenizer
    vocab = AutoTokenizer.from_pretrained(out).get_vocab()
    assert set(vocab) == set(V1) | set(V2)
    o, b, x = tensors(out), tensors(models['base']), tensors(models['other'])
    assert json.loads((out / 'config.json').read_text())['vocab_size'] == len(vocab) == o['model.embed_tokens.weight'].shape[0]
    for key in ('model.embed_tokens.weight', 'lm_head.weight'):
        for w in ('a', 'b', 'c', 'e'):   # in both: the mean of each model's own row for that token
            assert torch.allclose(o[key][vocab[w]], 0.5 * _row(b[key], V1, w) + 0.5 * _row(x[key], V2, w), atol=1e-6), (key, w)
        assert torch.allclose(o[key][vocab['d']], _row(b[key], V1, 'd'))    # only the base has it: its row in both
        assert torch.allclose(o[key][vocab['x']], _row(x[key], V2, 'x'))    # only `other` has it

def test_tokenizer_source_model_reorders_rows(models, tmp_path):
    cfg = {'merge_method': 'task_arithmetic', 'base_model': str(models['base']), 'dtype': 'float32', 'tokenizer_source': 'base',
           'models': [{'model': str(models['other']), 'parameters': {'weight': 1.0}}]}
    out = run_merge(cfg, tmp_path / 't', progress=False)
    o, x = tensors(out), tensors(models['other'])
    key = 'model.embed_tokens.weight'
    assert o[key].shape[0] == len(V1)
    for w in ('a', 'b', 'c', 'e'): assert torch.allclose(o[key][V1.index(w)], _row(x[key], V2, w), atol=1e-6)   # base + (x - base) = x, by token

def test_tokenizer_section_pad_and_forced_zero(models, tmp_path):
    cfg = {'merge_method': 'linear', 'dtype': 'float32', 'tokenizer': {'source': 'base', 'pad_to_multiple_of': 8, 'tokens': {'a': {'source': {'kind': 'zero'}, 'force': True}}},
           'base_model': str(models['base']),
           'models': [{'model': str(models['base']), 'parameters': {'weight': 1.0}}, {'model': str(models['other']), 'parameters': {'weight': 1.0}}]}
    o = tensors(run_merge(cfg, tmp_path / 'p', progress=False))
    e = o['model.embed_tokens.weight']
    assert e.shape[0] == 8 and torch.equal(e[V1.index('a')], torch.zeros(16))

def test_chat_template_names(models, tmp_path):
    base = {'merge_method': 'linear', 'models': [{'model': str(models['base']), 'parameters': {'weight': 1}}, {'model': str(models['ft']), 'parameters': {'weight': 1}}]}
    out = run_merge({**base, 'chat_template': 'chatml'}, tmp_path / 'c', progress=False)
    assert (out / 'chat_template.jinja').read_text() == CHAT_TEMPLATES['chatml']
    out = run_merge({**base, 'models': base['models'] + [{'model': str(models['ft2']), 'parameters': {'weight': 1}}], 'chat_template': 'auto'}, tmp_path / 'd', progress=False)
    assert (out / 'chat_template.jinja').read_text() == '{{ ft }} template xx'   # two of the three models ship it
    with pytest.raises(MergeConfigError, match='chat_template'): run_merge({**base, 'chat_template': 'chatlm'}, tmp_path / 'e', progress=False)

def test_multi_document_config(models, tmp_path):
    text = yaml.safe_dump({'name': 'mid', 'merge_method': 'linear', 'dtype': 'float32', 'intermediate_dir': str(tmp_path / 'inter'),
                           'models': [{'model': str(models['base']), 'parameters': {'weight': 1}}, {'model': str(models['ft']), 'parameters': {'weight': 1}}]})
    text += '---\n' + yaml.safe_dump({'merge_method': 'linear', 'dtype': 'float32',
                                      'models': [{'model': 'mid', 'parameters': {'weight': 1}}, {'model': str(models['ft2']), 'parameters': {'weight': 1}}]})
    f = tmp_path / 'multi.yml'; f.write_text(text)
    assert merge_cli([str(f), str(tmp_path / 'final'), '--no-progress']) == 0
    o, b, a, c = tensors(tmp_path / 'final'), tensors(models['base']), tensors(models['ft']), tensors(models['ft2'])
    k = 'model.layers.1.mlp.down_proj.weight'
    assert torch.allclose(o[k], 0.25 * b[k] + 0.25 * a[k] + 0.5 * c[k], atol=1e-6)
    assert (tmp_path / 'inter' / 'mid' / 'model.safetensors').exists()
