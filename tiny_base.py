"""tiny_base.py — the offline "model organism": a tiny pretrained base model that stands in for an instruct LLM on
Sokoban, built on a CPU in about 4 minutes, so that Skill-SD can be run and measured with no downloads.

WHAT IT IS. A 0.84M-parameter Qwen3 (model.build_tiny_model) with its own tokenizer, pretrained by behaviour cloning on
transcripts of scripted players. The transcripts go through the real pipeline: SokobanEpisode's chat prompt and
observations, model.encode_prompt / model.encode_segments (exactly the token stream model.rollout records), replies
parsed by env_sokoban.parse_action, and skills written by rule_skills.SokobanRuleSummarizer from an earlier episode on
the same level, put in the prompt with skills.with_skill: what train.py's teacher sees. The players give it the three
properties the paper's base has (METHOD.md §10): it follows the action format, it plays weakly, and it plays better
with a skill from its own earlier episode in its context, more than with a skill from another level.

WHAT IT IS NOT. A language model: it has seen no text but these transcripts, cannot write a skill (train.py uses the
rule summariser with it), and its knowledge is by construction: the plain player is a noisy solver whose mistakes are
systematic, so the solver's move is in its output distribution but not the most likely one, and RL can raise it. Its
numbers say whether the algorithms run and behave as argued, not how a 4B instruct model would score. RESULTS.md has
its measurements and the history of its design.

The recipe (RECIPE below; every number is ours):
 1. Levels: the "easy" preset's generator (6x6, 1 box, depth 300) from seed 5,000,000 on, disjoint by seed from the
    train (10,000+) and test (1,000,000+) seeds and by room from the "easy" and "hard" presets' train and test levels
    (the generator repeats rooms: 13 of the 64 easy test rooms came back among 1,500 pretraining seeds, so such seeds
    are skipped); episodes of at most 12 turns.
 2. Plain player b0(s): with p_opt the BFS-optimal move, with p_naive the novice's move (one step toward the nearest
    box not on a target, whatever lies there), else uniform. Its mistake is a function of the state only (RESULTS.md
    says why that matters).
 3. Skill player: b0, except where the skill of an earlier b0 episode on the same level speaks (rule_skills keys each
    workflow move and blocked move by the player's cell): at a workflow cell it plays that move with p_follow; a move
    the skill reports blocked at this cell loses a fraction p_avoid of its probability. Reading a skill is one-token
    copying by cell, which still applies after a detour, and a failed attempt's skill carries information too.
 4. Replies are one token ("<action>up</action>" etc. are added tokens), so a turn costs 2 sampled tokens. The loss is
    the cross-entropy against the player's full action distribution (soft target) on the action token, plus the
    end-of-turn token; none on prompt or observations.
 5. Tokenizer: byte-level BPE trained on the transcripts, plus added tokens for the fixed texts, one per rendered grid
    row and one per cell ("(row 1, col 2)"), so the first prompt is ~34 tokens and an observation ~25. Model: hidden
    128, 3 layers, 4 heads (2 KV), MLP 256, tied embeddings.
 6. Pretraining: AdamW lr 2e-3 (warm-up 50, linear decay), 1000 steps of 16 transcripts of similar length.
 7. Cache: ~/.cache/skill-sd/tiny-sokoban-<hash>/ (a save_pretrained folder, loadable by model.load(path)); the hash
    covers RECIPE, the source of the recipe's functions (docstrings included: editing one rebuilds), the env's prompt
    texts, the rule summariser and library versions. Written to a temporary folder, then renamed.

Run: `python tiny_base.py` (build or load, print the path), `python tiny_base.py --measure` (pre-RL measurements:
student / teacher-with-own-skill / mismatched-skill Acc, format errors, copy rate; `--model <ckpt>` after RL),
`python tiny_base.py --recipe p_follow=0.75 --measure` (a variant organism in its own cache folder; pass the printed
path to train.py as --model), `python -m pytest -q tests/test_tiny_base.py`.
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import shutil
import sys
import time

import numpy as np
import torch
from tqdm import tqdm

import env_sokoban as es
import model as model_lib
import rule_skills
import skills as skills_lib

RECIPE = dict(
    seed=0,
    level_seed_start=5_000_000,   # pretraining levels (train 10,000+, test 1,000,000+)
    exclude_presets=["easy", "hard"],   # no pretraining level has the room of one of their train or test levels
    num_levels=1500,
    num_boxes=1, search_depth=300, max_steps=20, max_turns=12,
    p_opt=0.12, p_naive=0.4,      # plain player b0
    p_follow=0.97,                # skill player, at a workflow cell
    p_avoid=0.9,                  # skill player, a move the skill reports blocked at this cell
    skill_success=0.85, skill_tries=6, skill_episodes=2,
    vocab_size=600,
    hidden_size=128, num_hidden_layers=3, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
    head_dim=32,
    steps=1000, batch_size=16, lr=2e-3, warmup=50, grad_clip=1.0,
)

ACTION_REPLIES = tuple(f"<action>{a}</action>" for a in es.ACTION_NAMES)
CACHE_ROOT = os.path.join(os.path.expanduser("~"), ".cache", "skill-sd")


# ----------------------------------------------------------------------------------------------------------------------
# Scripted players (recipe 2-3)

def optimal_action(game) -> int | None:
    """First move of a BFS-optimal plan from the current state; None when solved or unsolvable (a dead box)."""
    plan = es.solve(game.room_fixed, game.room_state)
    return plan[0] if plan else None


def naive_move(game) -> int | None:
    """The novice's move: one step toward the nearest box not on a target (along the longer axis, rows first on a tie),
    whatever lies there; next to the box that is a push in that direction. None when no box is left to place."""
    boxes = np.argwhere(game.room_state == es.BOX)
    if len(boxes) == 0:
        return None
    pr, pc = (int(x) for x in game.player)
    br, bc = min(((int(b[0]), int(b[1])) for b in boxes), key=lambda b: (abs(b[0] - pr) + abs(b[1] - pc), b))
    if br != pr and abs(br - pr) >= abs(bc - pc):
        return 2 if br > pr else 1      # down / up
    return 4 if bc > pc else 3          # right / left


def plain_policy(game, r: dict) -> np.ndarray:
    """b0: p_opt on the optimal move, p_naive on the novice's move toward the box, the rest uniform. (4,) over
    actions 1..4. A function of the state only: a mistake that copies the context (such as repeating the last move)
    shares the copy circuit with reading a skill, and RL that removes it destroys that reading too (RESULTS.md)."""
    p = np.full(4, (1.0 - r["p_opt"] - r["p_naive"]) / 4)
    for move, mass in ((optimal_action(game), r["p_opt"]), (naive_move(game), r["p_naive"])):
        if move is None:
            p += mass / 4
        else:
            p[move - 1] += mass
    return p


def skill_policy(game, workflow: dict, blocked: set, r: dict) -> np.ndarray:
    """b0, except: at a workflow cell p_follow on that entry's move; a move the skill reports as blocked at this cell
    loses a fraction p_avoid of its probability (spread over the other moves)."""
    p = plain_policy(game, r)
    cell = tuple(int(x) for x in game.player)
    move = workflow.get(cell)
    if move is not None:
        p = (1 - r["p_follow"]) * p
        p[move - 1] += r["p_follow"]
    for a in range(1, 5):
        if (cell, a) in blocked and p[a - 1] < 1:
            cut = r["p_avoid"] * p[a - 1]
            p[a - 1] -= cut
            others = [b for b in range(4) if b != a - 1]
            p[others] += cut * p[others] / p[others].sum()
    return p


def room_key(level) -> bytes:
    """A level's room (walls, targets, box and player cells) as bytes: two seeds can generate the same room."""
    return level.room_fixed.tobytes() + level.room_state.tobytes()


def held_out_rooms(presets) -> set:
    """The rooms of these presets' train and test splits, which pretraining must not see."""
    return {room_key(lv) for name in presets for split in ("train", "test") for lv in es.load_levels(name, split)}


def pretrain_levels(r: dict) -> list:
    """r["num_levels"] levels from seed r["level_seed_start"] on, skipping seeds that fail to generate and rooms of
    the r["exclude_presets"] splits (repeats among the pretraining levels themselves are kept)."""
    held = held_out_rooms(r.get("exclude_presets", []))
    levels, seed = [], r["level_seed_start"]
    while len(levels) < r["num_levels"]:
        try:
            level = es.make_level_unchecked("pretrain", seed, seed, (6, 6), r["num_boxes"], r["search_depth"],
                                            r["max_steps"])
            if room_key(level) not in held:
                levels.append(level)
        except es.SokobanGenerationError:
            pass
        seed += 1
    return levels


def play(level, r: dict, rng: np.random.Generator, skill=None):
    """One scripted episode, by b0 or (with a skill) by the skill player -> (episode, [(reply, target (4,))])."""
    ep = es.SokobanEpisode(level, max_turns=r["max_turns"])
    workflow, blocked = rule_skills.workflow_moves(skill), rule_skills.blocked_moves(skill)
    turns = []
    while not ep.done:
        p = plain_policy(ep.game, r) if skill is None else skill_policy(ep.game, workflow, blocked, r)
        a = int(rng.choice(4, p=p)) + 1
        reply = ACTION_REPLIES[a - 1]
        turns.append((reply, p))
        ep.step(reply)
    return ep, turns


def make_skill(ep):
    """The rule summariser's skill of a finished episode (what train.py's bank would hold)."""
    return rule_skills.SokobanRuleSummarizer().summarize_one(skills_lib.SummaryRequest.from_episode("sokoban", ep))


def generate_episodes(r: dict, progress=True) -> list[dict]:
    """Per level: one plain episode and `skill_episodes` skill episodes (each skill from an earlier attempt).
    Deterministic in r["seed"]."""
    rng = np.random.default_rng(r["seed"])
    out = []
    for level in tqdm(pretrain_levels(r), desc="transcripts", disable=not progress, leave=False):
        ep, turns = play(level, r, rng)
        out.append({"level": level, "turns": turns, "skill": None})
        for _ in range(r["skill_episodes"]):
            want_success = rng.random() < r["skill_success"]
            earlier = None
            for _ in range(r["skill_tries"] if want_success else 1):
                earlier, _ = play(level, r, rng)
                if earlier.result()["success"]:
                    break
            skill = make_skill(earlier)
            _, turns = play(level, r, rng, skill=skill)
            out.append({"level": level, "turns": turns, "skill": skill})
    return out


# ----------------------------------------------------------------------------------------------------------------------
# Token stream: exactly what model.rollout records (recipe 4)

def transcript(tokenizer, level, turns, skill, max_turns) -> dict:
    """ids, loss targets and the ledger layout of one scripted episode, built the way model.rollout builds a ledger:
    encode_prompt(first messages) + per turn [reply tokens + end-of-turn] + encode_segment(observation)."""
    ep = es.SokobanEpisode(level, max_turns=max_turns)
    messages = ep.initial_messages()
    if skill is not None:
        messages = skills_lib.with_skill(messages, skill.to_prompt())
    ids = model_lib.encode_prompt(tokenizer, messages)
    eot = model_lib.stop_token_ids(tokenizer)[0]
    action_ids = [tokenizer.convert_tokens_to_ids(t) for t in ACTION_REPLIES]
    observations = []
    for reply, _ in turns:
        obs, done = ep.step(reply)
        if done:
            break
        observations.append(obs)
    segments = model_lib.encode_segments(tokenizer, observations)
    prompt_len, trainable, targets = len(ids), [0] * len(ids), []
    for k, (reply, p) in enumerate(turns):
        reply_ids = [action_ids[ACTION_REPLIES.index(reply)]]   # the one token rollout samples for this reply
        targets.append((len(ids) - 1, [float(x) for x in p]))       # hidden at t predicts token t + 1
        targets.append((len(ids), None))                            # ... and the end-of-turn after it
        ids += reply_ids + [eot]
        trainable += [1, 1]
        if k == len(segments):
            break
        ids += segments[k]
        trainable += [0] * len(segments[k])
    return {"ids": ids, "trainable": trainable, "targets": targets, "prompt_len": prompt_len,
            "eot": eot, "action_ids": action_ids}


# ----------------------------------------------------------------------------------------------------------------------
# Tokenizer (recipe 5)

def fixed_phrases() -> list[str]:
    """Texts the env / summarizer write verbatim, each made one added token."""
    head, _ = es.RULES_TEXT.split("{limit}")
    return [*ACTION_REPLIES, es.SYSTEM_PROMPT, head, ".\n" + es.FORMAT_TEXT["single"] + "\n\n",
            skills_lib.SKILL_HEADER, skills_lib.PRIVILEGED_HEADER,
            '{"success_analysis": "', '", "mistake_analysis": "', '", "golden_workflow": "', '"}',
            "Moves from the start (loops and bumps removed):", "No successful workflow yet.",
            " No move sequence placed a box on a target yet; avoid the mistakes above.",
            "No wall bumps, corner deadlocks, loops or format errors.",
            " The episode ended before every box was placed.", " Pushing a box onto a target worked at turn(s) ",
            " No box reached a target.", " walked into a wall (nothing moved).", " (push the box)", "\\n",
            "# # # # # #", "Turn ", ". Boxes on target: ", "You moved ", "You pushed a box ", "You cannot move ",
            " (blocked); nothing moved.", "A shortest solution from the initial state (",
            "system\n", "user\n", "assistant\n", ". Boxes on target: 0/1.", ". Boxes on target: 1/1.",
            "\nYou are at ", ". at ", *positions(), *grid_rows()]


def positions(size=6) -> list[str]:
    """Every cell as the observation and the workflow write it ("(row 1, col 2)"), one token each: the key that the
    skill-reading copy matches between "You are at (row 1, col 2)." and "3. at (row 1, col 2): up"."""
    return [es.position_text((r, c)) for r in range(size) for c in range(size)]


def grid_rows(inner=4) -> list[str]:
    """Every rendered row of a 6-wide room with wall borders, with its leading newline: one token per grid row, so an
    observation is ~20 tokens instead of ~45 (a 1.5-2x cheaper forward everywhere). 7**4 = 2401 tokens."""
    import itertools
    return ["\n# " + " ".join(cells) + " #" for cells in itertools.product(es.SYMBOLS, repeat=inner)]


def build_tokenizer(corpus: list[str], vocab_size: int):
    """model.py's byte-level BPE trained on the transcripts, plus the fixed texts as whole tokens."""
    return model_lib.build_tiny_tokenizer(corpus, vocab_size=vocab_size, min_frequency=2, added_tokens=fixed_phrases())


def corpus_texts(episodes: list[dict], r: dict, limit=400) -> list[str]:
    """Prompt and observation texts of the first `limit` episodes (enough for a ~600-token BPE)."""
    texts = []
    for e in episodes[:limit]:
        ep = es.SokobanEpisode(e["level"], max_turns=r["max_turns"])
        msgs = ep.initial_messages()
        if e["skill"] is not None:
            msgs = skills_lib.with_skill(msgs, e["skill"].to_prompt())
        texts += [m["content"] for m in msgs] + [ep.privileged_context()]
        for reply, _ in e["turns"]:
            obs, done = ep.step(reply)
            texts.append(obs)
    return texts


# ----------------------------------------------------------------------------------------------------------------------
# Pretraining (recipe 4, 6)

def pretrain(model, data: list[dict], r: dict, progress=True) -> list[float]:
    """AdamW on the soft-target loss at reply positions; batches of similar length. Returns the loss curve."""
    g = torch.Generator().manual_seed(r["seed"])
    action_ids = torch.tensor(data[0]["action_ids"])                                   # (4,)
    eot = data[0]["eot"]
    order = sorted(range(len(data)), key=lambda i: len(data[i]["ids"]))
    batches = [order[k:k + r["batch_size"]] for k in range(0, len(order), r["batch_size"])]
    opt = torch.optim.AdamW(model.parameters(), lr=r["lr"], betas=(0.9, 0.95), weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / r["warmup"]) * max(0.05, 1 - s / r["steps"]))
    model.train()
    losses = []
    bar = tqdm(range(r["steps"]), desc="pretrain", disable=not progress, leave=False)
    for step in bar:
        rows = [data[i] for i in batches[int(torch.randint(len(batches), (1,), generator=g))]]
        loss = sequence_loss(model, rows, action_ids, eot)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), r["grad_clip"])
        opt.step()
        sched.step()
        losses.append(loss.item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


def sequence_loss(model, rows: list[dict], action_ids: torch.Tensor, eot: int) -> torch.Tensor:
    """Mean over reply tokens of CE(soft target over the 4 action tokens) and CE(end-of-turn)."""
    T = max(len(x["ids"]) for x in rows)
    ids = torch.tensor([x["ids"] + [0] * (T - len(x["ids"])) for x in rows])           # (B, T) right-padded
    mask = torch.tensor([[1] * len(x["ids"]) + [0] * (T - len(x["ids"])) for x in rows])  # (B, T)
    hidden = model.get_decoder()(input_ids=ids, attention_mask=mask,
                                 position_ids=model_lib.position_ids(mask, T)).last_hidden_state   # (B, T, D)
    b_act, t_act, q, b_eot, t_eot = [], [], [], [], []
    for b, x in enumerate(rows):
        for t, p in x["targets"]:
            if p is None:
                b_eot.append(b), t_eot.append(t)
            else:
                b_act.append(b), t_act.append(t), q.append(p)
    head = model.get_output_embeddings()
    logp_act = torch.log_softmax(head(hidden[b_act, t_act]).float(), -1)[:, action_ids]  # (Na, 4)
    logp_eot = torch.log_softmax(head(hidden[b_eot, t_eot]).float(), -1)[:, eot]         # (Ne,)
    ce = -(torch.tensor(q) * logp_act).sum(-1)                                           # (Na,)
    return torch.cat([ce, -logp_eot]).mean()


# ----------------------------------------------------------------------------------------------------------------------
# Build, cache, load (recipe 7)

def recipe_hash(r: dict) -> str:
    import tokenizers
    import transformers
    parts = [json.dumps(r, sort_keys=True), torch.__version__, transformers.__version__, tokenizers.__version__,
             es.SYSTEM_PROMPT, es.RULES_TEXT, json.dumps(es.FORMAT_TEXT), skills_lib.SKILL_HEADER,
             inspect.getsource(rule_skills.SokobanRuleSummarizer), inspect.getsource(skills_lib.Skill),
             inspect.getsource(model_lib.build_tiny_model), inspect.getsource(es.SokobanEpisode._observation),
             inspect.getsource(es.position_text)]
    parts += [repr(es.PRESETS[name]) for name in r.get("exclude_presets", [])]
    parts += [inspect.getsource(f) for f in _RECIPE_FUNCTIONS]
    return hashlib.sha256("\n\x00".join(parts).encode()).hexdigest()[:12]


def build(r: dict, progress=True):
    """The organism from scratch -> (model, tokenizer, info)."""
    t0 = time.time()
    torch.manual_seed(r["seed"])
    episodes = generate_episodes(r, progress)
    tokenizer = build_tokenizer(corpus_texts(episodes, r), r["vocab_size"])
    data = [transcript(tokenizer, e["level"], e["turns"], e["skill"], r["max_turns"])
            for e in tqdm(episodes, desc="tokenize", disable=not progress, leave=False)]
    model = model_lib.build_tiny_model(tokenizer, seed=r["seed"], hidden_size=r["hidden_size"],
                                       num_hidden_layers=r["num_hidden_layers"],
                                       intermediate_size=r["intermediate_size"],
                                       num_attention_heads=r["num_attention_heads"],
                                       num_key_value_heads=r["num_key_value_heads"], head_dim=r["head_dim"])
    t1 = time.time()
    losses = pretrain(model, data, r, progress)
    info = {"recipe": r, "episodes": len(episodes), "tokens": int(sum(len(d["ids"]) for d in data)),
            "reply_targets": int(sum(len(d["targets"]) for d in data)) // 2, "vocab": len(tokenizer),
            "params": int(sum(p.numel() for p in model.parameters())),
            "final_loss": float(np.mean(losses[-50:])), "seconds_data": t1 - t0, "seconds_train": time.time() - t1,
            "target_entropy": float(np.mean([-(np.asarray(p) * np.log(np.asarray(p))).sum()
                                             for d in data for _, p in d["targets"] if p is not None]))}
    info["seconds_total"] = time.time() - t0
    return model, tokenizer, info


# the functions whose source is part of the recipe hash (bound at import, so a monkeypatched name does not count)
_RECIPE_FUNCTIONS = (grid_rows, positions, model_lib.encode_segments, optimal_action, naive_move, plain_policy,
                     rule_skills.workflow_sequence, rule_skills.workflow_moves, rule_skills.blocked_moves, skill_policy,
                     room_key, held_out_rooms, pretrain_levels, play, generate_episodes, transcript, fixed_phrases,
                     build_tokenizer, corpus_texts, pretrain, sequence_loss, build)


def base_dir(recipe: dict | None = None, cache_root: str | None = None) -> str:
    r = {**RECIPE, **(recipe or {})}
    return os.path.join(cache_root or CACHE_ROOT, f"tiny-sokoban-{recipe_hash(r)}")


def load_base(device=None, dtype=None, rebuild=False, recipe: dict | None = None, cache_root: str | None = None,
              progress=True):
    """(model, tokenizer) of the organism; built once per recipe and cached (see recipe 7)."""
    path = ensure_built(recipe, cache_root, rebuild, progress)
    return model_lib.load(path, device=device, dtype=dtype)


def ensure_built(recipe: dict | None = None, cache_root: str | None = None, rebuild=False, progress=True) -> str:
    """Path of the cached organism, building it first when missing (or when rebuild=True)."""
    r = {**RECIPE, **(recipe or {})}
    path = base_dir(r, cache_root)
    if os.path.exists(os.path.join(path, "config.json")) and not rebuild:
        problem = damaged(path)
        if problem:
            raise SystemExit(f"the cached tiny base {path} is damaged ({problem}): rebuild it with "
                             f"`python tiny_base.py --rebuild`" + (" --recipe ..." if recipe else ""))
        return path
    if progress:
        print(f"[tiny_base] building the tiny Sokoban base model -> {path}", file=sys.stderr)
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)   # a one-off job: every core (a run's 1-thread setting is restored)
    try:
        with torch.random.fork_rng(devices=[]):
            model, tokenizer, info = build(r, progress)
    finally:
        torch.set_num_threads(threads)
    save_folder(model, tokenizer, info, path, "tiny_base.json")
    if progress:
        print(f"[tiny_base] built in {info['seconds_total']:.0f}s: {info['params'] / 1e6:.2f}M params, "
              f"loss {info['final_loss']:.3f} (target entropy {info['target_entropy']:.3f})", file=sys.stderr)
    return path


def save_folder(model, tokenizer, info: dict, path: str, info_name: str) -> None:
    """A built base as a save_pretrained folder at `path`, atomically: written to a temporary folder (the info file
    last: its presence marks a whole folder), then renamed over any old one (real_base.py uses it too)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    with open(os.path.join(tmp, info_name), "w") as f:
        json.dump(info, f, indent=2)
    if os.path.exists(path):
        shutil.rmtree(path)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------------------------------
# Pre-RL measurements: student, teacher with its own skill, teacher with a mismatched skill

@torch.no_grad()
def copy_rate(model, tokenizer, levels, skills, max_turns) -> tuple:
    """How well the model reads a skill: replay each level along its skill's own workflow and average, over those turns,
    the probability of the workflow's move with the skill in the prompt (teacher) and without it (student).
    -> (teacher, student) in %; levels whose skill has no workflow are skipped."""
    device = next(model.parameters()).device
    teacher, student = [], []
    for level, skill in zip(levels, skills):
        # every move of the workflow in order (workflow_moves keeps one move per cell)
        moves = [es.ACTION_NAMES[a - 1] for _, a in rule_skills.workflow_sequence(skill)]
        turns = [(f"<action>{m}</action>", (0.25,) * 4) for m in moves][:max_turns]
        if not turns:
            continue
        for prompt_skill, out in ((skill, teacher), (None, student)):
            d = transcript(tokenizer, level, turns, prompt_skill, max_turns)
            logits = model(input_ids=torch.tensor([d["ids"]], device=device)).logits[0].float()     # (T, V)
            pos = [t for t, p in d["targets"][0::2]]                                               # reply positions
            probs = torch.softmax(logits[pos], -1)[:, d["action_ids"]]                              # (turns, 4)
            picked = [es.ACTION_NAMES.index(m) for m in moves[:len(pos)]]
            out += probs[torch.arange(len(pos)), picked].tolist()
    return 100 * float(np.mean(teacher)), 100 * float(np.mean(student))


def damaged(path: str) -> str:
    """What is wrong with a cached organism folder ("" when nothing): a missing file or a weights file whose header
    or size is inconsistent (a truncated copy)."""
    from safetensors import safe_open
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        if not os.path.exists(os.path.join(path, name)):
            return f"{name} is missing"
    try:
        with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
            for key in f.keys():
                f.get_slice(key)
    except Exception as err:  # noqa: BLE001 - any unreadable weights file is "damaged"
        return f"model.safetensors: {type(err).__name__}: {str(err).splitlines()[0][:200]}"
    return ""


def resolve(name: str) -> str:
    """What a command line's --model means: "tiny-sokoban" is this organism's cache folder (built on first use, about
    4 minutes, every core); "smollm2-135m" the folder converted from the SmolLM2 wheel (smollm2.py), and
    "smollm2-sokoban" its warm-started Sokoban base (real_base.py); any other name (a hub id, a folder, "tiny") is
    passed on unchanged."""
    if name == "tiny-sokoban":
        return ensure_built()
    if name in ("smollm2-135m", "smollm2-sokoban"):
        import real_base   # optional: these names need the wheel, and the warm start is built on first use
        return real_base.resolve(name)
    return name


def parse_recipe(items: list[str]) -> dict:
    """--recipe KEY=VALUE ... -> RECIPE overrides, each converted with the type of its RECIPE entry; a clear error
    (SystemExit) for an unknown key or a bad value, before anything is built."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in RECIPE:
            raise SystemExit(f"--recipe {item!r}: use KEY=VALUE with KEY one of {sorted(RECIPE)}")
        try:
            if isinstance(RECIPE[key], list):               # exclude_presets=easy,hard (or "" for none)
                overrides[key] = [name for name in value.split(",") if name]
                if any(name not in es.PRESETS for name in overrides[key]):
                    raise ValueError
            else:
                overrides[key] = type(RECIPE[key])(value)  # every other RECIPE entry is an int or a float
        except ValueError:
            kind = f"comma-separated list of {sorted(es.PRESETS)}" if isinstance(RECIPE[key], list) else \
                type(RECIPE[key]).__name__
            raise SystemExit(f"--recipe {item!r}: {key} takes a {kind}") from None
    return overrides


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--measure", action="store_true", help="print the pre-RL measurements")
    ap.add_argument("--rebuild", action="store_true", help="rebuild even if cached")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--model", default="", help="measure this model folder instead of the base")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--recipe", nargs="+", default=[], metavar="KEY=VALUE",
                    help="a variant organism: override RECIPE entries (e.g. p_follow=0.75); it gets its own cache "
                         "folder, whose path train.py takes as --model (the tiny profile applies to it too)")
    args = ap.parse_args()
    overrides = parse_recipe(args.recipe)
    torch.set_num_threads(args.threads)
    path = args.model or ensure_built(overrides, rebuild=args.rebuild)
    print(path)
    if args.measure:
        import eval as eval_lib        # a command-line entry: the library tiny_base.py never imports eval.py
        from common import make_env
        t0 = time.time()
        base, base_tokenizer = model_lib.load(path, device="cpu", dtype=torch.float32)
        env = make_env("sokoban", "easy", max_turns=RECIPE["max_turns"])
        m, levels, skills = eval_lib.teacher_gap(base, base_tokenizer, env, env.test_tasks[:64], samples=args.samples)
        if levels:
            m["copy_rate"] = copy_rate(base, base_tokenizer, levels, skills, RECIPE["max_turns"])
        print(eval_lib.format_teacher_gap(m))
        print(f"({time.time() - t0:.0f}s)")
