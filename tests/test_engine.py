"End-to-end, refusal and property tests of the streaming merge engine (`vlm-merge merge`)."
from __future__ import annotations
import json, math, warnings
from pathlib import Path

import pytest, torch, yaml
from hypothesis import given, settings, strategies as st, HealthCheck
from safetensors.torch import save_file, load_file

from vlm_merge.engine import MergeConfig, MergeRefused, MergeConfigError, build_plan, run_merge, merge_cli, card_text
from vlm_merge.checkpoints import CheckpointReader
from vlm_merge.methods import merge_tensors
from vlm_merge.anatomy import canonical_key

def canon(keys):
    "canonical language-model name -> key"
    return {c: k for k in keys if (c := canonical_key(k)) is not None}

# ---------------------------------------------------------------- helpers
def tiny_llama_cfg(**kw):
    from transformers import LlamaConfig
    d = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    d.update(kw)
    return LlamaConfig(**d)

def save_llama(path, seed, **kw):
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    m = LlamaForCausalLM(tiny_llama_cfg(**kw))
    m.save_pretrained(path)
    return Path(path)

def save_llava(path, seed, **kw):
    from transformers import LlavaConfig, LlavaForConditionalGeneration, CLIPVisionConfig
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=16, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    m = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tiny_llama_cfg(**kw), image_token_index=95))
    m.save_pretrained(path)
    return Path(path)

def finetune(src, dst, seed, scale=0.05, density=0.3):
    "A copy of checkpoint `src` with a sparse random delta on every float tensor."
    import shutil
    shutil.copytree(src, dst)
    sd = load_file(str(Path(src) / 'model.safetensors'))
    g = torch.Generator().manual_seed(seed)
    for k, v in sd.items():
        m = torch.rand(v.shape, generator=g) < density
        sd[k] = (v + m * torch.randn(v.shape, generator=g) * scale).to(v.dtype)
    save_file(sd, str(Path(dst) / 'model.safetensors'), metadata={'format': 'pt'})
    return Path(dst)

def load_out(out):
    return dict(CheckpointReader(out).iter_tensors())

def write_yaml(path, d):
    Path(path).write_text(yaml.safe_dump(d)); return Path(path)

@pytest.fixture(scope='module')
def llamas(tmp_path_factory):
    r = tmp_path_factory.mktemp('llamas')
    base = save_llama(r / 'base', 0)
    return base, finetune(base, r / 'ft1', 1), finetune(base, r / 'ft2', 2)

# ---------------------------------------------------------------- CLI end to end
def test_cli_ties_end_to_end(llamas, tmp_path):
    base, ft1, ft2 = llamas
    cfg = write_yaml(tmp_path / 'ties.yml', {
        'models': [{'model': str(base)}, {'model': str(ft1), 'parameters': {'density': 0.5, 'weight': 0.5}},
                   {'model': str(ft2), 'parameters': {'density': 0.5, 'weight': 0.5}}],
        'merge_method': 'ties', 'base_model': str(base), 'parameters': {'normalize': True}, 'dtype': 'bfloat16'})
    out = tmp_path / 'out'
    assert merge_cli([str(cfg), str(out), '--shard-size', '20KB', '--no-progress']) == 0
    files = {p.name for p in out.iterdir()}
    assert 'model.safetensors.index.json' in files and 'README.md' in files and 'config.json' in files
    assert not any(n.startswith('.') for n in files)
    got = load_out(out)
    rb, r1, r2 = CheckpointReader(base), CheckpointReader(ft1), CheckpointReader(ft2)
    assert set(got) == set(rb.keys())
    k = 'model.layers.1.mlp.up_proj.weight'
    want = merge_tensors('ties', rb.get(k), [r1.get(k), r2.get(k)], [{'density': 0.5, 'weight': 0.5}] * 2,
                         {'normalize': True}).to(torch.bfloat16)
    assert got[k].dtype == torch.bfloat16 and torch.equal(got[k], want)
    assert json.loads((out / 'config.json').read_text())['dtype'] == 'bfloat16'
    card = (out / 'README.md').read_text()
    assert card.startswith('---') and 'ties' in card and str(ft1) in card and 'library_name: transformers' in card
    from transformers import LlamaForCausalLM
    m = LlamaForCausalLM.from_pretrained(out)
    assert torch.equal(m.model.layers[1].mlp.up_proj.weight.detach(), want)

def test_cli_refuses_existing_output_and_overwrite(llamas, tmp_path):
    base, ft1, _ = llamas
    cfg = write_yaml(tmp_path / 'lin.yml', {'models': [{'model': str(base), 'parameters': {'weight': 1}},
                                                       {'model': str(ft1), 'parameters': {'weight': 1}}],
                                            'merge_method': 'linear', 'dtype': 'float32'})
    out = tmp_path / 'out'; out.mkdir(); (out / 'keep.txt').write_text('x')
    with pytest.raises(Exception, match='not empty'): run_merge(cfg, out, progress=False)
    assert (out / 'keep.txt').exists()
    run_merge(cfg, out, overwrite=True, progress=False)
    got = load_out(out)
    k = 'model.norm.weight'
    assert torch.allclose(got[k], (CheckpointReader(base).get(k) + CheckpointReader(ft1).get(k)) / 2)
    with pytest.raises(Exception, match='input'): run_merge(cfg, base, overwrite=True, progress=False)

def test_gradient_and_filter_parameters(llamas, tmp_path):
    base, ft1, ft2 = llamas
    d = {'models': [{'model': str(ft1), 'parameters': {'weight': [1.0, 0.0]}},
                    {'model': str(ft2), 'parameters': {'weight': [0.0, 1.0]}}],
         'merge_method': 'linear'}
    out = run_merge(d, tmp_path / 'out', progress=False)
    got, r1, r2 = load_out(out), CheckpointReader(ft1), CheckpointReader(ft2)
    assert torch.equal(got['model.layers.0.self_attn.q_proj.weight'], r1.get('model.layers.0.self_attn.q_proj.weight'))
    assert torch.equal(got['model.layers.2.self_attn.q_proj.weight'], r2.get('model.layers.2.self_attn.q_proj.weight'))
    mid = (r1.get('model.layers.1.mlp.up_proj.weight') + r2.get('model.layers.1.mlp.up_proj.weight')) / 2
    assert torch.allclose(got['model.layers.1.mlp.up_proj.weight'], mid, atol=1e-6)

# ---------------------------------------------------------------- refusals: clear errors, nothing written
def _refused(cfg, out, match, **kw):
    with pytest.raises(MergeRefused, match=match): run_merge(cfg, out, progress=False, **kw)
    assert not out.exists()
    assert not any(p.name.startswith(f'.{out.name}') for p in out.parent.iterdir()), 'temporary folder left behind'

def test_refuses_shape_mismatch(llamas, tmp_path):
    base, ft1, _ = llamas
    other = save_llama(tmp_path / 'wide', 3, intermediate_size=96)
    cfg = {'models': [{'model': str(base)}, {'model': str(other), 'parameters': {'weight': 1.0}}],
           'merge_method': 'task_arithmetic', 'base_model': str(base)}
    _refused(cfg, tmp_path / 'out', 'intermediate_size')        # architecture check comes first
    _refused(cfg, tmp_path / 'out', 'shape mismatch.*mlp', allow_mismatched_architectures=True)

def test_refuses_missing_tensor(llamas, tmp_path):
    base, ft1, _ = llamas
    import shutil
    cut = tmp_path / 'cut'; shutil.copytree(ft1, cut)
    sd = load_file(str(cut / 'model.safetensors')); del sd['model.layers.2.mlp.down_proj.weight']
    save_file(sd, str(cut / 'model.safetensors'), metadata={'format': 'pt'})
    cfg = {'models': [{'model': str(cut), 'parameters': {'weight': 1.0}}], 'merge_method': 'task_arithmetic', 'base_model': str(base)}
    _refused(cfg, tmp_path / 'out', 'missing tensor.*layers.2.*down_proj')

def test_refuses_nan_in_input(llamas, tmp_path):
    base, ft1, _ = llamas
    import shutil
    bad = tmp_path / 'bad'; shutil.copytree(ft1, bad)
    sd = load_file(str(bad / 'model.safetensors')); sd['model.layers.2.mlp.down_proj.weight'][0, 0] = float('nan')
    save_file(sd, str(bad / 'model.safetensors'), metadata={'format': 'pt'})
    cfg = {'models': [{'model': str(bad), 'parameters': {'weight': 1.0}}], 'merge_method': 'task_arithmetic', 'base_model': str(base)}
    _refused(cfg, tmp_path / 'out', 'NaN.*down_proj')
    sd['model.layers.2.mlp.down_proj.weight'][0, 0] = float('inf')   # Inf in a tensor that is copied, not merged
    save_file(sd, str(bad / 'model.safetensors'), metadata={'format': 'pt'})
    cfg['merge_layers'] = [[0, 2]]; cfg['output_model'] = str(bad)
    _refused(cfg, tmp_path / 'out', 'NaN/Inf.*down_proj')

def test_refuses_mismatched_architectures_without_opt_in(llamas, tmp_path):
    base, ft1, _ = llamas
    import shutil
    mis = tmp_path / 'mistral'; shutil.copytree(ft1, mis)
    c = json.loads((mis / 'config.json').read_text()); c['model_type'] = 'mistral'; c['architectures'] = ['MistralForCausalLM']
    (mis / 'config.json').write_text(json.dumps(c))
    cfg = {'models': [{'model': str(mis), 'parameters': {'weight': 1.0}}], 'merge_method': 'task_arithmetic', 'base_model': str(base)}
    _refused(cfg, tmp_path / 'out', 'architectures do not match')
    with pytest.warns(UserWarning, match='allowed'):
        run_merge(cfg, tmp_path / 'out', allow_mismatched_architectures=True, progress=False)
    assert (tmp_path / 'out' / 'model.safetensors').exists()

def test_cli_error_exit_code(llamas, tmp_path, capsys):
    base, ft1, _ = llamas
    cfg = write_yaml(tmp_path / 'c.yml', {'models': [{'model': str(ft1)}], 'merge_method': 'ties', 'base_model': str(base)})
    assert merge_cli([str(cfg), str(tmp_path / 'out'), '--no-progress']) == 2   # ties needs weight per model
    assert not (tmp_path / 'out').exists()
    cfg.write_text('merge_method: tiez\nmodels: [a]\n')
    assert merge_cli([str(cfg), str(tmp_path / 'out')]) == 2
    assert 'unknown method' in capsys.readouterr().err

# ---------------------------------------------------------------- properties over random shapes
def _ckpt(root, name, tensors):
    p = Path(root) / name; p.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(p / 'model.safetensors'), metadata={'format': 'pt'})
    (p / 'config.json').write_text('{}')
    return p

shapes = st.lists(st.tuples(st.integers(1, 17), st.integers(1, 9)), min_size=1, max_size=4)
DT = st.sampled_from([torch.float32, torch.bfloat16, torch.float16])

@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=shapes, dt=DT, n=st.integers(2, 4), method=st.sampled_from(['linear', 'task_arithmetic', 'ties', 'dare_ties', 'dare_linear', 'slerp']),
       seed=st.integers(0, 2**16))
def test_identical_models_bit_for_bit(tmp_path_factory, shapes, dt, n, method, seed):
    root = tmp_path_factory.mktemp('ident')
    g = torch.Generator().manual_seed(seed)
    sd = {f'w{i}': (torch.randn(s, generator=g) * 3).to(dt) for i, s in enumerate(shapes)}
    p = _ckpt(root, 'm', sd)
    n = 2 if method == 'slerp' else n
    refs = [str(p)] + [str(_ckpt(root, f'c{j}', sd)) for j in range(1, n)]   # N copies in N folders
    cfg = {'merge_method': method, 'models': [{'model': r, 'parameters': {'weight': 1.0 / n, 'density': 0.5}} for r in refs]}
    if method != 'linear': cfg['base_model'] = refs[0]
    out = run_merge(cfg, root / 'out', seed=seed, progress=False)
    got = load_out(out)
    assert set(got) == set(sd)
    for k in sd: assert got[k].dtype == dt and torch.equal(got[k], sd[k]), k

@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(shapes=shapes, seed=st.integers(0, 2**16), method=st.sampled_from(['dare_ties', 'dare_linear']))
def test_dare_same_seed_same_output(tmp_path_factory, shapes, seed, method):
    root = tmp_path_factory.mktemp('dare')
    g = torch.Generator().manual_seed(seed)
    base = {f'w{i}': torch.randn(s, generator=g) for i, s in enumerate(shapes)}
    fts = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    refs = [_ckpt(root, 'b', base)] + [_ckpt(root, f'f{j}', f) for j, f in enumerate(fts)]
    cfg = {'merge_method': method, 'base_model': str(refs[0]),
           'models': [{'model': str(r), 'parameters': {'weight': 0.5, 'density': 0.5}} for r in refs[1:]]}
    a = load_out(run_merge(cfg, root / 'a', seed=seed, progress=False))
    b = load_out(run_merge(cfg, root / 'b2', seed=seed, progress=False))
    c = load_out(run_merge(cfg, root / 'c', seed=seed + 1, progress=False))
    for k in base: assert torch.equal(a[k], b[k]), k
    big = [k for k in base if base[k].numel() >= 16]
    if big: assert any(not torch.equal(a[k], c[k]) for k in big), 'a different seed should drop different entries'

# ---------------------------------------------------------------- VLM + text LLM
@pytest.fixture(scope='module')
def vlm_llm(tmp_path_factory):
    r = tmp_path_factory.mktemp('vlm')
    text_base = save_llama(r / 'text_base', 10)
    vlm = save_llava(r / 'vlm', 11)
    # the VLM's language model is a fine-tune of text_base: copy the base's LM tensors in, then perturb
    sdv, sdb = load_file(str(vlm / 'model.safetensors')), load_file(str(text_base / 'model.safetensors'))
    g = torch.Generator().manual_seed(12)
    cb = canon(sdb)
    for k in list(sdv):
        c = canonical_key(k)
        if c is not None: sdv[k] = sdb[cb[c]] + 0.01 * torch.randn(sdb[cb[c]].shape, generator=g)
    save_file(sdv, str(vlm / 'model.safetensors'), metadata={'format': 'pt'})
    llm = finetune(text_base, r / 'reason', 13, scale=0.02, density=1.0)
    return text_base, vlm, llm

def test_vlm_llm_task_arithmetic(vlm_llm, tmp_path):
    text_base, vlm, llm = vlm_llm
    cfg = {'merge_method': 'task_arithmetic', 'base_model': str(text_base),
           'models': [{'model': str(vlm), 'parameters': {'weight': 1.0}}, {'model': str(llm), 'parameters': {'weight': 0.5}}]}
    plan = build_plan(MergeConfig.from_dict(cfg))
    assert plan.output_model == str(vlm)
    out = run_merge(cfg, tmp_path / 'out', progress=False)
    got, rv, rl, rb = load_out(out), CheckpointReader(vlm), CheckpointReader(llm), CheckpointReader(text_base)
    assert set(got) == set(rv.keys())
    n_vis = 0
    for k in rv.keys():   # vision tower, projector, embeddings, lm_head: the VLM's, bit for bit
        if canonical_key(k) in (None, 'embed.weight', 'lm_head.weight'):
            assert torch.equal(got[k], rv.get(k)), k; n_vis += 1
    assert n_vis > 20
    kv, kt = canon(rv.keys())['layers.1.fwd_down.weight'], canon(rb.keys())['layers.1.fwd_down.weight']
    want = rb.get(kt) + 1.0 * (rv.get(kv) - rb.get(kt)) + 0.5 * (rl.get(kt) - rb.get(kt))
    assert torch.allclose(got[kv], want, atol=1e-6)
    assert not torch.equal(got[kv], rv.get(kv))
    from transformers import LlavaForConditionalGeneration
    m = LlavaForConditionalGeneration.from_pretrained(out)
    assert torch.allclose(m.model.language_model.layers[1].mlp.down_proj.weight.detach(), want, atol=1e-6)

def test_vlm_llm_layer_ranges_and_ties(vlm_llm, tmp_path):
    text_base, vlm, llm = vlm_llm
    cfg = {'merge_method': 'ties', 'base_model': str(text_base), 'merge_layers': [[1, 3]],
           'models': [{'model': str(vlm), 'parameters': {'weight': 1.0, 'density': 0.5}},
                      {'model': str(llm), 'parameters': {'weight': 1.0, 'density': 0.5}}]}
    got, rv = load_out(run_merge(cfg, tmp_path / 'out', progress=False)), CheckpointReader(vlm)
    cv = canon(rv.keys())
    kept = [k for c, k in cv.items() if c.startswith('layers.0.')]
    assert len(kept) == 9
    for k in kept: assert torch.equal(got[k], rv.get(k)), k   # kept from the VLM
    k = cv['layers.2.attn_q.weight']
    assert not torch.equal(got[k], rv.get(k))

def test_vlm_llm_vocab_mismatch_merges_common_rows(vlm_llm, tmp_path):
    text_base, vlm, llm = vlm_llm
    import shutil
    big = tmp_path / 'bigvocab'; shutil.copytree(llm, big)
    sd = load_file(str(big / 'model.safetensors'))
    for k in ('model.embed_tokens.weight', 'lm_head.weight'): sd[k] = torch.cat([sd[k], torch.randn(8, sd[k].shape[1])])
    save_file(sd, str(big / 'model.safetensors'), metadata={'format': 'pt'})
    c = json.loads((big / 'config.json').read_text()); c['vocab_size'] += 8; (big / 'config.json').write_text(json.dumps(c))
    cfg = {'merge_method': 'linear', 'embeddings': 'merge',
           'models': [{'model': str(vlm), 'parameters': {'weight': 0.5}}, {'model': str(big), 'parameters': {'weight': 0.5}}]}
    with pytest.warns(UserWarning, match='vocabulary sizes differ'):
        out = run_merge(cfg, tmp_path / 'out', progress=False)
    got, rv, rbig = load_out(out), CheckpointReader(vlm), CheckpointReader(big)
    e = canon(rv.keys())['embed.weight']
    assert got[e].shape == rv.shape(e)
    assert torch.allclose(got[e], (rv.get(e) + rbig.get('model.embed_tokens.weight')[:96]) / 2, atol=1e-6)
    h = canon(rv.keys())['lm_head.weight']
    assert torch.allclose(got[h], (rv.get(h) + rbig.get('lm_head.weight')[:96]) / 2, atol=1e-6)
    from transformers import LlavaForConditionalGeneration
    LlavaForConditionalGeneration.from_pretrained(out)

def test_card_text_is_small_and_records_sources():
    c = MergeConfig.from_dict({'merge_method': 'linear', 'models': [{'model': 'a', 'parameters': {'weight': 1}}, 'b']})
    t = card_text(c)
    front = yaml.safe_load(t.split('---')[1])
    assert front['base_model'] == ['a', 'b'] and front['tags'] == ['merge', 'vlm_merge', 'linear']
    assert 'merge_method: linear' in t

def test_qwen25vl_with_qwen2_text_llm(tmp_path):
    "Qwen2.5-VL's language model merged with a Qwen2 text LLM of the same geometry: no opt-in needed."
    from vlm_merge.anatomy import tiny_model
    from transformers import Qwen2_5_VLForConditionalGeneration
    tiny_model('qwen2_5_vl', seed=0).save_pretrained(tmp_path / 'vlm')
    tiny_model('qwen2', seed=1).save_pretrained(tmp_path / 'math')
    vlm, math_ = str(tmp_path / 'vlm'), str(tmp_path / 'math')
    cfg = {'merge_method': 'linear', 'models': [{'model': vlm, 'parameters': {'weight': 0.5}}, {'model': math_, 'parameters': {'weight': 0.5}}]}
    out = run_merge(cfg, tmp_path / 'out', progress=False)
    got, rv, rm = load_out(out), CheckpointReader(vlm), CheckpointReader(math_)
    assert set(got) == set(rv.keys())
    cv, cm = canon(rv.keys()), canon(rm.keys())
    assert sum(torch.equal(got[k], rv.get(k)) for k in rv.keys() if canonical_key(k) is None) == \
        sum(1 for k in rv.keys() if canonical_key(k) is None) > 5       # vision tower and merger: the VLM's
    c = 'layers.1.attn_k.bias'
    assert torch.allclose(got[cv[c]], (rv.get(cv[c]) + rm.get(cm[c])) / 2, atol=1e-6)
    Qwen2_5_VLForConditionalGeneration.from_pretrained(out)

@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 40), cols=st.integers(1, 12), n=st.integers(2, 3), chunk=st.sampled_from([1, 7, 64, 1 << 16]),
       dens=st.floats(0.05, 1.0), levels=st.sampled_from([3, 9, 1000]), sparse=st.floats(0.0, 1.0),
       method=st.sampled_from(['ties', 'task_arithmetic']), normalize=st.booleans(), seed=st.integers(0, 2**16))
def test_stream_kernel_matches_merge_tensors(rows, cols, n, chunk, dens, levels, sparse, method, normalize, seed):
    "The engine's chunked kernel = methods.merge_tensors, bit for bit, ties at the trim threshold included (few levels)."
    from vlm_merge.engine import stream_task_arithmetic
    g = torch.Generator().manual_seed(seed)
    shape = (rows, cols)
    b = torch.randn(shape, generator=g).bfloat16()
    xs = [(b.float() + (torch.randint(-levels, levels + 1, shape, generator=g) / levels)
           * (torch.rand(shape, generator=g) < sparse)).bfloat16() for _ in range(n)]
    ps = [{'weight': 0.3 + j / 5, 'density': dens} for j in range(n)]
    gp = {'normalize': normalize, 'lambda': 0.9}
    run = lambda: stream_task_arithmetic(lambda i, a, c: ([b] + xs)[i][a:c], shape, method, ps, gp, torch.bfloat16, chunk=chunk)
    try: want = merge_tensors(method, b, xs, ps, dict(gp)).bfloat16()
    except ValueError as e:   # e.g. a density that keeps no entry: the kernel refuses too
        with pytest.raises(ValueError, match='keeps no entry'): run()
        return
    assert torch.equal(run(), want)
