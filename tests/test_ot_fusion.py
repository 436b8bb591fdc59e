"Couplings, transported weights, the index baseline, residuals, and the refusals of `vlm-merge ot-fuse`."
import json
import pytest
import torch
import transformers
from vlm_merge.transport import TransportError, model_shapes, save_plans, load_plans
from vlm_merge.ot_fusion import (Fuser, check_alpha, check_plans, enable_hot_residual, finetune, index_plans, load_hot_residual,
                                 merge_hot_residual, post_coupling, pre_coupling, reconstruct_X, transport_weight,
                                 transported_weights, ot_fuse, head_plan, kv_neuron_plan)
from vlm_merge.cli import main


def _tiny(hidden, layers, seed, vocab=64):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                                   num_attention_heads=hidden // 16, num_key_value_heads=hidden // 32, head_dim=16)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_couplings_and_transport_weight():
    Q = torch.tensor([[0.25, 0.0], [0.25, 0.0], [0.0, 0.5]])
    assert torch.allclose(post_coupling(Q), torch.tensor([[.5, 0.], [.5, 0.], [0., 1.]]))
    assert torch.allclose(pre_coupling(Q), torch.tensor([[1., 0.], [1., 0.], [0., 1.]]))
    W = torch.arange(9.).reshape(3, 3)
    Wt = transport_weight(W, post_coupling(Q), pre_coupling(Q))
    # target output 0 = mean of source rows 0, 1; target input 0 feeds source inputs 0 and 1
    assert torch.allclose(Wt, torch.tensor([[(0 + 1 + 3 + 4) / 2, (2 + 5) / 2], [6 + 7, 8.]]))


def test_head_plans():
    Q = torch.zeros(4 * 2, 2 * 2); Q[0:2, 2:4] = 1  # source head 0 -> target head 1
    assert torch.equal(head_plan(Q, (4, 2)), torch.tensor([[0., 4.], [0., 0.], [0., 0.], [0., 0.]]))
    class G: pass
    gs, gt = G(), G(); gs.n_kv_heads, gs.group_size, gs.head_dim = 2, 2, 2; gt.n_kv_heads, gt.group_size, gt.head_dim = 1, 2, 2
    assert kv_neuron_plan(Q, gs, gt).shape == (4, 2) and kv_neuron_plan(Q, gs, gt).sum() == Q.sum()


def test_reconstruct_X_mixes_layers_by_P():
    Xs = [torch.ones(5, 2), 3 * torch.ones(5, 2)]
    Q = {('resid', i, 0): torch.eye(2) / 2 for i in range(2)}
    rec = reconstruct_X(Xs, Q, torch.tensor([[0.25], [0.75]]))
    assert torch.allclose(rec[0], torch.full((5, 2), 0.25 * 1 + 0.75 * 3))


def test_index_fusion_is_truncation_and_alpha_zero_is_target():
    sm, tm = _tiny(64, 3, 0), _tiny(32, 2, 1)
    ip = index_plans(model_shapes(sm.config), model_shapes(tm.config))
    assert ip['P'].argmax(0).tolist() == [0, 2]
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad(): y0 = tm(x).logits.clone()
    fu = Fuser(tm, transported_weights(sm, tm, ip))
    fu.set_alpha(1.0)
    s, t = sm.model.layers, tm.model.layers
    assert torch.allclose(t[1].mlp.down_proj.weight, s[2].mlp.down_proj.weight[:32, :64])
    assert torch.allclose(t[1].self_attn.o_proj.weight, s[2].self_attn.o_proj.weight[:32, :32])
    assert torch.allclose(t[0].self_attn.q_proj.weight,
                          (s[0].self_attn.q_proj.weight * s[0].input_layernorm.weight)[:32, :32] / t[0].input_layernorm.weight)
    fu.set_alpha(0.5)
    with torch.no_grad(): assert not torch.allclose(tm(x).logits, y0, atol=1e-4)
    fu.set_alpha(0.0)
    with torch.no_grad(): assert torch.allclose(tm(x).logits, y0, atol=1e-6)


def test_check_plans_and_alpha():
    s, t = model_shapes(_tiny(64, 3, 0).config), model_shapes(_tiny(32, 2, 1).config)
    check_plans(index_plans(s, t), s, t)
    with pytest.raises(TransportError, match=r'plans do not match the models: P is \(2, 3\)'): check_plans(index_plans(t, s), s, t)
    p = index_plans(s, t); p['Q'][('mlp', 1, 1)] = torch.zeros(3, 3)
    with pytest.raises(TransportError, match=r'Q.mlp.1.1 is \(3, 3\)'): check_plans(p, s, t)
    for bad in (-0.1, 1.01, 'x'):
        with pytest.raises(TransportError, match='alpha'): check_alpha(bad)
    assert check_alpha('0.3') == 0.3


def test_residual_scenarios_and_freeze():
    sm, tm = _tiny(64, 2, 0), _tiny(32, 2, 1)
    fu = Fuser(tm, transported_weights(sm, tm, index_plans(model_shapes(sm.config), model_shapes(tm.config)))).set_alpha(0.3)
    R = fu.residuals()
    x = torch.randint(0, 64, (2, 9))
    with torch.no_grad(): y0 = tm(x).logits.clone()
    before = {n: p.detach().clone() for n, p in tm.named_parameters()}
    n = enable_hot_residual(tm, R, 'transport', 'frozen_transport')
    assert n == sum(r.shape[0] for r in R.values())
    with torch.no_grad(): assert torch.allclose(tm(x).logits, y0, atol=1e-6)   # gates start at 0
    exs = [{'input_ids': list(range(1, 10)), 'labels': list(range(1, 10))}] * 4
    finetune(tm, exs, 0, steps=3, batch_size=2, lr=1e-2, progress=False)
    moved = {n for n, p in tm.named_parameters() if n.replace('.base', '') in before and not torch.equal(p, before[n.replace('.base', '')])}
    assert not moved                                                                  # base and R frozen
    assert any(m.gate.abs().sum() > 0 for m in tm.modules() if hasattr(m, 'gate'))     # gates trained
    assert merge_hot_residual(tm) == len(R)
    with torch.no_grad(): assert not torch.allclose(tm(x).logits, y0, atol=1e-6)
    with pytest.raises(TransportError, match='trains nothing'): enable_hot_residual(tm, R, 'no_transport', 'frozen_transport')
    m2 = _tiny(32, 2, 1)
    enable_hot_residual(m2, R, 'no_transport', 'frozen_base')
    assert all(torch.count_nonzero(m.R) == 0 for m in m2.modules() if hasattr(m, 'R'))
    assert {n.rsplit('.', 1)[1] for n, p in m2.named_parameters() if p.requires_grad} == {'R', 'gate'}


@pytest.fixture
def pair(tmp_path):
    from vlm_merge.zoo import zoo_tokenizer
    for name, (h, l, s) in {'src': (64, 3, 0), 'tgt': (32, 2, 1)}.items():
        _tiny(h, l, s, vocab=512).save_pretrained(tmp_path / name); zoo_tokenizer().save_pretrained(tmp_path / name)
    return tmp_path


def test_ot_fuse_writes_target_architecture(pair, capsys):
    rc = main(['ot-fuse', '--source', str(pair / 'src'), '--target', str(pair / 'tgt'), '--plans', 'index', '--alpha', '0.4',
               '--out', str(pair / 'out'), '--residual'])
    assert rc == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['alpha'] == 0.4
    m = transformers.AutoModelForCausalLM.from_pretrained(pair / 'out')
    assert type(m).__name__ == 'LlamaForCausalLM' and m.config.hidden_size == 32
    card = (pair / 'out' / 'README.md').read_text()
    assert 'ot_fusion' in card and '# out' in card and '.tmp-' not in card and json.loads((pair / 'out' / 'ot_fusion.json').read_text())['alpha'] == 0.4
    assert load_hot_residual(m, pair / 'out') > 0


def test_ot_fuse_refusals_write_nothing(pair, capsys):
    base = ['ot-fuse', '--source', str(pair / 'src'), '--target', str(pair / 'tgt'), '--out', str(pair / 'out')]
    rc = main(base + ['--plans', 'index', '--alpha', '1.5'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and err[0].startswith('vlm-merge ot-fuse: error:') and '--alpha' in err[0]
    s, t = (model_shapes(transformers.AutoConfig.from_pretrained(pair / n)) for n in ('src', 'tgt'))
    wrong = index_plans(t, s)
    save_plans(pair / 'wrong', wrong['Q'], {}, wrong['P'], {'note': 'swapped'})
    rc = main(base + ['--plans', str(pair / 'wrong'), '--alpha', '0.5'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and 'plans do not match the models' in err[0] and '--plans' in err[0]
    unk = pair / 'unk'; unk.mkdir(); (unk / 'config.json').write_text(json.dumps({'model_type': 'no_such_family'}))
    rc = main(['ot-fuse', '--source', str(pair / 'src'), '--target', str(unk), '--out', str(pair / 'out'), '--plans', 'index', '--alpha', '0.5'])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and 'no_such_family' in err[0]
    assert not (pair / 'out').exists() and not [p for p in pair.iterdir() if p.name.startswith('.out')]
