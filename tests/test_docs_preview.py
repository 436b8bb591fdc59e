"""The docs preview (tools/preview_docs.py) renders every processed notebook, and each page, opened in
headless Chromium, renders and shows the notebook's stored figures. One screenshot per page goes to _preview/."""
import json, re, shutil, subprocess, sys, tempfile
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path('/usr/bin/chromium')
sys.path.insert(0, str(ROOT/'tools'))
import preview_docs as pd

needs_chromium = pytest.mark.skipif(not CHROMIUM.exists(),
    reason='/usr/bin/chromium is absent (Debian package `chromium`; .ci/run installs it): no headless browser to open the pages')

FLAGS = ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
         '--disable-background-networking', '--disable-component-update', '--disable-sync']

def _chromium(*args, timeout=60):
    with tempfile.TemporaryDirectory() as prof:
        return subprocess.run([str(CHROMIUM), *FLAGS, f'--user-data-dir={prof}', *args],
                              capture_output=True, text=True, timeout=timeout)

def _n_png(nb:Path) -> int:
    cells = json.loads(nb.read_text(encoding='utf-8'))['cells']
    return sum('image/png' in o.get('data', {}) for c in cells for o in c.get('outputs', []))

@pytest.fixture(scope='module')
def pages():
    if not pd.notebooks():
        r = subprocess.run([sys.executable, str(ROOT/'tools'/'proc_docs.py')], cwd=ROOT, capture_output=True, text=True)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    out = pd.render(use_quarto=shutil.which('quarto') is not None)
    assert len(out) == len(pd.notebooks()), 'a processed notebook has no page'
    return {nb: pd.OUT/pd.page_name(nb) for nb in pd.notebooks()}

def test_every_page_holds_its_figures(pages):
    "Without a browser: each page's HTML has at least as many <img> (the badge aside) as its notebook stores PNGs."
    for nb, page in pages.items():
        imgs = [t for t in re.findall(r'<img\b[^>]*>', page.read_text(encoding='utf-8')) if 'colab-badge' not in t]
        assert len(imgs) >= _n_png(nb), f'{page.name}: {len(imgs)} <img>, {_n_png(nb)} stored figures in {nb.name}'

@needs_chromium
def test_every_page_renders_and_shows_its_figures(pages):
    bad = []
    for nb, page in pages.items():
        url = page.resolve().as_uri()
        dom = _chromium('--dump-dom', url)
        if dom.returncode != 0 or '<body' not in dom.stdout: bad.append(f'{page.name}: no DOM ({dom.stderr[-300:]})'); continue
        imgs = [t for t in re.findall(r'<img\b[^>]*>', dom.stdout) if 'colab-badge' not in t]   # the badge is not a figure
        n_img, n_png = len(imgs), _n_png(nb)
        if n_img < n_png: bad.append(f'{page.name}: {n_img} <img> on the page, {n_png} stored figures in {nb.name}')
        shot = pd.OUT/(page.stem + '.png')
        _chromium(f'--screenshot={shot}', '--window-size=1200,1600', url)
        if not shot.exists() or shot.stat().st_size < 1000: bad.append(f'{page.name}: no screenshot')
    assert not bad, '\n'.join(bad)
