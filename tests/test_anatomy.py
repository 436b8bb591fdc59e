"""Tests of vlm_merge.anatomy that do not belong in the notebook: fused-row equivalence with a real
forward pass, head geometry against transformers' own repeat_kv, property tests of key round
trips, remote-code families on stand-in modules, and the `vlm-merge inspect` command end to end."""
import contextlib, io, json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from torch import nn
from hypothesis import given, settings, strategies as st, HealthCheck

import transformers
from vlm_merge.anatomy import (GROUPS, ROW_GROUPS, FUSED, FAMILIES, DECODERS, TINY_FAMILIES, Family, KeyLayout,
                               HeadGeometry, ModelAnatomy, UnknownFamilyError, canonical_key, fuse_groups,
                               fused_rows, get_family, guess_family, head_geometry, inspect_cli, key_for,
                               list_checkpoint_keys, match_keys, match_report, parse_key, register_family, split_fused,
                               tiny_config, tiny_model)

transformers.logging.set_verbosity_error()


@pytest.fixture(scope='module')
def tiny():
    return {n: tiny_model(n) for n in TINY_FAMILIES}


# ---------------------------------------------------------------- head geometry

geoms = st.builds(lambda K, G, d, I: HeadGeometry(K * G, K, d, K * G * d, I, 2),
                  st.integers(1, 4), st.integers(1, 4), st.integers(1, 6), st.integers(1, 16))


@settings(max_examples=60, deadline=None)
@given(g=geoms, data=st.data())
def test_q_kv_maps_match_repeat_kv(g, data):
    "q_to_kv agrees with transformers' repeat_kv, which decides which kv head each query head reads."
    from transformers.models.llama.modeling_llama import repeat_kv
    kv_idx = torch.arange(g.kv_dim).view(1, g.n_kv_heads, 1, g.head_dim)
    per_q = repeat_kv(kv_idx, g.group_size).reshape(-1)         # kv neuron read by each q neuron
    test_q = data.draw(st.lists(st.integers(0, g.q_dim - 1), max_size=8))
    assert g.q_to_kv(test_q) == sorted({int(per_q[n]) for n in test_q})
    test_kv = data.draw(st.lists(st.integers(0, g.kv_dim - 1), max_size=8))
    assert g.kv_to_q(test_kv) == sorted(n for n in range(g.q_dim) if int(per_q[n]) in set(test_kv))
    assert g.q_to_kv(g.kv_to_q(test_kv)) == sorted(set(test_kv))


def test_geometry_errors_and_sources(tiny):
    with pytest.raises(ValueError, match='not a multiple'): HeadGeometry(6, 4, 8, 48, 10, 1)
    with pytest.raises(ValueError, match="no 'intermediate_size'"):
        head_geometry({'model_type': 'x', 'hidden_size': 8, 'num_attention_heads': 2, 'num_hidden_layers': 1})
    g = head_geometry(tiny['gemma2'].config)
    assert (g.head_dim, g.q_dim, g.kv_dim) == (8, 32, 16)
    for n, m in tiny.items():   # object config and its saved dict give the same geometry
        assert head_geometry(m.config) == head_geometry(json.loads(m.config.to_json_string())), n
    # InternVL keeps its LLM config under llm_config; Qwen2-VL 4.x configs at the top level
    assert head_geometry({'model_type': 'internvl_chat', 'llm_config': {'model_type': 'internlm2', 'hidden_size': 64,
                          'num_attention_heads': 8, 'num_key_value_heads': 2, 'intermediate_size': 128,
                          'num_hidden_layers': 3}}).group_size == 4
    assert head_geometry({'model_type': 'qwen2_vl', 'hidden_size': 64, 'num_attention_heads': 4, 'num_key_value_heads': 4,
                          'intermediate_size': 100, 'num_hidden_layers': 5, 'vocab_size': 10}).intermediate_size == 100


# ---------------------------------------------------------------- fused modules

def test_phi3_split_equals_llama_forward(tiny):
    "Splitting Phi-3's fused weights with fused_rows gives a Llama with the same logits."
    phi = tiny['phi3']
    g = head_geometry(phi.config)
    sd = {}
    for k, v in phi.state_dict().items():
        i = parse_key(k, 'phi3')
        if i.group in FUSED:
            for grp, t in split_fused(v, i.group, g).items():
                sd[key_for(f'layers.{i.layer}.{grp}.{i.suffix}', 'llama')] = t
        else:
            sd[key_for(canonical_key(k), 'llama')] = v
    llama = transformers.LlamaForCausalLM(tiny_config('llama', rms_norm_eps=phi.config.rms_norm_eps)).eval()
    llama.load_state_dict(sd, strict=True)
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(llama(ids).logits, phi(ids).logits, rtol=1e-5, atol=1e-5)
    # and back: fusing the Llama's groups gives Phi-3's tensors
    for L in range(2):
        an = ModelAnatomy(llama)
        parts = {grp: an.weight(L, grp) for grp in FUSED['attn_qkv']}
        assert torch.equal(fuse_groups(parts, 'attn_qkv', g), phi.model.layers[L].self_attn.qkv_proj.weight)


def test_phi3_weight_view_edits_model(tiny):
    phi = tiny_model('phi3', seed=3)
    an = ModelAnatomy(phi)
    with torch.no_grad(): an.weight(1, 'fwd_up').zero_()
    w = phi.model.layers[1].mlp.gate_up_proj.weight
    assert w[64:].abs().sum() == 0 and w[:64].abs().sum() > 0


@settings(max_examples=40, deadline=None)
@given(g=geoms)
def test_internlm2_grouped_rows_match_reference_layout(g):
    "attn_qkv_grouped rows follow InternLM2's (K, G+2, d) view of wqkv, in each group's canonical neuron order."
    n_rows, d, G, K = g.q_dim + 2 * g.kv_dim, g.head_dim, g.group_size, g.n_kv_heads
    w = torch.arange(n_rows * 3, dtype=torch.float32).view(n_rows, 3)
    ref = w.view(K, G + 2, d, 3)                                    # reference: the modelling code's view
    parts = split_fused(w, 'attn_qkv_grouped', g)
    assert torch.equal(parts['attn_q'], ref[:, :G].reshape(-1, 3))  # query heads in order h = kv*G + j
    assert torch.equal(parts['attn_k'], ref[:, G].reshape(-1, 3))
    assert torch.equal(parts['attn_v'], ref[:, G + 1].reshape(-1, 3))
    assert torch.equal(fuse_groups(parts, 'attn_qkv_grouped', g), w)
    rows = torch.cat([torch.as_tensor(fused_rows('attn_qkv_grouped', m, g)).reshape(-1) for m in FUSED['attn_qkv_grouped']])
    assert sorted(rows.tolist()) == list(range(n_rows))            # a partition of the rows


def test_fused_errors():
    g = HeadGeometry(4, 2, 2, 8, 6, 1)
    with pytest.raises(KeyError, match='not part of fused'): fused_rows('attn_qkv', 'fwd_up', g)
    with pytest.raises(KeyError, match='misses'): fuse_groups({'attn_q': torch.zeros(8, 8)}, 'attn_qkv', g)


# ---------------------------------------------------------------- key parsing

def _all_canonical(dec, n_layers=3):
    out = ['embed.weight', 'final_norm.weight', 'lm_head.weight']
    for L in range(n_layers):
        out += [f'layers.{L}.{g}.{s}' for g in dec.modules for s in ('weight', 'bias')]
        out += [f'layers.{L}.{nm}.weight' for nm in dec.norms]
    return out


@pytest.mark.parametrize('fam', list(FAMILIES))
def test_every_layout_round_trips(fam):
    "For every family, layout and decoder it can have: canonical -> key -> parse (with and without family) -> canonical."
    f = FAMILIES[fam]
    decs = [f.decoder] if f.decoder else list(DECODERS)
    for dec in decs:
        cfg = {'model_type': f.model_types[0], 'llm_config': {'model_type': dec}} if not f.decoder else None
        for lay in f.layouts:
            for c in _all_canonical(DECODERS[dec]):
                k = key_for(c, f, lay.tag, config=cfg)
                i = parse_key(k, f)
                # a key spelt the same in two layouts (Qwen2-VL's lm_head.weight) reads as the first
                tag = next(l.tag for l in f.layouts if key_for(c, f, l.tag, config=cfg) == k)
                assert (canonical_key(k, f), i.layout, i.family) == (c, tag, f.name), (fam, dec, lay.tag, k)
                assert canonical_key(k) == c, (fam, dec, k)    # no family: the same canonical name


def test_unknown_layer_tensors_and_others():
    i = parse_key('model.language_model.layers.4.self_attn.rotary_emb.inv_freq')
    assert (i.component, i.layer, i.group, i.rest) == ('lm_layer', 4, None, 'self_attn.rotary_emb.inv_freq')
    assert canonical_key('language_model.model.layers.4.self_attn.rotary_emb.inv_freq') == 'layers.4.self_attn.rotary_emb.inv_freq'
    assert key_for('layers.4.self_attn.rotary_emb.inv_freq', 'llama') == 'model.layers.4.self_attn.rotary_emb.inv_freq'
    assert parse_key('foo.bar').component == 'other' and canonical_key('foo.bar') is None
    with pytest.raises(KeyError, match='not a canonical'): key_for('vision.weight', 'llama')
    with pytest.raises(KeyError, match="no 'new' layout"): key_for('embed.weight', 'llama', 'new')


def test_match_llm_text_and_vlm_layouts(tiny):
    "A VLM's language model matches a text LLM of its decoder, whichever layout the VLM keys are in."
    for vlm, llm in [('llava', 'llama'), ('llava_next', 'llama'), ('idefics3', 'llama'), ('qwen2_vl', 'qwen2'), ('qwen2_5_vl', 'qwen2')]:
        v, t = tiny[vlm], tiny[llm]
        for lay in get_family(vlm).layouts:
            vk = [key_for(canonical_key(k, vlm), vlm, lay.tag, v.config) if canonical_key(k, vlm) else k
                  for k in v.state_dict()]
            pairs = match_keys(vk, t.state_dict(), vlm, llm, strict=True)
            assert len(pairs) == len(t.state_dict()), (vlm, lay.tag)
            for a, b in pairs.items():   # the paired tensors have the same shape in the real models
                assert v.state_dict()[key_for(canonical_key(a), v)].shape == t.state_dict()[b].shape


def test_match_mixed_layouts_refused_and_reports(tiny):
    keys = list(tiny['llava'].state_dict())
    with pytest.raises(ValueError, match='both map to'):
        match_keys(keys + ['language_model.model.layers.0.mlp.up_proj.weight'], tiny['llama'].state_dict())
    r = match_report(tiny['gemma2'].state_dict(), tiny['llama'].state_dict())
    assert any('pre_feedforward' in k for k in r.only_a) and not r.only_b


def test_remote_key_lists_match_text():
    "MiniCPM-V 2.6 (Qwen2 LLM) and InternVL2 (InternLM2) key lists, as their checkpoints name them."
    layers, groups = 2, ['self_attn.q_proj', 'self_attn.k_proj', 'self_attn.v_proj', 'self_attn.o_proj',
                         'mlp.gate_proj', 'mlp.up_proj', 'mlp.down_proj']
    qwen = ['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight']
    qwen += [f'model.layers.{L}.{g}.weight' for L in range(layers) for g in groups]
    qwen += [f'model.layers.{L}.self_attn.{p}_proj.bias' for L in range(layers) for p in 'qkv']
    qwen += [f'model.layers.{L}.{n}.weight' for L in range(layers) for n in ('input_layernorm', 'post_attention_layernorm')]
    minicpm = ['llm.' + k for k in qwen] + ['vpm.encoder.layers.0.mlp.fc1.weight', 'resampler.query', 'resampler.kv_proj.weight']
    pairs = match_keys(minicpm, qwen, 'minicpmv', 'qwen2', strict=True)
    assert pairs['llm.model.layers.1.self_attn.v_proj.bias'] == 'model.layers.1.self_attn.v_proj.bias'
    assert guess_family(minicpm).name == 'minicpmv'
    internlm = ['model.tok_embeddings.weight', 'model.norm.weight', 'output.weight']
    internlm += [f'model.layers.{L}.{p}.weight' for L in range(layers) for p in
                 ('attention.wqkv', 'attention.wo', 'feed_forward.w1', 'feed_forward.w2', 'feed_forward.w3',
                  'attention_norm', 'ffn_norm')]
    internvl = ['language_model.' + k for k in internlm] + ['vision_model.embeddings.class_embedding', 'mlp1.0.weight', 'mlp1.3.bias']
    r = match_report(internvl, internlm, 'internvl')
    assert len(r.pairs) == len(internlm) and not r.only_a and not r.only_b
    assert sorted(parse_key(k).component for k in r.ignored_a) == ['projector', 'projector', 'vision']
    assert r.pairs['language_model.output.weight'] == 'output.weight'
    assert canonical_key('language_model.model.layers.1.attention.wqkv.weight') == 'layers.1.attn_qkv_grouped.weight'
    # a grouped qkv never pairs with a concatenated one
    assert not match_keys(['model.layers.0.attention.wqkv.weight'], ['model.layers.0.self_attn.qkv_proj.weight'])


# ---------------------------------------------------------------- remote-code models, loaded

class _InternLM2Layer(nn.Module):
    def __init__(self, g):
        super().__init__()
        self.attention = nn.Module(); self.feed_forward = nn.Module()
        self.attention.wqkv = nn.Linear(g.hidden_size, g.q_dim + 2 * g.kv_dim, bias=False)
        self.attention.wo = nn.Linear(g.q_dim, g.hidden_size, bias=False)
        self.feed_forward.w1 = nn.Linear(g.hidden_size, g.intermediate_size, bias=False)
        self.feed_forward.w3 = nn.Linear(g.hidden_size, g.intermediate_size, bias=False)
        self.feed_forward.w2 = nn.Linear(g.intermediate_size, g.hidden_size, bias=False)
        self.attention_norm = nn.LayerNorm(g.hidden_size); self.ffn_norm = nn.LayerNorm(g.hidden_size)


def test_remote_internvl_standin():
    "A stand-in with InternVL's module tree (the names its remote code uses) resolves through the table."
    llm_cfg = {'model_type': 'internlm2', 'architectures': ['InternLM2ForCausalLM'], 'hidden_size': 16,
               'num_attention_heads': 4, 'num_key_value_heads': 2, 'intermediate_size': 24, 'num_hidden_layers': 2,
               'vocab_size': 50}
    g = head_geometry({'llm_config': llm_cfg})
    m = nn.Module()
    m.config = transformers.PretrainedConfig(model_type='internvl_chat', llm_config=llm_cfg)
    m.config.model_type = 'internvl_chat'
    m.language_model = nn.Module(); m.language_model.model = nn.Module()
    m.language_model.model.tok_embeddings = nn.Embedding(50, 16)
    m.language_model.model.layers = nn.ModuleList([_InternLM2Layer(g) for _ in range(2)])
    m.language_model.model.norm = nn.LayerNorm(16)
    m.language_model.output = nn.Linear(16, 50, bias=False)
    m.vision_model = nn.Linear(3, 3); m.mlp1 = nn.Sequential(nn.LayerNorm(3), nn.Linear(3, 16))
    an = ModelAnatomy(m)
    assert (an.family.name, an.decoder.name, an.n_layers) == ('internvl', 'internlm2', 2)
    assert an.lm_head is m.language_model.output and an.embed is m.language_model.model.tok_embeddings
    assert an.vision is m.vision_model and an.projector is m.mlp1
    assert an.module(1, 'fwd_up') is m.language_model.model.layers[1].feed_forward.w3
    assert an.module(0, 'attn_k') is m.language_model.model.layers[0].attention.wqkv
    assert an.weight(0, 'attn_k').shape == (g.kv_dim, 16)
    for k in m.state_dict():        # the module tree's keys are the checkpoint keys the table describes
        if k.startswith('language_model.'): assert canonical_key(k, 'internvl') is not None, k


def test_remote_minicpmv_standin(tiny):
    m = nn.Module()
    m.config = transformers.PretrainedConfig(**tiny_config('qwen2').to_dict())
    m.config.model_type = 'minicpmv'
    m.llm = tiny_model('qwen2'); m.vpm = nn.Linear(3, 3); m.resampler = nn.Linear(3, 32)
    an = ModelAnatomy(m)
    assert an.layers is m.llm.model.layers and an.lm_head is m.llm.lm_head and an.projector is m.resampler
    assert all(canonical_key(k, 'minicpmv') for k in m.state_dict() if k.startswith('llm.'))
    assert match_keys(m.state_dict(), tiny['qwen2'].state_dict(), strict=True)


def test_model_anatomy_errors(tiny):
    with pytest.raises(IndexError, match='out of range'): ModelAnatomy(tiny['llama']).module(2, 'attn_q')
    with pytest.raises(KeyError, match='no norm'): ModelAnatomy(tiny['llama']).norm(0, 'pre_ffn_norm')
    with pytest.raises(ValueError, match='no decoder layers'): ModelAnatomy(tiny['llama'].model, family='llama')
    m = nn.Module(); m.config = transformers.PretrainedConfig(); m.config.model_type = 'mamba'
    with pytest.raises(UnknownFamilyError, match='register_family'): ModelAnatomy(m)
    with pytest.raises(UnknownFamilyError, match="text model_type='granite'"):
        from vlm_merge.anatomy import decoder_for
        decoder_for('llava', {'model_type': 'llava', 'text_config': {'model_type': 'granite'}})


def test_get_family_sources(tiny, tmp_path):
    tiny['idefics3'].config.save_pretrained(tmp_path)
    assert get_family(tmp_path).name == 'idefics3' and get_family(str(tmp_path)).name == 'idefics3'
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'mamba'}))
    with pytest.raises(UnknownFamilyError, match=str(tmp_path)): get_family(tmp_path)
    with pytest.raises(UnknownFamilyError, match='neither a family name nor an existing folder'): get_family('no/such-thing')
    with pytest.raises(ValueError, match='exists; pass overwrite'): register_family(FAMILIES['llama'])
    with pytest.raises(ValueError, match="belong to 'llama'"): register_family(Family('llama2', ('llama',), 'text', (KeyLayout('text', 'model'),), 'llama'))
    with pytest.raises(ValueError, match='unknown decoder'): register_family(Family('x', ('x',), 'text', (KeyLayout('text', 'model'),), 'nope'))
    assert 'llama2' not in FAMILIES and 'x' not in FAMILIES


# ---------------------------------------------------------------- vlm-merge inspect

def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = inspect_cli(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.mark.parametrize('name', TINY_FAMILIES)
def test_inspect_every_family(tiny, tmp_path, name):
    tiny[name].save_pretrained(tmp_path)
    rc, out, _ = _run([str(tmp_path), '--json', '--limit', '100'])
    r = json.loads(out)
    assert rc == 0 and r['family'] == name and r['n_layers'] == 2 and r['geometry']['n_kv_heads'] == 2
    assert r['n_keys'] == len(list_checkpoint_keys(tmp_path))
    assert {s['group'] for s in r['sample'] if s['layer'] == 0} >= (set(GROUPS) if name != 'phi3' else {'attn_qkv', 'fwd_gate_up'})
    assert set(r['layouts']) == ({'text'} if get_family(name).kind == 'text' else {'new'} if name == 'idefics3' else {'old'})
    rc, out, _ = _run([str(tmp_path)])
    assert rc == 0 and f'family {name}' in out and 'heads 4 (kv 2, group 2)' in out


def test_inspect_sharded_bin_and_no_config(tiny, tmp_path):
    m = tiny['qwen2_vl']
    m.save_pretrained(tmp_path / 'sharded', max_shard_size='20KB')
    assert (tmp_path / 'sharded' / 'model.safetensors.index.json').exists()
    shapes = list_checkpoint_keys(tmp_path / 'sharded', with_shapes=True)
    assert shapes['model.layers.0.self_attn.k_proj.weight'] == (16, 32)
    rc, out, _ = _run([str(tmp_path / 'sharded'), '--json'])
    assert rc == 0 and json.loads(out)['layouts'] == {'old': 24}
    # a .bin checkpoint, without config.json: keys read through mmap, family guessed from the keys
    (tmp_path / 'bin').mkdir()
    torch.save(tiny['llava'].state_dict(), tmp_path / 'bin' / 'pytorch_model.bin')
    rc, out, _ = _run([str(tmp_path / 'bin'), '--json'])
    r = json.loads(out)
    assert rc == 0 and r['family'] == 'llava' and r['geometry'] is None and r['layouts'] == {'new': 18}


def test_inspect_errors(tmp_path, monkeypatch):
    (tmp_path / 'bad').mkdir()
    (tmp_path / 'bad' / 'model.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00not json at all!')
    (tmp_path / 'bad' / 'config.json').write_text(json.dumps({'model_type': 'llama'}))
    rc, _, err = _run([str(tmp_path / 'bad')])
    assert rc == 1 and 'model.safetensors' in err and 'header' in err
    (tmp_path / 'empty').mkdir()
    rc, _, err = _run([str(tmp_path / 'empty')])
    assert rc == 1 and 'no *.safetensors' in err
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, 'HF_HUB_OFFLINE', True)
    rc, _, err = _run(['someone/not-here'])
    assert rc == 1 and 'not a local folder' in err and 'someone/not-here' in err
    rc, _, err = _run([str(tmp_path / 'no' / 'such' / 'dir')])
    assert rc == 1 and 'no such file or folder' in err


def test_console_script(tiny, tmp_path):
    "`vlm-merge inspect` through the installed console script (the CLI table points at inspect_cli)."
    tiny['llama'].save_pretrained(tmp_path)
    p = subprocess.run([sys.executable, '-m', 'vlm_merge.cli', 'inspect', str(tmp_path), '--json'],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout)['family'] == 'llama'


def test_new_layout_on_disk(tiny, tmp_path):
    "save_original_format=False writes the transformers 5 layout; inspect reads it as 'new'."
    tiny['llava'].save_pretrained(tmp_path, save_original_format=False)
    rc, out, _ = _run([str(tmp_path), '--json'])
    r = json.loads(out)
    assert rc == 0 and r['layouts'] == {'new': 18} and r['components']['vision'] > 0 and r['components']['projector'] == 4
