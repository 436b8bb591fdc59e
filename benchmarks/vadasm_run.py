"""Time a whole V-ADASM run on the zoo against issue 15's target: at least 60 evaluations in at most 5 minutes on 2 CPU cores.

    python benchmarks/vadasm_run.py                                  # reason-lm <- wide-vlm, 60 evaluations, 2 threads
    python benchmarks/vadasm_run.py --small base-lm --evals 90 --threads 1

Prints the seconds of each phase (prepare: load, calibrate, align, map; search; test: both parameter sets on the held-out
split; write), the evaluations made, the validation and test scores, and the load average before and after: on a shared
machine the wall time depends on the other processes, so read it beside the load.
"""
from __future__ import annotations
import argparse, json, os, tempfile, time, warnings
from pathlib import Path
import torch, transformers
from vlm_merge.vadasm import vadasm


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--small', default='reason-lm'); p.add_argument('--large', default='wide-vlm')
    p.add_argument('--evals', type=int, default=60); p.add_argument('--budget-s', type=float, default=240)
    p.add_argument('--threads', type=int, default=2); p.add_argument('--no-vision', action='store_true')
    a = p.parse_args(argv)
    transformers.logging.set_verbosity_error(); warnings.filterwarnings('ignore'); torch.set_num_threads(a.threads)
    load0 = os.getloadavg(); t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        res = vadasm(a.small, a.large, Path(d) / 'out', no_vision=a.no_vision, budget_evals=a.evals, budget_s=a.budget_s, progress=False)
    wall = time.perf_counter() - t0
    out = dict(small=a.small, large=a.large, threads=a.threads, wall_s=round(wall, 1), target_s=300, met=bool(wall <= 300 and len(res.history) >= 60),
               load_before=round(load0[0], 2), load_after=round(os.getloadavg()[0], 2), **{k: v for k, v in res.summary().items() if k != 'out'})
    print(json.dumps(out))


if __name__ == '__main__': main()
