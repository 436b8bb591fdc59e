"Streaming Sinkhorn against POT, correlation costs, activations, plans on disk, and the refusals of `vlm-merge ot-plans`."
import json
import numpy as np
import pytest
import torch
import transformers
ot = pytest.importorskip('ot')   # POT: a test dependency (dev_requirements)
from vlm_merge.transport import (CorrCost, TransportError, check_same_tokenizer, collect_activations, corr_distance_matrix,
                                 compute_P, compute_Q_and_layer_costs, load_plans, save_plans, sinkhorn_stream, token_stream,
                                 transport_cost, plan_topk)
from vlm_merge.cli import main


@pytest.mark.parametrize('n,m,eps,block', [(5, 7, 0.1, 2), (40, 13, 0.05, 8), (64, 64, 0.2, 2048), (31, 50, 0.03, 16)])
def test_sinkhorn_matches_pot(n, m, eps, block):
    g = torch.Generator().manual_seed(n * 100 + m)
    M = torch.rand(n, m, generator=g, dtype=torch.float64)
    r = sinkhorn_stream(M, eps=eps, n_iter=20000, tol=1e-13, block=block)
    ref = ot.sinkhorn(np.full(n, 1 / n), np.full(m, 1 / m), M.numpy(), eps, method='sinkhorn_log', numItermax=100000, stopThr=1e-14)
    pi = r.plan().numpy()
    assert np.abs(pi - ref).max() * n * m < 1e-6          # relative to the uniform mass 1/(n m)
    assert abs(transport_cost(r, block=3) - float((ref * M.numpy()).sum())) < 1e-6


def test_sinkhorn_streamed_cost_equals_dense():
    g = torch.Generator().manual_seed(1)
    X, Y = torch.randn(80, 30, generator=g, dtype=torch.float64), torch.randn(80, 20, generator=g, dtype=torch.float64)
    C = corr_distance_matrix(X, Y)
    np.testing.assert_allclose(C.numpy(), 1 - np.corrcoef(X.numpy().T, Y.numpy().T)[:30, 30:], atol=1e-12)
    a = sinkhorn_stream(CorrCost(X, Y, dtype=torch.float64), eps=0.05, block=7, tol=1e-12, n_iter=5000)
    b = sinkhorn_stream(C, eps=0.05, block=2048, tol=1e-12, n_iter=5000)
    np.testing.assert_allclose(a.plan().numpy(), b.plan().numpy(), atol=1e-12)
    v, j = plan_topk(a, k=2, block=4)
    assert torch.equal(j[:, 0], a.plan().argmax(1))


def test_sinkhorn_recovers_permutation_and_P_diagonal():
    g = torch.Generator().manual_seed(2)
    Xs = [torch.randn(300, 12, generator=g) for _ in range(3)]
    p = torch.randperm(12, generator=g)
    Q, costs = compute_Q_and_layer_costs({'resid': Xs}, {'resid': [x[:, p] for x in Xs]}, eps=0.01, progress=False)
    assert torch.equal(Q[('resid', 1, 1)].argmax(0), p)
    P = compute_P(costs, eps=0.05)
    assert torch.allclose(P.sum(0), torch.full((3,), 1 / 3), atol=1e-6) and P.diag().sum() > 0.95


def test_bad_eps_and_token_mismatch():
    with pytest.raises(TransportError, match='eps'): sinkhorn_stream(torch.rand(3, 3), eps=0)
    with pytest.raises(TransportError, match='share the token stream'): corr_distance_matrix(torch.rand(5, 2), torch.rand(6, 2))


class _Tok:
    eos_token_id = 0
    def __init__(self, v): self.v = v
    def get_vocab(self): return self.v
    def __call__(self, s, add_special_tokens=False): return {'input_ids': [len(w) for w in s.split()]}


def test_tokenizers_and_stream():
    check_same_tokenizer(_Tok({'a': 0, 'b': 1, 'x': 2}), _Tok({'a': 0, 'b': 1}))
    with pytest.raises(TransportError, match='tokenizers of source and target differ'):
        check_same_tokenizer(_Tok({'a': 0, 'b': 1}), _Tok({'a': 1, 'b': 0}))
    assert token_stream(['aa b', 'ccc'], _Tok({}), 4).tolist() == [2, 1, 0, 3]
    with pytest.raises(TransportError, match=r'holds 5 tokens but 6 were requested \(--tokens\)'):
        token_stream(['aa b', 'ccc'], _Tok({}), 6)


def _tiny(hidden=32, layers=2, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 16, num_key_value_heads=1, head_dim=16)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_collect_activations_shapes_and_hooks_removed():
    m = _tiny(48, 3)
    acts = collect_activations(m, torch.randint(0, 64, (70,)), seq_len=32, progress=False)
    assert [acts[k][2].shape for k in ('resid', 'attn', 'mlp')] == [(70, 48), (70, 48), (70, 96)]
    assert not any(mod._forward_pre_hooks for mod in m.modules())
    # the resid of layer 0 is the token embedding of the stream
    ids = torch.arange(10)
    a0 = collect_activations(m, ids, seq_len=10, kinds=('resid',), progress=False)['resid'][0]
    assert torch.allclose(a0, m.model.embed_tokens.weight[ids])


def test_plans_round_trip_and_refusals(tmp_path):
    Q = {('resid', 0, 0): torch.rand(3, 2)}
    out = save_plans(tmp_path / 'p', Q, {'resid': torch.rand(1, 1)}, torch.ones(1, 1), {'a': 1}, {'rms.source.resid': torch.ones(1)})
    back = load_plans(out)
    assert torch.equal(back['Q'][('resid', 0, 0)], Q[('resid', 0, 0)]) and back['summary'] == {'a': 1}
    assert set(back['extra']) == {'rms.source.resid'}
    with pytest.raises(TransportError, match='exists and is not empty'): save_plans(out, Q, {}, torch.ones(1, 1), {})
    save_plans(out, Q, {}, torch.ones(1, 1), {'b': 2}, overwrite=True)
    assert load_plans(out)['summary'] == {'b': 2}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith('.')]


def test_cli_refusals_write_nothing(tmp_path, capsys):
    short = tmp_path / 'short.txt'; short.write_text('Mia has 6 shells.\n')
    rc = main(['ot-plans', '--source', 'wide-lm', '--target', 'base-lm', '--data', str(short), '--out', str(tmp_path / 'o1'), '--quiet'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith('vlm-merge ot-plans: error:') and '--tokens' in err[0]
    unk = tmp_path / 'unk'; unk.mkdir(); (unk / 'config.json').write_text(json.dumps({'model_type': 'no_such_family'}))
    rc = main(['ot-plans', '--source', 'wide-lm', '--target', str(unk), '--data', str(short), '--out', str(tmp_path / 'o2'), '--quiet'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and 'target' in err[0] and 'no_such_family' in err[0]
    assert not (tmp_path / 'o1').exists() and not (tmp_path / 'o2').exists()


def test_cli_writes_plans_on_the_zoo(tmp_path, capsys):
    from vlm_merge.zoo import zoo_data_path
    rc = main(['ot-plans', '--source', 'wide-lm', '--target', 'base-lm', '--data', str(zoo_data_path('llama3ds_math.tsv')),
               '--tokens', '256', '--seq-len', '128', '--iters', '50', '--out', str(tmp_path / 'plans'), '--quiet'])
    assert rc == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    p = load_plans(tmp_path / 'plans')
    assert p['P'].shape == (3, 4) and np.allclose(np.array(out['P']).sum(0), 0.25, atol=1e-4)
    assert p['Q'][('mlp', 2, 3)].shape == (512, 384) and p['Q'][('attn', 0, 0)].shape == (192, 128)
    assert p['summary']['target_shapes']['hidden_size'] == 128
