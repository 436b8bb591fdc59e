"""Resident memory of reading one tensor of a sharded checkpoint with vlm_merge's CheckpointReader,
against the peer: safetensors.torch.load_file of every shard (what "load the checkpoint" costs).

    python benchmarks/read_memory.py                 # 1 GiB checkpoint in 4 shards of 32 MiB tensors
    python benchmarks/read_memory.py --size 200MB --json

safetensors (0.8) maps files lazily: a tensor's pages become resident only when touched, so every
case sums the tensors it read (as a merge would) before RSS is measured.

Builds the checkpoint in a temporary folder with ShardedWriter, then measures each case in a fresh
Python process (so one case's memory cannot hide in another's): RSS after imports and after the
read, from psutil when installed, else /proc/self/status (VmRSS; RssAnon, the part that is not
file-backed page cache, where the kernel reports it). Cases:
  reader-one   CheckpointReader(folder).get(one key)                       (the target: < 200 MB for 1 GB)
  reader-one-mmap  the same with mmap=True (zero-copy views of the file map)
  reader-all   every tensor through CheckpointReader.iter_tensors, none kept (a streaming merge's read side)
  peer-load    safetensors.torch.load_file of every shard, all kept          (the peer)
Prints each delta and its ratio to the peer measured in the same run.
"""
from __future__ import annotations
import argparse, json, os, subprocess, sys, tempfile, time
from pathlib import Path


def rss() -> dict:
    "Resident memory of this process in bytes: {'rss': ..., 'anon': ... or None}."
    out = {'rss': None, 'anon': None}
    try:
        for line in Path('/proc/self/status').read_text().splitlines():
            if line.startswith('VmRSS:'): out['rss'] = int(line.split()[1]) * 1024
            if line.startswith('RssAnon:'): out['anon'] = int(line.split()[1]) * 1024
    except OSError: pass
    try:
        import psutil
        out['rss'] = psutil.Process().memory_info().rss
    except ImportError: pass
    if out['rss'] is None: raise RuntimeError('cannot measure RSS: install psutil')
    return out


def build(folder: Path, size: int, tensor_bytes: int, shards: int, seed: int = 0) -> list[str]:
    "A float32 checkpoint of about `size` bytes in `shards` shards; returns the tensor names."
    import torch
    from vlm_merge.checkpoints import ShardedWriter
    n = max(1, size // tensor_bytes)
    per = max(1, -(-n // shards))
    g = torch.Generator().manual_seed(seed)
    keys = [f'model.layers.{i}.mlp.up_proj.weight' for i in range(n)]
    with ShardedWriter(folder, max_shard_size=per * tensor_bytes) as w:
        for k in keys: w.add(k, torch.randn(tensor_bytes // 4, generator=g).reshape(-1, 1024))
    return keys


def measure(case: str, folder: str, key: str) -> dict:
    "Run in a fresh process: RSS before and after one case."
    import gc, torch
    from safetensors.torch import load_file
    from vlm_merge.checkpoints import CheckpointReader
    gc.collect()
    r0, t0 = rss(), time.perf_counter()
    keep = None
    if case in ('reader-one', 'reader-one-mmap'):
        r = CheckpointReader(folder, mmap=case.endswith('mmap'))
        keep = r.get(key); keep.sum()          # touch every page: the tensor may be a lazy memory map
        got = keep.nbytes
    elif case == 'reader-all':
        r = CheckpointReader(folder)
        got, peak = 0, 0
        for k, t in r.iter_tensors():
            t.sum(); got += t.nbytes
            peak = max(peak, rss()['rss']); del t
    elif case == 'peer-load':
        keep = [load_file(f) for f in sorted(Path(folder).glob('*.safetensors'))]
        got = sum(t.sum() is not None and t.nbytes for d in keep for t in d.values())
    else: raise ValueError(case)
    dt = time.perf_counter() - t0
    r1 = rss()
    res = {'case': case, 'bytes_read': got, 'seconds': dt, 'rss_delta': r1['rss'] - r0['rss'],
           'anon_delta': None if r1['anon'] is None else r1['anon'] - r0['anon']}
    if case == 'reader-all': res['rss_delta_peak'] = peak - r0['rss']
    return res


def _fmt(b) -> str: return 'n/a' if b is None else f'{b / 2**20:8.1f} MiB'


def main(argv=None) -> int:
    from vlm_merge.checkpoints import parse_size
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument('--size', default='1GiB', help='checkpoint size (default 1GiB = 1.07 GB)')
    p.add_argument('--tensor_size', default='32MiB', help='size of each tensor (default 32MiB)')
    p.add_argument('--shards', type=int, default=4, help='number of shards (default 4)')
    p.add_argument('--cases', default='reader-one,reader-one-mmap,reader-all,peer-load')
    p.add_argument('--json', action='store_true', help='print one JSON object instead of a table')
    p.add_argument('--measure', nargs=3, metavar=('CASE', 'FOLDER', 'KEY'), help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.measure: print(json.dumps(measure(*a.measure))); return 0
    size, tb = parse_size(a.size), parse_size(a.tensor_size)
    with tempfile.TemporaryDirectory(prefix='vlm_merge_readmem_') as d:
        folder = Path(d)/'ckpt'
        t0 = time.perf_counter(); keys = build(folder, size, tb, a.shards); t_build = time.perf_counter() - t0
        files = sorted(folder.glob('*.safetensors'))
        total = sum(f.stat().st_size for f in files)
        key = keys[len(keys) // 2]
        res = {}
        for case in a.cases.split(','):
            out = subprocess.run([sys.executable, __file__, '--measure', case, str(folder), key],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode: raise RuntimeError(f'{case} failed:\n{out.stderr}')
            res[case] = json.loads(out.stdout.strip().splitlines()[-1])
    peer = res.get('peer-load', {}).get('rss_delta')
    summary = {'checkpoint_bytes': total, 'shards': len(files), 'tensor_bytes': tb, 'build_seconds': t_build, 'cases': res,
               'ratio_reader_one_to_peer': (res['reader-one']['rss_delta'] / peer) if peer and 'reader-one' in res else None}
    if a.json: print(json.dumps(summary)); return 0
    print(f'checkpoint: {total / 2**20:.0f} MiB in {len(files)} shards, tensors of {tb / 2**20:.0f} MiB (built in {t_build:.1f} s)')
    print(f'{"case":<15} {"RSS delta":>13} {"anon delta":>13} {"peak delta":>13} {"seconds":>8} {"ratio to peer":>14}')
    for c, r in res.items():
        ratio = f'{r["rss_delta"] / peer:14.3f}' if peer else ' ' * 14
        print(f'{c:<15} {_fmt(r["rss_delta"]):>13} {_fmt(r["anon_delta"]):>13} {_fmt(r.get("rss_delta_peak")):>13} {r["seconds"]:8.2f} {ratio}')
    if 'reader-one' in res:
        ok = res['reader-one']['rss_delta'] < 200_000_000
        print(f'reader-one adds {_fmt(res["reader-one"]["rss_delta"]).strip()} (target < 200 MB for a 1 GB checkpoint): {"OK" if ok else "FAIL"}')
    return 0


if __name__ == '__main__': sys.exit(main())
