"Property and behaviour tests of vlm_merge.methods (merge registry, TIES/DARE/SLERP, LoRA folding)."
import json, math
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st, HealthCheck
from safetensors.torch import save_file

from vlm_merge.methods import (MERGE_METHODS, merge_tensors, get_method, register_method, topk_mask, bottom_mask, kth_largest,
                               sparsify, fold_lora, lora_delta, LoraAdapter, is_lora_adapter)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
TASK_METHODS = ['task_arithmetic', 'ties', 'dare_ties', 'dare_linear', 'breadcrumbs', 'breadcrumbs_ties']
shapes = st.lists(st.integers(1, 12), min_size=1, max_size=3).map(tuple)
PROP = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def rand(shape, seed, dtype=torch.float32, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(dtype)


def params_for(method, n, density=0.5):
    return [{'weight': 1.0 / n, 'density': density} for _ in range(n)]


# ---------------------------------------------------------------- registry
def test_registry_has_the_methods():
    assert {'linear', 'task_arithmetic', 'ties', 'dare_ties', 'dare_linear', 'slerp', 'breadcrumbs'} <= set(MERGE_METHODS)
    assert get_method('ties').global_defaults['normalize'] is True
    assert get_method('dare_ties').global_defaults == {'normalize': False, 'rescale': True, 'lambda': 1.0}
    assert get_method('task_arithmetic').global_defaults['normalize'] is False
    with pytest.raises(KeyError, match='known methods'): get_method('frankenmerge')


def test_register_custom_method():
    @register_method('_test_max', needs_base=False)
    def _mx(base, tensors, params, gp, seed, importance):
        "Elementwise max."
        return torch.stack(tensors).amax(0)
    try:
        r = merge_tensors('_test_max', None, [torch.tensor([1., 5.]), torch.tensor([3., 2.])])
        assert torch.equal(r, torch.tensor([3., 5.]))
        assert MERGE_METHODS['_test_max'].doc == 'Elementwise max.'
    finally:
        del MERGE_METHODS['_test_max']


# ---------------------------------------------------------------- refusals: identical inputs, determinism
@PROP
@given(shape=shapes, n=st.integers(1, 4), seed=st.integers(0, 10_000), dt=st.sampled_from(DTYPES),
       w=st.floats(0.05, 3.0))
def test_linear_of_identical_models_is_bit_exact(shape, n, seed, dt, w):
    x = rand(shape, seed, dt)
    r = merge_tensors('linear', None, [x] * n, [{'weight': w}] * n)
    assert r.dtype == torch.float32
    assert torch.equal(r.to(dt), x)


@PROP
@given(shape=shapes, n=st.integers(1, 4), seed=st.integers(0, 10_000), dt=st.sampled_from(DTYPES),
       method=st.sampled_from(TASK_METHODS), density=st.floats(0.1, 1.0))
def test_task_methods_of_copies_of_the_base_return_the_base(shape, n, seed, dt, method, density):
    b = rand(shape, seed, dt)
    copies = [b.clone() for _ in range(n)]
    r = merge_tensors(method, b, copies, params_for(method, n, density), {'tensor_name': 'w', 'lambda': 1.7}, seed=seed)
    assert torch.equal(r.to(dt), b)


@PROP
@given(shape=shapes, seed=st.integers(0, 10_000), t=st.floats(0, 1), dt=st.sampled_from(DTYPES))
def test_slerp_of_identical_models_is_bit_exact(shape, seed, t, dt):
    x = rand(shape, seed, dt)
    assert torch.equal(merge_tensors('slerp', x, [x.clone()], [{}], {'t': t}).to(dt), x)


@PROP
@given(shape=shapes, n=st.integers(1, 3), seed=st.integers(0, 10_000), density=st.floats(0.05, 0.95),
       method=st.sampled_from(['dare_ties', 'dare_linear']), mode=st.sampled_from(['l1', 'inverse_density']))
def test_dare_same_seed_same_output(shape, n, seed, density, method, mode):
    b = rand(shape, seed)
    xs = [b + rand(shape, seed + 1 + i, scale=0.1) for i in range(n)]
    ps = params_for(method, n, density)
    gp = {'tensor_name': 'layers.0.mlp.up_proj.weight', 'rescale_mode': mode}
    r1 = merge_tensors(method, b, xs, ps, gp, seed=seed)
    r2 = merge_tensors(method, b, [x.clone() for x in xs], ps, dict(gp), seed=seed)
    assert torch.equal(r1, r2)


def test_dare_seed_depends_on_tensor_name_not_on_order():
    b = torch.zeros(64, 64); x = rand((64, 64), 1)
    p = [{'weight': 1.0, 'density': 0.5}]
    a1 = merge_tensors('dare_linear', b, [x], p, {'tensor_name': 'a'}, seed=3)
    b1 = merge_tensors('dare_linear', b, [x], p, {'tensor_name': 'b'}, seed=3)
    b2 = merge_tensors('dare_linear', b, [x], p, {'tensor_name': 'b'}, seed=3)   # after another tensor: same
    a2 = merge_tensors('dare_linear', b, [x], p, {'tensor_name': 'a'}, seed=3)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    assert not torch.equal(a1 != 0, b1 != 0)
    assert not torch.equal(a1, merge_tensors('dare_linear', b, [x], p, {'tensor_name': 'a'}, seed=4))
    # the global RNG is neither used nor disturbed
    torch.manual_seed(0); before = torch.rand(3)
    torch.manual_seed(0); merge_tensors('dare_linear', b, [x], p, {'tensor_name': 'a'}, seed=3); after = torch.rand(3)
    assert torch.equal(before, after)


def test_dare_models_get_independent_masks():
    b = torch.zeros(4096); x = torch.ones(4096)
    r = merge_tensors('dare_linear', b, [x, x * 2], [{'weight': 1., 'density': 0.5}] * 2,
                      {'tensor_name': 'w', 'rescale': False}, seed=0)
    # entries: 0 (neither kept), 1, 2, 3 (both): all four combinations occur, about a quarter each
    for v in (0., 1., 2., 3.):
        assert 0.2 < float((r == v).float().mean()) < 0.3


# ---------------------------------------------------------------- trimming
@PROP
@given(n=st.integers(1, 400), frac=st.floats(0, 1), seed=st.integers(0, 10_000), levels=st.integers(1, 50))
def test_topk_mask_matches_a_stable_sort(n, frac, seed, levels):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, levels, (n,), generator=g).float()      # many ties
    k = int(frac * n)
    m = topk_mask(s, k)
    assert int(m.sum()) == k
    # reference: stable descending sort (equal values in index order), first k
    order = np.argsort(-s.numpy(), kind='stable')[:k]
    ref = torch.zeros(n, dtype=torch.bool); ref[torch.from_numpy(order)] = True
    assert torch.equal(m, ref)
    b = bottom_mask(s, k)
    order = np.argsort(s.numpy(), kind='stable')[:k]
    ref = torch.zeros(n, dtype=torch.bool); ref[torch.from_numpy(order)] = True
    assert torch.equal(b, ref)


@pytest.mark.parametrize('levels', [None, 40])
def test_kth_largest_on_large_tensors_is_exact(levels):
    g = torch.Generator().manual_seed(1)
    n = 6_000_000
    s = torch.randn(n, generator=g).abs() if levels is None else torch.randint(0, levels, (n,), generator=g).float()
    for k in (1, 7, n // 5, n // 2, n - 3, n):
        assert kth_largest(s, k) == torch.kthvalue(s, n - k + 1).values
    m = topk_mask(s, n // 5)
    assert int(m.sum()) == n // 5


@PROP
@given(shape=shapes, density=st.floats(0.05, 1.0), seed=st.integers(0, 10_000))
def test_magnitude_trim_keeps_the_largest(shape, density, seed):
    d = rand(shape, seed)
    k = int(density * d.numel())
    if density < 1 and k == 0:
        with pytest.raises(ValueError, match='keeps no entry'): sparsify(d, density)
        return
    r = sparsify(d, density)
    kept = r != 0
    assert int(kept.sum()) == (d.numel() if density >= 1 else k)
    if 0 < int(kept.sum()) < d.numel():
        assert d.abs()[kept].min() >= d.abs()[~kept].max()
    assert torch.equal(r[kept], d[kept])


def _ties_reference(base, xs, ws, density, normalize=True):
    "TIES from the paper's description, in float64 numpy with a stable sort for the trim."
    b = base.double().numpy().reshape(-1)
    ds = []
    for x in xs:
        d = x.double().numpy().reshape(-1) - b
        k = int(density * d.size)
        keep = np.zeros(d.size, bool); keep[np.argsort(-np.abs(d), kind='stable')[:k]] = True
        ds.append(np.where(keep, d, 0.0))
    wd = np.stack([w * d for w, d in zip(ws, ds)])
    sign = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(wd) == sign
    mixed = (wd * agree).sum(0)
    div = (np.array(ws)[:, None] * agree).sum(0); div[div == 0] = 1
    if normalize: mixed = mixed / div
    return torch.from_numpy(b + mixed).reshape(base.shape)


@PROP
@given(shape=shapes, n=st.integers(1, 4), density=st.floats(0.1, 1.0), seed=st.integers(0, 10_000),
       ws=st.lists(st.floats(0.1, 2.0), min_size=4, max_size=4), normalize=st.booleans())
def test_ties_matches_reference(shape, n, density, seed, ws, normalize):
    base = rand(shape, seed)
    xs = [base + rand(shape, seed + 1 + i) for i in range(n)]
    if int(density * base.numel()) == 0: return
    ps = [{'weight': ws[i], 'density': density} for i in range(n)]
    r = merge_tensors('ties', base, xs, ps, {'normalize': normalize})
    torch.testing.assert_close(r.double(), _ties_reference(base, xs, ws[:n], density, normalize), rtol=1e-5, atol=1e-5)


def test_ties_by_hand_and_lambda():
    b = torch.zeros(5)
    t1 = torch.tensor([3., -2, .5, .1, -.3]); t2 = torch.tensor([-1., -4, 2, .2, .1])
    p = [{'weight': .5, 'density': .4}] * 2
    assert torch.equal(merge_tensors('ties', b, [t1, t2], p), torch.tensor([3., -3., 2., 0., 0.]))
    assert torch.equal(merge_tensors('ties', b, [t1, t2], p, {'lambda': 2.0}), torch.tensor([6., -6., 4., 0., 0.]))
    # without normalize: the weighted sum of agreeing entries
    assert torch.equal(merge_tensors('ties', b, [t1, t2], p, {'normalize': False}), torch.tensor([1.5, -3., 1., 0., 0.]))


def test_ties_importance_replaces_magnitude():
    b = torch.zeros(6); x = torch.arange(1., 7.)
    imp = torch.tensor([5., 0., 0., 0., 0., 4.])
    r = merge_tensors('ties', b, [x], [{'weight': 1., 'density': 2 / 6}], importance=[imp])
    assert torch.equal(r, torch.tensor([1., 0, 0, 0, 0, 6.]))
    r = merge_tensors('ties', b, [x], [{'weight': 1., 'density': 2 / 6}], {'use_sparsegpt': False}, importance=[imp])
    assert torch.equal(r, torch.tensor([0., 0, 0, 0, 5., 6.]))
    with pytest.raises(ValueError, match='importance'):
        merge_tensors('ties', b, [x], [{'weight': 1., 'density': .5}], importance=[torch.ones(3)])


def test_dare_importance_keeps_important_entries_more_often():
    b = torch.zeros(20_000); x = torch.ones(20_000)
    imp = torch.cat([torch.full((10_000,), 3.0), torch.ones(10_000)])
    r = merge_tensors('dare_linear', b, [x], [{'weight': 1., 'density': 0.2}], {'tensor_name': 'w', 'rescale': False},
                      seed=0, importance=[imp])
    hi, lo = float((r[:10_000] != 0).float().mean()), float((r[10_000:] != 0).float().mean())
    assert abs(hi - 0.3) < 0.02 and abs(lo - 0.1) < 0.02      # p = density * imp / mean(imp)
    # inverse rescale divides each kept entry by its own probability: unbiased
    r = merge_tensors('dare_linear', b, [x], [{'weight': 1., 'density': 0.2}],
                      {'tensor_name': 'w', 'rescale_mode': 'inverse_density'}, seed=0, importance=[imp])
    assert abs(float(r.mean()) - 1.0) < 0.05


def test_breadcrumbs_drops_outliers_and_small():
    d = torch.arange(1., 101.)          # |delta| 1..100
    r = merge_tensors('breadcrumbs', torch.zeros(100), [d], [{'weight': 1., 'density': 0.5, 'gamma': 0.1}])
    kept = torch.nonzero(r).view(-1) + 1
    assert torch.equal(kept, torch.arange(41, 91))   # drop the top 10 and the bottom 40


# ---------------------------------------------------------------- slerp
@PROP
@given(n=st.integers(2, 64), seed=st.integers(0, 10_000), t=st.floats(0, 1))
def test_slerp_stays_on_the_sphere(n, seed, t):
    a, b = rand((n,), seed), rand((n,), seed + 1)
    a, b = a / a.norm(), b / b.norm()
    r = merge_tensors('slerp', a, [b], [{}], {'t': t})
    assert abs(float(r.norm()) - 1.0) < 1e-4 or abs(float((a * b).sum())) > 0.9995


def test_slerp_ends_and_errors():
    a, b = torch.tensor([1., 0.]), torch.tensor([0., 1.])
    torch.testing.assert_close(merge_tensors('slerp', a, [b], [{}], {'t': 1.0}), b)
    torch.testing.assert_close(merge_tensors('slerp', None, [a, b], [{}, {}], {'t': 0.0}), a)
    with pytest.raises(ValueError, match='exactly two'):
        merge_tensors('slerp', a, [b, b], [{}, {}], {'t': 0.5})


# ---------------------------------------------------------------- errors, purity, dtypes
def test_refusals():
    b = torch.zeros(4)
    with pytest.raises(ValueError, match='NaN or Inf'):
        merge_tensors('ties', b, [torch.tensor([1., float('nan'), 0, 0])], [{'weight': 1.}], {'tensor_name': 'layers.0.x'})
    with pytest.raises(ValueError, match='layers.0.x'):
        merge_tensors('linear', None, [b, torch.tensor([1., float('inf'), 0, 0])], [{'weight': 1.}] * 2, {'tensor_name': 'layers.0.x'})
    with pytest.raises(ValueError, match='shape mismatch'):
        merge_tensors('ties', b, [torch.zeros(5)], [{'weight': 1.}])
    with pytest.raises(ValueError, match='needs a base'):
        merge_tensors('ties', None, [b], [{'weight': 1.}])
    with pytest.raises(ValueError, match='weight'):
        merge_tensors('ties', b, [b + 1], [{}])
    with pytest.raises(ValueError, match='keeps no entry'):
        merge_tensors('ties', b, [b + 1], [{'weight': 1., 'density': 0.1}])
    with pytest.raises(TypeError, match='non-float'):
        merge_tensors('linear', None, [torch.ones(3, dtype=torch.int64)], [{'weight': 1}])
    with pytest.raises(ValueError, match='compute_dtype'):
        merge_tensors('linear', None, [b, b + 1], [{'weight': 1}] * 2, compute_dtype='int8')


@pytest.mark.parametrize('method', sorted(MERGE_METHODS))
def test_inputs_are_never_modified(method):
    b = rand((8, 8), 0); xs = [b + rand((8, 8), 1), b + rand((8, 8), 2)]
    if method in ('slerp', 'nearswap', 'arcee_fusion', 'passthrough'): xs = xs[:1]   # methods of exactly two models (one with passthrough)
    keep = [b.clone()] + [x.clone() for x in xs]
    ps = [{'weight': 0.5, 'density': 0.5, 'scale': 0.5}] * len(xs)
    merge_tensors(method, b, xs, ps, {'tensor_name': 'w', 'rescale': True, 't': 0.5}, seed=0)
    for a, c in zip([b] + xs, keep): assert torch.equal(a, c)


def test_compute_dtype_input_matches_bf16_arithmetic_and_returns_fp32():
    b = rand((64,), 0, torch.bfloat16); x = rand((64,), 1, torch.bfloat16)
    r = merge_tensors('task_arithmetic', b, [x], [{'weight': 0.3}], compute_dtype='input')
    assert r.dtype == torch.float32
    assert torch.equal(r.to(torch.bfloat16), b + (x - b) * torch.tensor(0.3, dtype=torch.bfloat16))
    r2 = merge_tensors('task_arithmetic', b, [x], [{'weight': 0.3}], {'compute_dtype': 'input'})
    assert torch.equal(r, r2)


def test_mergekit_compat_uses_argsort_order():
    # tie_break='sort' gives exactly the mask of argsort(descending)[:k], whatever its tie order
    d = torch.randint(-3, 4, (5000,)).float()
    k = 1000
    ref = torch.zeros(5000, dtype=torch.bool); ref[torch.argsort(d.abs(), descending=True)[:k]] = True
    r = sparsify(d, k / 5000, tie_break='sort')
    assert torch.equal(r != 0, ref & (d != 0))


def test_mergekit_parity_when_available():
    pytest.importorskip('mergekit')
    pytest.importorskip('immutables')
    import importlib.util, pathlib, sys
    path = pathlib.Path(__file__).parents[1] / 'benchmarks' / 'methods_mergekit_parity.py'
    spec = importlib.util.spec_from_file_location('parity', path); mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    base = rand((256, 256), 0, torch.bfloat16)
    xs = [(base.float() + rand((256, 256), i + 1) * 0.002).to(torch.bfloat16) for i in range(2)]
    ref = mod.mergekit_merge('ties', base, xs, [0.5, 0.5], [0.2, 0.2], {'normalize': True})
    out = merge_tensors('ties', base, xs, [{'weight': .5, 'density': .2}] * 2, {'mergekit_compat': True}).to(torch.bfloat16)
    assert torch.equal(out, ref)


# ---------------------------------------------------------------- LoRA
def _write_adapter(folder, mods, r=4, alpha=8, extra_cfg=None, seed=0, fan_in_fan_out=False):
    g = torch.Generator().manual_seed(seed)
    tensors, AB = {}, {}
    for mod, (out_f, in_f) in mods.items():
        A, B = torch.randn(r, in_f, generator=g), torch.randn(out_f, r, generator=g)
        tensors[f'base_model.model.{mod}.lora_A.weight'] = A
        tensors[f'base_model.model.{mod}.lora_B.weight'] = B
        AB[mod] = (A, B)
    save_file(tensors, str(folder / 'adapter_model.safetensors'))
    cfg = {'peft_type': 'LORA', 'r': r, 'lora_alpha': alpha, 'target_modules': sorted({m.split('.')[-1] for m in mods}),
           'fan_in_fan_out': fan_in_fan_out, 'base_model_name_or_path': 'tiny', 'task_type': 'CAUSAL_LM', **(extra_cfg or {})}
    (folder / 'adapter_config.json').write_text(json.dumps(cfg))
    return AB


def test_lora_adapter_folds_tensor_by_tensor(tmp_path):
    mods = {'model.layers.0.self_attn.q_proj': (8, 6), 'model.layers.1.mlp.down_proj': (6, 10)}
    AB = _write_adapter(tmp_path, mods, r=4, alpha=8, extra_cfg={'rank_pattern': {}, 'alpha_pattern': {'down_proj': 2}})
    ad = LoraAdapter(tmp_path)
    assert is_lora_adapter(tmp_path) and not is_lora_adapter(tmp_path / 'nope')
    assert sorted(ad.base_keys()) == sorted(f'{m}.weight' for m in mods)
    W = torch.randn(8, 6, dtype=torch.bfloat16)
    A, B = AB['model.layers.0.self_attn.q_proj']
    out = ad.fold('model.layers.0.self_attn.q_proj.weight', W)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, (W.float() + B @ A * 2.0).to(torch.bfloat16))
    A, B = AB['model.layers.1.mlp.down_proj']
    torch.testing.assert_close(ad.delta('model.layers.1.mlp.down_proj.weight'), B @ A * (2 / 4))   # alpha_pattern
    assert 'model.layers.0.self_attn.q_proj.weight' in ad and 'model.layers.0.self_attn.k_proj.weight' not in ad
    with pytest.raises(KeyError, match='k_proj'): ad.delta('model.layers.0.self_attn.k_proj.weight')
    with pytest.raises(ValueError, match='shape'): ad.fold('model.layers.0.self_attn.q_proj.weight', torch.zeros(6, 8))


def test_lora_rslora_and_fan_in_fan_out():
    A, B = torch.randn(4, 3), torch.randn(5, 4)
    torch.testing.assert_close(lora_delta(A, B, 8, 4, use_rslora=True), B @ A * 4.0)
    W = torch.zeros(3, 5)
    torch.testing.assert_close(fold_lora(W, A, B, 8, 4, fan_in_fan_out=True), (B @ A * 2.0).T)


def test_lora_bad_folders(tmp_path):
    with pytest.raises(FileNotFoundError, match='adapter_config.json'): LoraAdapter(tmp_path)
    (tmp_path / 'adapter_config.json').write_text(json.dumps({'peft_type': 'IA3'}))
    with pytest.raises(ValueError, match='IA3'): LoraAdapter(tmp_path)
    _write_adapter(tmp_path, {'model.layers.0.self_attn.q_proj': (4, 4)})
    from safetensors.torch import load_file
    t = load_file(str(tmp_path / 'adapter_model.safetensors'))
    t.pop('base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight')
    save_file(t, str(tmp_path / 'adapter_model.safetensors'))
    with pytest.raises(ValueError, match='not both'): LoraAdapter(tmp_path)


def test_lora_from_real_peft(tmp_path):
    peft = pytest.importorskip('peft')
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1)).eval()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=['q_proj', 'down_proj'], init_lora_weights=False))
    pm.save_pretrained(tmp_path)
    merged = pm.merge_and_unload().state_dict()
    ad = LoraAdapter(tmp_path)
    assert len(ad.base_keys()) == 2
    for k in ad.base_keys():
        torch.testing.assert_close(ad.fold(k, sd[k]), merged[k], rtol=1e-5, atol=1e-5)


def test_lora_adapter_embeddings_saved_modules_and_refused_variants(tmp_path):
    "peft's embedding LoRA and modules_to_save fold as merge_and_unload does; DoRA is refused, naming adapter_config.json."
    peft = pytest.importorskip('peft')
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, tie_word_embeddings=False)
    base = LlamaForCausalLM(cfg).eval()
    sd = {k: v.clone() for k, v in base.state_dict().items()}
    pm = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, target_modules=['embed_tokens', 'q_proj'],
                                                   modules_to_save=['lm_head'], init_lora_weights=False))
    with torch.no_grad(): pm.base_model.model.lm_head.modules_to_save['default'].weight.mul_(2)
    pm.save_pretrained(tmp_path / 'ad')
    merged = pm.merge_and_unload().state_dict()
    ad = LoraAdapter(tmp_path / 'ad')
    assert 'model.embed_tokens' in ad.embedding and ad.extra == []
    assert set(ad.saved) == {'lm_head.weight', 'model.embed_tokens.weight'}      # the module to save, the embedding's base layer
    k = 'model.embed_tokens.weight'
    assert ad.delta_shape(k) == tuple(sd[k].shape)
    torch.testing.assert_close(ad.fold(k, ad.saved_tensor(k)), merged[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ad.saved_tensor('lm_head.weight'), merged['lm_head.weight'])
    assert not torch.equal(merged['lm_head.weight'], sd['lm_head.weight'])
    torch.manual_seed(0)
    dora = peft.get_peft_model(LlamaForCausalLM(cfg), peft.LoraConfig(r=2, target_modules=['q_proj'], use_dora=True))
    dora.save_pretrained(tmp_path / 'dora')
    with pytest.raises(ValueError, match='adapter_config.json: unsupported LoRA variant: use_dora'): LoraAdapter(tmp_path / 'dora')
