"Run-all pipeline: config precedence, resumability, SKIP_DETECT, the run CLI and the demo on a stand-in zoo."
import json, shutil
import pandas as pd, pytest, yaml
from vlm_merge.data import make_geometry, make_gsm, write_geometry_parquet, write_gsm_tsv
from vlm_merge.detect import _tiny_models
from vlm_merge.pipeline import PRESETS, PipelineConfig, demo_cli, run_cli, run_pipeline


@pytest.fixture(scope='module')
def zoo(tmp_path_factory):
    "A stand-in zoo with the real zoo's layout (tiny random models, synthetic data)."
    z = tmp_path_factory.mktemp('zoo'); m = _tiny_models(z/'tmp')
    (z/'models').mkdir(); shutil.move(m/'vlm', z/'models'/'vlm-llava'); shutil.move(m/'llm', z/'models'/'reason-lm')
    (z/'data').mkdir()
    write_gsm_tsv(make_gsm(12, seed=1), z/'data'/'llama3ds_math.tsv')
    for k in ('perception', 'chain', 'reasoning'): write_geometry_parquet(make_geometry(6, seed=5, kind=k), z/'data'/f'geometry_{k}.parquet')
    (z/'manifest.json').write_text(json.dumps({'models': {n: {'path': f'models/{n}'} for n in ('vlm-llava', 'reason-lm')}}))
    return z


def test_presets_match_the_seed_table():
    assert PRESETS['internvl-3b'] == dict(lora_rank=32, lora_beta=0.5, atten_ratio=0.3, ffn_ratio=0.3)
    assert {k for k, v in PRESETS.items() if v['atten_ratio'] == 0.1} == {'qwen-vl-7b', 'qwen-vl-3b'}


def test_precedence_flag_over_config_over_env():
    env = {'NEURON_BASE': '/env', 'SAMPLE_SIZE': '9'}
    c = PipelineConfig.from_dict({'models': [{'base': 'x'}], 'neuron_base': '/cfg'}, env=env, sample_size=3)
    assert (c.neuron_base, c.sample_size) == ('/cfg', 3)
    assert PipelineConfig.from_dict({'models': [{'base': 'x'}]}, env=env).neuron_base == '/env'
    with pytest.raises(ValueError, match='models'): PipelineConfig.from_dict({'models': []}, env={})


def _cfg(zoo, tmp):
    return dict(models=[{'name': 'v', 'base': str(zoo/'models'/'vlm-llava')}], reasoning_model=str(zoo/'models'/'reason-lm'),
                neuron_base=str(tmp/'n'), output_base=str(tmp/'o'), corpus_path=str(zoo/'data'),
                multimodal_file=str(zoo/'data'/'geometry_perception.parquet'), sample_size=4, methods=['mean'], device='cpu')


def test_resume_and_skip_detect(zoo, tmp_path):
    cfg = _cfg(zoo, tmp_path)
    with pytest.raises(FileNotFoundError, match='skip_detect'):
        run_pipeline(PipelineConfig.from_dict({**cfg, 'skip_detect': True}, env={}), quiet=True)
    run_pipeline(PipelineConfig.from_dict(cfg, env={}), quiet=True)
    df = run_pipeline(PipelineConfig.from_dict({**cfg, 'skip_detect': True}, env={}), quiet=True)
    assert all(s.startswith('skipped') for _, _, s in df.attrs['log'])
    # a damaged merge output is detected and rebuilt
    shard = next((tmp_path/'o'/'v_mean').glob('*.safetensors')); shard.write_bytes(b'junk')
    df = run_pipeline(PipelineConfig.from_dict(cfg, env={}), quiet=True)
    assert [s for st, _, s in df.attrs['log'] if st == 'merge'][0] != 'skipped (done)'


def test_run_cli_env(zoo, tmp_path, monkeypatch, capsys):
    cfg = _cfg(zoo, tmp_path); out = cfg.pop('output_base')
    (tmp_path/'c.yaml').write_text(yaml.safe_dump(cfg))
    monkeypatch.setenv('OUTPUT_BASE', out)
    assert run_cli([str(tmp_path/'c.yaml'), '--quiet']) == 0
    assert len(pd.read_csv(f'{out}/results.tsv', sep='\t')) == 2


def test_demo_end_to_end(zoo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv('VLM_MERGE_ZOO', str(zoo))
    out = tmp_path/'demo'
    assert demo_cli(['--out', str(out), '--limit', '4', '--quiet', '--vlm', 'vlm-llava']) == 0
    txt = capsys.readouterr().out
    assert 'vlm-llava_lora' in txt and 'vlm-llava_mean' in txt and 'vs the unmerged VLM' in txt
    assert 'chain_acc' in txt and 'chain: read the labels, then compute' in txt   # the kind that needs both skills, explained
    assert list(pd.read_csv(out/'results.tsv', sep='\t').columns).count('chain_vs_base') == 1
    assert (out/'overlap_heatmap.png').exists() and (out/'merged'/'vlm-llava_lora'/'config.json').exists()
    assert demo_cli(['--out', str(out), '--limit', '4', '--quiet', '--vlm', 'vlm-llava']) == 2   # refuses a non-empty folder
    (tmp_path/'mine').mkdir(); (tmp_path/'mine'/'x').write_text('keep')
    assert demo_cli(['--out', str(tmp_path/'mine'), '--overwrite', '--quiet', '--vlm', 'vlm-llava']) == 2   # not a demo folder: untouched
    assert (tmp_path/'mine'/'x').read_text() == 'keep'


def test_skip_detect_reads_detect_cli_outputs_without_stamps(zoo, tmp_path, capsys):
    "Issue 18 item 2: `vlm-merge detect` wrote JSONs and scores for both models; SKIP_DETECT goes on from them."
    from vlm_merge.detect import detect_cli
    cfg = _cfg(zoo, tmp_path)
    for m, task, flag in (('vlm-llava', 'multimodal', ['--multimodal_file', cfg['multimodal_file']]),
                          ('reason-lm', 'gsm', ['--corpus_path', cfg['corpus_path']])):
        assert detect_cli(['--base', str(zoo/'models'/m), '--task', task, *flag, '--sample_size', '4', '--device', 'cpu',
                           '--output_path', cfg['neuron_base']]) == 0
    assert not list((tmp_path/'n').glob('*.stage.json'))
    df = run_pipeline(PipelineConfig.from_dict({**cfg, 'skip_detect': True}, env={}), quiet=True)
    assert [s.split(':')[0] for st, _, s in df.attrs['log'] if st == 'detect'] == ['skipped (SKIP_DETECT'] * 2
    assert (tmp_path/'o'/'v_mean'/'config.json').exists()
    # the seed's layout with only the neuron JSONs, then only compare_<name>/shared_VL_reasoning.json
    for f in (tmp_path/'n').glob('*.scores.safetensors'): f.unlink()
    df = run_pipeline(PipelineConfig.from_dict({**cfg, 'skip_detect': True, 'output_base': str(tmp_path/'o2')}, env={}), quiet=True)
    assert all('.json, used as selected' in s for st, _, s in df.attrs['log'] if st == 'detect')
    for f in (tmp_path/'n').glob('*.json'): f.unlink()
    (tmp_path/'n'/'compare_v'/'shared_VL_reasoning.meta.json').unlink()     # the seed's layout has no sidecar
    df = run_pipeline(PipelineConfig.from_dict({**cfg, 'skip_detect': True, 'output_base': str(tmp_path/'o3')}, env={}), quiet=True)
    assert [s for st, _, s in df.attrs['log'] if st == 'shared'] == ['skipped (SKIP_DETECT: existing shared_VL_reasoning.json)']
    assert json.loads((tmp_path/'o3'/'v_mean'/'neuron_merge.json').read_text())['selection'] is None   # unknown: not claimed


def test_selection_option_recorded(zoo, tmp_path):
    "Issue 18 item 4: `selection: mean|intersect`, written beside the shared JSON and into the merge's metadata."
    cfg = {**_cfg(zoo, tmp_path), 'selection': 'intersect'}
    run_pipeline(PipelineConfig.from_dict(cfg, env={}), quiet=True)
    meta = json.loads((tmp_path/'n'/'compare_v'/'shared_VL_reasoning.meta.json').read_text())
    assert meta['selection'] == 'intersect'
    assert json.loads((tmp_path/'o'/'v_mean'/'neuron_merge.json').read_text())['selection'] == 'intersect'
    from vlm_merge.detect import Detection, read_neuron_json
    det = Detection.load(next((tmp_path/'n').glob('*_multimodal.scores.safetensors')))
    assert det.sample_scores is not None
    assert read_neuron_json(tmp_path/'n'/'compare_v'/'vl.json') == det.select(0.3, 0.3, mode='intersect')
    with pytest.raises(ValueError, match='selection'):
        PipelineConfig.from_dict({**cfg, 'selection': 'union'}, env={})


def test_preset_match_on_family_and_size():
    "Issue 18 item 5: family and size; a guess warns; the config can name the preset."
    import warnings
    from vlm_merge.pipeline import preset_for, PresetGuessWarning
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert preset_for('Qwen/Qwen2.5-VL-3B-Instruct') == 'qwen-vl-3b'
        assert preset_for('Qwen/Qwen2.5-VL-7B-Instruct') == 'qwen-vl-7b'
        assert preset_for('llava-hf/llama3-llava-next-8b-hf') == 'llava-next'
    for mid in ('Qwen/Qwen2-VL-72B-Instruct', 'OpenGVLab/InternVL2_5-8B', 'llava-hf/llava-1.5-7b-hf'):
        with pytest.warns(PresetGuessWarning, match='a guess'): preset_for(mid)
    with pytest.warns(PresetGuessWarning, match='72B'): assert preset_for('Qwen/Qwen2-VL-72B-Instruct') == 'qwen-vl-7b'
    c = PipelineConfig.from_dict({'models': [{'base': 'OpenGVLab/InternVL2_5-8B'}], 'reasoning_model': 'r', 'preset': 'idefics3'}, env={})
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert c.entry(c.models[0])['lora_rank'] == 4      # named: no guess, no warning
