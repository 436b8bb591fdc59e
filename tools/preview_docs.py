"""Render every processed notebook (nbdev's `_proc`, made by `python tools/proc_docs.py`) to HTML in `_preview/`.

With quarto on the PATH this is `quarto render _proc --output-dir ../_preview` (the real site);
without it, each `_proc/*.ipynb` is converted with nbconvert's HTML exporter (stored outputs,
figures embedded as data: images) to `_preview/<page>.html`, named the way nbdev names pages
(`00_anatomy.ipynb` -> `anatomy.html`). Exits non-zero on the first page that fails.

    python tools/proc_docs.py && python tools/preview_docs.py [--quarto|--nbconvert]
"""
import re, shutil, subprocess, sys, time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROC, OUT = ROOT/'_proc', ROOT/'_preview'

def page_name(nb:Path) -> str:
    "nbdev's page name for a notebook (as `nbdev.doclinks._nbpath2html`)."
    return re.sub(r'^\d+[a-zA-Z0-9]*_', '', nb.name.lower()).rsplit('.', 1)[0] + '.html'

def notebooks(proc:Path=PROC) -> list[Path]:
    return sorted(p for p in proc.glob('*.ipynb') if not p.name.startswith('_'))

def render_nbconvert(proc:Path=PROC, out:Path=OUT) -> list[Path]:
    import nbformat
    from nbconvert import HTMLExporter
    exp = HTMLExporter(template_name='lab')
    exp.exclude_input_prompt = exp.exclude_output_prompt = True
    pages = []
    for nb in notebooks(proc):
        node = nbformat.read(nb, as_version=4)
        html, _ = exp.from_notebook_node(node, resources={'metadata': {'name': nb.stem}})
        page = out/page_name(nb)
        page.write_text(html, encoding='utf-8'); pages.append(page)
    return pages

def render_quarto(proc:Path=PROC, out:Path=OUT) -> list[Path]:
    subprocess.run(['quarto', 'render', str(proc), '--output-dir', str(out)], check=True)
    return [out/page_name(nb) for nb in notebooks(proc) if (out/page_name(nb)).exists()]

def render(use_quarto:bool|None=None) -> list[Path]:
    if not PROC.is_dir() or not notebooks(): sys.exit(f'FAIL: no notebooks in {PROC}: run `python tools/proc_docs.py` first')
    if use_quarto is None: use_quarto = shutil.which('quarto') is not None
    OUT.mkdir(exist_ok=True)
    return (render_quarto if use_quarto else render_nbconvert)()

if __name__ == '__main__':
    t = time.time()
    q = True if '--quarto' in sys.argv else False if '--nbconvert' in sys.argv else None
    pages = render(q)
    print(f'rendered {len(pages)} pages into {OUT} in {time.time()-t:.1f}s')
