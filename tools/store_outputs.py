"""Execute a notebook in place to store its outputs for the docs site, skipping the cells you name.

    python tools/store_outputs.py nbs/03_zoo.ipynb --skip 'build_zoo(Path'

Runs every code cell in order in one kernel (slow cells included: their outputs are what the site shows),
except cells whose source contains one of the `--skip` strings (for example a cell that rebuilds the zoo):
those keep no output. Then clean the notebook with `nbdev_clean --fname NB`.
"""
import argparse, sys, time
from pathlib import Path
import nbformat
from nbclient import NotebookClient


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('notebook')
    p.add_argument('--skip', action='append', default=[], help='skip cells whose source contains this string')
    p.add_argument('--timeout', type=int, default=3600, help='seconds per cell')
    a = p.parse_args(argv)
    path = Path(a.notebook); nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, timeout=a.timeout, kernel_name='python3', resources={'metadata': {'path': str(path.parent)}})
    t0 = time.time()
    with client.setup_kernel():
        for i, cell in enumerate(nb.cells):
            if cell.cell_type != 'code': continue
            if any(s in cell.source for s in a.skip): cell.outputs = []; cell.execution_count = None; continue
            t = time.time(); client.execute_cell(cell, i)
            if time.time() - t > 30: print(f'cell {i}: {time.time() - t:.0f}s', file=sys.stderr)
    nbformat.write(nb, path)
    print(f'{path}: executed in {time.time() - t0:.0f}s')


if __name__ == '__main__': main()
