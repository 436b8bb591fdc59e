"""Throughput of batched generation (batch 16) against per-sample generation (batch 1), same prompts, same model.

Uses the zoo's reason-lm (GSM answers of about 20 tokens) when `vlm_merge.zoo` is available (else a tiny random Llama built from a config with a
word-level tokenizer), greedy decoding, and checks that both runs produce identical text (left padding is correct).
Prints samples/s of each and their ratio; the target is a ratio >= 5.

    python benchmarks/batched_inference.py [--n 256] [--max_new_tokens 32] [--batch_size 16] [--model PATH] [--device cpu] [--threads 1] [--hf_generate]

Text models decode greedily with `vlm_merge.inference.greedy_decode`, which drops finished rows from the batch;
`--hf_generate` measures transformers' `model.generate` instead (rows run until the longest one ends), through
`Inferencer.generate(fast_greedy=False)`.

On a shared, loaded CPU, torch's intra-op threads oversubscribe the cores and make every step slow; `--threads 1`
gives stable figures (both runs always use the same thread count).
"""
from __future__ import annotations
import argparse, tempfile, time, json
from pathlib import Path
import torch


def _tiny_model(folder: Path) -> Path:
    "A random Llama (4 layers, hidden 128) with a word-level tokenizer that has a chat template."
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast, LlamaConfig, LlamaForCausalLM
    from vlm_merge.data import make_gsm, gsm_prompt
    df = make_gsm(500, seed=0)
    specials = ['<pad>', '<unk>', '<s>', '</s>', '<|user|>', '<|assistant|>', '<|end|>']
    words = {str(i) for i in range(1000)} | {w for t in list(df.answer) + [gsm_prompt(q) for q in df.question] for w in t.split()}
    vocab = {w: i for i, w in enumerate(specials + sorted(words - set(specials)))}
    tk = Tokenizer(models.WordLevel(vocab, unk_token='<unk>')); tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens(specials)
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token='<pad>', unk_token='<unk>', bos_token='<s>', eos_token='</s>')
    tok.chat_template = ("{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
                         "{% if add_generation_prompt %}<|assistant|> {% endif %}")
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, pad_token_id=0, bos_token_id=2, eos_token_id=3)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder); tok.save_pretrained(folder)
    return folder


def _zoo_model() -> Path | None:
    try:
        from vlm_merge import zoo
        models = zoo.zoo_manifest()['models']
        for name in ('reason-lm', 'base-lm'):   # reason-lm writes worked answers (~20 tokens); base-lm often stops after 1-2
            if name in models: return zoo.zoo_path(name)
    except Exception: return None
    return None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--n', type=int, default=256, help='prompts (with 64 the ratio scatters by +-0.5 from run to run)')
    p.add_argument('--max_new_tokens', type=int, default=32)
    p.add_argument('--batch_size', type=int, default=16)
    p.add_argument('--model', default=None, help='a causal LM folder; default: zoo reason-lm, else a tiny random Llama')
    p.add_argument('--device', default='cpu')
    p.add_argument('--threads', type=int, default=None, help='torch threads (default: torch default)')
    p.add_argument('--hf_generate', action='store_true', help="decode with transformers' generate, not greedy_decode")
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    from vlm_merge.data import make_gsm, gsm_prompt
    from vlm_merge.inference import Inferencer
    tmp = tempfile.TemporaryDirectory()
    model = a.model or _zoo_model()
    source = 'given' if a.model else ('zoo' if model else 'tiny random Llama')
    if model is None: model = _tiny_model(Path(tmp.name) / 'tiny')
    inf = Inferencer(model, device=a.device)
    prompts = [gsm_prompt(q) for q in make_gsm(a.n, seed=1).question]
    inf.generate(prompts[:2], batch_size=2, max_new_tokens=4, progress=False)   # warm-up
    if a.device.startswith('cuda'): torch.cuda.synchronize()
    t0 = time.perf_counter()
    batched = inf.generate(prompts, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens, progress=False, fast_greedy=not a.hf_generate)
    if a.device.startswith('cuda'): torch.cuda.synchronize()
    t1 = time.perf_counter()
    single = [inf.generate([q], batch_size=1, max_new_tokens=a.max_new_tokens, progress=False, fast_greedy=not a.hf_generate)[0] for q in prompts]
    if a.device.startswith('cuda'): torch.cuda.synchronize()
    t2 = time.perf_counter()
    same = sum(x == y for x, y in zip(batched, single))
    n_params = sum(p.numel() for p in inf.model.parameters())
    res = dict(model=str(model), source=source, params=n_params, device=a.device, threads=torch.get_num_threads(), n=a.n,
               max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, decoder='model.generate' if a.hf_generate else 'greedy_decode',
               batched_samples_per_s=round(a.n / (t1 - t0), 2), per_sample_samples_per_s=round(a.n / (t2 - t1), 2),
               ratio=round((t2 - t1) / (t1 - t0), 2), identical_outputs=f'{same}/{a.n}')
    print(json.dumps(res, indent=1))
    print(f"batched (batch {a.batch_size}) / per-sample throughput: {res['ratio']}x  (target >= 5x)")
    tmp.cleanup()


if __name__ == '__main__': main()
