"""Tests of tiny_base.py on a drastically reduced recipe (a few levels, a few dozen steps): determinism of the data
generator, the players, token-stream identity with model.rollout's ledger, loss positions = reply tokens only, cache
hit/rebuild, --recipe parsing, and that variant organisms get the tiny profile."""
import os
import re

import numpy as np
import pytest
import torch

import env_sokoban as es
import model as model_lib
import rule_skills
import skills as skills_lib
import tiny_base as tb

SMALL = dict(num_levels=16, steps=150, batch_size=4, warmup=5, lr=3e-3, vocab_size=420, hidden_size=64,
             num_hidden_layers=2, intermediate_size=128, num_attention_heads=2, num_key_value_heads=1, head_dim=32)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("cache"))
    path = tb.ensure_built(SMALL, cache_root=root, progress=False)
    return root, path


def test_data_generator_is_deterministic():
    r = {**tb.RECIPE, **SMALL, "num_levels": 6}
    a, b = tb.generate_episodes(r, progress=False), tb.generate_episodes(r, progress=False)
    c = tb.generate_episodes({**r, "seed": 1}, progress=False)
    key = lambda eps: [(e["level"].task_id, [t[0] for t in e["turns"]], [tuple(t[1]) for t in e["turns"]],
                        e["skill"].to_prompt() if e["skill"] else None) for e in eps]
    assert key(a) == key(b)
    assert key(a) != key(c)
    assert all(abs(sum(p) - 1) < 1e-9 for e in a for _, p in e["turns"])
    assert sum(e["skill"] is not None for e in a) == 6 * tb.RECIPE["skill_episodes"]


def test_pretraining_levels_share_no_room_with_the_train_or_test_levels():
    """Disjoint by room, not only by seed: the generator repeats rooms across seeds (13 of the 64 easy test rooms
    came back among the first 1,500 pretraining seeds before pretrain_levels skipped them)."""
    r = {**tb.RECIPE, "num_levels": 300}
    held = tb.held_out_rooms(["easy", "hard"])
    before = [tb.room_key(lv) for lv in tb.pretrain_levels({**r, "exclude_presets": []})]
    after = [tb.room_key(lv) for lv in tb.pretrain_levels(r)]
    assert sum(k in held for k in before) > 0          # the check can fail: unfiltered seeds do repeat held rooms
    assert len(after) == 300 and not any(k in held for k in after)
    assert [k for k in before if k not in held] == after[:len([k for k in before if k not in held])]
    assert tb.parse_recipe(["exclude_presets=easy"]) == {"exclude_presets": ["easy"]}
    with pytest.raises(SystemExit, match="comma-separated"):
        tb.parse_recipe(["exclude_presets=eazy"])


def test_players():
    r = tb.RECIPE
    level = es.load_levels("easy", "test")[0]
    game = es.SokobanGame(level.room_fixed, level.room_state, 20)
    best = tb.optimal_action(game)
    naive = tb.naive_move(game)
    assert (best, naive) == (3, 2)       # this level: the box is down-left of the player; the solver goes left first
    p = tb.plain_policy(game, r)
    rest = (1 - r["p_opt"] - r["p_naive"]) / 4
    assert np.allclose(p, [rest, rest + r["p_naive"], rest + r["p_opt"], rest]) and p.sum() == pytest.approx(1)
    # the novice's move: toward the nearest box along the longer axis (rows on a tie), a push when next to it
    room = np.array([[0] * 6] + [[0, 1, 1, 1, 1, 0]] * 4 + [[0] * 6])
    for player, box, want in [((1, 1), (3, 2), 2), ((1, 1), (2, 4), 4), ((4, 4), (3, 3), 1), ((2, 3), (2, 2), 3)]:
        state = room.copy()
        state[player], state[box] = es.PLAYER, es.BOX
        assert tb.naive_move(es.SokobanGame(room, state)) == want, (player, box)
    state = room.copy()
    state[1, 1], state[2, 2] = es.PLAYER, es.BOX_ON_TARGET
    assert tb.naive_move(es.SokobanGame(np.where(state == es.BOX_ON_TARGET, es.TARGET, room), state)) is None
    here = tuple(int(x) for x in game.player)
    elsewhere = (here[0], here[1] + 1)
    wf = {here: 3, elsewhere: 1}                                 # {cell: move}
    on = tb.skill_policy(game, wf, set(), r)
    assert on[2] == pytest.approx(r["p_follow"] + (1 - r["p_follow"]) * tb.plain_policy(game, r)[2])
    off = tb.skill_policy(game, {elsewhere: 1}, set(), r)     # no workflow entry here: exactly the plain player
    assert np.allclose(off, tb.plain_policy(game, r))
    plain = tb.plain_policy(game, r)
    avoid = tb.skill_policy(game, {}, {(here, 2), (elsewhere, 1)}, r)   # "down" reported blocked at this cell
    assert avoid[1] == pytest.approx((1 - r["p_avoid"]) * plain[1]) and avoid.sum() == pytest.approx(1)
    assert np.allclose(avoid[[0, 2, 3]] / avoid[[0, 2, 3]].sum(), plain[[0, 2, 3]] / plain[[0, 2, 3]].sum())
    skill = skills_lib.Skill("", "Turn 1: at (row 2, col 3), up walked into a wall (nothing moved).\n"
                                 "Turn 4: at (row 1, col 1), left pushed a box that cannot move (nothing moved).",
                             "Moves from the start (loops and bumps removed):\n1. at (row 2, col 3): left\n"
                             "2. at (row 2, col 2): up (push the box)\n3. at (row 2, col 3): down")
    assert rule_skills.workflow_moves(skill) == {(2, 3): 3, (2, 2): 1}            # the first entry of a cell wins
    assert rule_skills.blocked_moves(skill) == {((2, 3), 1), ((1, 1), 3)}
    assert rule_skills.workflow_moves(skills_lib.Skill("", "", "No successful workflow yet.")) == {}
    # the summarizer's own text parses back (the organism reads exactly what train.py's teacher sees)
    rng = np.random.default_rng(0)
    for _ in range(40):
        ep, _ = tb.play(level, r, rng)
        sk = tb.make_skill(ep)
        if ep.result()["success"]:
            cells = re.findall(r"^\d+\. at (\(row \d+, col \d+\)): ", sk.golden_workflow, re.M)
            assert len(cells) == len(sk.golden_workflow.splitlines()) - 1 >= 1        # every move is keyed
            assert len(rule_skills.workflow_moves(sk)) == len(set(cells))
        bumps = [t for t in ep.trajectory if not t.get("moved")]
        assert bool(rule_skills.blocked_moves(sk)) == bool(bumps)


def test_cache_hit_and_rebuild(built, tmp_path, monkeypatch):
    root, path = built
    assert os.path.exists(os.path.join(path, "config.json")) and os.path.basename(path).startswith("tiny-sokoban-")
    monkeypatch.setattr(tb, "build", lambda *a, **k: pytest.fail("cache hit expected"))
    assert tb.ensure_built(SMALL, cache_root=root, progress=False) == path
    other = tb.base_dir({**SMALL, "steps": 61}, cache_root=root)
    assert other != path and not os.path.exists(other)              # a changed recipe gets its own folder
    monkeypatch.undo()
    # a rebuild in a cache root of its own (so the module's organism stays as it is): 2 training steps, 4 levels
    own = str(tmp_path / "cache")
    calls = []
    real = tb.build
    monkeypatch.setattr(tb, "build", lambda r, progress=True: calls.append(1) or real({**r, "steps": 2,
                                                                                       "num_levels": 4}, progress))
    first = tb.ensure_built(SMALL, cache_root=own, progress=False)
    assert tb.ensure_built(SMALL, cache_root=own, rebuild=True, progress=False) == first and calls == [1, 1]
    assert os.path.basename(first) == os.path.basename(path)        # the same recipe, the same folder name
    assert not [n for n in os.listdir(own) if ".tmp" in n]          # the temporary folder was renamed away


def test_tokenizer_round_trips_and_reloads(built):
    _, tok = tb.load_base(device="cpu", recipe=SMALL, cache_root=built[0], progress=False)
    for s in ["hello wörld 🙂 <action> up </action>\n\t", "<action>up</action>", "Turn 3/20. Boxes on target: 0/1."]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    for reply in tb.ACTION_REPLIES:
        ids = tok(reply, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and es.parse_action(tok.decode(ids))[1] is None


@pytest.mark.parametrize("with_skill", [False, True])
def test_transcript_equals_rollout_ledger(built, with_skill):
    """Replies generated by model.rollout (greedy), re-played through tb.transcript: identical ids, prompt_len, mask."""
    model, tok = tb.load_base(device="cpu", dtype=torch.float32, recipe=SMALL, cache_root=built[0], progress=False)
    levels = es.load_levels("easy", "test")[:3]
    skill = tb.make_skill(tb.play(levels[0], tb.RECIPE, np.random.default_rng(0))[0]) if with_skill else None
    eps = [es.SokobanEpisode(lv, max_turns=20) for lv in levels]
    prompts = [skills_lib.with_skill(ep.initial_messages(), skill.to_prompt()) if skill else ep.initial_messages()
               for ep in eps]
    ledgers = model_lib.rollout(model, tok, eps, model_lib.SamplingConfig(temperature=0.0, max_new_tokens=3),
                                generator=torch.Generator().manual_seed(0), prompts=prompts)
    for lv, L in zip(levels, ledgers):
        assert L.replies and all(r in tb.ACTION_REPLIES for r in L.replies), L.replies   # the format is learned
        x = tb.transcript(tok, lv, [(r, [0.25] * 4) for r in L.replies], skill, 20)
        assert x["ids"] == L.ids and x["prompt_len"] == L.prompt_len and x["trainable"] == L.trainable


def test_loss_only_on_reply_tokens(built):
    r = {**tb.RECIPE, **SMALL, "num_levels": 3}
    _, tok = tb.load_base(device="cpu", recipe=SMALL, cache_root=built[0], progress=False)
    eps = tb.generate_episodes(r, progress=False)
    for e in eps:
        x = tb.transcript(tok, e["level"], e["turns"], e["skill"], r["max_turns"])
        predicted = sorted(t + 1 for t, _ in x["targets"])              # hidden at t scores token t + 1
        assert predicted == [j for j, m in enumerate(x["trainable"]) if m]
        assert all(x["ids"][t + 1] in x["action_ids"] if p is not None else x["ids"][t + 1] == x["eot"]
                   for t, p in x["targets"])
    model = model_lib.build_tiny_model(tok, seed=0, hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                                       num_attention_heads=2, num_key_value_heads=1, head_dim=16)
    x = tb.transcript(tok, eps[0]["level"], eps[0]["turns"], None, r["max_turns"])
    aid = torch.tensor(x["action_ids"])
    base = tb.sequence_loss(model, [x], aid, x["eot"])
    last = max(t for t, _ in x["targets"]) + 1
    y = dict(x, ids=x["ids"][:last + 1])                                # the tail after the last reply: no loss
    assert torch.allclose(tb.sequence_loss(model, [y], aid, x["eot"]), base)
    z = dict(x, targets=[(t, None if p is None else [1.0, 0, 0, 0]) for t, p in x["targets"]])
    assert not torch.allclose(tb.sequence_loss(model, [z], aid, x["eot"]), base)   # the soft target counts


def test_copy_rate_reads_the_workflow_along_its_own_path(built):
    """copy_rate averages P(workflow move) over the workflow's own turns: a stub model that always puts all its mass on
    "up" scores exactly the fraction of "up" moves in the workflow, with and without the skill."""
    _, tok = tb.load_base(device="cpu", dtype=torch.float32, recipe=SMALL, cache_root=built[0], progress=False)
    up = tok.convert_tokens_to_ids(tb.ACTION_REPLIES[0])

    class AlwaysUp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, input_ids):
            logits = torch.zeros(*input_ids.shape, len(tok))
            logits[..., up] = 50.0
            return type("Out", (), {"logits": logits})()

    level = es.load_levels("easy", "test")[0]       # player (1, 2): the moves below never end the episode
    skill = skills_lib.Skill("", "", "Moves from the start (loops and bumps removed):\n1. at (row 1, col 2): up\n"
                             "2. at (row 1, col 2): right\n3. at (row 1, col 3): up\n4. at (row 1, col 3): left")
    teacher, student = tb.copy_rate(AlwaysUp(), tok, [level], [skill], 12)
    assert teacher == pytest.approx(50.0) and student == pytest.approx(50.0)
    no_workflow = skills_lib.Skill("", "", "No successful workflow yet.")
    teacher, student = tb.copy_rate(AlwaysUp(), tok, [level, level], [no_workflow, skill], 12)
    assert teacher == pytest.approx(50.0)                           # a skill without a workflow is skipped


def test_recipe_flag_rejects_unknown_keys_and_bad_values():
    """`tiny_base.py --recipe` builds variant organisms; a typo must say which keys exist, before any build starts."""
    assert tb.parse_recipe(["p_follow=0.5", "steps=10"]) == {"p_follow": 0.5, "steps": 10}
    for arg, expected in (("p_folow=0.5", "KEY one of"), ("p_follow=high", "takes a float"), ("p_follow", "KEY=VALUE")):
        with pytest.raises(SystemExit, match=expected):
            tb.parse_recipe([arg])
    import subprocess
    import sys
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, os.path.join(here, "tiny_base.py"), "--recipe", "p_folow=0.5"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "KEY one of" in out.stderr and "Traceback" not in out.stderr


def test_variant_organism_folders_get_the_tiny_profile():
    import config
    variant = os.path.join(tb.CACHE_ROOT, "tiny-sokoban-0123456789ab")
    cfg = config.parse_args(["--model", variant, "--run-dir", os.devnull])
    profile = config.TINY_PROFILES["tiny-sokoban"]
    assert all(getattr(cfg, k) == v for k, v in profile.items()) and cfg.summarizer == "rule"
    other = config.parse_args(["--model", "/models/Qwen3-4B", "--run-dir", os.devnull])
    assert other.lam == 1e-3 and other.max_turns == 40 and other.summarizer == "policy"


def test_resolve_builds_only_the_built_in_name(monkeypatch):
    monkeypatch.setattr(tb, "ensure_built", lambda *a, **k: "/cache/tiny-sokoban-abc")
    assert tb.resolve("tiny-sokoban") == "/cache/tiny-sokoban-abc"
    assert [tb.resolve(n) for n in ("tiny", "Qwen/Qwen3-4B", "./runs/x/ckpt/model")] == \
        ["tiny", "Qwen/Qwen3-4B", "./runs/x/ckpt/model"]


def test_teacher_gap_reports_the_trainers_own_pick(built):
    """eval.teacher_gap on a small organism: the own-skill section and, for both credit rules, the teacher with the
    skill the trainer's bank would retrieve; the source-reward prior never picks a failure's skill on a level whose
    visit had a success, the paper's letter may."""
    import eval as eval_lib
    from common import make_env
    model, tok = tb.load_base(device="cpu", dtype=torch.float32, recipe=SMALL, cache_root=built[0], progress=False)
    env = make_env("sokoban", "easy", max_turns=12)
    m, levels, skills = eval_lib.teacher_gap(model, tok, env, env.test_tasks[:8], samples=4, batch_size=32)
    t = m["trainer_pick"]
    assert set(t) == {"group", "source", "student_acc"} and all(t[c]["tasks"] == 8 for c in ("group", "source"))
    with_success = m["levels_with_skill"]
    assert t["source"]["gap_success"][2] == with_success and t["source"]["from_success"] == with_success / 8
    assert t["group"]["from_success"] <= t["source"]["from_success"]
    text = eval_lib.format_teacher_gap(m)
    assert "--skill-credit group" in text and "--skill-credit source" in text
