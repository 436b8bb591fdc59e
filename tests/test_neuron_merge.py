"Neuron merge: only shared rows/columns change, beta scales, errors leave no output, VLM base + text LLM B."
import json
import pytest, torch
from hypothesis import given, settings, strategies as st
from vlm_merge.anatomy import canonical_key, COL_GROUPS
from vlm_merge.checkpoints import CheckpointReader
from vlm_merge.detect import _tiny_models
from vlm_merge.neuron_merge import merge_weight, neuron_merge, neuron_merge_cli


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    return _tiny_models(tmp_path_factory.mktemp('models'))


@settings(max_examples=40, deadline=None)
@given(st.sampled_from(['attn_q', 'attn_o', 'fwd_up', 'fwd_down']), st.lists(st.integers(0, 9), max_size=6, unique=True),
       st.sampled_from(['mean', 'lora', 'lora_rows', 'pca']), st.integers(0, 1000))
def test_only_shared_neurons_change(group, idx, method, seed):
    g = torch.Generator().manual_seed(seed)
    Wb, Wa, WB = (torch.randn(10, 10, generator=g) for _ in range(3))
    out = merge_weight(Wb, Wa, WB, group, idx, method=method, lora_rank=2, pca_k=2)
    col = group in COL_GROUPS
    rest = [i for i in range(10) if i not in idx]
    if col: assert torch.equal(out[:, rest], Wb[:, rest])
    else: assert torch.equal(out[rest], Wb[rest])


@pytest.mark.parametrize('beta', [0.25, 1.0, 2.0])
def test_beta_scales_linearly(beta):
    g = torch.Generator().manual_seed(1)
    Wb, WB = torch.randn(8, 6, generator=g), torch.randn(8, 6, generator=g)
    d1 = merge_weight(Wb, Wb, WB, 'fwd_up', [0, 3, 5], method='lora', lora_rank=2, lora_beta=1.0) - Wb
    db = merge_weight(Wb, Wb, WB, 'fwd_up', [0, 3, 5], method='lora', lora_rank=2, lora_beta=beta) - Wb
    torch.testing.assert_close(db, beta * d1)
    assert d1.abs().sum() > 0


def test_vlm_base_with_llm_b(models, tmp_path):
    base, b = models/'vlm', models/'llm'
    shared = {'attn_v': {'1': [0, 3]}, 'fwd_down': {'1': [10, 20]}}
    out = neuron_merge(base, base, b, shared, tmp_path/'m', method='lora', lora_rank=64, lora_beta=1.0, progress=False)
    rb, rm, rB = CheckpointReader(base), CheckpointReader(out), CheckpointReader(b)
    cb = {canonical_key(k): k for k in rB.keys()}
    for k in rb.keys():
        c = canonical_key(k)
        if c == 'layers.1.attn_v.weight':       # full rank, beta 1, A = base: the shared rows become B's
            torch.testing.assert_close(rm.get(k)[[0, 3]], rB.get(cb[c])[[0, 3]], rtol=1e-4, atol=1e-5)
            assert torch.equal(rm.get(k)[[1, 2]], rb.get(k)[[1, 2]])
        elif c == 'layers.1.fwd_down.weight':
            torch.testing.assert_close(rm.get(k)[:, [10, 20]], rB.get(cb[c])[:, [10, 20]], rtol=1e-4, atol=1e-5)
        else: assert torch.equal(rm.get(k), rb.get(k)), k
    meta = json.loads((out/'neuron_merge.json').read_text())
    assert meta['changed_tensors'] == 2 and meta['changed_neurons'] == 4


def test_errors_leave_nothing(models, tmp_path):
    base = models/'vlm'
    with pytest.raises(KeyError, match='match no weight'):
        neuron_merge(base, base, models/'llm', {'attn_q': {'7': [0]}}, tmp_path/'x', method='mean', progress=False)
    assert not (tmp_path/'x').exists()
    with pytest.raises(Exception, match='input'):   # never write into an input
        neuron_merge(base, base, models/'llm', {'attn_q': {'0': [0]}}, models/'vlm'/'sub', method='mean', progress=False)


def test_cli_beta_zero_is_base(models, tmp_path):
    (tmp_path/'s.json').write_text(json.dumps({'attn_q': {'0': [1, 2]}, 'fwd_gate': {'1': [3]}}))
    assert neuron_merge_cli(['--base', str(models/'llm'), '--model_a', str(models/'llm'), '--model_b', str(models/'llm2'),
                            '--json', str(tmp_path/'s.json'), '--output_dir', str(tmp_path/'o'), '--lora_beta', '0']) == 0
    out = tmp_path/'o'
    ra, ro = CheckpointReader(models/'llm'), CheckpointReader(out)
    assert all(torch.equal(ra.get(k), ro.get(k)) for k in ra.keys())
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(out)


def test_fused_phi3(tmp_path):
    "Phi-3 keeps q/k/v in one qkv_proj: a shared attn_k neuron changes exactly row q_dim + j of it."
    from vlm_merge.anatomy import tiny_model, head_geometry
    for s, n in ((0, 'a'), (1, 'b')): tiny_model('phi3', seed=s).save_pretrained(tmp_path/n)
    g = head_geometry(json.loads((tmp_path/'a'/'config.json').read_text()))
    out = neuron_merge(tmp_path/'a', tmp_path/'a', tmp_path/'b', {'attn_k': {'0': [2]}, 'fwd_up': {'1': [5]}}, tmp_path/'m',
                       method='mean', progress=False)
    ra, rb, rm = CheckpointReader(tmp_path/'a'), CheckpointReader(tmp_path/'b'), CheckpointReader(out)
    for k in ra.keys():
        d = (rm.get(k) - ra.get(k)).abs()
        if d.dim() < 2: assert d.sum() == 0; continue
        rows = torch.nonzero(d.sum(1)).flatten().tolist()
        if 'layers.0.self_attn.qkv_proj' in k:
            assert rows == [g.q_dim + 2]
            torch.testing.assert_close(rm.get(k)[g.q_dim + 2], (ra.get(k)[g.q_dim + 2] + rb.get(k)[g.q_dim + 2]) / 2)
        elif 'layers.1.mlp.gate_up_proj' in k: assert rows == [g.intermediate_size + 5]
        else: assert rows == [], k


def test_lora_is_the_seeds_full_matrix_rule():
    "Seed 000: `lora` is the rank-r delta of the FULL projection, applied to the shared neurons; `lora_rows` is the rows-only SVD."
    from vlm_merge.neuron_merge import MERGE_RULES
    g = torch.Generator().manual_seed(0)
    Wb, WB = torch.randn(64, 48, generator=g), torch.randn(64, 48, generator=g)
    S = list(range(8))
    U, s, Vh = torch.linalg.svd(WB - Wb, full_matrices=False)
    full4 = (U[:, :4] * s[:4]) @ Vh[:4]
    seed = merge_weight(Wb, Wb, WB, 'fwd_up', S, method='lora', lora_rank=4, lora_beta=1.0)
    torch.testing.assert_close(seed[S], Wb[S] + full4[S], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seed[8:], Wb[8:])
    rows = merge_weight(Wb, Wb, WB, 'fwd_up', S, method='lora_rows', lora_rank=4, lora_beta=1.0)
    assert ((seed - rows)[S].norm() / (seed - Wb)[S].norm()) > 0.5
    # rank >= shared rows: lora_rows copies B, the seed's rule does not
    torch.testing.assert_close(merge_weight(Wb, Wb, WB, 'fwd_up', S, method='lora_rows', lora_rank=8, lora_beta=1.0)[S], WB[S])
    assert not torch.allclose(merge_weight(Wb, Wb, WB, 'fwd_up', S, method='lora', lora_rank=8, lora_beta=1.0)[S], WB[S], atol=1e-2)
    assert 'lora_rows' in MERGE_RULES


def test_lora_default_in_neuron_merge_is_full_matrix(models, tmp_path):
    base, b = models/'llm', models/'llm2'
    shared = {'fwd_up': {'0': [1, 4, 9]}, 'attn_o': {'1': [3, 5]}}
    out = neuron_merge(base, base, b, shared, tmp_path/'m', lora_rank=2, lora_beta=1.0, progress=False)
    rb, rB, rm = CheckpointReader(base), CheckpointReader(b), CheckpointReader(out)
    k = next(k for k in rb.keys() if canonical_key(k) == 'layers.0.fwd_up.weight')
    D = rB.get(k).float() - rb.get(k).float()
    U, s, Vh = torch.linalg.svd(D, full_matrices=False)
    want = rb.get(k).float()[[1, 4, 9]] + ((U[:, :2] * s[:2]) @ Vh[:2])[[1, 4, 9]]
    torch.testing.assert_close(rm.get(k).float()[[1, 4, 9]], want, atol=1e-4, rtol=1e-4)
    ko = next(k for k in rb.keys() if canonical_key(k) == 'layers.1.attn_o.weight')
    Do = rB.get(ko).float() - rb.get(ko).float()
    U, s, Vh = torch.linalg.svd(Do, full_matrices=False)
    torch.testing.assert_close(rm.get(ko).float()[:, [3, 5]], rb.get(ko).float()[:, [3, 5]] + ((U[:, :2] * s[:2]) @ Vh[:2])[:, [3, 5]],
                               atol=1e-4, rtol=1e-4)
