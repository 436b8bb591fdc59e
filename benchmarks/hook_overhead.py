"""Cost of detection hooks: a hooked forward pass against a plain one, on the same model and batch, in the same run.

    python benchmarks/hook_overhead.py                  # a random Llama built from a config (no download)
    python benchmarks/hook_overhead.py --model PATH     # any model folder ModelAnatomy knows (zoo model, Hub snapshot)

Prints the median time of each and the ratio hooked / plain (the target is <= 1.10).
"""
from __future__ import annotations
import argparse, statistics, time
import torch
from vlm_merge.detect import ActivationRecorder


def _model(args):
    if args.model:
        from transformers import AutoModelForCausalLM
        m = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    else:
        from transformers import LlamaConfig, LlamaForCausalLM
        torch.manual_seed(0)
        m = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=args.hidden, intermediate_size=int(args.hidden * 2.75),
                                         num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
                                         num_key_value_heads=max(1, args.hidden // 256), max_position_embeddings=4096))
    return m.to(args.device, getattr(torch, args.dtype)).eval()


def _time(fn, reps, device):
    ts = []
    for _ in range(reps):
        if device.startswith('cuda'): torch.cuda.synchronize()
        t0 = time.perf_counter(); fn()
        if device.startswith('cuda'): torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', help='model folder (default: a random Llama from a config)')
    p.add_argument('--hidden', type=int, default=512); p.add_argument('--layers', type=int, default=4)
    p.add_argument('--batch', type=int, default=4); p.add_argument('--seq', type=int, default=256)
    p.add_argument('--reps', type=int, default=7); p.add_argument('--device', default='cpu')
    p.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16', 'float16'])
    p.add_argument('--threads', type=int, default=None, help='torch CPU threads (default: torch default)')
    a = p.parse_args(argv)
    if a.threads: torch.set_num_threads(a.threads)
    m = _model(a)
    vocab = m.config.vocab_size if hasattr(m.config, 'vocab_size') else m.config.get_text_config().vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (a.batch, a.seq), generator=g).to(a.device)
    mask = torch.ones_like(ids); mask[0, a.seq // 2:] = 0          # some padding, as in real batches

    @torch.no_grad()
    def plain(): m(input_ids=ids, attention_mask=mask, use_cache=False)
    rec = ActivationRecorder(m)
    @torch.no_grad()
    def hooked():
        rec.set_mask(mask); m(input_ids=ids, attention_mask=mask, use_cache=False)

    plain(); plain()                       # warm-up
    with rec: hooked(); hooked()
    # interleave so that drift (other load on the machine) hits both alike
    tp, th = [], []
    for _ in range(a.reps):
        tp.append(_time(plain, 1, a.device))
        with rec: th.append(_time(hooked, 1, a.device))
    p_, h_ = statistics.median(tp), statistics.median(th)
    n_hooks = sum(len(v) for v in rec.modules.values())
    print(f'model: {a.model or f"random Llama hidden={a.hidden} layers={a.layers}"}  batch={a.batch}x{a.seq}  device={a.device}  dtype={a.dtype}  hooks={n_hooks}')
    print(f'plain forward : {p_ * 1e3:8.1f} ms (median of {a.reps})')
    print(f'hooked forward: {h_ * 1e3:8.1f} ms (median of {a.reps})')
    print(f'ratio hooked/plain: {h_ / p_:.3f}  ({"within" if h_ / p_ <= 1.10 else "OVER"} the 1.10 budget)')
    return h_ / p_


if __name__ == '__main__':
    main()
