"Shared neurons: set algebra laws, k/v mapping, validation and the CLI."
import json
import pytest
from hypothesis import given, settings, strategies as st
from vlm_merge.anatomy import HeadGeometry
from vlm_merge.detect import write_neuron_json, read_neuron_json
from vlm_merge.shared import combine, map_kv, overlap_table, shared_cli, shared_neurons, validate_neurons

G = HeadGeometry(n_heads=8, n_kv_heads=2, head_dim=4, hidden_size=32, intermediate_size=16, n_layers=3, vocab_size=10)
sets = st.lists(st.integers(0, 15), max_size=10)
ndict = st.fixed_dictionaries({'attn_q': st.fixed_dictionaries({'0': sets, '2': sets}),
                               'fwd_up': st.fixed_dictionaries({'1': sets})})


@settings(max_examples=40, deadline=None)
@given(ndict, ndict)
def test_set_laws(a, b):
    i, u, d = combine(a, b), combine(a, b, 'union'), combine(a, b, 'difference')
    for g in i:
        for l in i[g]:
            A, B = set(a[g][l]), set(b[g][l])
            assert set(i[g][l]) == A & B and set(u[g][l]) == A | B and set(d[g][l]) == A - B
    assert combine(a, b) == combine(b, a)
    t = overlap_table(a, b)
    assert ((t.jaccard >= 0) & (t.jaccard <= 1)).all()


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(0, 7), max_size=8))
def test_kv_roundtrip(idx):
    mha = HeadGeometry(8, 8, 4, 32, 16, 3, 10)
    # GQA -> MHA -> GQA is the identity; the factor comes from the geometry (8 / 2 = 4 q heads per kv head)
    assert map_kv(map_kv(idx, G, mha), mha, G) == sorted(set(idx))
    assert len(map_kv(idx, G, mha)) == 4 * len(set(idx))


def test_validation_messages(tmp_path):
    with pytest.raises(ValueError, match=r'attn_k\.0: indices \[8\] out of range \[0, 8\)'):
        validate_neurons({'attn_k': {'0': [8]}}, G, 'x.json')
    validate_neurons({'attn_q': {'0': [31]}, 'fwd_down': {'2': [15]}}, G)
    with pytest.raises(ValueError, match='layer 3 out of range'): validate_neurons({'attn_q': {'3': [0]}}, G)
    other = HeadGeometry(8, 2, 4, 32, 16, 4, 10)
    write_neuron_json({'attn_q': {'0': [1]}}, tmp_path/'a.json')
    with pytest.raises(ValueError, match='decoder layers'): shared_neurons(tmp_path/'a.json', tmp_path/'a.json', G, other)


def test_cli_outputs(tmp_path):
    write_neuron_json({'attn_q': {'0': [1, 2, 3]}, 'fwd_up': {'0': [4]}}, tmp_path/'a.json')
    write_neuron_json({'attn_q': {'0': [2, 3, 9]}, 'fwd_up': {'0': [5]}}, tmp_path/'b.json')
    assert shared_cli([str(tmp_path/'a.json'), str(tmp_path/'b.json'), '--output_path', str(tmp_path/'o'), '--op', 'union']) == 0
    p = tmp_path/'o'/'shared_VL_reasoning.json'
    assert read_neuron_json(p) == {'attn_q': {'0': [1, 2, 3, 9]}, 'fwd_up': {'0': [4, 5]}}
    assert (tmp_path/'o'/'shared_VL_reasoning.heatmap.png').stat().st_size > 0
    (tmp_path/'bad.json').write_text('{"attn_q": {"0": [1,')
    with pytest.raises(ValueError, match='bad.json: not valid JSON'):
        shared_cli([str(tmp_path/'a.json'), str(tmp_path/'bad.json'), '--output_path', str(tmp_path/'o2')])


def test_overlap_explorer_headless_slider_and_picker_redraw():
    "The explorer builds without a display and redraws its figures and summary when the knobs move."
    import os, base64
    os.environ.setdefault('MPLBACKEND', 'Agg')
    import ipywidgets as W
    from vlm_merge.anatomy import HeadGeometry
    from vlm_merge.shared import overlap_explorer, overlap_table, group_sizes
    G = HeadGeometry(n_heads=4, n_kv_heads=2, head_dim=2, hidden_size=8, intermediate_size=6, n_layers=3, vocab_size=10)
    A = {'attn_q': {'0': [0, 1, 2], '1': [4], '2': [0, 1, 2, 3, 4, 5, 6, 7]}, 'fwd_down': {'0': [1], '1': [0, 1], '2': [5]}}
    B = {'attn_q': {'0': [2, 3], '1': [5], '2': [0, 1, 2, 3, 4, 5, 6, 7]}, 'fwd_down': {'0': [1], '1': [1, 2], '2': [4]}}
    ex = overlap_explorer(A, B, sizes=group_sizes(G))
    assert isinstance(ex, W.VBox) and isinstance(ex.slider, W.IntSlider) and isinstance(ex.picker, W.Dropdown)
    assert (ex.slider.min, ex.slider.max) == (0, 2) and ex.picker.options == ('attn_q', 'fwd_down')
    png = lambda out: base64.b64decode(out.outputs[0]['data']['image/png'])
    heat0, bars0 = png(ex.heat), png(ex.bars)
    assert heat0[:8] == b'\x89PNG\r\n\x1a\n' and bars0[:8] == b'\x89PNG\r\n\x1a\n'
    assert ex.bars.outputs[0]['data']['text/plain'] == '<layer 0: Jaccard per group>'
    assert ex.info.value.startswith('layer 0, attn_q: 1 shared of 4 (A 3, B 2), Jaccard 0.250 (chance ')
    assert ex.info.value.endswith('<br>shared indices: [2]')
    ex.slider.value = 2                      # what a person dragging the slider does
    assert ex.bars.outputs[0]['data']['text/plain'] == '<layer 2: Jaccard per group>'
    assert png(ex.bars) != bars0 and png(ex.heat) != heat0   # both figures redrawn (outline moved)
    assert 'layer 2, attn_q: 8 shared of 8' in ex.info.value and 'Jaccard 1.000' in ex.info.value
    assert ex.info.value.endswith('shared indices: [0, 1, 2, 3, 4, 5, 6, 7]')
    ex.picker.value = 'fwd_down'
    assert ex.info.value.startswith('layer 2, fwd_down: 0 shared of 2 (A 1, B 1), Jaccard 0.000')
    assert len(ex.heat.outputs) == len(ex.bars.outputs) == 1   # replaced, not appended
    # a table works too (no indices then), and bad input is refused by name
    t = overlap_table(A, B)
    ex2 = overlap_explorer(t, layer=1, group='fwd_down', max_indices=1)
    assert ex2.info.value == 'layer 1, fwd_down: 1 shared of 3 (A 2, B 2), Jaccard 0.333'
    with pytest.raises(ValueError, match='lacks columns'): overlap_explorer(t.drop(columns='jaccard'))
    with pytest.raises(ValueError, match='empty overlap table'): overlap_explorer({'attn_q': {}}, {'fwd_up': {}})
