"End-to-end tests for vlm_merge.inference on tiny random models (plumbing, not accuracy)."
import json, io, contextlib
from pathlib import Path
import pandas as pd, pytest, torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM, LlavaNextConfig, LlavaNextForConditionalGeneration,
                          CLIPVisionConfig, LlavaNextProcessor, LlavaNextImageProcessor)
from vlm_merge.data import make_gsm, make_geometry, gsm_prompt, geometry_prompt, write_gsm_tsv, write_geometry_parquet
from vlm_merge.inference import Inferencer, evaluate, perplexity, infer_cli, detect_backend

TPL = ("{% for m in messages %}<|{{ m['role'] }}|> {% if m['content'] is string %}{{ m['content'] }}{% else %}"
       "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image> {% else %}{{ c['text'] }}{% endif %}{% endfor %}"
       "{% endif %} <|end|> {% endfor %}{% if add_generation_prompt %}<|assistant|> {% endif %}")


def _tok():
    texts = [gsm_prompt(q) for q in make_gsm(200).question] + list(make_gsm(200).answer)
    texts += [geometry_prompt(p, c) for p, c in zip(make_geometry(40).problem, make_geometry(40).choices)]
    specials = ['<pad>', '<unk>', '<s>', '</s>', '<image>', '<|user|>', '<|assistant|>', '<|end|>']
    words = {str(i) for i in range(1000)} | {w for t in texts for w in t.split()}
    vocab = {w: i for i, w in enumerate(specials + sorted(words - set(specials)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>')); tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='<pad>', unk_token='<unk>', bos_token='<s>', eos_token='</s>')
    tok.chat_template = TPL
    return tok


def _tc(tok):
    return LlamaConfig(vocab_size=len(tok), hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)


@pytest.fixture(scope='module')
def models_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp('models'); tok = _tok()
    torch.manual_seed(1); LlamaForCausalLM(_tc(tok)).save_pretrained(d / 'llama'); tok.save_pretrained(d / 'llama')
    vc = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32, patch_size=8)
    cfg = LlavaNextConfig(vision_config=vc, text_config=_tc(tok), image_token_index=4, image_grid_pinpoints=[[32, 32]], vision_feature_layer=-1)
    torch.manual_seed(1); LlavaNextForConditionalGeneration(cfg).save_pretrained(d / 'llava')
    ip = LlavaNextImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32}, image_grid_pinpoints=[[32, 32]])
    LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=8, vision_feature_select_strategy='default', chat_template=TPL,
                       image_token='<image>', num_additional_image_tokens=1).save_pretrained(d / 'llava')
    return d


@pytest.mark.parametrize('bs', [3, 7])
def test_left_padding_matches_single(models_dir, bs):
    inf = Inferencer(models_dir / 'llama')
    qs = [gsm_prompt(q) for q in make_gsm(9, seed=5, steps=(1, 3)).question]
    assert len({len(inf.format(q).split()) for q in qs}) > 1         # prompts of different lengths share batches
    single = [inf.generate([q], max_new_tokens=6, progress=False)[0] for q in qs]
    assert inf.generate(qs, batch_size=bs, max_new_tokens=6, progress=False) == single


def test_vlm_padding_and_text_only(models_dir):
    inf = Inferencer(models_dir / 'llava')
    assert inf.backend_name == 'llava_next'
    g = make_geometry(5, seed=2)
    ps, ims = [geometry_prompt(p, c) for p, c in zip(g.problem, g.choices)], [i[0] for i in g.images]
    single = [inf.generate([p], [i], max_new_tokens=4, progress=False)[0] for p, i in zip(ps, ims)]
    assert inf.generate(ps, ims, batch_size=5, max_new_tokens=4, progress=False) == single
    # mixed batch: prompts with and without an image
    mixed = inf.generate(ps[:2] + ['hello'], ims[:2] + [None], batch_size=3, max_new_tokens=4, progress=False)
    assert mixed[:2] == single[:2] and isinstance(mixed[2], str)


def test_cli_end_to_end_parquet(models_dir, tmp_path):
    from vlm_merge.cli import main
    g = make_geometry(6, seed=3); write_geometry_parquet(g, tmp_path / 'geo.parquet')
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(io.StringIO()):
        rc = main(['infer', '--task', 'multimodal', '--model_path', str(models_dir / 'llava'), '--data', str(tmp_path / 'geo.parquet'),
                   '--batch_size', '3', '--max_new_tokens', '3', '--out_file', str(tmp_path / 'out.parquet')])
    assert rc == 0
    s = json.loads(buf.getvalue())
    out = pd.read_parquet(tmp_path / 'out.parquet')
    assert s['n'] == 6 and len(out) == 6 and abs(s['accuracy'] - out.correct.mean()) < 1e-9
    assert {'prediction', 'extracted', 'correct', 'images'} <= set(out.columns)


def test_gsm_default_file_and_limit(models_dir, tmp_path, monkeypatch):
    write_gsm_tsv(make_gsm(10, seed=4), tmp_path / 'mgsm_en.tsv')
    monkeypatch.chdir(tmp_path)
    df, s = evaluate(str(models_dir / 'llama'), 'gsm', None, limit=4, max_new_tokens=3, progress=False)
    assert s['n'] == 4 and s['backend'] == 'llama3' and df.gold.tolist() == [a.rsplit('#### ', 1)[1] for a in make_gsm(10, seed=4).answer[:4]]
    with pytest.raises(FileNotFoundError, match='mgsm_fr.tsv'): evaluate(str(models_dir / 'llama'), 'gsm', None, lang='fr', progress=False)


def test_perplexity_padding_invariant(models_dir):
    inf = Inferencer(models_dir / 'llama')
    texts = [a.replace('\n', ' ') for a in make_gsm(10, seed=6).answer]
    a, b = perplexity(inf, texts, batch_size=10), perplexity(inf, texts, batch_size=1)
    assert abs(a - b) < 1e-4 * a
    with pytest.raises(ValueError, match='no texts'): perplexity(inf, [])


def test_errors(models_dir):
    with pytest.raises(ValueError, match='unknown backend'): Inferencer(models_dir / 'llama', backend='gpt9')
    assert detect_backend({'model_type': 'idefics3'}) == 'idefics3'


@pytest.mark.parametrize('sep', ['', '\n', ' '])
def test_geometry3k_image_placeholder_in_problem_text(models_dir, sep):
    "Issue 18 item 9: '<image>' in the problem text (Geometry3K's form) gives a LLaVA processor no second image token."
    inf = Inferencer(models_dir / 'llava')
    g = make_geometry(2, seed=3)
    p, im = geometry_prompt(g.problem[0], g.choices[0]), g.images[0][0]
    with_ph = inf.format('<image>' + sep + p, with_image=True)
    assert with_ph == inf.format(p, with_image=True) and with_ph.count('<image>') == 1
    e1, e2 = inf.encode([with_ph], [im]), inf.encode([inf.format(p, with_image=True)], [im])
    assert torch.equal(e1['input_ids'], e2['input_ids'])
    assert inf.generate(['<image>' + sep + p], [im], max_new_tokens=3, progress=False) == inf.generate([p], [im], max_new_tokens=3, progress=False)


def test_data_flag_takes_a_zoo_file_name_from_any_folder(tmp_path, monkeypatch, capsys):
    "A merged folder is not a zoo model: without mgsm_en.tsv here the default is refused in one line naming --data; "
    "`--data mgsm_en.tsv` then finds the zoo's file from any working folder."
    import shutil
    from vlm_merge.cli import main
    from vlm_merge.zoo import zoo_path
    model = tmp_path/'merged'; shutil.copytree(zoo_path('base-lm'), model)
    monkeypatch.chdir(tmp_path)
    assert main(['infer', '--model_path', str(model), '--task', 'gsm', '--limit', '2']) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('vlm-merge infer: error: no GSM data') and '--data' in err[0], err
    assert main(['infer', '--model_path', str(model), '--task', 'gsm', '--limit', '2', '--data', 'mgsm_en.tsv']) == 0
    assert '"n": 2' in capsys.readouterr().out
