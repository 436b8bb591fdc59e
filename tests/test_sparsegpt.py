"Tests of vlm_merge.sparsegpt: importance formula, Hessians from calibration data, the disk cache."
import pytest
import torch
from torch import nn

from vlm_merge.sparsegpt import (sparsegpt_importance, hessians, HessianStore, decoder_layers, tiny_llama, word_tokenizer,
                                 _fingerprint)

TEXTS = ['the cat sat on the mat', 'two plus three is five', 'a square has four equal sides',
         'the angle of a right triangle is ninety degrees', 'seven times six is forty two']


def spd(n, seed):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(3 * n, n, generator=g)
    return X.T @ X / (3 * n)


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_importance_formula(seed):
    H = spd(12, seed)
    W = torch.randn(5, 12, generator=torch.Generator().manual_seed(seed + 10))
    damp = 0.01
    Hd = H + damp * torch.diagonal(H).mean() * torch.eye(12)
    d = torch.diagonal(torch.linalg.inv(Hd.double())).float()
    torch.testing.assert_close(sparsegpt_importance(W, H, damp), W ** 2 / d ** 2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(sparsegpt_importance(W, H, damp, kind='obs'), W ** 2 / d, rtol=1e-4, atol=1e-6)


def test_obs_saliency_is_the_least_loss_increase():
    # removing w_q with optimal compensation of the other entries raises w^T H w by exactly w_q^2 / [H^-1]_qq
    H = spd(6, 3).double(); w = torch.randn(6, dtype=torch.float64)
    Hinv = torch.linalg.inv(H)
    for q in range(6):
        dw = -w[q] / Hinv[q, q] * Hinv[:, q]            # OBS update, sets entry q to zero
        assert abs(float((w + dw)[q])) < 1e-9
        loss = float(dw @ H @ dw)
        sal = float(sparsegpt_importance(w[None].float(), H.float(), damp=0.0, kind='obs')[0, q])
        assert abs(loss - sal) / sal < 1e-3


def test_importance_dead_inputs_and_errors():
    H = torch.diag(torch.tensor([2., 0., 1.]))
    imp = sparsegpt_importance(torch.ones(2, 3), H)
    assert torch.equal(imp[:, 1], torch.zeros(2)) and bool((imp[:, [0, 2]] > 0).all())
    with pytest.raises(ValueError, match='do not match'): sparsegpt_importance(torch.ones(2, 4), H)
    with pytest.raises(ValueError, match='kind'): sparsegpt_importance(torch.ones(2, 3), H, kind='magnitude')


@pytest.fixture(scope='module')
def model():
    return tiny_llama(seed=0, layers=3)


@pytest.fixture(scope='module')
def tok():
    return word_tokenizer(TEXTS)


def _count_forwards(model):
    calls = {'n': 0}
    h = model.register_forward_pre_hook(lambda *a: calls.__setitem__('n', calls['n'] + 1))
    return calls, h


def test_hessian_equals_manual_xtx(model, tok):
    Hs = hessians(model, TEXTS, None, tokenizer=tok, progress=False)
    # capture the inputs of one module independently
    xs = []
    mod = model.model.layers[1].mlp.down_proj
    h = mod.register_forward_hook(lambda m, i, o: xs.append(i[0].detach().reshape(-1, i[0].shape[-1])))
    with torch.no_grad():
        for t in TEXTS: model(**tok(t, return_tensors='pt'))
    h.remove()
    X = torch.cat(xs).double()
    torch.testing.assert_close(Hs['model.layers.1.mlp.down_proj'].double(), X.T @ X / X.shape[0], rtol=1e-5, atol=1e-6)
    # every nn.Linear of the decoder layers, nothing else (no lm_head)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and '.layers.' in n}
    assert set(Hs) == names


def test_padding_is_excluded(model, tok):
    ids = [torch.tensor(tok(t)['input_ids']) for t in TEXTS[:2]]
    H1 = hessians(model, [{'input_ids': i} for i in ids], None, progress=False)
    L = max(len(i) for i in ids)
    padded = [{'input_ids': torch.cat([i, torch.ones(L - len(i), dtype=torch.long)]),
               'attention_mask': torch.cat([torch.ones(len(i)), torch.zeros(L - len(i))]).long()} for i in ids]
    assert any(len(i) < L for i in ids)
    H2 = hessians(model, padded, None, progress=False)
    for n in H1: torch.testing.assert_close(H1[n], H2[n], rtol=1e-4, atol=1e-5)


def test_cache_reused_and_keyed_by_model_and_data(model, tok, tmp_path):
    calls, h = _count_forwards(model)
    try:
        H1 = hessians(model, TEXTS, tmp_path, tokenizer=tok, progress=False)
        assert isinstance(H1, HessianStore) and calls['n'] == len(TEXTS)
        H2 = hessians(model, TEXTS, tmp_path, tokenizer=tok, progress=False)
        assert calls['n'] == len(TEXTS)                      # no forward pass the second time
        for n in H1: assert torch.equal(H1[n], H2[n])
        hessians(model, TEXTS[:3], tmp_path, tokenizer=tok, progress=False)      # other data: recomputed
        assert calls['n'] == len(TEXTS) + 3
        assert len([p for p in tmp_path.iterdir() if p.is_dir()]) == 2
    finally:
        h.remove()
    other = tiny_llama(seed=1, layers=3)                     # other weights, same config: another key
    assert _fingerprint(other) != _fingerprint(model)
    calls2, h2 = _count_forwards(other)
    try:
        hessians(other, TEXTS, tmp_path, tokenizer=tok, progress=False)
        assert calls2['n'] == len(TEXTS)
    finally:
        h2.remove()


def test_layer_by_layer_and_resume(model, tok, tmp_path):
    ref = hessians(model, TEXTS, None, tokenizer=tok, progress=False)
    store = hessians(model, TEXTS, tmp_path, tokenizer=tok, layers_per_pass=1, progress=False)
    for n in ref: torch.testing.assert_close(store[n], ref[n], rtol=1e-5, atol=1e-6)
    folder = store.folder
    (folder / 'layer_0001.safetensors').unlink()              # an interrupted run
    (folder / 'meta.json').unlink()
    calls, h = _count_forwards(model)
    try:
        again = hessians(model, TEXTS, tmp_path, tokenizer=tok, layers_per_pass=1, progress=False)
    finally:
        h.remove()
    assert calls['n'] == len(TEXTS)                          # one pass, for the missing layer only
    assert set(again) == set(ref)
    for n in ref: torch.testing.assert_close(again[n], ref[n], rtol=1e-5, atol=1e-6)
    # q/k/v share one stored Hessian
    torch.testing.assert_close(again['model.layers.2.self_attn.v_proj'], again['model.layers.2.self_attn.q_proj'])


def test_for_key_and_errors(model, tok, tmp_path):
    store = hessians(model, TEXTS[:2], tmp_path, tokenizer=tok, progress=False)
    assert store.for_key('model.layers.0.mlp.up_proj.weight').shape == (32, 32)
    assert store.for_key('language_model.model.layers.0.mlp.up_proj.weight').shape == (32, 32)
    assert store.for_key('lm_head.weight') is None
    with pytest.raises(KeyError, match='nope'): store['nope']
    with pytest.raises(ValueError, match='tokenizer'): hessians(model, ['text'], None, progress=False)
    with pytest.raises(ValueError, match='no calibration'): hessians(model, [], None, progress=False)
    assert decoder_layers(model)[0] == 'model.layers'


def test_importance_trimming_vs_magnitude_on_layer_output(model, tok):
    "diag (w^2 H_qq) trimming loses less layer output than magnitude; sparsegpt/obs change the selection."
    from vlm_merge.methods import merge_tensors
    Hs = hessians(model, TEXTS, None, tokenizer=tok, progress=False)
    g = torch.Generator().manual_seed(0)
    for name in ['model.layers.0.mlp.down_proj', 'model.layers.1.self_attn.o_proj', 'model.layers.2.mlp.up_proj']:
        W0 = model.get_submodule(name).weight.detach().float(); H = Hs[name]
        ds = [torch.randn(W0.shape, generator=g) * 0.01 for _ in range(2)]
        full = merge_tensors('ties', W0, [W0 + d for d in ds], [{'weight': 1., 'density': 1.}] * 2)
        ps = [{'weight': 1., 'density': 0.2}] * 2
        err = lambda M: float(torch.trace((M - full) @ H @ (M - full).T))
        mag = merge_tensors('ties', W0, [W0 + d for d in ds], ps)
        by = {k: merge_tensors('ties', W0, [W0 + d for d in ds], ps, importance=[sparsegpt_importance(d, H, kind=k) for d in ds])
              for k in ('sparsegpt', 'obs', 'diag')}
        assert err(by['diag']) < err(mag)
        assert not torch.equal(by['sparsegpt'] != W0, mag != W0)


def _family_trio(tmp, fam):
    "A tiny GPT-2 or BLOOM base and two light fine-tunes of it, saved with save_pretrained."
    from transformers import GPT2Config, GPT2LMHeadModel, BloomConfig, BloomForCausalLM
    cls, cfg = ((GPT2LMHeadModel, GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64, bos_token_id=0, eos_token_id=0))
                if fam == 'gpt2' else (BloomForCausalLM, BloomConfig(vocab_size=64, hidden_size=32, n_layer=2, n_head=4)))
    torch.manual_seed(0); base = cls(cfg).eval(); base.save_pretrained(tmp/'base')
    paths = []
    for s in (1, 2):
        torch.manual_seed(s); m = cls(cfg).eval(); m.load_state_dict(base.state_dict())
        with torch.no_grad():
            for p in m.parameters():
                if p.dim() == 2: p.add_(0.05 * torch.randn_like(p))
        m.save_pretrained(tmp/f'ft{s}'); paths.append(tmp/f'ft{s}')
    return tmp/'base', paths


@pytest.mark.parametrize('fam,key', [('gpt2', 'transformer.h.1.attn.c_attn.weight'), ('bloom', 'transformer.h.1.self_attention.query_key_value.weight')])
def test_sparsegpt_on_gpt2_and_bloom(fam, key, tmp_path, caplog):
    "Issue 18 item 6: GPT-2's Conv1D and BLOOM's `h.N.` layout are ranked by importance, not silently by magnitude."
    import logging
    from transformers import AutoModelForCausalLM
    from vlm_merge.engine import run_merge
    from vlm_merge.checkpoints import CheckpointReader
    from vlm_merge.methods import merge_tensors
    base, fts = _family_trio(tmp_path, fam)
    data = [[int(i) for i in torch.randint(0, 64, (12,), generator=torch.Generator().manual_seed(s))] for s in range(4)]
    ps = [{'weight': 0.5, 'density': 0.2}] * 2
    cfg = {'merge_method': 'ties', 'base_model': str(base), 'dtype': 'float32',
           'models': [{'model': str(f), 'parameters': p} for f, p in zip(fts, ps)],
           'parameters': {'use_sparsegpt': True}, 'sparsegpt': {'data': data, 'cache_dir': str(tmp_path/'cache')}}
    with caplog.at_level(logging.INFO, logger='vlm_merge.engine'):
        out = run_merge(cfg, tmp_path/'out', progress=False)
    card = (out/'README.md').read_text()
    assert '8 merged linear weights of the decoder layers were ranked by importance' in card, card
    assert 'no Hessian was found' not in card
    assert any('8 tensors ranked by SparseGPT importance' in r.getMessage() for r in caplog.records)
    # the output equals TIES given each model's importance from its own Hessian (Conv1D: on the transpose)
    mod = key[:-len('.weight')]
    b0, xs = CheckpointReader(base).get(key), [CheckpointReader(f).get(key) for f in fts]
    imp = []
    for f, x in zip(fts, xs):
        H = hessians(AutoModelForCausalLM.from_pretrained(f), data, None, progress=False)
        d = x - b0
        imp.append(sparsegpt_importance(d.T, H[mod]).T if fam == 'gpt2' else sparsegpt_importance(d, H[mod]))
        assert H.is_transposed(key) == (fam == 'gpt2')
    want = merge_tensors('ties', b0, xs, ps, importance=imp)
    assert torch.equal(CheckpointReader(out).get(key), want)
    assert not torch.equal(want != b0, merge_tensors('ties', b0, xs, ps) != b0)   # not what magnitude keeps


def test_decoder_weight_without_hessian_is_counted_and_named(tmp_path, monkeypatch, caplog):
    "A decoder-layer weight that finds no Hessian is ranked by magnitude, and the card and the log say which."
    import logging
    import vlm_merge.engine as E
    base, fts = _family_trio(tmp_path, 'bloom')
    data = [[1, 2, 3, 4, 5, 6]] * 2
    real = E.input_hessians
    def partial(plan, **kw):
        hs = real(plan, **kw)
        for st in hs.values(): st.pop('transformer.h.0.mlp.dense_4h_to_h')
        return hs
    monkeypatch.setattr(E, 'input_hessians', partial)
    cfg = {'merge_method': 'ties', 'base_model': str(base), 'dtype': 'float32',
           'models': [{'model': str(f), 'parameters': {'weight': 0.5, 'density': 0.2}} for f in fts],
           'parameters': {'use_sparsegpt': True}, 'sparsegpt': {'data': data, 'cache_dir': None}}
    with caplog.at_level(logging.INFO, logger='vlm_merge.engine'):
        out = E.run_merge(cfg, tmp_path/'out', progress=False)
    card = (out/'README.md').read_text()
    assert '7 merged linear weights of the decoder layers were ranked by importance' in card
    assert '1 linear weights of decoder layers for which no Hessian was found**: `transformer.h.0.mlp.dense_4h_to_h.weight`' in card
    rec = [r for r in caplog.records if 'no Hessian was found' in r.getMessage()]
    assert rec and rec[0].levelno == logging.WARNING and 'transformer.h.0.mlp.dense_4h_to_h.weight' in rec[0].getMessage()
