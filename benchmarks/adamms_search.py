"""Cost of the AdaMMS search: a 7-point search against the 7 generation passes alone, in the same run.

    python benchmarks/adamms_search.py                                   # zoo: vlm-2 into vlm-llava, 100 perception rows
    python benchmarks/adamms_search.py --target T --source S --data F    # any pair `map_models` accepts

The peer is the work the search cannot avoid: 7 generation passes over the same rows at the same alphas
(`adamms.generations`; the model is blended before each pass, outside the timing, so both generate the same tokens). The search adds blending each alpha in place, the change measures and the
rule. The target of issue 14 is search / generation <= 1.30. The two are interleaved `--reps` times and the
medians are compared, so load from other processes hits both alike; the load average is printed beside them.
"""
from __future__ import annotations
import argparse, os, statistics, time, warnings
import pandas as pd, torch, transformers
import shutil, tempfile
from pathlib import Path
from vlm_merge.adamms import Blender, generations, map_models, merge_config, parse_grid, search_alpha
from vlm_merge.engine import run_merge
from vlm_merge.inference import Inferencer
from vlm_merge.zoo import zoo_data_path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--target', default='vlm-llava'); p.add_argument('--source', default='vlm-2')
    p.add_argument('--data', default=None, help="parquet / TSV (default: the zoo's perception questions)")
    p.add_argument('--grid', default='1.0:0.4:0.1'); p.add_argument('--limit', type=int, default=100)
    p.add_argument('--reps', type=int, default=3); p.add_argument('--threads', type=int, default=1)
    p.add_argument('--device', default='cpu')
    a = p.parse_args(argv)
    transformers.logging.set_verbosity_error(); warnings.filterwarnings('ignore')
    torch.set_num_threads(a.threads)
    df = pd.read_parquet(a.data or zoo_data_path('geometry_perception.parquet')) if not str(a.data).endswith('.tsv') else pd.read_csv(a.data, sep='\t')
    df = df.head(a.limit)
    grid = parse_grid(a.grid)
    m = map_models(a.target, a.source)
    bl = Blender(m, device=a.device)

    def gen_only() -> float:
        "Seconds of the 7 generation passes at the grid's alphas; the blending between them is not timed."
        t = 0.0
        for x in grid:
            bl.set_alpha(x); t0 = time.perf_counter(); generations(bl.inf, df); t += time.perf_counter() - t0
        return t
    def search(): search_alpha(m, df, grid, limit=None, labels=False, blender=bl)

    gen_only()   # warm-up
    tg, ts = [], []
    for _ in range(a.reps):
        tg.append(gen_only())
        t0 = time.perf_counter(); search(); ts.append(time.perf_counter() - t0)
    g, s = statistics.median(tg), statistics.median(ts)
    print(f'pair: {a.source} into {a.target}  grid: {len(grid)} alphas  rows: {len(df)}  device: {a.device}  threads: {a.threads}')
    print(f'{len(grid)} generation passes alone : {g:7.2f} s (median of {a.reps})')
    print(f'search (blend + generate + rule): {s:7.2f} s (median of {a.reps})')
    print(f'ratio search / generation       : {s / g:7.3f}   (target <= 1.30)   load average: {os.getloadavg()[0]:.2f}')
    tmp = Path(tempfile.mkdtemp(prefix='adamms_bench_'))
    try:   # the seed's way: write a checkpoint per alpha and load it again (generation not included)
        t0 = time.perf_counter()
        for x in grid:
            run_merge(merge_config(m, x), tmp/f'a{x:g}', progress=False); Inferencer(tmp/f'a{x:g}', device=a.device)
        w = time.perf_counter() - t0
        t0 = time.perf_counter()
        for x in grid: bl.set_alpha(x)
        b = time.perf_counter() - t0
    finally: shutil.rmtree(tmp, ignore_errors=True)
    print(f'per-alpha write + reload (seed) : {w:7.3f} s for {len(grid)} alphas; in-place blending: {b:7.4f} s; ratio {w / b:,.0f}x')


if __name__ == '__main__': main()
