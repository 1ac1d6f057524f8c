"""rule_skills.py — deterministic skills written by rules instead of an LLM, and the readers of their text.

The paper summarises each trajectory with an external LLM (Seed1.8). The built-in tiny models cannot write JSON, and
tests need skills that do not depend on a model, so these summarisers write the same three fields from the trajectory
alone (train.py picks them with --summarizer rule, and by default for the tiny models):

 1. Sokoban: the episode is replayed from its initial room (`ep.summary_context()`) with env_sokoban.SokobanGame. The
    workflow of a success is the episode's own moves with wall bumps and loops cut out (still a valid plan); a failure
    gets "no successful workflow yet" plus its best prefix (the earliest state with the most boxes on targets). Each
    workflow move and each blocked move names the cell it was made from, in the observation's words ("3. at (row 2,
    col 1): up", "Turn 4: at (row 1, col 1), left walked into a wall (nothing moved)."), so the plan can be looked up
    by position after a detour; each blocked (cell, move) is listed once. It never uses the solver: a skill holds only
    what an attempt revealed.
 2. AppWorld: the API calls that worked, the failed ones with their error lines, and the call sequence of a success.
 3. The Sokoban cell-key text is written here and read here only (`workflow_moves`, `workflow_sequence`,
    `blocked_moves`, `skill_covers`): tiny_base.py's skill player and train.py's --sdl-mask covered variant use these
    readers, so writer and readers cannot drift apart.

Editing SokobanRuleSummarizer (its docstring included) changes the tiny base's recipe hash: the next run rebuilds the
organism into a new cache folder (about 4 minutes).

Run: `python -m pytest -q tests/test_rule_skills.py`.
"""
import logging
import re

import numpy as np

import env_sokoban as es
from skills import Skill, clip_text

log = logging.getLogger("rule_skills")

_DIRECTIONS = es.ACTION_NAMES     # Sokoban actions 1..4


def rule_summarizer(env: str):
    """The rule summariser of an environment ("sokoban" | "appworld")."""
    summarizers = {"sokoban": SokobanRuleSummarizer, "appworld": AppWorldRuleSummarizer}
    if env not in summarizers:
        raise ValueError(f"no rule summariser for env {env!r} (have {sorted(summarizers)})")
    return summarizers[env]()


# ----------------------------------------------------------------------------------------------------------------------
# Sokoban

class SokobanRuleSummarizer:
    """Deterministic Sokoban skill from one episode (choice 1): wall bumps, corner deadlocks, loops, format errors."""

    def __init__(self, max_items=3):
        self.max_items = max_items
        self.num_errors = 0

    def summarize(self, requests):
        return [_guarded(self, self.summarize_one, r) for r in requests]

    def _replay(self, req):
        """One record per env action: turn, action, moved, pushed, box_to, state (player, boxes) after, on_target."""
        fixed = np.asarray(req.extra["room_fixed"])
        game = es.SokobanGame(fixed, np.asarray(req.extra["room_state"]), max_steps=10 ** 9)

        def state():
            boxes = np.argwhere(np.isin(game.room_state, (es.BOX, es.BOX_ON_TARGET)))
            return game.player, tuple(sorted(tuple(int(x) for x in b) for b in boxes))

        steps, start = [], state()
        for turn, t in enumerate(req.trajectory, 1):
            for a in t.get("actions") or ([t["action"]] if t.get("action") is not None else []):
                if game.solved or not (isinstance(a, (int, np.integer)) and 1 <= a <= 4):
                    break
                before = state()
                game.step(a)
                after = state()
                new_box = sorted(set(after[1]) - set(before[1]))
                dr, dc = es.MOVES[a - 1]
                ahead = (before[0][0] + dr, before[0][1] + dc)
                wall = not (0 <= ahead[0] < fixed.shape[0] and 0 <= ahead[1] < fixed.shape[1]) \
                    or fixed[ahead] == es.WALL
                steps.append({"turn": turn, "action": a, "cell": before[0], "moved": after[0] != before[0],
                              "pushed": bool(new_box),
                              "box_to": new_box[0] if new_box else None, "wall": wall, "state": after,
                              "on_target": game.boxes_on_target})
        corner = {}
        for s in steps:
            if s["pushed"]:
                r, c = s["box_to"]
                blocked = [not (0 <= rr < fixed.shape[0] and 0 <= cc < fixed.shape[1]) or fixed[rr, cc] == es.WALL
                           for rr, cc in ((r - 1, c), (r + 1, c), (r, c - 1), (r, c + 1))]
                corner[id(s)] = fixed[r, c] != es.TARGET and (blocked[0] or blocked[1]) and (blocked[2] or blocked[3])
        n_start = int((np.asarray(req.extra["room_state"]) == es.BOX_ON_TARGET).sum())
        return steps, start, corner, game.num_boxes, n_start

    def summarize_one(self, req):
        traj, res = req.trajectory, req.result or {}
        if "room_fixed" in req.extra and "room_state" in req.extra:
            steps, start, corner, n_boxes, n_start = self._replay(req)
        else:   # no initial room: the trajectory's own flags only (no loop or deadlock detection)
            steps = [{"turn": i, "action": t["action"], "moved": bool(t.get("moved")),
                      "pushed": bool(t.get("box_moved")), "box_to": None, "wall": None, "state": None,
                      "on_target": None}
                     for i, t in enumerate(traj, 1) if t.get("action") is not None]
            start, corner, n_boxes, n_start = None, {}, None, 0
        success = bool(res.get("success"))
        path, loops = _loop_free_path(steps, start)
        placed = [s["turn"] for j, s in enumerate(steps) if s["on_target"] is not None
                  and s["on_target"] > (steps[j - 1]["on_target"] if j else n_start)]
        moves = sum(s["moved"] for s in steps)
        if success:
            good = f"Solved in {len(traj)} turns ({moves} moves); the plan below needs {len(path)} moves."
        else:
            final = steps[-1]["on_target"] if steps and steps[-1]["on_target"] is not None else n_start
            good = (f"Not solved: {final}/{n_boxes} boxes on targets at the end after {moves} moves in {len(traj)} "
                    f"turns." if n_boxes else f"Not solved after {moves} moves in {len(traj)} turns.")
        good += (f" Pushing a box onto a target worked at turn(s) {_few(placed, 6)}." if placed
                 else " No box reached a target.")
        bad = self._mistakes(traj, steps, corner, loops) or [
            "No wall bumps, corner deadlocks, loops or format errors."
            + ("" if success else " The episode ended before every box was placed.")]
        return Skill(good, "\n".join(bad), self._workflow(success, path, n_start, n_boxes, start))

    def _mistakes(self, traj, steps, corner, loops):
        k, bad = self.max_items, []
        bumps, seen = [], set()
        for s in steps:     # each blocked (cell, move) once, at its first turn
            key = (s.get("cell"), s["action"]) if s.get("cell") is not None else id(s)
            if not s["moved"] and key not in seen:
                seen.add(key)
                bumps.append(s)
        what = {True: "walked into a wall", False: "pushed a box that cannot move", None: "was blocked"}
        # keyed by the cell, like the workflow, so "do not go left at (row 1, col 2)" can be looked up by position
        at = lambda s: f"at {es.position_text(s['cell'])}, " if s.get("cell") is not None else ""
        bad += [f"Turn {s['turn']}: {at(s)}{_DIRECTIONS[s['action'] - 1]} {what[s['wall']]} (nothing moved)."
                for s in bumps[:k]]
        bad += [f"(+{len(bumps) - k} more blocked moves.)"] if len(bumps) > k else []
        dead = [s for s in steps if corner.get(id(s))]
        bad += [f"Turn {s['turn']}: pushed a box {_DIRECTIONS[s['action'] - 1]} into the corner at "
                f"(row {s['box_to'][0]}, col {s['box_to'][1]}), not a target: deadlock, that box can never reach "
                f"a target." for s in dead[:k]]
        bad += [(f"Turns {a + 1}-{b}" if b > a + 1 else f"Turn {b}") + ": loop, back to the position "
                + (f"after turn {a}" if a else "of the start") + " (moves wasted)." for a, b in loops[:k]]
        bad += [f"(+{len(loops) - k} more loops.)"] if len(loops) > k else []
        invalid = [(i, t.get("error")) for i, t in enumerate(traj, 1) if not t.get("valid", True)]
        if invalid:
            bad.append(f"{len(invalid)} turn(s) with an invalid reply (turns {_few([i for i, _ in invalid], 6)}; "
                       f"first error: {clip_text(invalid[0][1], 120)}); always answer in the required action format.")
        return bad

    @staticmethod
    def _workflow(success, path, n_start, n_boxes, start=None):
        # Each move is keyed by the cell it is made from, in the words of the observation ("You are at (row 1, col 2)"),
        # so the plan can be looked up by position after a detour instead of only followed from the start.
        cells = [start[0] if start else None] + [s["state"][0] if s["state"] else None for s in path]
        name = lambda j, s: ((f"at {es.position_text(cells[j])}: " if cells[j] is not None else "")
                             + _DIRECTIONS[s["action"] - 1] + (" (push the box)" if s["pushed"] else ""))
        if success:
            return ("Moves from the start (loops and bumps removed):\n"
                    + _numbered(name(j, s) for j, s in enumerate(path)))
        counts = [n_start] + [s["on_target"] if s["on_target"] is not None else 0 for s in path]
        best = max(range(len(counts)), key=lambda j: (counts[j], -j))      # earliest state with the most boxes placed
        if counts[best] > n_start:
            return (f"No successful workflow yet. Best prefix so far ({counts[best]}/{n_boxes} boxes on targets):\n"
                    + _numbered(name(j, s) for j, s in enumerate(path[:best])))
        return "No successful workflow yet. No move sequence placed a box on a target yet; avoid the mistakes above."



def _loop_free_path(steps, start):
    """The moves with every loop cut out (a revisited state rewinds the path) -> (path, [(first_turn, turn)]).
    Bumps never change the state, so they never enter the path. Still a valid plan from the start."""
    seen, path, loops = {start: 0}, [], []
    for s in steps:
        if not s["moved"]:
            continue
        if s["state"] is not None and s["state"] in seen:
            first = seen[s["state"]]
            loops.append((path[first - 1]["turn"] if first else 0, s["turn"]))
            path = path[:first]
            seen = {start: 0, **{p["state"]: j + 1 for j, p in enumerate(path)}}
            continue
        path.append(s)
        if s["state"] is not None:
            seen[s["state"]] = len(path)
    return path, loops


# ----------------------------------------------------------------------------------------------------------------------
# Readers of the Sokoban cell keys (the organism's skill player, --sdl-mask covered, copy_rate)

_WORKFLOW_LINE = re.compile(r"^\s*\d+\.\s+at \(row (\d+), col (\d+)\):\s+(up|down|left|right)\b", re.M)
_BLOCKED = re.compile(r"at \(row (\d+), col (\d+)\), (up|down|left|right) (?:walked into a wall|pushed a box that "
                      r"cannot move|was blocked)")
_YOU_ARE_AT = re.compile(r"You are at\s*(\(row \d+, col \d+\))")


def workflow_sequence(skill) -> list[tuple[tuple[int, int], int]]:
    """A skill's golden workflow as [(player cell, move 1..4)] in order, from its "k. at (row r, col c): move" lines;
    empty when the skill has no workflow (a failed attempt that placed no box)."""
    if skill is None:
        return []
    return [((int(r), int(c)), es.ACTION_NAMES.index(m) + 1) for r, c, m in _WORKFLOW_LINE.findall(
        skill.golden_workflow)]


def workflow_moves(skill) -> dict:
    """The workflow as {player cell: move}; the first entry of a cell wins (a plan can pass a cell twice)."""
    moves = {}
    for cell, move in workflow_sequence(skill):
        moves.setdefault(cell, move)
    return moves


def blocked_moves(skill) -> set:
    """The (cell, move) pairs a skill's mistake analysis reports as blocked ("Turn 2: at (row 1, col 2), left walked
    into a wall (nothing moved)."); empty without a skill."""
    if skill is None:
        return set()
    return {((int(a), int(b)), es.ACTION_NAMES.index(m) + 1) for a, b, m in _BLOCKED.findall(skill.mistake_analysis)}


def skill_covers(skill_text: str, observation: str) -> bool:
    """Whether a skill speaks about the state an observation shows: the player's cell in the observation's last
    "You are at (row r, col c)." line appears in the skill as "at (row r, col c)", the key of every workflow move and
    every blocked move. Used by train.py's labelled variant --sdl-mask covered; False for an observation without a
    position (a finished episode) or a skill without cell keys."""
    cells = _YOU_ARE_AT.findall(observation)
    return bool(cells) and f"at {cells[-1]}" in skill_text


# ----------------------------------------------------------------------------------------------------------------------
# AppWorld

_CALL = re.compile(r"apis\.(\w+)\.(\w+)")


class AppWorldRuleSummarizer:
    """Deterministic AppWorld skill (choice 2): the API calls that worked, the failed ones with their error lines, and
    the call sequence of a success as the workflow (from turns with keys reply/code/observation/valid/error)."""

    def __init__(self, max_items=5):
        self.max_items = max_items
        self.num_errors = 0

    def summarize(self, requests):
        return [_guarded(self, self.summarize_one, r) for r in requests]

    def summarize_one(self, req):
        worked, failed, no_code = [], [], []
        for i, t in enumerate(req.trajectory, 1):
            code, obs = t.get("code") or "", str(t.get("observation") or "")
            if not code.strip():
                no_code.append(i)
                continue
            calls = [f"{a}.{b}" for a, b in _CALL.findall(code)]
            if obs.lstrip().startswith("Execution failed"):
                lines = [x.strip() for x in obs.strip().splitlines() if x.strip()]
                failed.append((i, calls, clip_text(lines[-1] if lines else obs, 160)))
            else:
                worked += [c for c in calls if c not in worked]
        res, k = req.result or {}, self.max_items
        success = bool(res.get("success"))
        head = "Task completed." if success else f"Not completed (completion {float(res.get('completion') or 0):.2f})."
        good = head + (f" API calls that ran without error: {', '.join(worked)}." if worked
                       else " No API call ran without error.")
        bad = [f"Turn {i}: {', '.join(c) or 'code'} failed: {err}" for i, c, err in failed[:k]]
        bad += [f"(+{len(failed) - k} more failed executions.)"] if len(failed) > k else []
        if no_code:
            bad.append(f"{len(no_code)} turn(s) without a code block (turns {_few(no_code, 6)}).")
        if not bad:
            bad = ["No failed calls." + ("" if success else " The task was still not solved: check the answer and "
                                         "finish with apis.supervisor.complete_task.")]
        if success:
            flow = "API calls in order:\n" + _numbered(f"apis.{c}" for c in worked)
        else:
            flow = "No successful workflow yet." + (" Calls that worked so far:\n" + _numbered(
                f"apis.{c}" for c in worked) if worked else "")
        return Skill(good, "\n".join(bad), flow)


# ----------------------------------------------------------------------------------------------------------------------
# helpers

def _guarded(owner, fn, req):
    try:
        return fn(req)
    except Exception as e:   # a malformed trajectory costs its skill, not the training run; counted for the logs
        owner.num_errors += 1
        log.warning("%s failed on task %s: %r", type(owner).__name__, getattr(req, "task_id", "?"), e)
        return None


def _numbered(items):
    return "\n".join(f"{i}. {x}" for i, x in enumerate(items, 1))


def _few(xs, n):
    return ", ".join(map(str, xs[:n])) + (f" and {len(xs) - n} more" if len(xs) > n else "")
