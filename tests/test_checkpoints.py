"Streaming checkpoints: round trips through from_pretrained, bad input, atomic output, Hub ids offline, memory."
import json, os, subprocess, sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings, strategies as st
from safetensors import safe_open
from safetensors.torch import load_file

from vlm_merge.checkpoints import (CheckpointError, CheckpointReader, MissingTensorError, ShardedWriter, parse_size,
                                   read_safetensors_header, reshard, resolve_model_path, save_safetensors)

ROOT = Path(__file__).resolve().parents[1]
CHAT = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"


def _tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {w: i for i, w in enumerate(['<unk>', '<s>', '</s>', '<image>'] + [f'w{i}' for i in range(60)])}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>'))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    t = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token='<unk>', bos_token='<s>', eos_token='</s>')
    t.chat_template = CHAT
    return t


def _llama(tie=False, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, vocab_size=64, tie_word_embeddings=tie)).eval()


@pytest.fixture(scope='module')
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('src')/'llama'
    m = _llama()
    m.save_pretrained(d, max_shard_size='30KB')
    _tokenizer().save_pretrained(d)
    return d, m


def _ids(): return torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))


def _siblings(p: Path): return sorted(q.name for q in p.parent.iterdir() if q.name.startswith(f'.{p.name}.'))


# -- round trips -------------------------------------------------------------------------------
def test_llama_round_trip_several_shards(llama_dir, tmp_path):
    src, m = llama_dir
    out = tmp_path/'out'
    r = CheckpointReader(src)
    assert r.index_file is not None and len(r.files) > 1
    with ShardedWriter(out, max_shard_size='20KB', inputs=[src]) as w:
        for k in r.keys(): w.add(k, r.get(k))
        copied = w.copy_aux(src)
    for f in ('config.json', 'generation_config.json', 'tokenizer.json', 'tokenizer_config.json', 'chat_template.jinja'):
        assert (out/f).exists(), f
        assert f in copied
    assert not _siblings(out)
    idx = json.loads((out/'model.safetensors.index.json').read_text())
    shards = sorted(set(idx['weight_map'].values()))
    assert len(shards) >= 3 and shards[0] == f'model-00001-of-{len(shards):05d}.safetensors'
    assert sorted(p.name for p in out.glob('*.safetensors')) == shards
    assert idx['metadata']['total_size'] == sum(t.nbytes for t in m.state_dict().values())
    for s in shards:
        with safe_open(str(out/s), 'pt') as f: assert f.metadata() == {'format': 'pt'}
        n = sum(v.nbytes for v in load_file(out/s).values())
        assert n <= parse_size('20KB') or len(load_file(out/s)) == 1, s   # only a lone tensor may exceed the limit
    from transformers import AutoModelForCausalLM, AutoTokenizer
    back = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad(): assert torch.equal(back(_ids()).logits, m(_ids()).logits)
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{'role': 'user', 'content': 'w1 w2'}], tokenize=False, add_generation_prompt=True) == '<|user|>w1 w2\n<|assistant|>'


def test_tied_llama_keeps_what_it_is_given(tmp_path):
    m = _llama(tie=True)
    m.save_pretrained(tmp_path/'tied')
    r = CheckpointReader(tmp_path/'tied')
    assert r.tie_word_embeddings and 'lm_head.weight' not in r
    out = reshard(r, tmp_path/'copy', progress=False)
    assert sorted(p.name for p in out.iterdir()) == ['.vlm_merge_output', 'config.json', 'generation_config.json', 'model.safetensors']
    assert set(load_file(out/'model.safetensors')) == set(r.keys())
    from transformers import LlamaForCausalLM
    back = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad(): assert torch.equal(back(_ids()).logits, m(_ids()).logits)


def test_tiny_llava_round_trip(tmp_path):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration
    torch.manual_seed(0)
    cfg = LlavaConfig(vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     image_size=28, patch_size=14, projection_dim=32),
                      text_config=LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                              num_key_value_heads=2, vocab_size=80),
                      image_token_index=70, vision_feature_layer=-1)
    m = LlavaForConditionalGeneration(cfg).eval()
    m.save_pretrained(tmp_path/'llava')
    out = reshard(tmp_path/'llava', tmp_path/'copy', max_shard_size='40KB', progress=False)
    r, src = CheckpointReader(out), CheckpointReader(tmp_path/'llava')
    assert len(r.files) > 2 and set(r.keys()) == set(src.keys())
    assert any('vision_tower' in k for k in r) and any('multi_modal_projector' in k for k in r)
    for f in ('config.json', 'generation_config.json'): assert (out/f).read_bytes() == (tmp_path/'llava'/f).read_bytes()
    back = LlavaForConditionalGeneration.from_pretrained(out).eval()
    n_img = (28 // 14) ** 2
    ids = torch.cat([torch.full((1, n_img), 70), torch.randint(0, 60, (1, 5), generator=torch.Generator().manual_seed(2))], 1)
    pix = torch.randn(1, 3, 28, 28, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(back(input_ids=ids, pixel_values=pix).logits, m(input_ids=ids, pixel_values=pix).logits)
    half = reshard(src, tmp_path/'bf16', dtype='bf16', progress=False)          # a cast copy: floats cast, config says so
    h = CheckpointReader(half)
    assert h.config['dtype'] == 'bfloat16'
    for k in src:
        t = src.get(k)
        assert torch.equal(h.get(k), t.bfloat16() if t.is_floating_point() else t), k


def test_bin_checkpoint_needs_opt_in_and_converts(tmp_path, llama_dir):
    src, m = llama_dir
    d = tmp_path/'bin'; d.mkdir()
    sd = m.state_dict()
    keys = sorted(sd); half = len(keys) // 2
    torch.save({k: sd[k] for k in keys[:half]}, d/'pytorch_model-00001-of-00002.bin')
    torch.save({k: sd[k] for k in keys[half:]}, d/'pytorch_model-00002-of-00002.bin')
    (d/'pytorch_model.bin.index.json').write_text(json.dumps({'weight_map': {k: f'pytorch_model-0000{1 + (i >= half)}-of-00002.bin' for i, k in enumerate(keys)}}))
    with pytest.raises(CheckpointError, match=r'pytorch_model\.bin\.index\.json.*allow_bin=True'): CheckpointReader(d)
    r = CheckpointReader(d, allow_bin=True)
    assert r.format == 'bin' and len(r) == len(sd)
    k = keys[-1]
    assert torch.equal(r.get(k), sd[k]) and r.shape(k) == sd[k].shape
    out = reshard(r, tmp_path/'st', progress=False)
    assert set(load_file(out/'model.safetensors')) == set(sd)


# -- bad input ---------------------------------------------------------------------------------
def _copy(src, dst):
    import shutil
    shutil.copytree(src, dst); return dst


def test_corrupt_header(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path/'c')
    shard = sorted(d.glob('model-*.safetensors'))[1]
    held = [k for k, f in json.loads((d/'model.safetensors.index.json').read_text())['weight_map'].items() if f == shard.name]
    raw = shard.read_bytes()
    shard.write_bytes(raw[:40])                                       # truncated inside the header
    with pytest.raises(CheckpointError) as e: CheckpointReader(d)
    assert shard.name in str(e.value) and 'corrupt safetensors header' in str(e.value) and repr(held[0]) in str(e.value)
    shard.write_bytes(raw[:8] + b'{not json' + raw[17:])              # garbage header
    with pytest.raises(CheckpointError, match='not valid JSON') as e: CheckpointReader(d)
    assert shard.name in str(e.value)
    shard.write_bytes(raw[:-100])                                     # truncated data: names the tensor that no longer fits
    with pytest.raises(CheckpointError, match='truncated') as e: CheckpointReader(d)
    assert shard.name in str(e.value) and any(f"'{k}'" in str(e.value) for k in held)


def test_single_file_truncated(tmp_path):
    f = tmp_path/'model.safetensors'
    save_safetensors({'a': torch.ones(100), 'b': torch.ones(100)}, f)
    f.write_bytes(f.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt or truncated file: tensor '.'"): CheckpointReader(tmp_path)


def test_missing_shard(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path/'m')
    shard = sorted(d.glob('model-*.safetensors'))[-1]
    held = [k for k, f in json.loads((d/'model.safetensors.index.json').read_text())['weight_map'].items() if f == shard.name]
    shard.unlink()
    with pytest.raises(CheckpointError) as e: CheckpointReader(d)
    assert f'{shard}: shard listed in model.safetensors.index.json is missing' in str(e.value) and repr(held[0]) in str(e.value)


def test_tensor_listed_in_index_but_not_in_shard(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path/'x')
    idx = json.loads((d/'model.safetensors.index.json').read_text())
    first = sorted(d.glob('model-*.safetensors'))[0]
    idx['weight_map']['model.layers.7.mlp.up_proj.weight'] = first.name
    (d/'model.safetensors.index.json').write_text(json.dumps(idx))
    with pytest.raises(CheckpointError) as e: CheckpointReader(d)
    assert f"{first}: tensor 'model.layers.7.mlp.up_proj.weight' is listed in model.safetensors.index.json but not in this shard" == str(e.value)


def test_missing_tensor_and_dtype(llama_dir):
    r = CheckpointReader(llama_dir[0])
    with pytest.raises(KeyError) as e: r.get('model.layers.0.mlp.up_proj.weigth')
    assert isinstance(e.value, MissingTensorError)
    assert "model.safetensors.index.json: no tensor 'model.layers.0.mlp.up_proj.weigth'" in str(e.value)
    assert 'model.layers.0.mlp.up_proj.weight' in str(e.value)       # the close name is suggested
    k = 'model.layers.1.mlp.down_proj.weight'
    with pytest.raises(CheckpointError) as e: r.get(k, expect_dtype=torch.bfloat16)
    assert str(r.file_of(k)) in str(e.value) and f"'{k}'" in str(e.value) and 'torch.float32' in str(e.value)
    assert r.get(k, expect_dtype='fp32').dtype == torch.float32


def test_reads_are_independent_copies(llama_dir):
    "The merge engine may modify a tensor in place: later reads of the same name must not see it (default, pread)."
    k = 'model.layers.0.self_attn.q_proj.weight'
    with CheckpointReader(llama_dir[0]) as r:
        a = r.get(k); ref = a.clone(); a.mul_(0)
        assert torch.equal(r.get(k), ref)
        assert torch.equal(r.get(k, device='cpu', dtype=torch.float32), ref)
    t = CheckpointReader(llama_dir[0]).get(k)          # valid after the reader is gone
    assert torch.equal(t, ref)


def test_no_weights_and_missing_path(tmp_path):
    (tmp_path/'empty').mkdir()
    with pytest.raises(CheckpointError, match='empty: no weights found'): CheckpointReader(tmp_path/'empty')
    with pytest.raises(CheckpointError, match='no such file or folder'): CheckpointReader(tmp_path/'nope')


def test_nothing_half_written_when_input_is_bad(llama_dir, tmp_path):
    d = _copy(llama_dir[0], tmp_path/'in')
    r = CheckpointReader(d)
    out = tmp_path/'out'
    with pytest.raises(CheckpointError):
        with ShardedWriter(out, max_shard_size='10KB', inputs=[r]) as w:
            for k in r.keys(): w.add(k, r.get(k))
            w.add('extra', r.get('no.such.tensor'))
    assert not out.exists() and not _siblings(out)


# -- atomic output -----------------------------------------------------------------------------
def test_refuses_inputs_and_non_empty(llama_dir, tmp_path):
    src = llama_dir[0]
    for bad in (src, src/'sub', src.parent):
        with pytest.raises(CheckpointError, match='input'): ShardedWriter(bad, inputs=[str(src)], overwrite=True)
    with pytest.raises(CheckpointError, match='input'): ShardedWriter(src, inputs=[CheckpointReader(src)], overwrite=True)
    (tmp_path/'full').mkdir(); (tmp_path/'full'/'x').write_text('keep')
    with pytest.raises(CheckpointError, match='not empty.*overwrite=True'): ShardedWriter(tmp_path/'full')
    (tmp_path/'empty').mkdir()
    with ShardedWriter(tmp_path/'empty') as w: w.add('a', torch.ones(1))
    assert (tmp_path/'empty'/'model.safetensors').exists()


def test_overwrite_failure_leaves_old_intact(tmp_path, monkeypatch):
    out = tmp_path/'o'
    with ShardedWriter(out) as w: w.add('old', torch.ones(2))
    import vlm_merge.checkpoints as ck
    real = os.replace
    def flaky(a, b):
        if Path(a).name.startswith('.o.tmp-'): raise OSError('disk gone')
        return real(a, b)
    monkeypatch.setattr(ck.os, 'replace', flaky)
    with pytest.raises(OSError, match='disk gone'):
        with ShardedWriter(out, overwrite=True) as w: w.add('new', torch.zeros(2))
    monkeypatch.undo()
    assert list(load_file(out/'model.safetensors')) == ['old'] and not _siblings(out)
    with ShardedWriter(out, overwrite=True) as w: w.add('new', torch.zeros(2))
    assert list(load_file(out/'model.safetensors')) == ['new'] and not _siblings(out)


def test_writer_rules(tmp_path):
    with pytest.raises(CheckpointError, match="'a' was added twice"):
        with ShardedWriter(tmp_path/'d') as w: w.add('a', torch.ones(1)); w.add('a', torch.ones(1))
    assert not (tmp_path/'d').exists()
    with ShardedWriter(tmp_path/'v') as w:
        base = torch.arange(12.)
        w.add('view', base[2:5]); w.add('t1', base); w.add('t2', base)    # views and the same tensor twice are stored as copies
        w.add('tr', base.reshape(3, 4).T)                                   # non-contiguous: stored in logical order
        w.write_json('config.json', {'model_type': 'x'})
        with pytest.raises(CheckpointError, match='weight files'): w.write_text('model.safetensors', '')
        with pytest.raises(CheckpointError, match='relative'): w.write_text('../escape.txt', '')
    sd = load_file(tmp_path/'v'/'model.safetensors')
    assert torch.equal(sd['view'], torch.tensor([2., 3., 4.])) and torch.equal(sd['t2'], torch.arange(12.))
    assert torch.equal(sd['tr'], torch.arange(12.).reshape(3, 4).T)
    assert json.loads((tmp_path/'v'/'config.json').read_text()) == {'model_type': 'x'}


def test_write_json_wins_over_copy_aux(llama_dir, tmp_path):
    with ShardedWriter(tmp_path/'o') as w:
        w.add('a', torch.ones(1))
        w.write_json('config.json', {'mine': True})
        copied = w.copy_aux(llama_dir[0])
        with pytest.raises(CheckpointError, match='no_such.json: no such file'): w.copy_aux(llama_dir[0], files=['no_such.json'])
    assert 'config.json' not in copied and 'tokenizer.json' in copied
    assert json.loads((tmp_path/'o'/'config.json').read_text()) == {'mine': True}


@settings(max_examples=25, deadline=None)
@given(sizes=st.lists(st.integers(0, 300), min_size=1, max_size=12), limit=st.integers(64, 1200),
       dts=st.lists(st.sampled_from([torch.float32, torch.bfloat16, torch.float16, torch.int64, torch.uint8, torch.bool]), min_size=12, max_size=12))
def test_sharding_property(tmp_path_factory, sizes, limit, dts):
    out = tmp_path_factory.mktemp('p')/'o'
    ts = {f't{i}': (torch.arange(n) % 7).to(dts[i]) for i, n in enumerate(sizes)}
    with ShardedWriter(out, max_shard_size=limit) as w:
        for k, t in ts.items(): w.add(k, t)
    r = CheckpointReader(out)
    assert set(r.keys()) == set(ts)
    for k, t in ts.items(): assert r.dtype(k) == t.dtype and torch.equal(r.get(k), t)
    order = list(ts)
    for f in r.files:     # each shard within the limit unless it holds a single tensor; tensors keep their order across shards
        infos, meta = read_safetensors_header(f)
        assert meta == {'format': 'pt'}
        assert len(infos) == 1 or sum(ts[k].nbytes for k in infos) <= limit
        pos = sorted(order.index(k) for k in infos)
        assert pos == list(range(pos[0], pos[0] + len(pos)))


# -- Hub ids -----------------------------------------------------------------------------------
def test_hub_id_offline_is_clear_and_quick(tmp_path):
    code = ("from vlm_merge.checkpoints import CheckpointReader\n"
            "try: CheckpointReader('nobody-xyz-1234/no-such-model-5678')\n"
            "except Exception as e: print(type(e).__name__, '|', e)\n")
    env = {**os.environ, 'HF_HUB_OFFLINE': '1', 'HF_HOME': str(tmp_path/'hf')}
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120, env=env)
    assert out.stdout.startswith('CheckpointError |'), out.stdout + out.stderr
    assert "'nobody-xyz-1234/no-such-model-5678'" in out.stdout and 'HF_HUB_OFFLINE=1' in out.stdout


def test_hub_id_from_cache(tmp_path, llama_dir, monkeypatch):
    "A Hub id resolves through huggingface_hub.snapshot_download with the safetensors/JSON/tokenizer patterns."
    import huggingface_hub
    seen = {}
    def fake(repo_id, revision=None, allow_patterns=None, local_files_only=False, **kw):
        seen.update(repo_id=repo_id, revision=revision, allow_patterns=allow_patterns); return str(llama_dir[0])
    monkeypatch.setattr(huggingface_hub, 'snapshot_download', fake)
    r = CheckpointReader('someone/tiny-llama', revision='v1')
    assert seen['repo_id'] == 'someone/tiny-llama' and seen['revision'] == 'v1'
    assert '*.safetensors' in seen['allow_patterns'] and not any(p.endswith('.bin') for p in seen['allow_patterns'])
    assert len(r) == len(llama_dir[1].state_dict())


def test_parse_size():
    assert parse_size('5GB') == 5 * 10**9 and parse_size('2MiB') == 2 * 2**20 and parse_size('1.5 kb') == 1500
    for bad in ('x', '-1MB', '3XB', True):
        with pytest.raises(ValueError): parse_size(bad)


# -- memory ------------------------------------------------------------------------------------
def test_read_one_tensor_memory():
    "The benchmark at 200 MB: reading one 8 MiB tensor adds < 100 MB RSS, the peer (load everything) > 150 MB."
    out = subprocess.run([sys.executable, str(ROOT/'benchmarks'/'read_memory.py'), '--size', '200MB', '--tensor_size', '8MiB',
                          '--cases', 'reader-one,peer-load', '--json'], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout.strip().splitlines()[-1])
    one, peer = res['cases']['reader-one'], res['cases']['peer-load']
    assert one['bytes_read'] == 8 * 2**20
    assert one['rss_delta'] < 100 * 10**6, one
    assert peer['rss_delta'] > 150 * 10**6, peer


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
def test_get_to_cuda(llama_dir):
    r = CheckpointReader(llama_dir[0])
    k = 'model.norm.weight'
    t = r.get(k, device='cuda', dtype='bf16')
    assert t.device.type == 'cuda' and t.dtype == torch.bfloat16
    assert torch.equal(t.cpu(), r.get(k).bfloat16())


def test_remote_code_files_copied_into_every_output(tmp_path):
    "Issue 18 item 3: the auto_map's .py files (and their relative imports) go into the neuron merge, the streaming merge and reshard."
    import json, shutil
    from vlm_merge.checkpoints import reshard, remote_code_files
    from vlm_merge.detect import _tiny_models
    from vlm_merge.engine import run_merge
    from vlm_merge.neuron_merge import neuron_merge
    m = _tiny_models(tmp_path/'m')
    rc = tmp_path/'stand_in'; shutil.copytree(m/'llm', rc)
    cfg = json.loads((rc/'config.json').read_text())
    cfg['auto_map'] = {'AutoConfig': 'configuration_x.XConfig', 'AutoModel': 'modeling_x.XModel'}
    (rc/'config.json').write_text(json.dumps(cfg))
    tc = json.loads((rc/'tokenizer_config.json').read_text()); tc['auto_map'] = {'AutoTokenizer': ['tokenization_x.XTok', None]}
    (rc/'tokenizer_config.json').write_text(json.dumps(tc))
    (rc/'configuration_x.py').write_text('X = 1\n')
    (rc/'modeling_x.py').write_text('from .configuration_x import X\nfrom .sub.helpers import h\n')
    (rc/'sub').mkdir(); (rc/'sub'/'helpers.py').write_text('def h(): pass\n')
    (rc/'tokenization_x.py').write_text('T = 1\n'); (rc/'unrelated.py').write_text('')
    want = ['configuration_x.py', 'modeling_x.py', 'sub/helpers.py', 'tokenization_x.py']
    assert remote_code_files(rc) == want
    outs = [reshard(rc, tmp_path/'r', progress=False),
            neuron_merge(rc, rc, m/'llm2', {'fwd_up': {'0': [1, 2]}}, tmp_path/'nm', method='mean', progress=False),
            run_merge({'merge_method': 'linear', 'dtype': 'float32', 'models': [{'model': str(rc), 'parameters': {'weight': 0.5}},
                       {'model': str(m/'llm2'), 'parameters': {'weight': 0.5}}]}, tmp_path/'lin', progress=False)]
    for o in outs:
        got = sorted(p.relative_to(o).as_posix() for p in o.rglob('*.py'))
        assert got == want, (o, got)
        assert json.loads((o/'config.json').read_text())['auto_map']['AutoModel'] == 'modeling_x.XModel'
