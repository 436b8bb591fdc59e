"""Building the zoo, at toy sizes: a rebuild of some models (`only=`) reproduces the full build's files bit for bit
and keeps the rest, and it refuses what would leave the zoo inconsistent."""
import hashlib, json
from pathlib import Path
import pytest
from vlm_merge.zoo import build_zoo, ZOO_STEPS, ZOO_MODELS, FLOORS

STEPS = {k: 2 for k in ZOO_STEPS}
SIZES = dict(train_generic=60, train_gsm=20, train_geo=20, train_spec=20, train_chain=10, base_gsm=10, base_spec=10,
             base_geo=10, base_chain=10, test=4, cross=4, corpus=8)

def _hashes(z:Path) -> dict:
    return {str(p.relative_to(z)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(z.rglob('*'))
            if p.is_file() and p.name != 'manifest.json'}

@pytest.fixture(scope='module')
def toy_zoo(tmp_path_factory):
    return build_zoo(tmp_path_factory.mktemp('toy') / 'zoo', steps=STEPS, sizes=SIZES, workers=2)

def test_toy_build_manifest(toy_zoo):
    man = json.loads((toy_zoo / 'manifest.json').read_text())
    assert list(man['models']) == list(ZOO_MODELS)
    for n, m in man['models'].items():
        assert (toy_zoo / m['path'] / 'config.json').exists(), n
        assert len(m['train']['curve']) >= 1, n
        assert ('lm_delta_rel_norm' in m['train']) == (m['init'] != 'random init'), n   # every fine-tune says how far it moved
        assert (n in FLOORS) == ('floor' in m), n
    assert man['models']['wide-base']['model_type'] == 'qwen2' and man['models']['base-lm']['model_type'] == 'llama'

def test_rebuild_only_reproduces(toy_zoo):
    before = _hashes(toy_zoo)
    build_zoo(toy_zoo, steps=STEPS, sizes=SIZES, only=['spec-sort', 'vlm-2'], workers=2)
    assert _hashes(toy_zoo) == before   # the same seeds give the same bytes, and nothing else was touched
    man = json.loads((toy_zoo / 'manifest.json').read_text())
    assert man['rebuilt'][-1]['models'] == ['spec-sort', 'vlm-2'] and set(man['models']) == set(ZOO_MODELS)

def test_rebuild_refusals(toy_zoo, tmp_path):
    before = _hashes(toy_zoo)
    with pytest.raises(ValueError, match="changes the models built on it"): build_zoo(toy_zoo, steps=STEPS, sizes=SIZES, only=['wide-base'])
    with pytest.raises(ValueError, match='rebuild it whole'): build_zoo(toy_zoo, seed=1, steps=STEPS, sizes=SIZES, only=['spec-sort'])
    with pytest.raises(KeyError, match='unknown zoo model'): build_zoo(toy_zoo, steps=STEPS, sizes=SIZES, only=['gpt-5'])
    with pytest.raises(FileNotFoundError, match='no manifest.json'): build_zoo(tmp_path / 'none', only=['spec-sort'])
    assert _hashes(toy_zoo) == before and not list(toy_zoo.parent.glob('.zoo.tmp-*'))
