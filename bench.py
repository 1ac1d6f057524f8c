"""bench.py — the generation loop measured side by side: this loop vs `model.generate` at batch 64, and cache reuse
across turns vs re-prefilling the history every turn. Every ratio comes from one run with the two contenders
interleaved (median of 3), so load from other processes hits both alike.

Run: `python bench.py` (also `python model.py --bench`); README's table is its output.
"""
import time

import torch
import transformers

from model import (SamplingConfig, _CountingEpisode, _left_pad, build_tiny_model, build_tiny_tokenizer, encode_prompt,
                   generate_turn, prefill, rollout)


def _race(fns: dict, reps: int = 3) -> dict:
    """Median seconds per function, runs interleaved so that load from other processes hits both alike."""
    times = {name: [] for name in fns}
    for fn in fns.values():
        fn()                                                                    # warm-up
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}


@torch.no_grad()
def bench(batch: int = 64, new_tokens: int = 64, group: int = 8, turns: int = 20):
    tokenizer = build_tiny_tokenizer()
    pad = tokenizer.pad_token_id
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)
    text = "Level {}: push the box X onto the target O. "
    layouts = {f"{batch} distinct": [text.format(k) * (1 + k % 4) for k in range(batch)],
               f"{batch // group} tasks x G={group}": [text.format(k // group) * (1 + k // group % 4)
                                                        for k in range(batch)]}
    sizes = {"tiny": {}, "4x512": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, head_dim=64)}
    print(f"\nCommand: `python bench.py` (CPU, {torch.get_num_threads()} threads, fp32, torch "
          f"{torch.__version__}, transformers {transformers.__version__}); random-init Qwen3 configs, tiny "
          f"tokenizer (V={len(tokenizer)}), batch {batch}, {new_tokens} new tokens per row, T=1.0, no stop token "
          f"(every row runs to the cap), median of 3 interleaved runs.\n")
    print("| model | prompts | this loop, tok/s | `model.generate`, tok/s | ratio |\n|---|---|---:|---:|---:|")
    for size, overrides in sizes.items():
        model = build_tiny_model(tokenizer, seed=0, eos_token_id=None, **overrides)   # no eos: same lengths
        n_params = sum(p.numel() for p in model.parameters()) / 1e6
        for layout, texts in layouts.items():
            prompts = [encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]

            def ours():
                state, logits = prefill(model, prompts, pad)
                generate_turn(model, state, logits, sampling, torch.Generator().manual_seed(0), [], pad)

            def hf():
                ids, mask = _left_pad(prompts, pad, "cpu")
                model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                               top_k=0, max_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=None)

            t = _race({"ours": ours, "hf": hf})
            tps = {k: batch * new_tokens / v for k, v in t.items()}
            print(f"| Qwen3 {size} ({n_params:.1f}M) | {layout} | {tps['ours']:,.0f} | {tps['hf']:,.0f} | "
                  f"{tps['ours'] / tps['hf']:.2f}x |")

    tiny = build_tiny_model(tokenizer)
    stats, secs, ids = {}, {}, {}
    for mode in (False, True):
        eps = [_CountingEpisode(k, turns=turns, obs_words=6) for k in range(8)]
        stats[mode], t0 = {}, time.perf_counter()
        ledgers = rollout(tiny, tokenizer, eps, SamplingConfig(temperature=0, max_new_tokens=16), reprefill=mode,
                          max_context=100_000, stats=stats[mode])
        secs[mode], ids[mode] = time.perf_counter() - t0, [L.ids for L in ledgers]
    assert ids[False] == ids[True], "re-prefilling and cache reuse produced different episodes"
    ep_len = sum(map(len, ids[False])) / 8
    print(f"\n{turns}-turn episodes (8 rows, tiny model, greedy, <= 16 tokens per reply, ~30-token observations, "
          f"{ep_len:.0f} ledger tokens per episode; identical ledgers in both modes):\n")
    print("| per episode | cache reuse across turns | re-prefill the history each turn | ratio |\n|---|---:|---:|---:|")
    pre = {m: stats[m]["prefill_tokens"] / 8 for m in stats}
    print(f"| prefill + observation-chunk tokens forwarded | {pre[False]:,.0f} | {pre[True]:,.0f} | "
          f"{pre[True] / pre[False]:.1f}x fewer |")
    print(f"| decode tokens forwarded | {stats[False]['decode_tokens'] / 8:,.0f} | "
          f"{stats[True]['decode_tokens'] / 8:,.0f} | 1.0x |")
    print(f"| wall time of the 8 episodes, s | {secs[False]:.2f} | {secs[True]:.2f} | "
          f"{secs[True] / secs[False]:.2f}x |")


def main():
    bench()


if __name__ == "__main__":
    main()
