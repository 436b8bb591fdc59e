"""Trials for the next zoo's VLM recipe: does reasoning merged into a lightly fine-tuned VLM chain with its reading?

Each trial starts from the shipped zoo and retrains only what it changes (one thread, fixed seeds):

1. the base (optional): base-lm's pretraining continued on its own mixture with more figure questions stated
   in words (`--base-steps`, `--base-geo`; held-out figures removed from the new rows);
2. a reasoner (optional): a light fine-tune of that base on reason-lm's data (`--reason-steps`, `--reason-lr`);
3. a VLM the LLaVA way on that base, from the shipped vlm-llava's tower and projector: stage 1 with the language
   model frozen (`--align`; `--tower-lr` > 0 also trains the tower, as Qwen2-VL's stage 1 does), then a light
   stage 2 (`--s2`, `--s2-lr`) with text replay of the base's pretraining documents (`--replay`, LLaVA-1.5's mix;
   `--replay-figures`: only those about figures);
   `--image-last` renders the image after the question text (the zoo's chat template puts it first);
   `--labels-first` makes every perception answer read all labels before the value ('left 50 right 40\\n#### 40');
4. task arithmetic of the reasoner into the VLM at each `--weights`, on the base (`--methods` adds TIES and DARE-TIES
   at density 0.5, as in `09a_zoo_merges`).

Scores (100 held-out rows each, greedy): perception and chain questions with the figure, and `read`: the exact
labels line under 'Read the labels.'. The last line is JSON. The table "Lighter VLMs, measured" in
`09a_zoo_merges` lists the trials; each row names its flags, e.g.

    python benchmarks/zoo_chain_transfer.py t8 --tower-lr 1e-3              # 6-8 min on one thread
    python benchmarks/zoo_chain_transfer.py x1 --base-steps 800 --base-geo 6000 --reason-steps 400 --tower-lr 1e-3
    python benchmarks/zoo_chain_transfer.py ilf --tower-lr 1e-3 --image-last --labels-first --s2 600 --s2-lr 5e-4
    python benchmarks/zoo_chain_transfer.py rflH --tower-lr 1e-3 --image-last --labels-first --replay-figures --s2 600 \
        --s2-lr 5e-4 --reason-steps 1000 --reason-lr 1e-3 --reason-given-labels

The base trials of `03_zoo` ("What the next rebuild should change"), the shipped VLM recipe on a continued base:

    python benchmarks/zoo_chain_transfer.py bg6 --base-steps 800 --base-geo 6000 --align 400 --s2 1200 --s2-lr 1e-3 \
        --replay 0 --weights 1.0 --n 200        # ctl: no --base-*; bs8: --base-steps 800 only; bg6s6: --s2 600
"""
import argparse, copy, json, os, random, sys, time
from pathlib import Path
import pandas as pd, torch
import vlm_merge.zoo_recipe as R
from vlm_merge import zoo as Z
from vlm_merge.data import geometry_prompt, is_correct_choice, text_problem, to_pil
from vlm_merge.engine import run_merge
from vlm_merge.inference import evaluate

def _args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('tag', help='name of this trial: its models go to OUT/TAG-*')
    ap.add_argument('--out', default='/tmp/zoo_chain_transfer', help='folder for the trial models')
    ap.add_argument('--base-steps', type=int, default=0, help="steps of continued pretraining of base-lm (0: the shipped base-lm)")
    ap.add_argument('--base-geo', type=int, default=Z.ZOO_SIZES['base_geo'], help='figure questions stated in words in that mixture')
    ap.add_argument('--base-given-labels', type=int, default=0, help='chain solutions in that mixture whose labels line is given (no loss on it, no labels in words)')
    ap.add_argument('--reason-steps', type=int, default=0, help="steps of a light reasoner fine-tune (0: the shipped reason-lm)")
    ap.add_argument('--reason-lr', type=float, default=5e-4, help='its peak learning rate')
    ap.add_argument('--reason-given-labels', action='store_true', help="half the reasoner's chain questions without the labels in words, their labels line given (no loss on it)")
    ap.add_argument('--align', type=int, default=800, help='stage 1 steps (language model frozen)')
    ap.add_argument('--align-lr', type=float, default=Z.VISION_LR, help="stage 1's peak learning rate (projector)")
    ap.add_argument('--tower-lr', type=float, default=0.0, help="stage 1's peak learning rate for the tower (0: frozen)")
    ap.add_argument('--s2', type=int, default=200, help='stage 2 steps (language model trained)')
    ap.add_argument('--s2-lr', type=float, default=3e-4, help="stage 2's peak learning rate")
    ap.add_argument('--replay', type=float, default=0.5, help='text documents replayed in stage 2, per image example')
    ap.add_argument('--replay-figures', action='store_true', help="replay only the pretraining documents about figures (questions, reading and chain solutions in words)")
    ap.add_argument('--labels-first', action='store_true', help='perception answers read every label before the value')
    ap.add_argument('--image-last', action='store_true', help="the chat template puts the image after the question, next to the answer")
    ap.add_argument('--weights', type=float, nargs='+', default=[1.0, 0.5], help="the reasoner's weights in the merges")
    ap.add_argument('--methods', nargs='+', default=['task_arithmetic'], choices=['task_arithmetic', 'ties', 'dare_ties'],
                    help="merge methods (ties and dare_ties at density 0.5, as in 09a)")
    ap.add_argument('--n', type=int, default=100, help='held-out rows per score')
    return ap.parse_args(argv)

IMAGE_LAST_TEMPLATE = R.CHAT_TEMPLATE.replace(
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}",
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% endif %}{% endfor %}")
assert IMAGE_LAST_TEMPLATE != R.CHAT_TEMPLATE

def _save(model, tok, path, proc=None):
    model.generation_config.update(do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                                   bos_token_id=tok.bos_token_id, max_new_tokens=64)
    model.save_pretrained(path); tok.save_pretrained(path)
    if proc is not None: proc.save_pretrained(path)
    return str(path)

def held_out_figures() -> set:
    "Every figure of the zoo's test sets: rows drawn for a new mixture must not hold them."
    return {f for k in ('perception', 'chain', 'reasoning') for f in pd.read_parquet(Z.zoo_data_path(f'geometry_{k}.parquet')).figure}

def given_labels_example(tok, problem:str, choices, figure:str) -> dict:
    "A chain question (no labels stated in words) with its worked answer, whose labels line is given: no loss on it."
    from vlm_merge.data import geometry_solution, figure_labels
    e = R.encode_example(tok, geometry_prompt(problem, list(choices)), geometry_solution(figure))
    lab = tok(figure_labels(figure), add_special_tokens=False)['input_ids']
    k = next(j for j, l in enumerate(e['labels']) if l != -100)
    if e['input_ids'][k:k + len(lab)] == lab: e['labels'] = e['labels'][:k] + [-100] * len(lab) + e['labels'][k + len(lab):]
    return e

def continue_base(tok, steps:int, geo:int, given:int=0, seed:int=7):
    "base-lm's pretraining continued for `steps` on its mixture drawn anew (seed `seed`) with `geo` figure questions in words and `given` chain solutions from a given labels line."
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(Z.zoo_path('base-lm'), dtype=torch.float32)
    held, tt = held_out_figures(), Z._train_table
    def dedup(kind, s, sizes):
        t = tt(kind, s, sizes)
        return t[~t.figure.isin(held)].reset_index(drop=True) if 'figure' in t else t
    Z._train_table = dedup
    try: docs = Z.pretraining_mix(seed, {**Z.ZOO_SIZES, 'base_geo': geo})
    finally: Z._train_table = tt
    exs = [R.encode_example(tok, d['prompt'], d['answer']) for d in docs]
    if given:
        from vlm_merge.data import make_geometry
        ch = make_geometry(given * 2, seed=seed + 16, kind='chain'); ch = ch[~ch.figure.isin(held)].head(given)
        exs += [given_labels_example(tok, p, c, f) for p, c, f in zip(ch.problem, ch.choices, ch.figure)]
    R.train_model(base, exs, tok.pad_token_id,
                  steps=steps, batch_size=32, lr=Z.FT_LR, seed=seed, desc='base+')
    return base

def reason_examples(tok, given_labels:bool=False) -> list:
    "reason-lm's training examples; with `given_labels`, every other chain question loses its labels in words and its answer's labels line is masked from the loss."
    if not given_labels: return Z._train_examples('reason', tok, 0)
    from vlm_merge.data import gsm_prompt, geometry_solution, figure_labels
    g, ch = Z._train_table('gsm', 0, Z.ZOO_SIZES), Z._train_table('chain', 0, Z.ZOO_SIZES)
    exs = [R.encode_example(tok, gsm_prompt(q), a) for q, a in zip(g.question, g.answer)]
    for i, (p, c, f) in enumerate(zip(ch.problem, ch.choices, ch.figure)):
        e = R.encode_example(tok, geometry_prompt(text_problem(p, f), list(c)), geometry_solution(f))
        exs.append(given_labels_example(tok, p, c, f) if i % 2 else e)
    return exs

def text_scores(path, tok, n:int) -> dict:
    "A text model's accuracy on the figure questions with the labels stated in words, and on GSM."
    from transformers import AutoModelForCausalLM
    m, out = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), {}
    for kind in ('perception', 'chain'):
        df = pd.read_parquet(Z.zoo_data_path(f'geometry_{kind}.parquet')).head(n)
        prompts = [geometry_prompt(text_problem(q, f), list(c)) for q, f, c in zip(df.problem, df.figure, df.choices)]
        outs = R.greedy_generate(m, tok, prompts, max_new_tokens=64, batch_size=50)
        out[kind + '_in_words'] = sum(is_correct_choice(o, a, list(c)) for o, a, c in zip(outs, df.answer, df.choices)) / len(df)
    from vlm_merge.data import figure_labels   # the chain questions again (`df`), with the labels line given as the answer's start
    prompts = [R.chat_prompt(tok, geometry_prompt(q, list(c))) + figure_labels(f) for q, f, c in zip(df.problem, df.figure, df.choices)]
    enc = tok(prompts, return_tensors='pt', padding=True, add_special_tokens=False)
    with torch.no_grad(): g = m.generate(**enc, max_new_tokens=48, do_sample=False, pad_token_id=tok.pad_token_id)
    outs = tok.batch_decode(g[:, enc['input_ids'].shape[1]:], skip_special_tokens=True)
    out['chain_from_given_labels'] = sum(is_correct_choice(o, a, list(c)) for o, a, c in zip(outs, df.answer, df.choices)) / len(df)
    g = pd.read_csv(Z.zoo_data_path('mgsm_en.tsv'), sep='\t', dtype=str).head(n)
    out['gsm'] = evaluate(path, 'gsm', g, batch_size=50, max_new_tokens=64, progress=False)[1]['accuracy']
    return out

def labels_read(model, proc, tok, P:pd.DataFrame, batch:int=50) -> list:
    "Per figure of `P`: is the whole labels line, answered under 'Read the labels.', exactly right?"
    ok = []
    for i in range(0, len(P), batch):
        d = P.iloc[i:i + batch]
        enc = proc(text=[R.chat_prompt(tok, Z.READ_PROMPT, image=True)] * len(d), images=[to_pil(x[0]) for x in d.images], return_tensors='pt', padding=True)
        with torch.no_grad(): g = model.generate(**enc, max_new_tokens=24, do_sample=False)
        ok += [o.strip() == Z.reading_answer(f) for o, f in zip(tok.batch_decode(g[:, enc['input_ids'].shape[1]:], skip_special_tokens=True), d.figure)]
    return ok

def read_accuracy(path, tok, proc, n:int) -> float:
    "Share of held-out figures whose labels line under 'Read the labels.' is exactly right."
    from transformers import AutoModelForImageTextToText
    m = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    ok = labels_read(m, proc, tok, pd.read_parquet(Z.zoo_data_path('geometry_perception.parquet')).head(n))
    return sum(ok) / len(ok)

def vlm_scores(path, tok, proc, n:int) -> dict:
    "Perception and chain accuracy with the figure, and the reading accuracy."
    df = lambda k: pd.read_parquet(Z.zoo_data_path(f'geometry_{k}.parquet')).head(n)
    return {'perception': evaluate(path, 'multimodal', df('perception'), batch_size=50, progress=False)[1]['accuracy'],
            'chain': evaluate(path, 'multimodal', df('chain'), batch_size=50, max_new_tokens=64, progress=False)[1]['accuracy'],
            'read': read_accuracy(path, tok, proc, n)}

def main(argv=None):
    a = _args(argv); torch.set_num_threads(1); t0 = time.time(); out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoModelForCausalLM, AutoProcessor, LlavaForConditionalGeneration, PreTrainedTokenizerFast
    tok = PreTrainedTokenizerFast.from_pretrained(Z.zoo_path('base-lm')); proc = AutoProcessor.from_pretrained(Z.zoo_path('vlm-llava'))
    res = {'tag': a.tag, 'args': vars(a)}
    if a.image_last:
        tok.chat_template = proc.chat_template = IMAGE_LAST_TEMPLATE
        proc.tokenizer.chat_template = IMAGE_LAST_TEMPLATE
    if a.base_steps: base_path = _save(continue_base(tok, a.base_steps, a.base_geo, a.base_given_labels), tok, out / f'{a.tag}-base'); res['base'] = text_scores(base_path, tok, a.n)
    else: base_path = str(Z.zoo_path('base-lm'))
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    if a.reason_steps:
        r = copy.deepcopy(base)
        R.train_model(r, reason_examples(tok, a.reason_given_labels), tok.pad_token_id, steps=a.reason_steps, batch_size=32, lr=a.reason_lr, seed=0, desc='reason')
        reason_path = _save(r, tok, out / f'{a.tag}-reason'); res['reason'] = {'delta': Z.lm_delta_norm(r, base), **text_scores(reason_path, tok, a.n)}
    else: reason_path = str(Z.zoo_path('reason-lm'))
    if a.labels_first: Z.vision_answer = lambda letter, figure: Z.reading_answer(figure) + '\n#### ' + str(json.loads(figure)['value'])
    model = LlavaForConditionalGeneration.from_pretrained(Z.zoo_path('vlm-llava'), dtype=torch.float32)   # its tower and projector
    R.init_language_model(model, base)
    exs = Z._train_examples('perception', tok, 0, proc=proc)
    tower, proj = Z._vision_parts(model); dec, head = R._lm_of(model)
    tower.requires_grad_(a.tower_lr > 0); dec.requires_grad_(False); head.requires_grad_(False)
    if a.align: R.train_model(model, exs, tok.pad_token_id, steps=a.align, batch_size=32, lr=a.align_lr, seed=0, desc='stage 1',
                              lr_groups={'vision_tower': a.tower_lr} if a.tower_lr else None)
    tower.requires_grad_(False); dec.requires_grad_(True); head.requires_grad_(True)
    if a.replay:
        docs = Z.pretraining_mix(0, Z.ZOO_SIZES); random.Random(5).shuffle(docs)
        if a.replay_figures: docs = [d for d in docs if 'The figure is labelled' in (d['prompt'] or '')]
        exs = exs + [R.encode_example(tok, d['prompt'], d['answer']) for d in docs[:int(len(exs) * a.replay)]]
    if a.s2: R.train_model(model, exs, tok.pad_token_id, steps=a.s2, batch_size=32, lr=a.s2_lr, seed=1, desc='stage 2',
                           lr_groups={'multi_modal_projector': a.align_lr / 10})
    vlm_path = _save(model, tok, out / f'{a.tag}-vlm', proc)
    res['vlm'] = {'delta': Z.lm_delta_norm(model, base), **vlm_scores(vlm_path, tok, proc, a.n)}
    for m in a.methods:
        d = '' if m == 'task_arithmetic' else ', density: 0.5'
        for w in a.weights:
            cfg = (f"merge_method: {m}\nbase_model: {base_path}\nmodels:\n  - model: {vlm_path}\n    parameters: {{weight: 1.0{d}}}\n"
                   f"  - model: {reason_path}\n    parameters: {{weight: {w}{d}}}\ndtype: float32\nseed: 0\n")
            key = f'merged, reasoner weight {w}' if m == 'task_arithmetic' else f'{m}, reasoner weight {w}'
            res[key] = vlm_scores(str(run_merge(cfg, out / f'{a.tag}-{m}{w}', overwrite=True, progress=False)), tok, proc, a.n)
    res['seconds'] = round(time.time() - t0); res['loadavg'] = [round(x, 2) for x in os.getloadavg()]
    print(json.dumps(res))
    return res

if __name__ == '__main__': main()
