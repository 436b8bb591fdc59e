"""The fixed cost of `vlm-merge merge`: Python start-up and imports, on a merge so small that nothing else counts.

Builds three tiny Llama checkpoints with transformers' `save_pretrained` (a base and two fine-tunes with sparse
random deltas), writes a TIES config, and for each source tree given with `--tree LABEL=PATH` (the package is
imported from PATH through PYTHONPATH, so an old checkout and a new one can be compared in one run) times, each
as its own process, alternating between trees so that both see the same load:

- `python -c "import torch"`: what any torch-based tool pays before it reads a byte;
- the whole command as the console script runs it (`from vlm_merge.cli import main; sys.exit(main())`), wall time;
- the same command under `python -X importtime`: seconds spent importing (the sum of the top-level imports,
  lazy ones included; a module imported through `importlib.import_module`, as the CLI imports the engine, shows only
  through its own imports) and which of `HEAVY` it loaded.

Python's bytecode cache matters here: with PYTHONDONTWRITEBYTECODE set (as on the machines this was measured on),
every module of vlm_merge is compiled from source at every start. `--pycache-prefix DIR` times the commands with the
cache on, kept in DIR (the first run of each tree fills it; the best run is a cached one).

Prints the best (and the median) of `--repeat` runs with the 1-minute load average beside each figure.

    python benchmarks/startup.py --tree before=/tmp/old_checkout --tree after=. --repeat 5
"""
from __future__ import annotations
import argparse, json, os, re, statistics, subprocess, sys, tempfile, time
from pathlib import Path

HEAVY = ('transformers', 'huggingface_hub.hf_api', 'pandas', 'matplotlib', 'scipy', 'PIL', 'datasets', 'accelerate',
         'httpx', 'httpx2', 'IPython', 'ipywidgets', 'pyarrow', 'sympy')   # none of them needed by a merge

def build(root: Path) -> Path:
    "Three tiny Llama checkpoints under `root` and a TIES config over them; returns the config's path."
    import torch, yaml
    from transformers import LlamaConfig, LlamaForCausalLM
    from safetensors.torch import load_file, save_file
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                      vocab_size=96, max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(root / 'base')
    sd = load_file(str(root / 'base' / 'model.safetensors'))
    for i in (1, 2):
        g = torch.Generator().manual_seed(i)
        LlamaForCausalLM(cfg).save_pretrained(root / f'ft{i}')   # config files; the weights are replaced below
        ft = {k: (v + (torch.rand(v.shape, generator=g) < 0.3) * torch.randn(v.shape, generator=g) * 0.05).to(v.dtype) for k, v in sd.items()}
        save_file(ft, str(root / f'ft{i}' / 'model.safetensors'), metadata={'format': 'pt'})
    conf = {'models': [{'model': str(root / 'base')}] + [{'model': str(root / f'ft{i}'), 'parameters': {'density': 0.5, 'weight': 0.5}}
                                                          for i in (1, 2)],
            'merge_method': 'ties', 'base_model': str(root / 'base'), 'parameters': {'normalize': True}, 'dtype': 'bfloat16'}
    (root / 'ties.yml').write_text(yaml.safe_dump(conf))
    return root / 'ties.yml'

SCRIPT = 'import sys; from vlm_merge.cli import main; sys.exit(main())'   # what the `vlm-merge` console script runs

def timed(cmd: list, env: dict) -> tuple:
    "(wall seconds, load average at the start, stderr) of one run of `cmd`, which must succeed."
    load = os.getloadavg()[0]
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    dt = time.perf_counter() - t
    if r.returncode: raise RuntimeError(f'{cmd} failed ({r.returncode}): {r.stderr[-2000:]}')
    return dt, load, r.stderr

def import_seconds(stderr: str) -> tuple:
    "(seconds spent in top-level imports, the heavy packages among them) from `-X importtime` output."
    tot, heavy = 0, set()
    for l in stderr.splitlines():
        m = re.match(r'import time:\s+\d+ \|\s+(\d+) \|( +)(\S+)', l)
        if not m: continue
        if len(m[2]) == 1: tot += int(m[1])
        h = next((h for h in HEAVY if m[3] == h or m[3].startswith(h + '.')), None)
        if h: heavy.add(h)
    return tot / 1e6, sorted(heavy)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--tree', action='append', required=True, help='LABEL=PATH of a source tree holding vlm_merge/ (repeat)')
    p.add_argument('--repeat', type=int, default=5, help='runs of each measurement; the best and the median are shown')
    p.add_argument('--threads', default='1', help="the merge's --threads (1: leave the other core to others)")
    p.add_argument('--pycache-prefix', default=None, help='bytecode cache on, kept in this folder (default: the environment as it is)')
    a = p.parse_args(argv)
    trees = dict(t.split('=', 1) for t in a.tree)
    with tempfile.TemporaryDirectory() as d:
        root = Path(d); cfg = build(root)
        res = {k: {'torch': [], 'command': [], 'imports': []} for k in trees}
        def env_cmd(label, path):
            env = {**os.environ, 'PYTHONPATH': str(Path(path).resolve())}
            if a.pycache_prefix:
                env.pop('PYTHONDONTWRITEBYTECODE', None); env['PYTHONPYCACHEPREFIX'] = str(Path(a.pycache_prefix).resolve())
            return env, [SCRIPT, 'merge', str(cfg), str(root / f'out_{label}'), '--overwrite', '--no-progress', '--threads', a.threads]
        if a.pycache_prefix:   # fill the cache (torch's modules included) before anything is timed
            for label, path in trees.items(): env, cmd = env_cmd(label, path); timed([sys.executable, '-c', *cmd], env)
        for _ in range(a.repeat):
            for label, path in trees.items():
                env, cmd = env_cmd(label, path)
                res[label]['torch'].append(timed([sys.executable, '-c', 'import torch'], env)[:2])
                res[label]['command'].append(timed([sys.executable, '-c', *cmd], env)[:2])
                dt, load, err = timed([sys.executable, '-X', 'importtime', '-c', *cmd], env)
                secs, heavy = import_seconds(err)
                res[label]['imports'].append((secs, load, heavy))
        cache = f'bytecode cache in {a.pycache_prefix}' if a.pycache_prefix else (
            'no bytecode cache (PYTHONDONTWRITEBYTECODE)' if os.environ.get('PYTHONDONTWRITEBYTECODE') else 'bytecode cache on')
        print(f'python {sys.version.split()[0]}, {cache}, {os.cpu_count()} CPUs, tiny TIES merge (3 Llama checkpoints of 35K parameters), '
              f'best / median of {a.repeat}, [1-minute load average at the start of the best run; range over all runs]')
        for label, r in res.items():
            for what in ('torch', 'command', 'imports'):
                xs = r[what]; best = min(xs, key=lambda x: x[0])
                loads = [x[1] for x in xs]
                name = {'torch': 'import torch', 'command': 'whole command', 'imports': 'imports in it'}[what]
                print(f'{label:>8s}  {name:14s} {best[0]:6.3f} s / {statistics.median(x[0] for x in xs):6.3f} s'
                      f'  [load {best[1]:.2f}; {min(loads):.2f}-{max(loads):.2f}]' + (f'  heavy: {", ".join(best[2]) or "none"}' if what == 'imports' else ''))
        print(json.dumps({k: {w: [x[:2] for x in v] for w, v in r.items()} for k, r in res.items()}))

if __name__ == '__main__': main()
