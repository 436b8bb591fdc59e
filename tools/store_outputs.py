"""Execute a notebook in place to store its outputs for the docs site, skipping the cells you name.

    python tools/store_outputs.py nbs/03_zoo.ipynb --skip 'build_zoo(Path'

Runs every code cell in order in one kernel (slow cells included: their outputs are what the site shows),
except cells whose source contains one of the `--skip` strings (for example a cell that rebuilds the zoo):
those keep no output. Progress bars written to stderr are dropped. Then clean the notebook with `nbdev_clean --fname NB`.
"""
import argparse, os, re, sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


NOISE = re.compile(r'(Loading weights|Writing model shards|Fetching \d+ files).*it/s')   # progress bars, not results


def _noise(o) -> bool:
    "A progress bar: a tqdm widget (its state is not stored, so it shows as text) or stderr lines that are only bars."
    if 'application/vnd.jupyter.widget-view+json' in o.get('data', {}): return True
    return (o.get('output_type') == 'stream' and o.get('name') == 'stderr'
            and all(NOISE.search(l) or not l.strip() for l in o.get('text', '').splitlines()))


def strip_noise(nb) -> int:
    "Drop progress-bar outputs; returns how many were dropped."
    n = 0
    for cell in nb.cells:
        if cell.cell_type != 'code': continue
        keep = [o for o in cell.get('outputs', []) if not _noise(o)]
        n += len(cell.outputs) - len(keep); cell.outputs = keep
    return n


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('notebook')
    p.add_argument('--skip', action='append', default=[], help='skip cells whose source contains this string')
    p.add_argument('--timeout', type=int, default=3600, help='seconds per cell')
    p.add_argument('--strip-only', action='store_true', help='do not execute: only drop progress-bar noise from stored outputs')
    p.add_argument('--keep-going', action='store_true', help='run every cell even after one fails (its error is stored); exit 1 naming the failed cells')
    a = p.parse_args(argv)
    path = Path(a.notebook); nb = nbformat.read(path, as_version=4)
    if a.strip_only:
        print(f'{path}: {strip_noise(nb)} progress-bar outputs dropped'); nbformat.write(nb, path); return
    os.environ.pop('MPLBACKEND', None)   # the kernel must use its inline backend: with Agg no figure is stored
    client = NotebookClient(nb, timeout=a.timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}})
    t0 = time.time(); failed = []
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code': continue
            if any(s in cell.source for s in a.skip): cell.outputs = []; cell.execution_count = None; continue
            t = time.time()
            try: client.execute_cell(cell, i)
            except CellExecutionError as e:
                if not a.keep_going: raise
                failed.append(i); print(f'cell {i} failed: {str(e).strip().splitlines()[-1][:300]}', file=sys.stderr)
            if time.time() - t > 30: print(f'cell {i}: {time.time() - t:.0f}s', file=sys.stderr)
    strip_noise(nb); nbformat.write(nb, path)
    print(f'{path}: executed in {time.time() - t0:.0f}s' + (f'; cells that failed: {failed}' if failed else ''))
    if failed: sys.exit(1)


if __name__ == '__main__': main()
