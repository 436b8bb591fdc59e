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
