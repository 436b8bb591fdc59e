"""Per-layer blends of a zoo VLM's language model with reason-lm's: can weights chosen per layer and per kind of
tensor chain reading and computing where one weight for all cannot?

Each candidate gives every group of language-model tensors (attention and MLP of each layer, the embeddings, the
head with the final norm) its own weight of the VLM, from {1.0, 0.8, ..., 0.0}, and blends in place (AdaMMS's
`Blender`, the reasoner's weights mapped by `map_models`). Candidates are drawn at random (seed 0) and scored on
validation figures of another seed than the test sets (none in a training table or a test set, 100 a kind). The
best by chain accuracy among those that keep 90% of the VLM's validation perception is then scored on the zoo's
200 held-out test rows of each kind. One thread; each candidate takes about 2 s.

    python benchmarks/zoo_layer_blend.py --n 150          # about 5 min on an idle core

Measured (7 December 2026, the bfloat16 zoo, vlm-llava + reason-lm, 150 candidates): the VLM alone reads 1.00 of
the validation figures and answers 0.06 of the chain questions. Only 3 of the 150 candidates keep 90% of its
perception, and they answer 0.07-0.08 of the chain questions. The chosen one (attention of layer 1 and the MLP of
layer 3 moved most towards the reasoner) scores 0.945 perception and 0.11 chain on the test rows, against 0.995 and
0.04 for the VLM: +7 points, the issue's target being +20. The most chain any candidate answered was 0.21, at
0.38 perception: per-layer weights move along the same trade-off as one weight (`11_adamms`: 0.14 at 0.60).
"""
from __future__ import annotations
import argparse, json, random, re, time
import pandas as pd, torch
from vlm_merge import zoo as Z
from vlm_merge.adamms import Blender, map_models
from vlm_merge.inference import evaluate
from zoo_vlm_curve import validation_rows   # benchmarks/, first on the path when run as a script


def group(canon:str) -> str:
    "The blend group of a canonical tensor name: L<i>a (attention and its norm), L<i>m (MLP and its norm), emb, head."
    g = re.search(r'layers\.(\d+)\.(\w+?)_', canon)
    if g: return f"L{g.group(1)}{'a' if g.group(2) in ('attn', 'input') else 'm'}"
    return 'emb' if canon.startswith('embed') else 'head'


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    p.add_argument('--vlm', default='vlm-llava'); p.add_argument('--llm', default='reason-lm')
    p.add_argument('--n', type=int, default=150, help='random candidates')
    p.add_argument('--keep', type=float, default=0.9, help="share of the VLM's validation perception a candidate must keep")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    TP, TC = (pd.read_parquet(Z.zoo_data_path(f'geometry_{k}.parquet')) for k in ('perception', 'chain'))
    VP, VC = validation_rows(100, TP, kind='perception'), validation_rows(100, TC, kind='chain')
    bl = Blender(map_models(a.vlm, a.llm)); G = sorted({group(c) for c, *_ in bl.params})
    def blend(w):
        with torch.no_grad():
            for c, prm, t, s in bl.params: torch.lerp(s, t, w[group(c)], out=prm.data)
    def score(P, C):
        return tuple(evaluate(bl.inf, 'multimodal', d, batch_size=50, max_new_tokens=n, progress=False)[1]['accuracy'] for d, n in ((P, 16), (C, 64)))
    t0, r = time.time(), random.Random(0)
    blend({g: 1.0 for g in G}); p0, c0 = score(VP, VC); floor = a.keep * p0
    print(json.dumps({'groups': G, 'vlm_validation': [p0, c0], 'perception_floor': floor}), flush=True)
    best, kept = None, 0
    for i in range(a.n):
        w = {g: r.choice([1.0, 0.8, 0.6, 0.4, 0.2, 0.0]) for g in G}
        blend(w); pv, cv = score(VP, VC); kept += pv >= floor
        if pv >= floor and (best is None or cv > best[2]): best = (w, pv, cv)
    if best is None: print(json.dumps({'kept_perception': 0, 'n': a.n})); return
    blend(best[0]); tp, tc = score(TP, TC); blend({g: 1.0 for g in G}); bp, bc = score(TP, TC)
    print(json.dumps({'chosen': best[0], 'validation': best[1:], 'test': [tp, tc], 'vlm_test': [bp, bc],
                      'kept_perception': kept, 'n': a.n, 'seconds': round(time.time() - t0)}), flush=True)


if __name__ == '__main__': main()
