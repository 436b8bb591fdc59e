"""Where the zoo VLMs' perception misses come from: reading the figure, or answering the question.

For each VLM: perception accuracy on the held-out figures, the share whose whole labels line is read right
under 'Read the labels.', and, among the misses, how many read the labels right and how many answer with
another label's value; accuracy by shape. For each base: the same questions with the labels stated in
words (the skill a VLM's light stage 2 has to connect to the image).

    python benchmarks/zoo_vlm_errors.py                      # the three zoo VLMs and the two bases, 200 rows
    python benchmarks/zoo_vlm_errors.py --vlms vlm-llava --bases base-lm --rows 100

(On the zoo's first build. Its VLMs were retrained on 7 December as these measurements suggested: stage 2 of 1800 steps for vlm-llava and 2400 for wide-vlm, vlm-2 with 8-pixel patches and a tower stage 0 of 3000 steps; 'shipped' below means the first build.)
Measured on the zoo shipped on 7 December 2026 (200 rows, one thread):
    vlm-llava: perception 0.845, labels read right 0.995; misses 31: read right 30, another label's value 19
    vlm-2:     perception 0.970, labels read right 0.985; misses 6: read right 5, another label's value 2
    wide-vlm:  perception 0.780, labels read right 0.995; misses 44: read right 43, another label's value 24
    base-lm answers the questions from words at 0.61, wide-base at 0.26 (100 rows)
"""
import argparse, json, sys
from pathlib import Path
import pandas as pd, torch

sys.path.insert(0, str(Path(__file__).parent))
import zoo_chain_transfer as T   # noqa: E402
from vlm_merge import zoo as Z
from vlm_merge.inference import evaluate


def vlm_errors(name:str, rows:int) -> str:
    "One line: perception, reading, and what the misses are."
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path, tok = str(Z.zoo_path(name)), Z.zoo_tokenizer()
    P = pd.read_parquet(Z.zoo_data_path('geometry_perception.parquet')).head(rows)
    m = AutoModelForImageTextToText.from_pretrained(path, dtype=torch.float32).eval()
    read = T.labels_read(m, AutoProcessor.from_pretrained(path), tok, P)
    df, s = evaluate(path, 'multimodal', P, batch_size=50, progress=False)
    df['read'] = read
    labels = lambda f: {str(v) for k, v in json.loads(f).items() if k not in ('shape', 'asked', 'value')}
    miss = df[~df.correct]
    other = sum(p.replace('####', '').strip() in labels(f) for p, f in zip(miss.prediction, miss.figure))
    by_shape = df.groupby(df.figure.map(lambda f: json.loads(f)['shape'])).correct.mean().round(2).to_dict()
    return (f"{name}: perception {s['accuracy']:.3f}, labels read right {df.read.mean():.3f}; misses {len(miss)}: "
            f"read right {int(miss.read.sum())}, another label's value {other}; by shape {by_shape}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--vlms', default='vlm-llava,vlm-2,wide-vlm', help='zoo VLMs, comma-separated')
    p.add_argument('--bases', default='base-lm,wide-base', help='zoo text models scored on the questions in words')
    p.add_argument('--rows', type=int, default=200, help='held-out figures per model (the set holds 200)')
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    for v in filter(None, a.vlms.split(',')): print(vlm_errors(v, a.rows), flush=True)
    for b in filter(None, a.bases.split(',')):
        print(f"{b}: from words {T.text_scores(str(Z.zoo_path(b)), Z.zoo_tokenizer(), min(a.rows, 100))}", flush=True)


if __name__ == '__main__': main()
