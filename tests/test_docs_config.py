"""The docs site lists every notebook, in order, and the README is the index notebook."""
import re, subprocess, sys
from pathlib import Path
import yaml

ROOT = Path(__file__).resolve().parents[1]

def _sidebar_entries(node):
    if isinstance(node, str): yield node
    elif isinstance(node, list):
        for x in node: yield from _sidebar_entries(x)
    elif isinstance(node, dict):
        yield from _sidebar_entries(node.get('contents', []))

def test_sidebar_lists_every_notebook_in_order():
    side = yaml.safe_load((ROOT/'nbs'/'sidebar.yml').read_text())
    listed = list(_sidebar_entries(side['website']['sidebar']['contents']))
    nbs = sorted(p.name for p in (ROOT/'nbs').glob('*.ipynb') if not p.name.startswith('_'))
    assert sorted(listed) == nbs, f'sidebar.yml and nbs/ differ: {set(listed) ^ set(nbs)}'
    numbered = [n for n in listed if re.match(r'\d\d_', n)]
    assert numbered == sorted(numbered), 'numbered notebooks must appear in order'
    assert listed[0] == 'index.ipynb'

def test_custom_sidebar_is_on():
    # nbdev regenerates sidebar.yml (listing stray files) unless custom_sidebar is set
    assert re.search(r'^custom_sidebar\s*=\s*True', (ROOT/'settings.ini').read_text(), re.M)

def test_readme_is_generated_from_index():
    r = subprocess.run([sys.executable, str(ROOT/'tools'/'readme.py'), '--check'], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
