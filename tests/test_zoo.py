"""Tests of the shipped zoo: it loads offline, the manifest is complete and honest, generation is deterministic,
and the manifest's accuracies are reproduced by `vlm_merge.inference.evaluate`."""
import json, math, subprocess, sys
from pathlib import Path
import pandas as pd, pytest, torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
from vlm_merge.zoo import (ZOO_SIZES, ZOO_MODELS, SPEC_TASKS, FLOORS, zoo_dir, zoo_manifest, zoo_path, zoo_data_path, zoo_tokenizer,
                           zoo_cli, greedy_generate, train_tokenizer, build_zoo, spec_data, _train_table)

MAN = zoo_manifest()
VLMS = [n for n in ZOO_MODELS if 'vlm' in n]

def test_manifest_fields():
    assert set(MAN['models']) == set(ZOO_MODELS)
    for name, m in MAN['models'].items():
        assert (zoo_dir() / m['path'] / 'config.json').exists(), name
        assert m['params'] > 0 and m['size_mb'] > 0 and m['train']['steps'] > 0, name
        assert m['train']['loss_last'] < m['train']['loss_first'], (name, m['train'])   # it learnt something
        assert m['accuracy'], name
        for task, a in m['accuracy'].items():
            assert 0.0 <= a['accuracy'] <= 1.0 and a['n'] > 0, (name, task, a)
            assert a['evaluator'], (name, task)
    for name, (task, floor) in FLOORS.items():
        f = MAN['models'][name]['floor']
        assert f == {'task': task, 'min_accuracy': floor, 'met': MAN['models'][name]['accuracy'][task]['accuracy'] >= floor}
    # the cross numbers later merges compare against
    for v in VLMS: assert {'perception', 'chain', 'reasoning', 'gsm'} <= set(MAN['models'][v]['accuracy']), v
    assert set(SPEC_TASKS) <= set(MAN['models']['reason-lm']['accuracy'])
    assert MAN['size_mb'] <= 40   # issue 13's target (float32 weights made it 42.9 MB)

# Floors the shipped build did not meet, with the accuracy it reached: stated in 03_zoo and the manifest, never hidden.
# A rebuild that meets one must remove it from here (the test fails until it does).
KNOWN_MISSES = {}   # the VLMs' longer stage 2 (7 December) met the last two: vlm-llava 0.845 -> 1.000, wide-vlm 0.78 -> 0.965

def test_floors_met():
    "The shipped zoo meets every floor of FLOORS (each model's own task) but the known misses, and the manifest says which."
    for n, (t, floor) in FLOORS.items():
        a = MAN['models'][n]['accuracy'][t]['accuracy']
        assert MAN['models'][n]['floor'] == {'task': t, 'min_accuracy': floor, 'met': a >= floor}, n
        if n in KNOWN_MISSES: assert a == KNOWN_MISSES[n] and a < floor, (n, a)
        else: assert a >= floor, (n, a)
    for v in VLMS:   # stage 0: each tower read the held-out figures' labels before its VLM was assembled
        tower = MAN['models'][v]['train']['tower']
        assert tower['read_test'] >= 0.9 and tower['steps'] == MAN['steps'][f'{v}-tower'], (v, tower)

def test_fine_tunes_are_light():
    "Every model but the two bases is a short fine-tune of its family's base: its language model moved a few percent, not a new model."
    for n, m in MAN['models'].items():
        if m['init'] == 'random init': assert n in ('base-lm', 'wide-base'), n; continue
        assert m['init'].split(' ')[0] == ('wide-base' if n.startswith('wide') else 'base-lm'), (n, m['init'])
        assert 0 < m['train']['lm_delta_rel_norm'] < 0.5, (n, m['train']['lm_delta_rel_norm'])   # the first zoo's were 0.6-0.7; the largest now is wide-vlm's 0.43 (a 2400-step stage 2)

def test_shipped_in_bfloat16():
    "Every model ships in bfloat16, as real checkpoints do (the build trains in float32): the config says so, and so does every tensor."
    from safetensors import safe_open
    for n in ZOO_MODELS:
        p = zoo_path(n)
        cfg = json.loads((p / 'config.json').read_text())
        cfgs = [cfg] + [cfg[k] for k in ('text_config', 'vision_config') if k in cfg]   # a VLM's sub-configs too
        assert len(cfgs) == (3 if n in VLMS else 1) and [c.get('dtype') for c in cfgs] == ['bfloat16'] * len(cfgs), n
        with safe_open(p / 'model.safetensors', 'pt') as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {'BF16'}, n

def test_data_files():
    for name, info in MAN['data'].items():
        p = zoo_data_path(name)
        assert p.exists() and (zoo_dir() / info['path']) == p
    gsm = pd.read_csv(zoo_data_path('mgsm_en.tsv'), sep='\t')
    assert list(gsm.columns[:2]) == ['question', 'answer'] and len(gsm) == MAN['data']['mgsm_en.tsv']['rows']
    geo = pd.read_parquet(zoo_data_path('geometry_perception.parquet'))
    assert set(geo.answer) <= set('ABCD') and len(geo.images[0]) == 1
    with pytest.raises(FileNotFoundError, match='available'): zoo_data_path('nope.tsv')
    with pytest.raises(KeyError, match='unknown zoo model'): zoo_path('nope')

@pytest.mark.parametrize('name', ZOO_MODELS)
def test_loads_with_auto_classes(name):
    cls = AutoModelForImageTextToText if 'vlm' in name else AutoModelForCausalLM
    m = cls.from_pretrained(zoo_path(name))
    assert type(m).__name__ == MAN['models'][name]['class']
    assert sum(p.numel() for p in m.parameters()) == MAN['models'][name]['params']
    assert all(torch.isfinite(p).all() for p in m.parameters())

def test_text_generation_deterministic():
    tok = zoo_tokenizer()
    prompts = ['Sort the digits: 3815', 'What is 12 + 7?', 'Mirror the digits: 9021']
    for name in ('base-lm', 'reason-lm', 'spec-sort', 'wide-lm'):
        m = AutoModelForCausalLM.from_pretrained(zoo_path(name))
        a = greedy_generate(m, tok, prompts, max_new_tokens=12)
        assert a == greedy_generate(m, tok, prompts[::-1], max_new_tokens=12)[::-1], name   # batch order/padding free
        assert all(isinstance(x, str) for x in a)

@pytest.mark.parametrize('name', VLMS)
def test_vlm_generation_deterministic(name):
    from vlm_merge.data import load_geometry, geometry_prompt, to_pil
    geo = load_geometry(zoo_data_path('geometry_perception.parquet')).head(3)
    m = AutoModelForImageTextToText.from_pretrained(zoo_path(name)); proc = AutoProcessor.from_pretrained(zoo_path(name))
    ims = [to_pil(i[0]) for i in geo.images]
    ps = [geometry_prompt(p, list(c)) for p, c in zip(geo.problem, geo.choices)]
    a = greedy_generate(m, zoo_tokenizer(), ps, proc=proc, images=ims, max_new_tokens=4)
    assert a == greedy_generate(m, zoo_tokenizer(), ps, proc=proc, images=ims, max_new_tokens=4)

def _close(acc, ref, n):
    "Within 3 binomial standard errors of the manifest's figure (plus a little for small n)."
    return abs(acc - ref) <= 3 * math.sqrt(max(ref * (1 - ref), 0.02) / n) + 0.02

def test_reason_lm_accuracy_reproduced():
    from vlm_merge.inference import evaluate
    n = 60
    _, s = evaluate(str(zoo_path('reason-lm')), 'gsm', str(zoo_data_path('mgsm_en.tsv')), batch_size=30, max_new_tokens=64,
                    limit=n, progress=False)
    ref = MAN['models']['reason-lm']['accuracy']['gsm']['accuracy']
    assert s['n'] == n and _close(s['accuracy'], ref, n), (s['accuracy'], ref)

@pytest.mark.parametrize('name', VLMS)
def test_vlm_accuracy_reproduced(name):
    from vlm_merge.inference import evaluate
    n = 60
    _, s = evaluate(str(zoo_path(name)), 'multimodal', str(zoo_data_path('geometry_perception.parquet')), batch_size=30,
                    max_new_tokens=8, limit=n, progress=False)
    ref = MAN['models'][name]['accuracy']['perception']['accuracy']
    assert _close(s['accuracy'], ref, n), (s['accuracy'], ref)

def test_specialist_beats_others_on_own_task():
    "Each specialist is better at its own task than the base model and than reason-lm: the task vectors are real."
    for s in SPEC_TASKS:
        own = MAN['models'][s]['accuracy'][s]['accuracy']
        assert own > MAN['models']['base-lm']['accuracy'][s]['accuracy'], s
        assert own > MAN['models']['reason-lm']['accuracy'][s]['accuracy'], s

def test_ties_of_the_specialists_keeps_their_skills(tmp_path):
    "The zoo's reason to exist: TIES (density 0.5) of the three specialists into base-lm keeps at least 0.85 of their accuracy (issue 13's target), and more than base-lm alone."
    from vlm_merge.engine import run_merge
    from vlm_merge.zoo import _eval_text
    tok, base = zoo_tokenizer(), zoo_path('base-lm')
    ms = '\n'.join(f'  - model: {zoo_path(s)}\n    parameters: {{weight: 1.0, density: 0.5}}' for s in SPEC_TASKS)
    out = run_merge(f"merge_method: ties\nbase_model: {base}\nmodels:\n{ms}\ndtype: float32\n", tmp_path / 'ties', progress=False)
    sets = {s: pd.read_csv(zoo_data_path(s.replace('-', '_') + '.tsv'), sep='\t', dtype=str).head(100) for s in SPEC_TASKS}
    acc = lambda p, s: _eval_text(p, tok, sets[s])['accuracy']
    own = {s: acc(zoo_path(s), s) for s in SPEC_TASKS}
    norm = lambda p: sum(acc(p, s) / own[s] for s in SPEC_TASKS) / len(SPEC_TASKS)
    merged, alone = norm(out), norm(base)
    print(f"TIES normalised {merged:.3f}, base-lm alone {alone:.3f}")
    assert merged >= 0.85 and merged > alone + 0.1, (merged, alone)

def test_cli_info(capsys):
    assert zoo_cli(['info', '--json']) == 0
    info = json.loads(capsys.readouterr().out)
    assert Path(info['root']) == zoo_dir() and set(info['models']) == set(ZOO_MODELS)

def test_cli_info_subprocess():
    r = subprocess.run([sys.executable, '-m', 'vlm_merge.cli', 'zoo', 'info', '--json'], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)['models']['vlm-llava']['class'] == MAN['models']['vlm-llava']['class']

def test_tokenizer_deterministic_and_digits():
    texts = ['Tom has 12 apples.', 'Sort the digits: 3815'] * 10
    a, b = train_tokenizer(texts, vocab_size=300), train_tokenizer(texts, vocab_size=300)
    assert a.get_vocab() == b.get_vocab()
    tok = zoo_tokenizer()
    assert tok.tokenize('2024') == ['2', '0', '2', '4']
    assert tok.convert_tokens_to_ids('<image>') != tok.unk_token_id and tok.chat_template

def test_build_refuses_nonempty(tmp_path):
    (tmp_path / 'x').write_text('keep')
    with pytest.raises(FileExistsError, match='not empty'): build_zoo(tmp_path)
    assert (tmp_path / 'x').read_text() == 'keep'

def test_test_sets_disjoint_from_training():
    "No held-out row was trained on, by a fine-tune or in base-lm's pretraining mixture."
    T = lambda k: _train_table(k, MAN['seed'], MAN['sizes'])
    for s in SPEC_TASKS:
        test = pd.read_csv(zoo_data_path(s.replace('-', '_') + '.tsv'), sep='\t', dtype=str)
        assert not set(test.prompt) & (set(T(s).prompt) | set(T(f'base-{s}').prompt)), s
    gsm = pd.read_csv(zoo_data_path('mgsm_en.tsv'), sep='\t', dtype=str)
    assert not set(gsm.question) & (set(T('gsm').question) | set(T('base-gsm').question))
    for kind in ('perception', 'chain'):
        key = lambda df: set(zip(df.problem, df.figure))
        assert not key(pd.read_parquet(zoo_data_path(f'geometry_{kind}.parquet'))) & (key(T(kind)) | key(T(f'base-{kind}'))), kind

def test_chain_transfer_trials_build_what_they_say():
    "benchmarks/zoo_chain_transfer.py: a given labels line carries no loss and is not stated in the prompt; --image-last puts the image after the text."
    import sys, pathlib, json
    sys.path.insert(0, str(pathlib.Path(__file__).parents[1] / 'benchmarks'))
    import zoo_chain_transfer as T
    from vlm_merge.data import make_geometry, figure_labels
    tok = zoo_tokenizer(); row = make_geometry(1, seed=5, kind='chain').iloc[0]
    e = T.given_labels_example(tok, row.problem, row.choices, row.figure)
    text = tok.decode(e['input_ids'])
    assert 'The figure is labelled' not in text and figure_labels(row.figure) in text
    supervised = tok.decode([t for t, l in zip(e['input_ids'], e['labels']) if l != -100])
    assert supervised.startswith('\n') and figure_labels(row.figure) not in supervised and f"#### {json.loads(row.figure)['value']}" in supervised
    msgs = [{'role': 'user', 'content': [{'type': 'image'}, {'type': 'text', 'text': 'Q'}]}]
    assert tok.apply_chat_template(msgs, chat_template=T.IMAGE_LAST_TEMPLATE, tokenize=False).endswith('Q<image><|eot|>')
