"V-ADASM (nbs/12_vadasm.ipynb): the primitives on toy tensors, MoE aggregation on tiny random MoE models, the refusals of the CLI, and one small end-to-end run on the zoo."
import json, warnings
import pandas as pd, pytest, torch
from vlm_merge.vadasm import (VADASM_DEFAULTS, VadasmError, Fuser, aligned_count, check_pair, evolve, hungarian_align, load_val,
                              map_matrix, map_projector, moe_aggregate, pair_layers, svd_subspace, vadasm)
from vlm_merge.cli import main
from vlm_merge.zoo import zoo_data_path

g = torch.Generator().manual_seed(0)


def test_svd_subspace_keeps_the_variance_asked_for():
    W = torch.randn(20, 4, generator=g) @ torch.randn(4, 16, generator=g) + 1e-3 * torch.randn(20, 16, generator=g)
    Wr, r, ex = svd_subspace(W, 0.95)
    assert r <= 4 and ex >= 0.95 and torch.linalg.matrix_rank(Wr) == r
    assert svd_subspace(W, 1.0)[1] == 16
    for bad in (0, -0.1, 1.01, float('nan')):
        with pytest.raises(VadasmError, match=r'\(0, 1\]'): svd_subspace(W, bad)


def test_layers_pair_by_relative_depth():
    assert pair_layers(4, 3) == [(0, 0), (1, 1), (2, 1), (3, 2)]
    assert pair_layers(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert [aligned_count(n) for n in (3, 4, 5, 6, 32)] == [1, 1, 1, 2, 7]


@pytest.mark.parametrize('n_small,n_large', [(5, 8), (8, 5)])
def test_hungarian_recovers_a_signed_permutation_of_unequal_width(n_small, n_large):
    base = torch.randn(400, max(n_small, n_large), generator=g)
    perm = torch.randperm(base.shape[1], generator=g)
    small, large = base[:, :n_small], (base[:, perm] * -3.0)[:, :n_large]
    al = hungarian_align(small, large)
    assert len(al.small_idx) == min(n_small, n_large)
    for s, l in zip(al.small_idx.tolist(), al.large_idx.tolist()): assert perm[l] == s   # donor unit l holds small unit perm[l]
    assert (al.sign == -1).all() and torch.allclose(al.scale, torch.full_like(al.scale, 1 / 3), atol=1e-6)
    named = al.unmatched_large if n_large > n_small else al.unmatched_small
    assert len(named) == abs(n_large - n_small)


def test_map_matrix_moves_rows_and_columns():
    x = torch.randn(300, 6, generator=g)
    rows = hungarian_align(x[:, :2], x[:, [3, 1, 0]])   # small unit 0 <- donor 2, small 1 <- donor 1
    cols = hungarian_align(x[:, 2:5], x[:, [4, 2, 3, 5]])   # small 0 <- donor 1, 1 <- 2, 2 <- 0
    D = torch.arange(12.).reshape(3, 4)
    assert torch.equal(map_matrix(D, rows, cols), D[[2, 1]][:, [1, 2, 0]])


def test_projector_mapping_recovers_a_permuted_output():
    l1, l2 = torch.nn.Linear(4, 6), torch.nn.Linear(6, 6)
    fe = torch.randn(500, 4, generator=g)
    out = l2(torch.nn.functional.gelu(l1(fe))).detach()
    al = hungarian_align(out[:, [4, 0, 2]], out)
    mp = map_projector(l1, l2, torch.nn.functional.gelu, fe, al, 1.0)
    assert mp['linear_1_weight'].shape == (3, 4) and mp['linear_2_weight'].shape == (3, 3) and mp['refit_r2'] > 0.8
    with pytest.raises(VadasmError, match='projector_svd_rank'): map_projector(l1, l2, torch.nn.functional.gelu, fe, al, 0)


def _mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM
    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)).eval()


def test_moe_aggregation_norm_avg_follows_router_mass():
    mlp = _mixtral().model.layers[0].mlp
    with torch.no_grad(): mlp.gate.weight.zero_(); mlp.gate.weight[2, 0] = 5.0; mlp.gate.weight[1, 1] = 2.0
    x = torch.randn(300, 32, generator=g).abs()   # positive inputs: expert 2 is routed most, then expert 1
    agg = moe_aggregate(mlp, x, 'norm_avg', 2)
    assert agg['experts'] == [1, 2] and agg['weights'][1] > agg['weights'][0] and abs(sum(agg['weights']) - 1) < 1e-3
    w = torch.tensor(agg['weights'])
    assert torch.allclose(agg['down'], (w[:, None, None] * mlp.experts.down_proj[[1, 2]]).sum(0), atol=1e-4)
    uni = moe_aggregate(mlp, x, 'uniform', 2)
    assert torch.allclose(uni['down'], mlp.experts.down_proj[[1, 2]].mean(0), atol=1e-6)
    with pytest.raises(VadasmError, match='norm_avg'): moe_aggregate(mlp, x, 'max')
    with pytest.raises(VadasmError, match='top_k'): moe_aggregate(mlp, x, 'uniform', 5)


def test_moe_aggregation_on_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM
    m = Qwen2MoeForCausalLM(Qwen2MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=24,
                            shared_expert_intermediate_size=48, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            num_experts=4, num_experts_per_tok=2)).eval()
    agg = moe_aggregate(m.model.layers[0].mlp, torch.randn(50, 32, generator=g), 'norm_avg', 2)
    assert agg['gate'].shape == (24, 32) and agg['up'].shape == (24, 32) and agg['down'].shape == (32, 24) and len(agg['experts']) == 2


class _Box(torch.nn.Module):
    def __init__(self, w):
        super().__init__(); self.layers = torch.nn.ModuleList([torch.nn.Module()]); self.layers[0].w = torch.nn.Parameter(w.clone())


def test_fuser_ties_election_and_drop_and_restore():
    base = torch.zeros(2, 4)
    small = _Box(torch.tensor([[1., 1, 1, 1], [1, 1, 1, 1]]))   # the small model's own fine-tune delta: +1 everywhere
    d = torch.tensor([[-4., 2, 0.5, 0.1], [-0.2, 3, -0.3, 0.4]])
    fz = Fuser(small, {'layers.0.w': (d, 'language')}, small_base=_Box(base))
    fz.apply(dict(fusion_beta=0.0, language_transfer_beta=0.5, ties_drop_rate=0.5))
    w = small.layers[0].w.detach()
    # kept by magnitude: -4, 2, 3, 0.5 (rescaled to the delta's L1 norm 10.5 / 9.5), weighted by 0.5; the sign election: at [0, 0]
    # -4k outweighs the small model's +1, whose entry is then dropped; elsewhere the agreeing parts add up
    k = 10.5 / 9.5 * 0.5
    assert torch.allclose(w, torch.tensor([[-4 * k, 1 + 2 * k, 1 + 0.5 * k, 1], [1, 1 + 3 * k, 1, 1]]), atol=1e-5)
    fz.restore(); assert torch.equal(small.layers[0].w.detach(), torch.ones(2, 4))
    fz.apply(dict(fusion_beta=0.0, language_transfer_beta=0.0, ties_drop_rate=0.3)); assert torch.equal(small.layers[0].w.detach(), torch.ones(2, 4))


def test_evolve_budget_and_fallback():
    f = lambda p: -(p['fusion_beta'] - 0.7) ** 2 - (p['language_transfer_beta'] - 0.2) ** 2
    best, hist = evolve(f, VADASM_DEFAULTS, budget_evals=60, seed=1)
    assert len(hist) == 60 and hist[0]['fusion_beta'] == 0.3 and f(best) >= f(VADASM_DEFAULTS)
    with pytest.warns(UserWarning, match='default parameters'): best0, h0 = evolve(f, VADASM_DEFAULTS, budget_evals=0)
    assert best0 == VADASM_DEFAULTS and len(h0) == 1


def test_check_pair_refusals(tmp_path):
    with pytest.raises(VadasmError, match='no vision tower and multi-modal projector'): check_pair('reason-lm', 'wide-lm')
    (tmp_path / 'config.json').write_text(json.dumps({'model_type': 'nosuchfamily'}))
    with pytest.raises(VadasmError, match='Known families') as e: check_pair('reason-lm', str(tmp_path))
    assert 'llama' in str(e.value) and 'llava' in str(e.value)


def _cli(capsys, *args):
    rc = main(['vadasm', *args]); cap = capsys.readouterr()
    return rc, cap.err.strip().splitlines()


@pytest.mark.parametrize('args,words', [
    (['--large', 'wide-lm'], '--large wide-lm: no vision tower and multi-modal projector'),
    (['--large', 'wide-vlm', '--svd-rank', '1.5'], '--svd-rank 1.5'),
    (['--large', 'wide-vlm', '--svd-rank', '0'], '(0, 1]'),
    (['--large', 'UNKNOWN'], 'Known families'),
    (['--large', 'wide-vlm', '--val', 'EMPTY'], 'no calibration data'),
])
def test_cli_refuses_in_one_line_and_writes_nothing(tmp_path, capsys, args, words):
    (tmp_path / 'u').mkdir(); (tmp_path / 'u' / 'config.json').write_text(json.dumps({'model_type': 'nosuchfamily'}))
    pd.DataFrame({'question': ['What is 1 + 1?'], 'answer': ['#### 2']}).to_csv(tmp_path / 'empty.tsv', sep='\t', index=False)
    args = [str(tmp_path / 'u') if a == 'UNKNOWN' else str(tmp_path / 'empty.tsv') if a == 'EMPTY' else a for a in args]
    rc, err = _cli(capsys, '--small', 'reason-lm', '--out', str(tmp_path / 'out'), '--quiet', *args)
    assert rc == 1 and len(err) == 1 and err[0].startswith('vlm-merge vadasm: error:') and words in err[0], err
    assert not (tmp_path / 'out').exists() and sorted(p.name for p in tmp_path.iterdir()) == ['empty.tsv', 'u']


def test_end_to_end_small_run_writes_a_loadable_vlm(tmp_path):
    from transformers import AutoModelForImageTextToText
    from vlm_merge.inference import Inferencer, evaluate
    per = pd.read_parquet(zoo_data_path('geometry_perception.parquet')).head(16)
    gsm = pd.read_csv(zoo_data_path('mgsm_en.tsv'), sep='\t', dtype=str).head(16)
    with pytest.warns(UserWarning, match='default parameters'):
        res = vadasm('reason-lm', 'wide-vlm', tmp_path / 'out', val=[per, gsm], budget_evals=0, progress=False)
    assert res.params['fusion_beta'] == VADASM_DEFAULTS['fusion_beta'] and len(res.history) == 1
    assert set(res.test['defaults']) == {'perception', 'gsm', 'fitness'} and res.test['defaults']['gsm'] >= 0.75
    rep = res.report['projector']
    assert 0 < rep['svd_rank'] <= 192 and rep['svd_explained'] >= 0.95 and rep['kept_units'] == 128
    assert len(res.report['hidden'][0]['unmatched_large']) == 192 - 128
    out = tmp_path / 'out'
    cfg = json.loads((out / 'vadasm_config.json').read_text())
    assert cfg['method'] == 'vadasm' and cfg['capabilities']['vision'] and cfg['sources']['large'] == 'wide-vlm' and cfg['n_parameters'] > 0
    assert 'vadasm' in (out / 'README.md').read_text() and 'n_parameters' in (out / 'README.md').read_text()
    m = AutoModelForImageTextToText.from_pretrained(out)
    assert type(m).__name__ == 'LlavaForConditionalGeneration' and m.config.text_config.hidden_size == 128
    df, s = evaluate(Inferencer(out), 'multimodal', per.tail(4), max_new_tokens=16, progress=False)
    assert s['n'] == 4 and df.prediction.str.len().sum() > 0


def test_no_vision_writes_a_text_llm_even_from_a_vlm_donor(tmp_path):
    from transformers import AutoModelForCausalLM
    gsm = pd.read_csv(zoo_data_path('mgsm_en.tsv'), sep='\t', dtype=str).head(12)
    with pytest.warns(UserWarning, match='default parameters'):
        res = vadasm('reason-lm', 'wide-vlm', tmp_path / 'out', no_vision=True, val=[gsm], budget_evals=0, progress=False)
    assert set(res.test['defaults']) == {'gsm', 'fitness'} and 'projector' not in res.report
    cfg = json.loads((tmp_path / 'out' / 'vadasm_config.json').read_text())
    assert cfg['capabilities']['vision'] is False
    m = AutoModelForCausalLM.from_pretrained(tmp_path / 'out')
    assert type(m).__name__ == 'LlamaForCausalLM'
    ref = AutoModelForCausalLM.from_pretrained(zoo_data_path('mgsm_en.tsv').parent.parent / 'reason-lm')
    moved = [k for k, v in m.state_dict().items() if not torch.equal(v, ref.state_dict()[k])]
    assert moved and all('.mlp.' in k or 'layernorm' in k for k in moved)   # only the transferred MLP and norm tensors change
