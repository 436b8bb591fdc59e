"Detection: hooks, statistic, selection, JSON I/O and the CLI end to end on tiny random models."
import json, subprocess, sys
import pandas as pd, pytest, torch
from hypothesis import given, settings, strategies as st
from vlm_merge.anatomy import GROUPS, ModelAnatomy
from vlm_merge.detect import (ActivationRecorder, Detection, _tiny_models, detect_cli, detect_neurons, intersect_neurons,
                              load_detection_samples, read_neuron_json, top_neurons, write_neuron_json)


@pytest.fixture(scope='module')
def models(tmp_path_factory):
    return _tiny_models(tmp_path_factory.mktemp('models'))


@pytest.fixture(scope='module')
def corpus(tmp_path_factory):
    d = tmp_path_factory.mktemp('corpus')
    pd.DataFrame({'question': [f'what is {i} + 1 ?' for i in range(10)],
                  'answer': [f'{i} + 1 = {i+1}\n#### {i+1}' for i in range(10)]}).to_csv(d/'llama3ds_math.tsv', sep='\t', index=False)
    return d


def test_padding_does_not_count(models):
    "Appending padding to a sample leaves its scores unchanged."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(models/'llm').eval(); tk = AutoTokenizer.from_pretrained(models/'llm')
    enc = tk(['what is 2 + 3 ?'], return_tensors='pt')
    pad = {'input_ids': torch.cat([enc['input_ids'], torch.full((1, 5), tk.pad_token_id)], 1),
           'attention_mask': torch.cat([enc['attention_mask'], torch.zeros(1, 5, dtype=torch.long)], 1)}
    out = []
    for e in (enc, pad):
        with ActivationRecorder(m) as rec, torch.no_grad():
            rec.set_mask(e['attention_mask']); m(**e)
        out.append(rec.scores())
    for g in GROUPS: torch.testing.assert_close(out[0][g], out[1][g], rtol=1e-4, atol=1e-5)


def test_column_groups_read_the_input(models):
    "attn_o / fwd_down scores come from the module input: one per input column."
    from transformers import AutoModelForCausalLM, AutoTokenizer
    m = AutoModelForCausalLM.from_pretrained(models/'llm').eval(); tk = AutoTokenizer.from_pretrained(models/'llm')
    enc = tk(['circle angle'], return_tensors='pt')
    grab = {}
    h = ModelAnatomy(m).module(1, 'fwd_down').register_forward_hook(lambda mod, a, o: grab.update(x=a[0].detach()))
    with ActivationRecorder(m, groups=('fwd_down',)) as rec, torch.no_grad():
        rec.set_mask(enc['attention_mask']); m(**enc)
    h.remove()
    torch.testing.assert_close(rec.scores()['fwd_down'][1], grab['x'].abs().sum((0, 1)) / enc['attention_mask'].sum())
    assert set(rec.scores()) == {'fwd_down'}


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 30), st.floats(0, 1))
def test_top_neurons_counts(L, N, r):
    s = torch.rand(L, N)
    sel = top_neurons(s, r)
    k = min(N, round(r * N))
    assert all(len(v) == k for v in sel.values())
    for l, v in sel.items():   # every kept score >= every dropped score
        rest = [i for i in range(N) if i not in v]
        if v and rest: assert s[int(l), v].min() >= s[int(l), rest].max()


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 5), st.integers(2, 20), st.floats(0.05, 1))
def test_intersection_is_subset_of_each_sample(S, N, r):
    ps = torch.rand(S, 2, N)
    inter = intersect_neurons(ps, r)
    for s in range(S):
        per = top_neurons(ps[s], r)
        for l in inter: assert set(inter[l]) <= set(per[l])


def test_json_errors(tmp_path):
    p = tmp_path/'n.json'
    for bad, msg in [('[]', 'expected an object'), ('{"mlp": {}}', 'unknown group'), ('{"attn_q": {"x": [1]}}', 'layer key'),
                     ('{"attn_q": {"0": [1.5]}}', 'non-negative integers'), ('{', 'not valid JSON')]:
        p.write_text(bad)
        with pytest.raises(ValueError, match=msg): read_neuron_json(p)
    with pytest.raises(FileNotFoundError): read_neuron_json(tmp_path/'missing.json')


def test_subsample_is_seeded(corpus):
    a = load_detection_samples('gsm', corpus, sample_size=4, seed=3)
    assert a == load_detection_samples('gsm', corpus, sample_size=4, seed=3)
    assert a != load_detection_samples('gsm', corpus, sample_size=4, seed=4)
    with pytest.raises(ValueError, match="task must be"): load_detection_samples('ocr', corpus)


def test_scores_roundtrip_and_reselect(models, corpus, tmp_path):
    det = detect_neurons(str(models/'llm'), load_detection_samples('gsm', corpus, sample_size=6), batch_size=3,
                         device='cpu', dtype='float32', keep_per_sample=True, progress=False)
    det.save(tmp_path/'s.safetensors')
    back = Detection.load(tmp_path/'s.safetensors')
    for r in (0.1, 0.5):
        assert back.select(r, r) == det.select(r, r)
        assert back.select(r, r, 'intersect') == det.select(r, r, 'intersect')
    assert back.meta['n_samples'] == 6


def test_batch_size_does_not_change_scores(models, corpus):
    s = load_detection_samples('gsm', corpus, sample_size=6)
    d1 = detect_neurons(str(models/'llm'), s, batch_size=1, device='cpu', dtype='float32', progress=False)
    d6 = detect_neurons(str(models/'llm'), s, batch_size=6, device='cpu', dtype='float32', progress=False)
    for g in GROUPS: torch.testing.assert_close(d1.scores[g], d6.scores[g], rtol=1e-4, atol=1e-5)


def test_cli_subprocess(models, corpus, tmp_path):
    r = subprocess.run([sys.executable, '-m', 'vlm_merge.cli', 'detect', '--base', str(models/'llm'), '--task', 'gsm',
                        '--corpus_path', str(corpus), '--sample_size', '4', '--output_path', str(tmp_path), '--device', 'cpu'],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    d = read_neuron_json(tmp_path/'llm_gsm.json')
    assert set(d) == set(GROUPS) and (tmp_path/'llm_gsm.scores.safetensors').exists()


@pytest.mark.parametrize('family', ['llama', 'mistral', 'qwen2', 'gemma2', 'phi3', 'llava', 'llava_next', 'idefics3', 'qwen2_vl', 'qwen2_5_vl'])
def test_every_tiny_family(family):
    "Hooks find every group through the anatomy table: one score per neuron, padding excluded, fused rows split."
    from vlm_merge.anatomy import tiny_model, head_geometry
    m = tiny_model(family)
    geom = head_geometry(m.config)
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids); mask[1, 6:] = 0
    grab = {}
    an = ModelAnatomy(m); ref = an.ref(1, 'fwd_up')
    h = ref.module.register_forward_hook(lambda mod, a, o: grab.update(y=o.detach()))
    with ActivationRecorder(m) as rec, torch.no_grad():
        rec.set_mask(mask); m(input_ids=ids, attention_mask=mask)
    h.remove()
    sc = rec.scores()
    assert set(sc) == set(GROUPS) and not rec.unmasked
    for g in GROUPS:
        assert sc[g].shape == (geom.n_layers, geom.n_neurons(g)), g
        assert torch.isfinite(sc[g]).all() and (sc[g] >= 0).all()
    y = grab['y'] if ref.rows is None else grab['y'][..., ref.rows]
    want = (y.abs() * mask[..., None]).sum((0, 1)) / mask.sum()
    torch.testing.assert_close(sc['fwd_up'][1], want, rtol=1e-4, atol=1e-6)


def _image_samples(n=2):
    from PIL import Image
    return [{'prompt': 'Find x.', 'answer': '3', 'image': Image.new('RGB', (28, 28), (i * 40, 0, 0))} for i in range(n)]


@pytest.mark.parametrize('prompt', ['<image>Find x in the triangle.', '<image>\nFind x in the triangle.', 'Find x in the triangle.'])
def test_image_placeholder_in_problem_text_detect(models, prompt):
    "Issue 18 item 9: with or without Geometry3K's '<image>' in the text, one image token per image; detection runs."
    from transformers import AutoProcessor
    from vlm_merge.detect import encode_batch
    proc = AutoProcessor.from_pretrained(models/'vlm')
    s = [{**x, 'prompt': prompt} for x in _image_samples(1)]
    enc = encode_batch(proc, s, True)
    plain = encode_batch(proc, [{**s[0], 'prompt': 'Find x in the triangle.'}], True)
    assert torch.equal(enc['input_ids'], plain['input_ids'])
    det = detect_neurons(models/'vlm', s, device='cpu', dtype='float32', progress=False)
    assert det.meta['n_samples'] == 1


def test_vlm_processor_without_image_processor_refuses(models):
    "Issue 18 item 8: images are never dropped silently; drop_images=True warns and detects on the text."
    from transformers import AutoTokenizer, AutoModelForImageTextToText
    from vlm_merge.detect import load_model_for_detection
    model = AutoModelForImageTextToText.from_pretrained(models/'vlm').eval()
    tok = AutoTokenizer.from_pretrained(models/'vlm')
    with pytest.raises(ValueError, match='has no image processor'):
        detect_neurons(model, _image_samples(), proc=tok, progress=False)
    with pytest.warns(UserWarning, match='detecting on the text alone'):
        det = detect_neurons(model, _image_samples(), proc=tok, drop_images=True, progress=False)
    assert det.meta['n_samples'] == 2
    llm, ltok, is_vlm = load_model_for_detection(models/'llm', 'cpu', 'float32')   # a text model given image samples
    with pytest.raises(ValueError, match='have images'):
        detect_neurons(llm, _image_samples(), proc=ltok, progress=False)
