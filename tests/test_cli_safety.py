"Bad inputs from issue 17: each gets one clear error line (or the right result), and nothing is left behind."
import json, os, struct, subprocess, sys, time, warnings
from pathlib import Path
import pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck
from vlm_merge.cli import main, parse_args, error_line, PARSERS, COMMANDS
from vlm_merge.checkpoints import (CheckpointReader, CheckpointError, ShardedWriter, save_safetensors, read_safetensors_header,
                                   resolve_model_path, zoo_model_path, OUTPUT_MARKER, stale_temporaries)
from vlm_merge.engine import MergeConfig, MergeConfigError, safe_yaml, run_merge, MergeRefused
from vlm_merge.methods import check_params
from vlm_merge.zoo import zoo_path, zoo_manifest

ENV = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1]), 'HF_HUB_OFFLINE': '1'}

def cli(*args, cwd=None, env=None):
    return subprocess.run([sys.executable, '-m', 'vlm_merge.cli', *map(str, args)], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={**ENV, **(env or {})})

def one_error_line(r, cmd):
    assert r.returncode != 0, r.stdout
    lines = [l for l in r.stderr.strip().splitlines() if 'Warning' not in l and not l.startswith(('  ', 'vlm_merge:'))]
    assert lines and lines[-1].startswith(f'vlm-merge {cmd}: error:'), r.stderr
    assert 'Traceback' not in r.stderr, r.stderr
    return lines[-1]

def tiny(folder:Path, tensors:dict|None=None, config=True):
    folder.mkdir(parents=True, exist_ok=True)
    save_safetensors(tensors or {'model.layers.0.mlp.down_proj.weight': torch.ones(4, 4)}, folder/'model.safetensors', {'format': 'pt'})
    if config: (folder/'config.json').write_text(json.dumps({'model_type': 'llama', 'architectures': ['LlamaForCausalLM']}))
    return folder

def files_under(p:Path): return sorted(q.relative_to(p).as_posix() for q in p.rglob('*'))

# -- one error path -------------------------------------------------------------------------
def test_every_command_has_a_fast_parser_with_defaults():
    assert set(PARSERS) == set(COMMANDS)
    for c in COMMANDS:
        t0 = time.perf_counter()
        r = cli(c, '--help')
        assert r.returncode == 0 and 'usage: vlm-merge' in r.stdout, (c, r.stderr)
        assert time.perf_counter() - t0 < 5, c   # the 0.5 s target is for the console script on a quiet machine

def test_output_into_a_closed_pipe_is_not_an_error():
    "`vlm-merge zoo info | head`: a reader that stops early (here: reads nothing) is not an error; no 'Broken pipe' line, no traceback."
    r = subprocess.run(f'{sys.executable} -m vlm_merge.cli zoo info | true', shell=True, capture_output=True, text=True, timeout=120)
    assert r.stderr == '', r.stderr

def test_help_does_not_import_torch():
    code = ('import sys; from vlm_merge.cli import main\n'
            'try: main(["merge", "--help"])\nexcept SystemExit: pass\nassert "torch" not in sys.modules, "torch imported for --help"')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, env=ENV, timeout=60)
    assert r.returncode == 0, r.stderr

def test_options_checked_before_work(tmp_path):
    for args in (['detect', '--base', 'base-lm', '--output_path', tmp_path/'o', '--atten_ratio', '1.5'],
                 ['infer', '--model_path', 'base-lm', '--out_file', tmp_path/'x.xlsx'],
                 ['infer', '--model_path', 'base-lm', '--limit', '-1'], ['infer', '--model_path', 'base-lm', '--limit', '0']):
        r = cli(*args)
        assert r.returncode == 2 and 'error: argument' in r.stderr, (args, r.stderr)
    assert files_under(tmp_path) == []

def test_unexpected_error_is_one_line_and_debug_shows_traceback(tmp_path):
    bad = tmp_path/'bad.json'; bad.write_text('{"attn_q": 5}')
    r = cli('shared', bad, bad, '--output_path', tmp_path/'out')
    one_error_line(r, 'shared')
    r = cli('shared', bad, bad, '--output_path', tmp_path/'out', '--debug')
    assert 'Traceback' in r.stderr and r.stderr.strip().splitlines()[-1].startswith('vlm-merge shared: error:')
    assert not (tmp_path/'out').exists()

def test_errors_speak_flags():
    assert error_line('merge', CheckpointError('o: not empty; pass overwrite=True to replace it')).endswith('pass --overwrite to replace it')

# -- security ------------------------------------------------------------------------------
def test_remote_code_needs_consent(tmp_path):
    m = tmp_path/'m'; m.mkdir()
    (m/'config.json').write_text(json.dumps({'model_type': 'evil_arch', 'auto_map': {'AutoConfig': 'evil.EvilConfig',
                                                                                     'AutoModelForCausalLM': 'evil.EvilModel'}}))
    flag = tmp_path/'ran'
    (m/'evil.py').write_text(f'open({str(flag)!r}, "w").write("x")\n')
    r = cli('detect', '--base', m, '--output_path', tmp_path/'o', '--corpus_path', zoo_path('base-lm').parent/'data'/'llama3ds_math.tsv')
    one_error_line(r, 'detect')
    assert not flag.exists(), 'the model folder\'s code ran without --trust-remote-code'
    assert 'trust_remote_code=True' not in r.stderr.splitlines()[-1]

def test_index_paths_stay_inside(tmp_path):
    other = tiny(tmp_path/'other')
    m = tmp_path/'m'; m.mkdir()
    for target in ('../other/model.safetensors', str(other/'model.safetensors')):
        (m/'model.safetensors.index.json').write_text(json.dumps({'weight_map': {'model.layers.0.mlp.down_proj.weight': target}}))
        with pytest.raises(CheckpointError, match='outside the model folder'): CheckpointReader(m)
    (m/'model.safetensors.index.json').write_text(json.dumps({'weight_map': {'model.layers.0.mlp.down_proj.weight': 'link.safetensors'}}))
    (m/'link.safetensors').symlink_to(other/'model.safetensors')
    with pytest.raises(CheckpointError, match='outside the model folder'): CheckpointReader(m)
    one_error_line(cli('inspect', m), 'inspect')

def _raw(path, header, data):
    raw = json.dumps(header).encode(); path.write_bytes(struct.pack('<Q', len(raw)) + raw + data)

def test_safetensors_offsets(tmp_path):
    f = tmp_path/'x.safetensors'
    _raw(f, {'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [0, 8]}, 'b': {'dtype': 'F32', 'shape': [2], 'data_offsets': [4, 12]}}, bytes(12))
    with pytest.raises(CheckpointError, match='overlaps'): read_safetensors_header(f)
    _raw(f, {'a': {'dtype': 'F32', 'shape': [2], 'data_offsets': [8, 16]}}, bytes(16))
    with pytest.raises(CheckpointError, match='gap'): read_safetensors_header(f)
    _raw(f, {'a': {'dtype': 'F32', 'shape': [3], 'data_offsets': [0, 8]}}, bytes(8))
    with pytest.raises(CheckpointError): read_safetensors_header(f)

def _yaml(tmp_path, models, method='task_arithmetic', **extra):
    base = models[0]
    d = {'merge_method': method, 'base_model': str(base), 'dtype': 'float32',
         'models': [{'model': str(m), 'parameters': {'weight': 1.0}} for m in models[1:]], **extra}
    p = tmp_path/'cfg.yml'; p.write_text(json.dumps(d)); return p

def test_non_float_tensors_are_copied(tmp_path):
    w = 'model.layers.0.mlp.down_proj.weight'
    a = tiny(tmp_path/'a', {w: torch.ones(4, 4), 'model.ids': torch.arange(4, dtype=torch.int32)})
    b = tiny(tmp_path/'b', {w: torch.ones(4, 4) * 3, 'model.ids': torch.arange(4, dtype=torch.int32) + 100})
    with warnings.catch_warnings(record=True) as ws:
        warnings.simplefilter('always')
        out = run_merge(_yaml(tmp_path, [a, b]), tmp_path/'out', progress=False)
    r = CheckpointReader(out)
    assert torch.equal(r.get('model.ids'), torch.arange(4, dtype=torch.int32))
    assert torch.allclose(r.get(w), torch.ones(4, 4) * 3)
    assert any('non-float' in str(x.message) for x in ws)

def test_yaml_bomb_and_name(tmp_path):
    bomb = 'a: &a ["x","x","x","x","x","x","x","x","x","x"]\n' + ''.join(
        f'{c}: &{c} [*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p},*{p}]\n' for p, c in zip('abcdef', 'bcdefg'))
    with pytest.raises(MergeConfigError, match='aliases'): safe_yaml(bomb)
    a, b = tiny(tmp_path/'a'), tiny(tmp_path/'b')
    cfg = _yaml(tmp_path, [a, b], name=['not', 'a', 'string'])
    one_error_line(cli('merge', cfg, tmp_path/'out'), 'merge')
    assert not (tmp_path/'out').exists()

def test_upload_refuses_escaping_symlinks_and_skips_temporaries(tmp_path):
    from vlm_merge.hub import plan_upload, HubUploadError
    out = run_merge(_yaml(tmp_path, [tiny(tmp_path/'a'), tiny(tmp_path/'b')]), tmp_path/'out', progress=False)
    (out/'.README.md.tmp').write_text('x'); (out/'.sub.tmp-1-0123abcd').mkdir(); (out/'.sub.tmp-1-0123abcd'/'f.bin').write_text('x')
    names = [f for f, _ in plan_upload(out, 'me/model').files]
    assert not any('tmp' in n or n == OUTPUT_MARKER for n in names), names
    secret = tmp_path/'secret.txt'; secret.write_text('token')
    (out/'notes.txt').symlink_to(secret)
    with pytest.raises(HubUploadError, match='outside'): plan_upload(out, 'me/model')

# -- nothing lost --------------------------------------------------------------------------
def test_overwrite_never_deletes_foreign_files(tmp_path):
    a, b = tiny(tmp_path/'a'), tiny(tmp_path/'b')
    cfg = _yaml(tmp_path, [a, b])
    mine = tmp_path/'mine'; mine.mkdir(); (mine/'thesis.tex').write_text('years of work')
    one_error_line(cli('merge', cfg, mine, '--overwrite'), 'merge')
    one_error_line(cli('merge', cfg, '.', '--overwrite', cwd=mine), 'merge')
    assert files_under(mine) == ['thesis.tex']
    r = cli('merge', cfg, tmp_path/'out'); assert r.returncode == 0, r.stderr
    assert (tmp_path/'out'/OUTPUT_MARKER).exists()
    assert oct((tmp_path/'out'/'model.safetensors').stat().st_mode & 0o777) != oct(0o600)
    line = one_error_line(cli('merge', cfg, tmp_path/'out'), 'merge'); assert '--overwrite' in line
    r = cli('merge', cfg, tmp_path/'out', '--overwrite'); assert r.returncode == 0, r.stderr

def test_stale_temporary_is_removed(tmp_path):
    p = subprocess.Popen(['true']); p.wait()
    left = tmp_path/f'.out.tmp-{p.pid}-0123abcd'; left.mkdir(); (left/'model.safetensors').write_text('partial')
    with warnings.catch_warnings(record=True): assert stale_temporaries(tmp_path/'out') == [left]
    assert not left.exists()

# -- zoo names -----------------------------------------------------------------------------
def test_zoo_names_resolve_and_local_folder_wins(tmp_path):
    name = next(iter(zoo_manifest()['models']))
    assert resolve_model_path(name) == zoo_path(name) == resolve_model_path(f'zoo:{name}')
    tiny(tmp_path/name)
    r = cli('inspect', name, '--json', cwd=tmp_path); assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['n_keys'] == 1                      # the local folder, not the zoo's model
    r = cli('inspect', name, '--json', cwd=tmp_path/'..'); assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['n_keys'] == len(CheckpointReader(zoo_path(name)).keys())

def test_unknown_name_fails_fast_offline():
    t0 = time.perf_counter()
    r = cli('inspect', 'nobody/no-such-model')
    line = one_error_line(r, 'inspect')
    assert 'HF_HUB_OFFLINE' in line and 'zoo model' in line and time.perf_counter() - t0 < 30
    one_error_line(cli('inspect', 'zoo:no-such-model'), 'inspect')

def test_missing_model_folder_is_named(tmp_path):
    "A path that does not exist is named as a missing folder, before any data is looked for, not sent to the Hub as a repo id."
    for data in ([], ['--data', 'mgsm_en.tsv']):
        line = one_error_line(cli('infer', '--model_path', tmp_path/'nope', '--task', 'gsm', *data), 'infer')
        assert f"{tmp_path/'nope'}: no such file or folder" in line and 'Repo id' not in line, line

# -- silent wrong results ------------------------------------------------------------------
def test_neuron_merge_refuses_nan(tmp_path):
    from vlm_merge.neuron_merge import neuron_merge
    base = tiny(tmp_path/'base')
    bad = tiny(tmp_path/'bad', {'model.layers.0.mlp.down_proj.weight': torch.full((4, 4), float('nan'))})
    with pytest.raises(ValueError, match='NaN/Inf'):
        neuron_merge(bad, base, base, {'fwd_down': {'0': [0]}}, tmp_path/'out', method='mean', progress=False)
    assert not (tmp_path/'out').exists() and not any(p.name.startswith('.out') for p in tmp_path.iterdir())

def test_output_without_config_gets_no_made_up_config(tmp_path):
    a, b = tiny(tmp_path/'a', config=False), tiny(tmp_path/'b', config=False)
    with pytest.warns(UserWarning, match='no config.json'): out = run_merge(_yaml(tmp_path, [a, b]), tmp_path/'out', progress=False)
    assert not (out/'config.json').exists() and (out/'model.safetensors').exists()

@pytest.mark.parametrize('method,params,glob', [('dare_ties', {'density': 0.0}, {}), ('dare_ties', {'density': 1.5}, {}),
                                                ('slerp', {}, {'t': 5})])
def test_parameter_ranges(tmp_path, method, params, glob):
    a, b = tiny(tmp_path/'a'), tiny(tmp_path/'b')
    d = {'merge_method': method, 'base_model': str(a), 'parameters': glob,
         'models': [{'model': str(a)}, {'model': str(b), 'parameters': {'weight': 1.0, **params}}]}
    with pytest.raises(MergeConfigError, match='outside'): run_merge(d, tmp_path/'out', progress=False)
    assert not (tmp_path/'out').exists()

@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(density=st.floats(allow_nan=True, allow_infinity=True), t=st.floats(allow_nan=True, allow_infinity=True),
       weight=st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.text(max_size=3)))
def test_property_parameters_accepted_iff_in_range(density, t, weight):
    import math
    ok_w = isinstance(weight, float) and math.isfinite(weight)
    for method, p, g, ok in (('dare_ties', {'density': density, 'weight': weight}, {}, 0 < density <= 1 and ok_w),
                             ('slerp', {'weight': weight}, {'t': t}, 0 <= t <= 1 and ok_w)):
        if ok: check_params(method, [p], g)
        else:
            with pytest.raises(ValueError): check_params(method, [p], g)

def test_infer_honest_numbers(tmp_path):
    from vlm_merge.inference import evaluate, load_task_data
    empty = tmp_path/'empty.tsv'; empty.write_text('question\tanswer\n')
    with pytest.raises(ValueError, match='no rows'): evaluate('base-lm', 'gsm', str(empty), progress=False)
    with pytest.raises(ValueError, match='positive'): evaluate('base-lm', 'gsm', str(empty), limit=-1, progress=False)
    spec = zoo_path('spec-sort').parent/'data'/'spec_sort.tsv'
    df = load_task_data('gsm', str(spec))
    assert list(df.columns)[:2] == ['question', 'answer'] and df.question.iloc[0] != 'prompt'
    assert len(df) == zoo_manifest()['data']['spec_sort.tsv']['rows']
    one_error_line(cli('infer', '--model_path', 'base-lm', '--data', empty), 'infer')
    assert files_under(tmp_path) == ['empty.tsv']

def test_outputs_get_the_usual_file_mode(tmp_path):
    from vlm_merge.detect import write_neuron_json
    from vlm_merge.data import _atomic_write
    m = os.umask(0); os.umask(m)
    a = write_neuron_json({'attn_q': {'0': [1]}}, tmp_path/'n.json')
    b = _atomic_write(tmp_path/'p.tsv', lambda t: Path(t).write_text('x\n'))
    for p in (a, b): assert p.stat().st_mode & 0o777 == 0o666 & ~m, oct(p.stat().st_mode)
    assert sorted(q.name for q in tmp_path.iterdir()) == ['n.json', 'p.tsv']

def test_neuron_merge_output_is_uploadable_with_a_card_naming_folders(tmp_path):
    from vlm_merge.neuron_merge import neuron_merge
    from vlm_merge.hub import plan_upload
    a = tiny(tmp_path/'a')
    b = tiny(tmp_path/'b', {'model.layers.0.mlp.down_proj.weight': torch.full((4, 4), 3.0)})
    out = neuron_merge(a, a, b, {'fwd_down': {'0': [0]}}, tmp_path/'out', method='mean', progress=False)
    plan = plan_upload(out, 'me/merged', new_card=True)
    assert '`a` (a local folder)' in plan.card_text and '`b` (a local folder)' in plan.card_text
    assert str(tmp_path) not in plan.card_text and 'base_model' not in plan.card_text.split('---')[1]
    assert OUTPUT_MARKER not in [f for f, _ in plan.files]


def test_quiet_flag_also_silences_transformers_bars():
    "`--quiet` is handled once, in `parse_args`: every command that has it gets no transformers loading bars either."
    import transformers
    from vlm_merge.cli import parse_args
    log = transformers.utils.logging
    log.enable_progress_bar()
    try:
        parse_args('ot-plans', ['--source', 's', '--target', 't', '--out', 'o'])
        assert log.is_progress_bar_enabled()
        parse_args('vadasm', ['--small', 's', '--large', 'l', '--quiet'])
        assert not log.is_progress_bar_enabled()
    finally: log.enable_progress_bar()
