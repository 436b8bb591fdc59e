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
    assert not any(n.startswith('.') and n != '.vlm_merge_output' for n in files)
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
    with pytest.raises(Exception, match='not a vlm_merge output'): run_merge(cfg, out, overwrite=True, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ['keep.txt']      # --overwrite never deletes files it did not write
    out = tmp_path / 'out2'
    run_merge(cfg, out, progress=False)
    run_merge(cfg, out, overwrite=True, progress=False)                # its own output: replaced
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

# ---------------------------------------------------------------- LoRA adapters as inputs
def _peft_adapter(base, out, targets, seed, rslora=False, save_head=False, **kw):
    "A peft LoRA adapter on the model in folder `base` (random A and B); returns the explicitly merged state dict (merge_and_unload)."
    peft = pytest.importorskip('peft')
    from transformers import AutoModelForCausalLM, LlavaForConditionalGeneration
    cls = LlavaForConditionalGeneration if 'llava' in json.loads((Path(base) / 'config.json').read_text())['model_type'] else AutoModelForCausalLM
    m = cls.from_pretrained(base)
    torch.manual_seed(seed)
    pm = peft.get_peft_model(m, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False, use_rslora=rslora,
                                                modules_to_save=['lm_head'] if save_head else None, **kw))
    if save_head:   # a retrained lm_head, saved whole by the adapter
        with torch.no_grad(): pm.base_model.model.lm_head.modules_to_save['default'].weight.add_(0.1)
    pm.save_pretrained(out)
    merged = pm.merge_and_unload()
    merged.save_pretrained(Path(out).parent / (Path(out).name + '_merged'))
    return Path(out), Path(out).parent / (Path(out).name + '_merged')

@pytest.mark.parametrize('form', ['plus', 'long', 'bare'])
def test_lora_input_equals_explicitly_merged_model(llamas, tmp_path, form):
    "TIES of (base + LoRA adapter) and a fine-tune = TIES of peft's merge_and_unload model and the same fine-tune, to float tolerance."
    base, _, ft2 = llamas
    ad, explicit = _peft_adapter(base, tmp_path / 'ad', ['q_proj', 'v_proj', 'down_proj', 'embed_tokens'], seed=3,
                                 rslora=form == 'long', save_head=True)
    ref = {'plus': f'{base}+{ad}', 'long': {'path': str(base), 'lora': str(ad)}, 'bare': str(ad)}[form]
    def cfg(m): return {'merge_method': 'ties', 'base_model': str(base), 'dtype': 'float32',
                        'models': [{'model': m, 'parameters': {'weight': 0.6, 'density': 0.5}},
                                   {'model': str(ft2), 'parameters': {'weight': 0.4, 'density': 0.5}}]}
    plan = build_plan(MergeConfig.from_dict(cfg(ref)))
    lr = plan.readers[f'{base}+{ad}']
    assert len(lr.targets) == 3 * 3 + 1 and set(lr.saved) == {'lm_head.weight', 'model.embed_tokens.weight'}
    want_sd = load_out(explicit)   # the folded model, tensor by tensor, equals peft's merge
    for k, v in want_sd.items(): torch.testing.assert_close(lr.get(k), v, rtol=0, atol=1e-6)
    for k in ('model.embed_tokens.weight', 'model.layers.2.mlp.down_proj.weight', 'lm_head.weight'):   # row ranges, as the kernel reads
        n = lr.shape(k)[0]
        torch.testing.assert_close(torch.cat([lr.get(k, a, min(a + 7, n)) for a in range(0, n, 7)]), lr.get(k), rtol=1e-6, atol=1e-6)
    assert not torch.equal(lr.get('lm_head.weight'), CheckpointReader(base).get('lm_head.weight'))
    plan.close()
    a = load_out(run_merge(cfg(ref), tmp_path / 'a', progress=False, shard_size='30KB'))
    b = load_out(run_merge(cfg(str(explicit)), tmp_path / 'b', progress=False))
    assert set(a) == set(b)
    for k in a: torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)
    card = (tmp_path / 'a' / 'README.md').read_text()
    assert f'`{Path(ad).name}`: a LoRA adapter folded into `{Path(str(base)).name}`' in card and 'r=4, alpha=8' in card and '10 tensors with a delta' in card
    assert ('rsLoRA' in card) == (form == 'long')
    front = yaml.safe_load(card.split('---')[1])
    assert str(ad) not in (front['base_model'] or []) and 'lora' in front['tags']   # only Hub ids

def test_lora_on_a_vlm_maps_peft_names_to_the_checkpoint_layout(tmp_path):
    "peft names a LLaVA's modules as transformers 5 loads it (model.language_model..., model.vision_tower...); the checkpoint keeps the old layout."
    vlm = save_llava(tmp_path / 'vlm', 21)
    ad, explicit = _peft_adapter(vlm, tmp_path / 'ad', ['q_proj', 'fc2'], seed=4)
    names = load_file(str(ad / 'adapter_model.safetensors'))
    assert any('model.language_model.layers' in k for k in names) and any('vision_tower' in k for k in names)
    cfg = {'merge_method': 'task_arithmetic', 'base_model': str(vlm), 'dtype': 'float32',
           'models': [{'model': f'{vlm}+{ad}', 'parameters': {'weight': 1.0}}]}
    got, want, rb = load_out(run_merge(cfg, tmp_path / 'out', progress=False)), load_out(explicit), CheckpointReader(vlm)
    assert set(got) == set(want) == set(rb.keys())
    changed = [k for k in want if not torch.equal(want[k], rb.get(k))]
    assert any(k.startswith('language_model.model.layers.') and 'q_proj' in k for k in changed)
    assert any(k.startswith('vision_tower.') and 'q_proj' in k for k in changed)
    assert any('fc2' in k for k in changed)
    for k in got: torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)

def test_lora_refusals(llamas, tmp_path):
    base, ft1, _ = llamas
    dora, _ = _peft_adapter(base, tmp_path / 'dora', ['q_proj'], seed=5, use_dora=True)
    cfg = {'merge_method': 'task_arithmetic', 'base_model': str(base), 'models': [{'model': f'{base}+{dora}', 'parameters': {'weight': 1.0}}]}
    _refused(cfg, tmp_path / 'out', r'dora/adapter_config.json: unsupported LoRA variant: use_dora')
    plain, _ = _peft_adapter(base, tmp_path / 'plain', ['q_proj'], seed=6)
    import shutil
    odd = tmp_path / 'odd'; shutil.copytree(plain, odd)   # a tensor of a kind peft's LoRA does not write
    sd = load_file(str(odd / 'adapter_model.safetensors')); sd['base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector'] = torch.ones(32)
    save_file(sd, str(odd / 'adapter_model.safetensors'))
    cfg['models'][0]['model'] = f'{base}+{odd}'
    _refused(cfg, tmp_path / 'out', r'odd/adapter_model.safetensors: 1 tensor\(s\) are neither LoRA factors.*lora_magnitude_vector')
    other = save_llama(tmp_path / 'wide', 9, intermediate_size=96)   # an adapter of another model: shapes differ
    wide_ad, _ = _peft_adapter(other, tmp_path / 'wide_ad', ['down_proj'], seed=7)
    cfg['models'][0]['model'] = f'{base}+{wide_ad}'
    _refused(cfg, tmp_path / 'out', r'wide_ad/adapter_model.safetensors: the LoRA delta of .*down_proj')
    c = json.loads((plain / 'adapter_config.json').read_text()); c['base_model_name_or_path'] = 'org/unknown-base'
    (plain / 'adapter_config.json').write_text(json.dumps(c))
    with pytest.raises(MergeConfigError, match="models\\[0\\].model: .* LoRA adapter of 'org/unknown-base'.*neither a local folder"):
        MergeConfig.from_dict({**cfg, 'models': [{'model': str(plain), 'parameters': {'weight': 1.0}}]})
    assert not (tmp_path / 'out').exists()

# ---------------------------------------------------------------- use_sparsegpt
SG_TEXTS = ['the cat sat on the mat', 'two plus three is five', 'a square has four equal sides',
            'the angle of a right triangle is ninety degrees', 'seven times six is forty two', 'birds sing in the morning']

@pytest.fixture(scope='module')
def sg_llamas(tmp_path_factory):
    "A tiny Llama with a tokenizer, and two dense fine-tunes of it."
    from vlm_merge.sparsegpt import word_tokenizer
    r = tmp_path_factory.mktemp('sg')
    base = save_llama(r / 'base', 30)
    word_tokenizer(SG_TEXTS, max_vocab=96).save_pretrained(base)
    return base, finetune(base, r / 'ft1', 31, scale=0.02, density=1.0), finetune(base, r / 'ft2', 32, scale=0.02, density=1.0)

def _count_forwards():
    "Counts forward passes of any LlamaForCausalLM (a global hook: the engine loads its own models)."
    calls = {'n': 0}
    def pre(mod, args):
        if type(mod).__name__ == 'LlamaForCausalLM': calls['n'] += 1
    return calls, torch.nn.modules.module.register_module_forward_pre_hook(pre)

def _direct_hessians(folder, texts, max_length):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vlm_merge.sparsegpt import hessians
    return hessians(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32), texts, None,
                    tokenizer=AutoTokenizer.from_pretrained(folder), max_length=max_length, progress=False)

@pytest.mark.parametrize('method,hessian', [('ties', 'self'), ('dare_ties', 'base')])
def test_use_sparsegpt_matches_merge_tensors_with_importance(sg_llamas, tmp_path, method, hessian):
    from vlm_merge.sparsegpt import sparsegpt_importance
    from vlm_merge.engine import tensor_seed
    base, ft1, ft2 = sg_llamas
    (tmp_path / 'calib.tsv').write_text('id\ttext\n' + ''.join(f'{i}\t{t}\n' for i, t in enumerate(SG_TEXTS)))
    ps = [{'weight': 0.5, 'density': 0.3}] * 2
    cfg = {'merge_method': method, 'base_model': str(base), 'dtype': 'float32', 'seed': 3,
           'models': [{'model': str(f), 'parameters': dict(p)} for f, p in zip((ft1, ft2), ps)],
           'parameters': {'use_sparsegpt': True},
           'sparsegpt': {'data': str(tmp_path / 'calib.tsv'), 'n_samples': 5, 'max_length': 12, 'hessian': hessian,
                         'cache_dir': str(tmp_path / 'hcache')}}
    calls, h = _count_forwards()
    try:
        got = load_out(run_merge(cfg, tmp_path / 'out', progress=False))
        first = calls['n']
        again = load_out(run_merge(cfg, tmp_path / 'out2', progress=False))
        second = calls['n'] - first
    finally: h.remove()
    n_models = 1 if hessian == 'base' else 2
    assert first == 5 * n_models and second == 0               # a rerun reads the cached Hessians: no forward pass
    card = (tmp_path / 'out2' / 'README.md').read_text()
    assert card.count('read from the cache') == n_models and '## SparseGPT importance' in card and 'sparsegpt' in card.split('---')[1]
    assert '21 merged linear weights of the decoder layers were ranked by importance' in card   # 3 layers x 7
    # one H^-1 per distinct input (q/k/v, o, gate/up, down: 4 a layer) and Hessian owner; 21 weights x 2 models scored
    n_fact = 3 * 4 * n_models
    assert f'Inverse-Hessian diagonals: {n_fact} factorised, {42 - n_fact} reused' in card, card
    rb, r1, r2 = CheckpointReader(base), CheckpointReader(ft1), CheckpointReader(ft2)
    H = {f: _direct_hessians(f, SG_TEXTS[:5], 12) for f in ((base,) if hessian == 'base' else (ft1, ft2))}
    n_diff = 0
    for k in rb.keys():
        b0, xs = rb.get(k), [r1.get(k), r2.get(k)]
        seed = tensor_seed(3, k)
        mag = merge_tensors(method, b0, xs, [dict(p) for p in ps], {'tensor_name': k}, seed=seed)
        mod = k[:-len('.weight')]
        if '.layers.' in k and b0.dim() == 2:
            Hs = [H[base][mod]] * 2 if hessian == 'base' else [H[ft1][mod], H[ft2][mod]]
            want = merge_tensors(method, b0, xs, [dict(p) for p in ps], {'tensor_name': k}, seed=seed,
                                 importance=[sparsegpt_importance(x - b0, Hm) for x, Hm in zip(xs, Hs)])
            n_diff += not torch.equal(want != b0, mag != b0)
        else: want = mag                                          # norms, embeddings, lm_head: magnitude
        assert torch.equal(got[k], want), k
        assert torch.equal(again[k], want), k
    assert n_diff >= 15   # importance keeps other entries than magnitude on (nearly) every linear weight

def test_sparsegpt_hessians_of_a_lora_input_are_of_the_folded_model(sg_llamas, tmp_path):
    from vlm_merge.engine import input_hessians
    base, ft1, _ = sg_llamas
    ad, explicit = _peft_adapter(base, tmp_path / 'ad', ['down_proj', 'o_proj'], seed=8)
    import shutil
    for f in base.iterdir():
        if f.name.startswith(('tokenizer', 'special')): shutil.copy(f, explicit)
    cfg = {'merge_method': 'ties', 'base_model': str(base), 'parameters': {'use_sparsegpt': True},
           'models': [{'model': f'{base}+{ad}', 'parameters': {'weight': 0.5, 'density': 0.3}},
                      {'model': str(ft1), 'parameters': {'weight': 0.5, 'density': 0.3}}],
           'sparsegpt': {'data': SG_TEXTS, 'max_length': 12, 'cache_dir': None}}
    plan = build_plan(MergeConfig.from_dict(cfg))
    try: Hs = input_hessians(plan, progress=False)
    finally: plan.close()
    assert set(Hs) == {f'{base}+{ad}', str(ft1)} and plan.hessian_passes == {f'{base}+{ad}': 6, str(ft1): 6}
    want, of_base = _direct_hessians(explicit, SG_TEXTS, 12), _direct_hessians(base, SG_TEXTS, 12)
    mod = 'model.layers.1.mlp.up_proj'   # its input depends on the adapted o_proj and down_proj of layer 0
    torch.testing.assert_close(Hs[f'{base}+{ad}'][mod], want[mod], rtol=1e-5, atol=1e-7)
    assert not torch.allclose(Hs[f'{base}+{ad}'][mod], of_base[mod], rtol=1e-3, atol=1e-6)

def test_sparsegpt_config_errors(sg_llamas, tmp_path):
    base, ft1, ft2 = sg_llamas
    d = {'merge_method': 'ties', 'base_model': str(base), 'parameters': {'use_sparsegpt': True},
         'models': [{'model': str(ft1), 'parameters': {'weight': 1.0}}]}
    with pytest.raises(MergeConfigError, match='sparsegpt.data: use_sparsegpt needs calibration data'): MergeConfig.from_dict(d)
    with pytest.raises(MergeConfigError, match='task_arithmetic drops no task-vector entry'):
        MergeConfig.from_dict({**d, 'merge_method': 'task_arithmetic', 'sparsegpt': {'data': SG_TEXTS}})
    with pytest.raises(MergeConfigError, match=r'models\[0\].parameters.use_sparsegpt: a global setting'):
        MergeConfig.from_dict({**d, 'parameters': {}, 'models': [{'model': str(ft1), 'parameters': {'weight': 1.0, 'use_sparsegpt': True}}]})
    with pytest.raises(MergeConfigError, match=r'sparsegpt.n_samples: expected a positive integer'):
        MergeConfig.from_dict({**d, 'sparsegpt': {'data': SG_TEXTS, 'n_samples': 0}})
    # per-model data: only the model without its own data needs the top-level one
    c = MergeConfig.from_dict({**d, 'models': [{'model': str(ft1), 'parameters': {'weight': 1.0}, 'sparsegpt': {'data': ['x y']}}]})
    assert c.sparsegpt_for(str(ft1))['data'] == ['x y'] and c.sparsegpt_for(str(ft1))['max_length'] == 512
    with pytest.raises(MergeConfigError, match='missing.txt: no such file'):
        run_merge({**d, 'sparsegpt': {'data': str(tmp_path / 'missing.txt')}}, tmp_path / 'out', progress=False)
    assert not (tmp_path / 'out').exists()
    with pytest.warns(UserWarning, match='use_sparsegpt` is not on'):
        build_plan(MergeConfig.from_dict({**d, 'parameters': {}, 'sparsegpt': {'data': SG_TEXTS}})).close()
