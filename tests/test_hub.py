"""vlm_merge.hub: model cards read back by huggingface_hub's own parsers, the offline dry run, the
refusals before any network call, and the upload path (create_repo then upload_folder) with the
two library calls replaced by recorders (the network is closed here)."""
import contextlib, io, json, os, re, socket, subprocess, sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
import huggingface_hub
from huggingface_hub import ModelCard, RepoCard, metadata_load

from vlm_merge import hub

VLM_ID, LLM_ID = 'llava-hf/llama3-llava-next-8b-hf', 'deepseek-ai/DeepSeek-R1-Distill-Llama-8B'
MERGE_CFG = {'merge_method': 'ties', 'base_model': VLM_ID,
             'models': [{'model': VLM_ID}, {'model': LLM_ID, 'parameters': {'weight': 0.6, 'density': 0.4}}],
             'parameters': {'normalize': True}, 'dtype': 'bfloat16'}


def _text_config():
    from transformers import LlamaConfig
    return LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                       bos_token_id=1, eos_token_id=2, pad_token_id=0)


def _vlm_config():
    from transformers import LlavaConfig, CLIPVisionConfig
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          image_size=28, patch_size=14, projection_dim=16)
    return LlavaConfig(vision_config=vc, text_config=_text_config(), image_token_index=63)


def _folder(tmp_path, name, config, weights=b'\0' * 1234, merge_cfg=None):
    d = tmp_path / name
    d.mkdir()
    config.save_pretrained(d)
    (d / 'model.safetensors').write_bytes(weights)   # the card and the dry run only look at names and sizes
    if merge_cfg is not None: (d / 'mergekit_config.yml').write_text(yaml.safe_dump(merge_cfg, sort_keys=False))
    return d


@pytest.fixture
def offline_env(tmp_path, monkeypatch):
    "No token anywhere (env or login cache) and the Hub offline, as on a fresh CI machine."
    home = tmp_path / 'hf_home'
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ('HF_TOKEN', 'HUGGING_FACE_HUB_TOKEN', 'HF_TOKEN_PATH')}
    env.update(HF_HUB_OFFLINE='1', HF_HOME=str(home), PYTHONUNBUFFERED='1')
    return env


# ---------------------------------------------------------------- the card


def test_card_round_trips_through_huggingface_hub_parsers(tmp_path):
    d = _folder(tmp_path, 'merged', _vlm_config(), merge_cfg=MERGE_CFG)
    p = hub.write_model_card(d, scores={'gsm': 0.4125, 'geometry': 0.3},
                             repo_id='me/merged', license='apache-2.0')
    assert p == d / 'README.md'
    meta = metadata_load(p)
    assert meta['base_model'] == [VLM_ID, LLM_ID]
    assert meta['tags'] == ['merge', 'vlm_merge', 'ties']
    assert meta['pipeline_tag'] == 'image-text-to-text'
    assert meta['library_name'] == 'transformers' and meta['license'] == 'apache-2.0'
    card = ModelCard.load(p)
    assert card.data.base_model == [VLM_ID, LLM_ID] and card.data.pipeline_tag == 'image-text-to-text'
    rc = RepoCard.load(p)
    assert rc.data.to_dict()['tags'] == ['merge', 'vlm_merge', 'ties']
    text = card.text
    # the body: sources, the config as YAML (it parses back to the merge config), scores, usage, citations
    assert f'[{VLM_ID}](https://huggingface.co/{VLM_ID})' in text and f'[{LLM_ID}]' in text
    y = re.search(r'```yaml\n(.*?)```', text, re.S).group(1)
    assert yaml.safe_load(y) == MERGE_CFG
    assert '| gsm | 0.4125 |' in text and '| geometry | 0.3 |' in text
    assert 'AutoModelForImageTextToText' in text and 'AutoProcessor' in text and '"me/merged"' in text
    assert 'arXiv:2306.01708' in text and '@software{vlm_merge' in text


def test_text_llm_card_and_local_sources(tmp_path):
    d = _folder(tmp_path, 'merged-text', _text_config())
    local_src = str(_folder(tmp_path, 'local-src', _text_config()))
    card = hub.make_model_card(d, sources=[LLM_ID, local_src], method='task_arithmetic', parameters={'lambda': 0.7})
    assert card.data.pipeline_tag == 'text-generation'
    assert card.data.base_model == [LLM_ID]                      # local folders are not Hub ids
    assert f'`{Path(local_src).name}` (a local folder)' in card.text and local_src not in card.text
    assert 'AutoModelForCausalLM' in card.text and 'AutoTokenizer' in card.text
    assert '## Evaluation' not in card.text                      # no scores, no table
    assert card.data.license is None and 'No licence is stated' in card.text
    assert 'arXiv:2212.04089' in card.text


@pytest.mark.parametrize('cls,vlm', [('LlavaConfig', True), ('LlavaNextConfig', True), ('Qwen2_5_VLConfig', True),
                                     ('Idefics3Config', True), ('LlamaConfig', False), ('Qwen2Config', False),
                                     ('MistralConfig', False)])
def test_pipeline_tag_of_real_transformers_configs(cls, vlm):
    import transformers
    cfg = getattr(transformers, cls)()
    d = json.loads(cfg.to_json_string())
    assert hub.is_vlm_config(d) is vlm and hub.is_vlm_config(cfg) is vlm
    assert hub.pipeline_tag_for(d) == ('image-text-to-text' if vlm else 'text-generation')


def test_engine_merge_config_dict_is_accepted_as_is(tmp_path):
    src = _folder(tmp_path, 'vlm-src', _vlm_config())            # a local VLM source tells the pipeline tag
    cfg = dict(MERGE_CFG, base_model=str(src), models=[{'model': str(src)}, {'model': LLM_ID}])
    card = hub.make_model_card(cfg)
    assert card.data.pipeline_tag == 'image-text-to-text'
    assert card.data.base_model == [LLM_ID]
    assert 'Merge method: `ties`' in card.text


def test_license_only_where_the_sources_agree(tmp_path):
    a, b, c = (_folder(tmp_path, n, _text_config()) for n in 'abc')
    for d, lic in [(a, 'apache-2.0'), (b, 'apache-2.0'), (c, 'mit')]:
        (d / 'README.md').write_text(f'---\nlicense: {lic}\n---\n# {d.name}\n')
    mk = lambda srcs: hub.make_model_card(a, sources=[str(s) for s in srcs], method='linear', parameters={})
    assert mk([a, b]).data.license == 'apache-2.0'
    assert mk([a, c]).data.license is None
    assert mk([a, LLM_ID]).data.license is None                   # a Hub source's licence cannot be read offline


def test_scores_as_dataframe_and_bad_scores(tmp_path):
    d = _folder(tmp_path, 'm', _text_config())
    df = pd.DataFrame({'task': ['gsm', 'mgsm_en'], 'merged': [0.5, 0.25], 'base': [0.125, float('nan')]})
    card = hub.make_model_card(d, sources=[LLM_ID], method='dare_linear', parameters={}, scores=df)
    assert '| task | merged | base |' in card.text and '| mgsm_en | 0.25 | – |' in card.text
    with pytest.raises(ValueError, match="task 'gsm'"):
        hub.make_model_card(d, sources=[LLM_ID], method='ties', parameters={}, scores={'gsm': 'n/a'})


def test_citations_table():
    ids = {c['key']: c['arxiv'] for k in ['ties', 'dare', 'task_arithmetic', 'linear', 'sparsegpt', 'adamms', 'ot_fusion']
           for c in hub.citations_for(k)}
    assert ids == {'ties': '2306.01708', 'dare': '2311.03099', 'task_arithmetic': '2212.04089',
                   'model_soups': '2203.05482', 'sparsegpt': '2301.00774', 'adamms': '2503.23733',
                   'ot_fusion': '1910.05653', 'vlm_merge': None}
    assert [c['key'] for c in hub.citations_for('slerp')] == ['slerp', 'vlm_merge']
    assert hub.citations_for('slerp')[0]['arxiv'] is None          # Shoemake 1985 has no arXiv id
    assert [c['key'] for c in hub.citations_for('v-adasm')] == ['vadasm', 'vlm_merge']
    for c in hub.CITATIONS.values():
        assert c['arxiv'] is None or re.fullmatch(r'\d{4}\.\d{5}', c['arxiv'])


def test_write_refuses_to_overwrite_and_is_atomic(tmp_path, monkeypatch):
    d = _folder(tmp_path, 'm', _text_config())
    (d / 'README.md').write_text('# my own notes\n')
    with pytest.raises(FileExistsError, match='overwrite=True'):
        hub.write_model_card(d, sources=[LLM_ID], method='ties', parameters={})
    assert (d / 'README.md').read_text() == '# my own notes\n'
    # a failure at the rename leaves the old README and no temporary file
    monkeypatch.setattr(hub.os, 'replace', lambda *a: (_ for _ in ()).throw(OSError('disk full')))
    with pytest.raises(OSError, match='disk full'):
        hub.write_model_card(d, overwrite=True, sources=[LLM_ID], method='ties', parameters={})
    assert (d / 'README.md').read_text() == '# my own notes\n'
    assert sorted(p.name for p in d.iterdir()) == ['README.md', 'config.json', 'model.safetensors']
    monkeypatch.undo()
    hub.write_model_card(d, overwrite=True, sources=[LLM_ID], method='ties', parameters={})
    assert metadata_load(d / 'README.md')['tags'] == ['merge', 'vlm_merge', 'ties']


def test_text_usage_snippet_runs_on_a_local_model(tmp_path):
    "The text snippet, as printed in the card, loads and generates with a tiny local model."
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaForCausalLM, PreTrainedTokenizerFast
    words = ['<pad>', '<s>', '</s>', '<unk>', 'user', 'assistant', ':'] + [f'w{i}' for i in range(50)]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token='<unk>'))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token='<s>', eos_token='</s>', pad_token='<pad>', unk_token='<unk>')
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} {% endfor %}"
                         "{% if add_generation_prompt %}assistant : {% endif %}")
    torch.manual_seed(0)
    d = tmp_path / 'tiny'
    LlamaForCausalLM(_text_config()).save_pretrained(d)
    tok.save_pretrained(d)
    code = hub.usage_snippet(str(d), vlm=False, prompt='w1 w2 w3').replace('max_new_tokens=256', 'max_new_tokens=5')
    ns = {}
    with contextlib.redirect_stdout(io.StringIO()): exec(compile(code, 'usage_snippet', 'exec'), ns)
    assert ns['out'].shape[1] > ns['inputs']['input_ids'].shape[1]  # it generated new tokens


# ---------------------------------------------------------------- dry run and refusals


def test_dry_run_offline_without_token_lists_files_and_card(tmp_path, offline_env):
    d = _folder(tmp_path, 'merged', _vlm_config(), merge_cfg=MERGE_CFG)
    (d / '.git').mkdir(); (d / '.git' / 'HEAD').write_text('ref')     # upload_folder ignores .git/, so must the listing
    before = sorted(p.name for p in d.iterdir())
    r = subprocess.run([sys.executable, '-m', 'vlm_merge.cli', 'upload', str(d), 'me/merged-vlm', '--dry-run', '--private'],
                       env=offline_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "'me/merged-vlm' (private)" in out and 'Token: none found' in out and 'hf auth login' in out
    listed = re.findall(r'^  (\S+)\s+([\d,]+) B', out, re.M)
    files = {n: int(s.replace(',', '')) for n, s in listed}
    expect = {p.name: p.stat().st_size for p in d.iterdir() if p.is_file()}
    card_text = out.split('----- README.md -----\n', 1)[1].split('----- end of README.md -----')[0]
    expect['README.md'] = len(card_text.encode())
    assert files == expect
    assert '.git/HEAD' not in out
    # the card printed is the one that would be written: parse it with huggingface_hub
    card = ModelCard(card_text)
    assert card.data.tags == ['merge', 'vlm_merge', 'ties'] and card.data.base_model == [VLM_ID, LLM_ID]
    assert card.data.pipeline_tag == 'image-text-to-text'
    assert sorted(p.name for p in d.iterdir()) == before                # nothing written by a dry run


def test_dry_run_makes_no_network_call(tmp_path, monkeypatch):
    d = _folder(tmp_path, 'm', _text_config())
    monkeypatch.delenv('HF_TOKEN', raising=False)
    def no_net(*a, **k): raise AssertionError('the dry run opened a network connection')
    monkeypatch.setattr(socket, 'socket', no_net)
    monkeypatch.setattr(socket, 'create_connection', no_net)
    monkeypatch.setattr(huggingface_hub, 'create_repo', no_net)
    monkeypatch.setattr(huggingface_hub, 'upload_folder', no_net)
    out = []
    plan = hub.upload_folder_to_hub(d, 'me/m', dry_run=True, print_fn=out.append, sources=[LLM_ID], method='slerp',
                                    parameters={'t': 0.5})
    assert [f for f, _ in plan.files] == ['README.md', 'config.json', 'model.safetensors']
    assert plan.card_source == 'generated (will be written to README.md)'
    assert 'Shoemake 1985' in out[0] and not (d / 'README.md').exists()


def test_no_token_is_a_clear_error_before_the_network(tmp_path, offline_env):
    d = _folder(tmp_path, 'm', _text_config())
    r = subprocess.run([sys.executable, '-m', 'vlm_merge.cli', 'upload', str(d), 'me/m', '--new-card',
                        '--method', 'ties', '--source', LLM_ID], env=offline_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert 'no Hugging Face token' in r.stderr and 'hf auth login' in r.stderr and 'HF_TOKEN' in r.stderr
    assert not (d / 'README.md').exists()


@pytest.mark.parametrize('bad', ['me/bad--name', 'a/b/c', 'has space/x', 'x/.hidden', 'me/name.git', 'x' * 97])
def test_invalid_repo_id_refused(tmp_path, bad):
    d = _folder(tmp_path, 'm', _text_config())
    with pytest.raises(hub.HubUploadError, match='invalid repo id'):
        hub.upload_folder_to_hub(d, bad, dry_run=True, sources=[LLM_ID], method='ties')
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert hub.upload_cli([str(d), bad, '--dry-run', '--new-card', '--method', 'ties', '--source', LLM_ID]) == 1
    assert 'invalid repo id' in err.getvalue()


def test_missing_or_empty_folder(tmp_path):
    with pytest.raises(hub.HubUploadError, match='not a folder'):
        hub.upload_folder_to_hub(tmp_path / 'nope', 'me/m', dry_run=True)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(hub.HubUploadError, match='no files'):
        hub.upload_folder_to_hub(tmp_path / 'empty', 'me/m', dry_run=True, sources=[LLM_ID], method='ties')


# ---------------------------------------------------------------- the upload path (library calls recorded)


def test_upload_calls_create_repo_then_upload_folder(tmp_path, monkeypatch):
    d = _folder(tmp_path, 'm', _vlm_config(), merge_cfg=MERGE_CFG)
    monkeypatch.setenv('HF_TOKEN', 'hf_test_token')
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)
    calls = []
    def create_repo(repo_id, **kw):
        calls.append(('create_repo', repo_id, kw)); return huggingface_hub.RepoUrl(f'https://huggingface.co/{repo_id}')
    def upload_folder(**kw):
        assert (Path(kw['folder_path']) / 'README.md').exists(), 'the card must be on disk before upload_folder'
        calls.append(('upload_folder', kw['repo_id'], kw)); return 'commit'
    monkeypatch.setattr(huggingface_hub, 'create_repo', create_repo)
    monkeypatch.setattr(huggingface_hub, 'upload_folder', upload_folder)
    url, info = hub.upload_folder_to_hub(d, 'me/merged', private=True, scores={'gsm': 0.5})
    assert [c[0] for c in calls] == ['create_repo', 'upload_folder']
    assert calls[0][2] == dict(token='hf_test_token', private=True, repo_type='model', exist_ok=True)
    assert calls[1][2]['token'] == 'hf_test_token' and calls[1][2]['folder_path'] == str(d)
    assert url == 'https://huggingface.co/me/merged' and info == 'commit'
    assert metadata_load(d / 'README.md')['base_model'] == [VLM_ID, LLM_ID]
    # a second upload keeps the README that is now there; --new-card is needed to regenerate it
    (d / 'README.md').write_text('---\nlicense: mit\n---\n# edited by hand\n')
    hub.upload_folder_to_hub(d, 'me/merged')
    assert (d / 'README.md').read_text().endswith('# edited by hand\n')
    with pytest.raises(hub.HubUploadError, match='new_card=True'):
        hub.upload_folder_to_hub(d, 'me/merged', method='ties')
    # offline mode is refused with a clear message, not a library traceback
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(hub.HubUploadError, match='HF_HUB_OFFLINE'):
        hub.upload_folder_to_hub(d, 'me/merged')


# ---------------------------------------------------------------- with the engine's output


def test_card_from_an_engine_output_folder(tmp_path, offline_env):
    "A folder written by vlm_merge.engine (with its mergekit_config.yml) gets the rich card with no arguments."
    engine = pytest.importorskip('vlm_merge.engine')
    from transformers import LlamaForCausalLM
    srcs = []
    for i in range(2):
        torch.manual_seed(i)
        d = tmp_path / f'src{i}'
        LlamaForCausalLM(_text_config()).save_pretrained(d)
        srcs.append(str(d))
    cfg = {'merge_method': 'linear', 'models': [{'model': srcs[0], 'parameters': {'weight': 0.5}},
                                                {'model': srcs[1], 'parameters': {'weight': 0.5}}], 'dtype': 'float32'}
    out = engine.run_merge(cfg, tmp_path / 'out', progress=False)
    assert (out / 'mergekit_config.yml').exists()
    card = hub.make_model_card(out, repo_id='me/linear-merge')
    assert card.data.tags == ['merge', 'vlm_merge', 'linear'] and card.data.pipeline_tag == 'text-generation'
    assert card.data.base_model is None                          # both sources are local folders
    assert 'arXiv:2203.05482' in card.text and all(f'`{Path(s).name}` (a local folder)' in card.text for s in srcs)
    # the engine's own minimal README is kept unless --new-card; with it the dry run shows the rich card
    r = subprocess.run([sys.executable, '-m', 'vlm_merge.cli', 'upload', str(out), 'me/linear-merge', '--dry-run', '--new-card'],
                       env=offline_env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert '[model card: generated (replaces README.md)]' in r.stdout and 'Wortsman et al. 2022' in r.stdout
    # the engine's MergeConfig object is accepted as it is
    mc = engine.MergeConfig.from_dict(cfg)
    assert hub.make_model_card(mc, model_config=json.loads((out / 'config.json').read_text())).data.tags[-1] == 'linear'
