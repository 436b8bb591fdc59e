"AdaMMS (issue 14): the CLI end to end, its refusals (one line each, nothing written), and property tests of the pieces."
import contextlib, io, json, os, subprocess, sys, types, warnings
from pathlib import Path
import pandas as pd, pytest, torch
from hypothesis import given, settings, strategies as st, HealthCheck
from vlm_merge.adamms import (AdaMMSError, Blender, map_models, merge_config, ties_config, parse_grid, token_alignment,
                              token_distance, pick_alpha, interpolate, check_same_lm, lm_signature)
from vlm_merge.checkpoints import CheckpointReader, OUTPUT_MARKER
from vlm_merge.cli import main
from vlm_merge.engine import run_merge
from vlm_merge.zoo import zoo_path, zoo_data_path

ENV = {**os.environ, 'PYTHONPATH': str(Path(__file__).resolve().parents[1]), 'HF_HUB_OFFLINE': '1'}
warnings.filterwarnings('ignore')

def cli(*args, subprocess_run:bool=False):
    "`vlm-merge adamms ARGS`: in this process through `main` (fast), or as a real console run."
    if subprocess_run:
        return subprocess.run([sys.executable, '-m', 'vlm_merge.cli', 'adamms', *map(str, args)], capture_output=True, text=True,
                              timeout=600, env=ENV)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err): rc = main(['adamms', *map(str, args)])
    return types.SimpleNamespace(returncode=rc, stdout=out.getvalue(), stderr=err.getvalue())

def one_error_line(r):
    assert r.returncode != 0, r.stdout
    lines = [l for l in r.stderr.strip().splitlines() if 'Warning' not in l and not l.startswith(('  ', 'Loading weights'))]
    assert len(lines) == 1 and lines[0].startswith('vlm-merge adamms: error:'), r.stderr
    assert 'Traceback' not in r.stderr
    return lines[0]

def files_under(p:Path): return sorted(q.relative_to(p).as_posix() for q in p.rglob('*'))

@pytest.fixture(scope='module')
def perception(tmp_path_factory):
    p = tmp_path_factory.mktemp('data')/'perception.parquet'
    pd.read_parquet(zoo_data_path('geometry_perception.parquet')).head(6).to_parquet(p)
    return p

# -- refusals: one line each, nothing written -------------------------------------------------
@pytest.mark.parametrize('args,msg', [
    (['--alphas', '1.2:0.4:0.1'], 'outside [0, 1]'),
    (['--alphas', '1,-0.1,0.5'], 'outside [0, 1]'),
    (['--alphas', '1.0:0.9:0.1'], 'at least 3'),
    (['--alphas', '1,0.5'], 'at least 3'),
    (['--alphas', 'a:b:c'], 'START:STOP:STEP'),
    (['--source', 'wide-lm'], 'do not share an architecture: '),
])
def test_bad_inputs_one_line_nothing_written(tmp_path, perception, args, msg):
    base = {'--target': 'vlm-llava', '--source': 'vlm-2', '--data': perception, '--out': tmp_path/'out'}
    for k, v in zip(args[::2], args[1::2]): base[k] = v
    line = one_error_line(cli(*[x for kv in base.items() for x in kv]))
    assert msg in line, line
    if base['--source'] == 'wide-lm':   # the message names how they differ
        a, b = (lm_signature(CheckpointReader(n).config)['hidden_size'] for n in ('vlm-llava', 'wide-lm'))
        assert a != b and f'hidden_size {a} (vlm-llava) vs {b} (wide-lm)' in line, line
    assert files_under(tmp_path) == []

def test_no_data(tmp_path):
    line = one_error_line(cli('--target', 'vlm-llava', '--source', 'vlm-2', '--data', tmp_path/'none.parquet', '--out', tmp_path/'o'))
    assert line.endswith(f'{tmp_path/"none.parquet"}: no such data file')
    empty = tmp_path/'empty.parquet'; pd.read_parquet(zoo_data_path('geometry_perception.parquet')).head(0).to_parquet(empty)
    assert 'has no rows' in one_error_line(cli('--target', 'vlm-llava', '--source', 'vlm-2', '--data', empty, '--out', tmp_path/'o'))
    assert files_under(tmp_path) == ['empty.parquet']

def test_existing_output_refused_and_untouched(tmp_path, perception):
    out = tmp_path/'out'; out.mkdir(); (out/'mine.txt').write_text('keep')
    line = one_error_line(cli('--target', 'vlm-llava', '--source', 'vlm-2', '--data', perception, '--out', out))
    assert 'exists and is not empty; pass --overwrite' in line
    assert files_under(tmp_path) == ['out', 'out/mine.txt']
    line = one_error_line(cli('--target', 'vlm-llava', '--source', 'vlm-2', '--data', perception, '--out', out, '--overwrite'))
    assert 'not a vlm_merge output' in line and (out/'mine.txt').read_text() == 'keep'

def test_output_inside_an_input_refused(tmp_path, perception):
    line = one_error_line(cli('--target', 'vlm-llava', '--source', 'vlm-2', '--data', perception, '--out', zoo_path('vlm-llava')/'merged'))
    assert 'inputs are never overwritten' in line

# -- end to end -----------------------------------------------------------------------------
def test_cli_end_to_end(tmp_path, perception):
    out = tmp_path/'merged'
    r = cli('--target', 'vlm-llava', '--source', 'vlm-2', '--data', perception, '--alphas', '1.0:0.6:0.2', '--limit', '4', '--out', out,
            subprocess_run=True)
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last['grid'] == [1.0, 0.8, 0.6] and last['chosen_alpha'] == 0.8 and last['oracle_alpha'] in last['grid']
    assert last['seconds'] > 0 and last['out'] == str(out)
    sj = json.loads((out/'search.json').read_text())
    assert sj['chosen_alpha'] == 0.8 and [row['alpha'] for row in sj['table']] == [1.0, 0.8, 0.6]
    card = (out/'README.md').read_text()
    assert 'adamms' in card and 'alpha: 0.8' in card and '2503.23733' in card
    assert (out/OUTPUT_MARKER).exists() and not [p for p in tmp_path.iterdir() if p.name.startswith('.')]
    with CheckpointReader(out) as o, CheckpointReader('vlm-llava') as t, CheckpointReader('vlm-2') as s:
        m = map_models('vlm-llava', 'vlm-2')
        for k in list(m.pairs)[:5]:   # computed in float32, written in the zoo's bfloat16: within its rounding
            torch.testing.assert_close(o.get(k).float(), 0.8 * t.get(k).float() + 0.2 * s.get(m.pairs[k]).float(), rtol=2**-8, atol=1e-6)
        for k in [k for k, why in m.kept.items() if why in ('vision', 'projector')][:5]: assert torch.equal(o.get(k), t.get(k))
    r = cli('--target', 'vlm-llava', '--source', 'vlm-2', '--data', perception, '--alphas', '1,0.9,0.8', '--limit', '2',
            '--out', out, '--overwrite', '--no-labels')
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last['oracle_alpha'] is None and json.loads((out/'search.json').read_text())['grid'] == [1.0, 0.9, 0.8]

def test_text_llm_into_vlm_default_zoo_data(tmp_path):
    r = cli('--target', 'vlm-llava', '--source', 'reason-lm', '--alphas', '1,0.95,0.9', '--limit', '3')
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout.strip().splitlines()[-1])['chosen_alpha'] == 0.95

# -- pieces ---------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(st.integers(0, 10), st.integers(0, 10), st.sampled_from([0.05, 0.1, 0.2, 0.25]))
def test_parse_grid_range(i, j, step):
    a, b = i / 10, j / 10
    spec = f'{a}:{b}:{step}'
    n = int(abs(b - a) / step + 1e-9) + 1
    if n < 3: 
        with pytest.raises(AdaMMSError): parse_grid(spec)
        return
    g = parse_grid(spec)
    assert len(g) == n and g[0] == a and all(0 <= x <= 1 for x in g) and all(min(a, b) - 1e-9 <= x <= max(a, b) + 1e-9 for x in g)
    assert all(abs(abs(x - y) - step) < 1e-6 for x, y in zip(g, g[1:]))

@settings(max_examples=40, deadline=None)
@given(st.permutations(list(range(12))), st.integers(0, 4))
def test_token_alignment_pairs_same_tokens(perm, drop):
    tv = {f't{i}': i for i in range(12)}
    sv = {f't{i}': perm[i] for i in range(12 - drop)}
    t_ids, s_ids, prefix = token_alignment(tv, sv, 12, 12)
    inv = {v: k for k, v in sv.items()}
    assert len(t_ids) == 12 - drop
    assert all(inv[int(s)] == f't{int(t)}' for t, s in zip(t_ids, s_ids))
    assert (prefix is not None) == (list(perm[:12 - drop]) == list(range(12 - drop)))

@settings(max_examples=30, deadline=None)
@given(st.floats(0, 1), st.integers(0, 2**16))
def test_interpolate_is_lerp(alpha, seed):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    torch.testing.assert_close(interpolate(x, y, alpha), torch.lerp(y, x, alpha), atol=1e-6, rtol=1e-6)

@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=8), st.lists(st.integers(0, 5), max_size=8))
def test_token_distance_metric(a, b):
    d = token_distance(a, b)
    assert 0 <= d <= 1 and d == token_distance(b, a) and (d == 0) == (a == b)

@settings(max_examples=40, deadline=None)
@given(st.lists(st.text('ab', min_size=1, max_size=2), min_size=4, max_size=4), st.integers(3, 6))
def test_pick_alpha_interior_and_order_free(preds, n):
    grid = [round(i / (n - 1), 6) for i in range(n)]
    gens = {a: pd.DataFrame(dict(prediction=[preds[(i + k) % 4] for k in range(3)], ids=[[0]] * 3)) for i, a in enumerate(grid)}
    best, scores = pick_alpha(gens)
    assert best in grid[1:-1] and set(scores) == set(grid[1:-1])
    assert pick_alpha(dict(reversed(list(gens.items()))))[0] == best

def test_blender_aligns_permuted_vocabulary(tmp_path):
    "A source whose tokenizer swaps two tokens: the blended rows pair by token, and alpha 1 is the target again."
    m = map_models('vlm-llava', 'reason-lm')
    emb = m.canon['embed.weight']
    n = m.vocab['target']
    perm = torch.arange(n); perm[[10, 11]] = perm[[11, 10]]
    m.rows, m.vocab = (torch.arange(n), perm, None), {**m.vocab, 'prefix': None}
    bl = Blender(m)
    c, p, t, s = next(x for x in bl.params if x[0] == 'embed.weight')
    with CheckpointReader('reason-lm') as src:
        se = src.get(m.pairs[emb])
    assert torch.equal(s[10], se[11]) and torch.equal(s[11], se[10]) and torch.equal(s[12], se[12])
    bl.set_alpha(0.5); torch.testing.assert_close(p.detach()[10], 0.5 * t[10] + 0.5 * se[11])
    bl.set_alpha(1.0); assert all(torch.equal(p, t) for _, p, t, _ in bl.params)
    with pytest.raises(AdaMMSError, match='tokenizers differ'): merge_config(m, 0.5)

def test_ties_baseline_runs_and_differs(tmp_path):
    m = map_models('vlm-llava', 'vlm-2')
    run_merge(ties_config(m, 'base-lm', density=0.3), tmp_path/'ties', progress=False)
    run_merge(merge_config(m, 0.5), tmp_path/'lin', progress=False)
    k = m.canon['layers.1.fwd_up.weight']
    with CheckpointReader(tmp_path/'ties') as a, CheckpointReader(tmp_path/'lin') as b, CheckpointReader('vlm-llava') as t:
        assert not torch.equal(a.get(k), b.get(k)) and not torch.equal(a.get(k), t.get(k))
        v = next(k for k, why in m.kept.items() if why == 'vision')
        assert torch.equal(a.get(v), t.get(v))

def test_streamed_candidates_match_the_blender(perception):
    "The seed's write-and-reload search (one model in memory) generates what the in-memory blender generates."
    from vlm_merge.adamms import search_alpha
    m = map_models('vlm-llava', 'vlm-2')
    temps = lambda: set(Path(__import__('tempfile').gettempdir()).glob('adamms_candidates_*'))
    before = temps()
    a = search_alpha(m, perception, '1.0:0.6:0.2', limit=4)
    b = search_alpha(m, perception, '1.0:0.6:0.2', limit=4, streaming=True)
    assert a.chosen_alpha == b.chosen_alpha and a.oracle_alpha == b.oracle_alpha
    pd.testing.assert_frame_equal(a.table, b.table)
    assert temps() <= before   # the candidates' folder is removed
