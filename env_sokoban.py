"""Text Sokoban for Skill-SD: gym-sokoban rules, the RAGEN/verl-agent room generator, a BFS solver, the LLM text
interface (prompt, renderer, parser) and the paper's level sets. numpy only, no gym.

Paper setup (METHOD.md §9): 6x6 rooms with 2 boxes, 96 training levels with a curriculum, 64 test levels, at
most 40 steps; Acc = solved, Comp = boxes on target at the end / boxes; the training reward is Comp.

Sources: mpSchrader/gym-sokoban (`sokoban_env.py`, `room_utils.py`)
for cell codes and step rules; RAGEN-AI/RAGEN (`ragen/env/sokoban`) and langfengQ/verl-agent
(`agent_system/environments/env_package/sokoban`) for the generator, symbols and prompt formats.

Choices and deviations (numbered; [C] = ours):
 1. Generator: the RAGEN/verl-agent algorithm step for step, with the two RNG streams made explicit
    (`random.Random(seed)` and numpy's legacy `RandomState(seed)`) instead of the global seeds the frameworks set, so
    seed s gives the same room as there and nothing global is touched. The reverse-play DFS runs on an explicit
    stack in the same pre-order as their recursion (no recursion limit) and skips blocked moves, which in their code
    only revisit the parent. Checked against a transcription of their code: the same room or the same failure on
    all ~1,900 seeds tried over 11 configurations (6x6 with 1-3 boxes at depths 30-300; 7x7, 8x8, 10x10, 5x8, 9x5).
 2. [C] A failed generation raises SokobanGenerationError. `make_level` retries with seed (seed*1_000_003 + k) mod
    2**32, k = 1, 2, ... (the frameworks use the per-process salted hash(str(seed)), which is not reproducible) and
    records the effective seed. Level sets instead skip seeds that need a retry.
 3. Step rules equal gym-sokoban's (0 differences in 7,808 random steps against a transcription), except: moves off the grid are blocked (gym wraps negative indices; generated
    rooms have wall borders, so this never matters there); `boxes_on_target` starts from the actual room (gym starts
    at 0); `done` stays true after the step limit (gym compares steps == max_steps).
 4. [C] Rendering uses the RAGEN/verl-agent symbols (# _ O √ X P S), one space between cells (verl-agent's "list"
    mode): a compact row like `######` merges into multi-character BPE tokens, so the model cannot count columns;
    spaced cells cost about one token each (~70 tokens per 6x6 grid).
 5. [C] Default action style "single" (verl-agent): one `<think>..</think><action>up</action>` per turn, so 40 steps
    = 40 turns. The trimmed, lower-cased text inside the first <action>..</action> must be exactly up/down/left/right
    (verl-agent accepts any substring match); <think> is asked for but not required. Option "multi" (RAGEN):
    `<answer>Up || Left</answer>`, at most 5 actions per turn, invalid pieces dropped.
 6. [C] An invalid reply uses a turn, makes no env step (no -0.1), costs `format_penalty` (default 0; 0.1 = the
    frameworks) and the next observation says what was wrong. No reply (any string, bytes, None) can raise.
 7. [C] The whole chat is kept (METHOD.md §9), so observations are short: a feedback line, "Turn k/H. Boxes on
    target: i/n.", "You are at (row r, col c)." (the player's cell, 0-based from the top-left wall corner: the key
    that rule_skills.SokobanRuleSummarizer writes before each workflow move and blocked move) and the grid.
 8. [C] Level sets: "paper" = 6x6, 2 boxes, depth 100, 40 steps; train = the first 96 seeds
    >= 10,000 that generate without a retry, sorted by optimal length (curriculum; its one duplicate room, seed
    10068 = 10010, is kept); test = the first 64 such seeds >= 1,000,000 whose room is neither a training room nor an
    earlier test room. "easy" = the same with 1 box, depth 300 (RAGEN's SimpleSokoban) and 20 steps (1-box optima
    are at most 11). Every level is BFS-verified; a level set is cached per process (about 0.2 s to build).

Run: `python env_sokoban.py` (render a level and its BFS solution), `python env_sokoban.py --play` (play with w/a/s/d),
`python -m pytest -q tests/test_env_sokoban.py`.
"""
import argparse
import functools
import random
import sys
from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------------------------
# Cell codes, actions, symbols (gym-sokoban / RAGEN / verl-agent)

WALL, FLOOR, TARGET, BOX_ON_TARGET, BOX, PLAYER, PLAYER_ON_TARGET = range(7)
ACTION_NAMES = ("up", "down", "left", "right")          # action id a in 1..4 -> ACTION_NAMES[a - 1]
MOVES = ((-1, 0), (1, 0), (0, -1), (0, 1))              # (row, col) change of up, down, left, right
GYM_ACTION_LOOKUP = ("no operation", "push up", "push down", "push left", "push right",
                     "move up", "move down", "move left", "move right")
SYMBOLS = "#_O√XPS"                                     # symbol of code c = SYMBOLS[c]


class SokobanGenerationError(RuntimeError):
    """The generator could not build a room for this seed (the frameworks' RuntimeError / RuntimeWarning)."""


# ----------------------------------------------------------------------------------------------------------------
# Room generator (RAGEN / verl-agent, step for step)

_WALK_DIRS = ((1, 0), (0, 1), (-1, 0), (0, -1))        # the topology walk's direction list, in the frameworks' order
_MASKS = (((0, -1), (0, 0), (0, 1)),                    # floor offsets of the five 3x3 masks, in order
          ((-1, 0), (0, 0), (1, 0)),
          ((0, -1), (0, 0), (1, 0)),
          ((0, -1), (0, 0), (1, -1), (1, 0)),
          ((0, 0), (0, 1), (1, 0)))
_MAX_EXPLORED = 300_000                                 # the frameworks' state cap of the reverse-play DFS


def _topology(rnd, H, W, num_steps, p_change=0.35):
    """Random walk that stamps floor masks; draws from rnd only."""
    level = np.zeros((H, W), dtype=np.int64)
    direction = rnd.sample(_WALK_DIRS, 1)[0]
    r = rnd.randint(1, H - 1)                           # inclusive bounds, row first then column
    c = rnd.randint(1, W - 1)
    for _ in range(num_steps):
        if rnd.random() < p_change:
            direction = rnd.sample(_WALK_DIRS, 1)[0]
        r = max(min(r + direction[0], H - 2), 1)
        c = max(min(c + direction[1], W - 2), 1)
        for dr, dc in rnd.sample(_MASKS, 1)[0]:
            level[r + dr, c + dc] = 1
    level[[0, H - 1], :] = 0
    level[:, [0, W - 1]] = 0
    return level


def _place(nrs, level, num_boxes):
    """Player, then one target per box, each uniform over the remaining floor cells (row-major); draws from nrs only."""
    floor = np.flatnonzero(level == FLOOR)
    if len(floor) <= num_boxes + 1:
        raise SokobanGenerationError(f"not enough free spots (#{len(floor)}) for 1 player and {num_boxes} boxes")
    level.flat[floor[nrs.randint(len(floor))]] = PLAYER
    for _ in range(num_boxes):
        floor = np.flatnonzero(level == FLOOR)
        level.flat[floor[nrs.randint(len(floor))]] = TARGET
    return level


def _displacement(mapping, targets, W):
    """Sum of Manhattan distances between each box (mapping[i]) and the target it started on (targets[i])."""
    return sum(abs(b // W - t // W) + abs(b % W - t % W) for b, t in zip(mapping, targets))


def _reverse_play(state, fixed, W, search_depth):
    """Deterministic DFS of pull moves from the solved room -> ((best state, its mapping), targets).

    state/fixed: flat bytearrays. During generation 4 = unmoved box (on its own target), 3 = pulled box. A state is
    scored swaps * displacement, and only when every target is visibly empty (no box or player on it)."""
    targets = tuple(i for i, v in enumerate(fixed) if v == TARGET)  # row-major, = the frameworks' mapping order
    steps = (-W, W, -1, 1)                                            # pull up, down, left, right
    explored, best_score, best = set(), -1, None
    # stack items = (state, player, mapping, swaps, last_pull, ttl); pushing children reversed gives the recursion's
    # pre-order, and a child's ttl is its parent's ttl after the parent's own decrement, as in the frameworks.
    stack = [(state, state.index(PLAYER), targets, 0, -1, search_depth)]
    while stack:
        state, player, mapping, swaps, last_pull, ttl = stack.pop()
        ttl -= 1
        if ttl <= 0 or len(explored) >= _MAX_EXPLORED:
            continue
        key = bytes(state)
        if key in explored:
            continue
        score = swaps * _displacement(mapping, targets, W) if state.count(TARGET) == len(targets) else 0
        if score > best_score:                                        # strict: the first of equal scores wins
            best_score, best = score, (state, mapping)
        explored.add(key)
        children = []
        for d in steps:
            nxt = player + d
            if state[nxt] not in (FLOOR, TARGET):                     # blocked: the same state, already explored
                continue
            child, child_map, pull = bytearray(state), mapping, last_pull
            child[player], child[nxt] = fixed[player], PLAYER
            behind = player - d
            if state[behind] in (BOX_ON_TARGET, BOX):                 # pull the box behind into the old player cell
                child[player], child[behind] = BOX_ON_TARGET, fixed[behind]
                pull = mapping.index(behind)                          # the box's target index = the frameworks' key
                child_map = mapping[:pull] + (player,) + mapping[pull + 1:]
            children.append((child, nxt, child_map, swaps + (pull != last_pull), pull, ttl))
        stack.extend(reversed(children))
    return best, targets


def _player_walk(rnd, state, fixed, W, displacement):
    """Move the player up to 3 cells at random so it does not always start beside a box; draws from rnd only."""
    if rnd.random() > (0.8 if displacement == 1 else 0.5):
        return
    player = state.index(PLAYER)
    visited = [player]
    for taken in range(1, 4):
        options = [player + d for d in (-W, W, -1, 1) if state[player + d] in (FLOOR, TARGET)
                   and player + d not in visited]
        if not options:
            return
        nxt = rnd.choice(options)
        state[player], state[nxt] = fixed[player], PLAYER
        player = nxt
        visited.append(nxt)
        if taken == 3 or rnd.random() > 0.5:                          # the third step draws nothing
            return


def generate_room(dim_room=(6, 6), num_boxes=1, search_depth=300, seed=0):
    """RAGEN/verl-agent room for `seed` -> (room_fixed, room_state), int64 arrays in gym-sokoban codes.

    Raises SokobanGenerationError when the frameworks' generator raises for this seed (then they reseed)."""
    H, W = (int(x) for x in dim_room)
    if H < 3 or W < 3 or num_boxes < 1 or search_depth < 2:
        raise ValueError(f"need dim_room >= (3, 3), num_boxes >= 1, search_depth >= 2; got {dim_room}, "
                         f"{num_boxes}, {search_depth}")
    if not 0 <= int(seed) < 2 ** 32:
        raise ValueError(f"seed must be in [0, 2**32), got {seed}")
    rnd, nrs = random.Random(int(seed)), np.random.RandomState(int(seed))
    num_steps = int(1.7 * (H + W))                                    # gym-sokoban's num_gen_steps
    for _ in range(4):                                                # the frameworks' tries; streams keep running
        grid = _place(nrs, _topology(rnd, H, W, num_steps), num_boxes)
        fixed = bytearray(np.where(grid == PLAYER, FLOOR, grid).ravel().tolist())
        start = bytearray(np.where(grid == TARGET, BOX, grid).ravel().tolist())  # every box on its own target
        (state, mapping), targets = _reverse_play(start, fixed, W, search_depth)
        displacement = _displacement(mapping, targets, W)
        if displacement > 0:
            break
    else:
        raise SokobanGenerationError(f"seed {seed}: generated model with score == 0 after 4 tries")
    state = bytearray(BOX if v == BOX_ON_TARGET else v for v in state)  # pulled boxes are plain boxes again
    _player_walk(rnd, state, fixed, W, displacement)
    return (np.array(fixed, dtype=np.int64).reshape(H, W), np.array(state, dtype=np.int64).reshape(H, W))


# ----------------------------------------------------------------------------------------------------------------
# BFS solver

def solve(room_fixed, room_state, max_depth=100, max_states=2_000_000):
    """Shortest (move-optimal) list of actions 1..4 that covers every target, [] if solved, None if none is found
    within max_depth moves / max_states states. Pushes onto dead squares (no box there can reach a target even
    alone) are pruned, which keeps optimality and makes 6x6 two-box rooms take milliseconds."""
    fixed = np.pad(np.asarray(room_fixed), 1)                         # wall ring: no bounds checks below
    state = np.pad(np.asarray(room_state), 1)
    W = fixed.shape[1]
    wall = (fixed == WALL).ravel().tolist()
    steps = (-W, W, -1, 1)
    targets = np.flatnonzero(fixed == TARGET).tolist()
    live = set(targets)                                               # reverse push reachability from the targets
    frontier = list(targets)
    while frontier:
        q = frontier.pop()
        for d in steps:
            p = q - d                                                 # box at p, player at p - d, pushed onto q
            if p not in live and not wall[p] and not wall[p - d]:
                live.add(p)
                frontier.append(p)
    goal = sum(1 << t for t in targets)
    boxes = sum(1 << b for b in np.flatnonzero((state == BOX) | (state == BOX_ON_TARGET)).tolist())
    player = np.flatnonzero((state == PLAYER) | (state == PLAYER_ON_TARGET))
    if len(player) != 1:
        raise ValueError(f"room_state needs exactly one player, found {len(player)}")
    start = (int(player[0]), boxes)
    if boxes & goal == goal:
        return []
    if any(boxes >> b & 1 and b not in live for b in range(fixed.size)):
        return None
    parent = {start: None}
    layer = [start]
    for _ in range(max_depth):
        next_layer = []
        for p, b in layer:
            for action, d in enumerate(steps, 1):
                q = p + d
                if wall[q]:
                    continue
                nb = b
                if b >> q & 1:                                        # push: the cell beyond must be free and live
                    r = q + d
                    if wall[r] or b >> r & 1 or r not in live:
                        continue
                    nb = b ^ (1 << q) ^ (1 << r)
                child = (q, nb)
                if child in parent:
                    continue
                parent[child] = ((p, b), action)
                if nb & goal == goal:
                    plan = []
                    while parent[child] is not None:
                        child, action = parent[child]
                        plan.append(action)
                    return plan[::-1]
                next_layer.append(child)
        if not next_layer or len(parent) > max_states:
            return None
        layer = next_layer
    return None


# ----------------------------------------------------------------------------------------------------------------
# The game (gym-sokoban step semantics)

class SokobanGame:
    """One room. step(a) for a in 0..8 (0 no-op, 1-4 push-or-move, 5-8 move) -> (reward, done, info) as gym-sokoban."""

    def __init__(self, room_fixed, room_state, max_steps=40):
        self.room_fixed = np.array(room_fixed, dtype=np.int64)
        self.room_state = np.array(room_state, dtype=np.int64)        # always current (a private copy)
        if self.room_fixed.shape != self.room_state.shape or self.room_fixed.ndim != 2:
            raise ValueError("room_fixed and room_state must be 2-D arrays of the same shape")
        players = np.argwhere(self.room_state == PLAYER)
        if len(players) != 1:
            raise ValueError(f"room_state needs exactly one player (code 5), found {len(players)}")
        self.player = tuple(int(x) for x in players[0])
        self.num_boxes = int(np.isin(self.room_state, (BOX, BOX_ON_TARGET)).sum())
        self.max_steps = int(max_steps)
        self.steps = 0
        self.boxes_on_target = self._count_on_target()

    def _count_on_target(self):
        uncovered = (self.room_state == TARGET) | ((self.room_fixed == TARGET) & (self.room_state == PLAYER))
        return self.num_boxes - int(uncovered.sum())

    @property
    def solved(self):
        return self.boxes_on_target == self.num_boxes

    @property
    def done(self):
        return self.solved or self.steps >= self.max_steps

    def _free(self, r, c):
        H, W = self.room_state.shape
        return 0 <= r < H and 0 <= c < W and self.room_state[r, c] in (FLOOR, TARGET)

    def _walk(self, r, c):
        pr, pc = self.player
        self.room_state[pr, pc] = self.room_fixed[pr, pc]
        self.room_state[r, c] = PLAYER
        self.player = (r, c)

    def step(self, action):
        if not (isinstance(action, (int, np.integer)) and 0 <= action <= 8):
            raise ValueError(f"action must be an int in 0..8, got {action!r}")
        action = int(action)
        self.steps += 1
        moved = box_moved = False
        if action > 0:
            dr, dc = MOVES[(action - 1) % 4]
            r, c = self.player[0] + dr, self.player[1] + dc
            H, W = self.room_state.shape
            if action <= 4 and 0 <= r < H and 0 <= c < W and self.room_state[r, c] in (BOX, BOX_ON_TARGET) \
                    and self._free(r + dr, c + dc):
                self.room_state[r + dr, c + dc] = BOX_ON_TARGET if self.room_fixed[r + dr, c + dc] == TARGET else BOX
                self._walk(r, c)
                moved = box_moved = True
            elif self._free(r, c):
                self._walk(r, c)
                moved = True
        before, self.boxes_on_target = self.boxes_on_target, self._count_on_target()
        reward = -0.1 + (self.boxes_on_target > before) - (self.boxes_on_target < before) + 10.0 * self.solved
        info = {"action.name": GYM_ACTION_LOOKUP[action], "action.moved_player": moved, "action.moved_box": box_moved}
        if self.done:
            info["maxsteps_used"] = self.steps >= self.max_steps
            info["all_boxes_on_target"] = self.solved
        return reward, self.done, info

    def render(self):
        return render(self.room_fixed, self.room_state)


def position_text(cell) -> str:
    """A cell as the observations and skill workflows write it: "(row 1, col 2)", 0-based from the top-left corner of
    the room (the outer wall ring is row 0 / col 0)."""
    return f"(row {int(cell[0])}, col {int(cell[1])})"


def render(room_fixed, room_state, sep=" "):
    """Text grid, rows top to bottom; a player on a target is shown as S (code 6)."""
    shown = np.where((np.asarray(room_state) == PLAYER) & (np.asarray(room_fixed) == TARGET),
                     PLAYER_ON_TARGET, room_state)
    return "\n".join(sep.join(SYMBOLS[int(v)] for v in row) for row in shown)


def room_from_text(text):
    """Inverse of render (spaces optional) -> (room_fixed, room_state); for tests and hand-made rooms."""
    rows = [line.replace(" ", "") for line in text.strip().splitlines()]
    if not rows or len({len(r) for r in rows}) != 1 or any(ch not in SYMBOLS for r in rows for ch in r):
        raise ValueError(f"not a rectangular grid of {SYMBOLS!r}: {text!r}")
    shown = np.array([[SYMBOLS.index(ch) for ch in r] for r in rows], dtype=np.int64)
    fixed = np.select([shown == WALL, np.isin(shown, (TARGET, BOX_ON_TARGET, PLAYER_ON_TARGET))], [WALL, TARGET], FLOOR)
    return fixed, np.where(shown == PLAYER_ON_TARGET, PLAYER, shown)


# ----------------------------------------------------------------------------------------------------------------
# Levels and level sets

@dataclass(frozen=True, eq=False)
class Level:
    task_id: str                 # f"sokoban-{preset}-{seed}"
    seed: int                    # the requested seed
    effective_seed: int          # the seed that generated the room (differs after a retry)
    dim_room: tuple
    num_boxes: int
    search_depth: int
    room_fixed: np.ndarray       # read-only
    room_state: np.ndarray       # read-only, the initial state
    optimal_plan: tuple          # BFS-optimal actions 1..4
    max_steps: int               # env step limit (the paper: 40)

    @property
    def optimal_length(self):
        return len(self.optimal_plan)


def make_level_unchecked(name, seed, effective_seed, dim_room, num_boxes, search_depth, max_steps):
    """Generate and BFS-verify one room for exactly this seed (no retry); raises SokobanGenerationError when either
    fails. make_level retries; level sets and tiny_base.py skip such seeds instead."""
    fixed, state = generate_room(dim_room, num_boxes, search_depth, effective_seed)
    plan = solve(fixed, state)
    if plan is None:
        raise SokobanGenerationError(f"seed {effective_seed}: BFS found no solution")
    fixed.flags.writeable = state.flags.writeable = False            # levels are shared (cached), never mutated
    return Level(f"sokoban-{name}-{seed}", int(seed), int(effective_seed), tuple(dim_room), num_boxes, search_depth,
                 fixed, state, tuple(plan), max_steps)


def make_level(seed, dim_room=(6, 6), num_boxes=2, search_depth=100, max_steps=40, name="custom", max_retries=20):
    """One solvable level for `seed`; a failure retries with (seed * 1_000_003 + k) mod 2**32, k = 1, 2, ..."""
    for k in range(max_retries + 1):
        effective = int(seed) if k == 0 else (int(seed) * 1_000_003 + k) % 2 ** 32
        try:
            return make_level_unchecked(name, seed, effective, dim_room, num_boxes, search_depth, max_steps)
        except SokobanGenerationError:
            continue
    raise SokobanGenerationError(f"seed {seed}: no room after {max_retries} retries")


@dataclass(frozen=True)
class LevelSetConfig:
    name: str
    dim_room: tuple = (6, 6)
    num_boxes: int = 2
    search_depth: int = 100      # ours (RAGEN 300, verl-agent 30)
    num_train: int = 96
    num_test: int = 64
    train_seed_start: int = 10_000
    test_seed_start: int = 1_000_000
    max_steps: int = 40          # env steps; with one action per turn also the number of turns
    min_optimal_length: int = 1  # skip rooms whose BFS solution is shorter (a harder set from the same generator)


PRESETS = {
    "paper": LevelSetConfig("paper"),
    "easy": LevelSetConfig("easy", num_boxes=1, search_depth=300, max_steps=20),
    # the easy generator's rooms that need 5+ moves: the built-in tiny base solves about 15% of the test levels at
    # T = 1, close to the paper's base on 2-box levels (12.5%): rewards as sparse as the paper's with one box (README)
    "hard": LevelSetConfig("hard", num_boxes=1, search_depth=300, max_steps=20, min_optimal_length=5),
}


def _scan_seeds(cfg, seed, count, seen=None):
    """The first `count` levels from `seed` on that generate without a retry; with `seen` (a set of room bytes,
    updated), rooms already in it are skipped too."""
    levels = []
    while len(levels) < count:
        try:
            level = make_level_unchecked(cfg.name, seed, seed, cfg.dim_room, cfg.num_boxes, cfg.search_depth,
                                         cfg.max_steps)
            key = level.room_fixed.tobytes() + level.room_state.tobytes()
            if level.optimal_length >= cfg.min_optimal_length and (seen is None or key not in seen):
                levels.append(level)
                if seen is not None:
                    seen.add(key)
        except SokobanGenerationError:                                 # skip seeds that would need a retry
            pass
        seed += 1
    return levels


@functools.lru_cache(maxsize=8)
def _level_set(cfg):
    """(train, test) tuples of Levels; cached because it is a pure function of the frozen config."""
    train = _scan_seeds(cfg, cfg.train_seed_start, cfg.num_train)     # duplicates kept (paper: 10068 = 10010)
    seen = {lv.room_fixed.tobytes() + lv.room_state.tobytes() for lv in train}
    test = _scan_seeds(cfg, cfg.test_seed_start, cfg.num_test, seen)   # unique, and no training room
    assert train[-1].seed < test[0].seed, "train and test seed ranges overlap"
    train.sort(key=lambda lv: (lv.optimal_length, lv.seed))          # curriculum order
    return tuple(train), tuple(test)


def load_levels(preset="paper", split="train"):
    """Levels of a preset ("paper", "easy" or a LevelSetConfig); split "train" (curriculum order) or "test"."""
    cfg = PRESETS.get(preset) if isinstance(preset, str) else preset
    if not isinstance(cfg, LevelSetConfig) or split not in ("train", "test"):
        raise ValueError(f"unknown preset {preset!r} (have {sorted(PRESETS)}) or split {split!r} (train/test)")
    return list(_level_set(cfg)[split == "test"])


# ----------------------------------------------------------------------------------------------------------------
# Text interface: prompt and parser (RAGEN / verl-agent formats, paraphrased)

SYSTEM_PROMPT = "You are an expert Sokoban player. You solve puzzles step by step and never break the answer format."

RULES_TEXT = ("You are playing Sokoban. Push every box onto a target.\n\n"
          "Symbols: # wall, _ floor, O target, X box, √ box on a target, P you, S you standing on a target.\n"
          "Rows are listed top to bottom: \"up\" goes one row up, \"left\" one column left.\n"
          "Rules:\n"
          "- Each action moves you one cell up, down, left or right.\n"
          "- Walking into a box pushes it one cell further if that cell is floor or a target. You cannot pull boxes,"
          " push two boxes at once, or push a box into a wall.\n"
          "- A box in a corner is stuck for good and a box against a wall can only slide along it, so plan before"
          " you push.\n"
          "- You have {limit}.")

FORMAT_TEXT = {
    "single": "Each turn, first think inside <think> </think>, then give exactly one action inside <action> </action>:"
              " up, down, left or right.\nExample: <think>The box is right of me and the target is right of the"
              " box.</think><action>right</action>",
    "multi": "Each turn, first think inside <think> </think>, then give 1 to {k} actions inside <answer> </answer>,"
             " separated by ||, each one of Up, Down, Left, Right.\nExample: <think>I go around the box, then push"
             " it up.</think><answer>Right || Up || Up</answer>",
}


def _as_text(reply):
    """Any reply (str, bytes, None, other) as a str; never raises."""
    try:
        if isinstance(reply, (bytes, bytearray)):
            return bytes(reply).decode("utf-8", errors="replace")
        return reply if isinstance(reply, str) else "" if reply is None else str(reply)
    except Exception:                                                   # a str() that raises
        return ""


def _snippet(text, n=20):
    text = "".join(ch if ch.isprintable() else "?" for ch in text[:n + 1])
    return repr(text[:n] + ("..." if len(text) > n else ""))


def _tag(text, name):
    """Content of the first <name>...</name> of the lower-cased text, or (None, error)."""
    low = text.lower()
    start = low.find(f"<{name}>")
    if start < 0:
        return None, f"no <{name}> tag"
    end = low.find(f"</{name}>", start + len(name) + 2)
    if end < 0:
        return None, f"<{name}> is not closed by </{name}>"
    return low[start + len(name) + 2:end].strip(), None


def parse_action(reply):
    """Single style -> (action id 1..4, None) or (None, error message)."""
    word, error = _tag(_as_text(reply), "action")
    if error:
        return None, error
    if word not in ACTION_NAMES:
        return None, f"{_snippet(word)} is not one of up, down, left, right"
    return ACTION_NAMES.index(word) + 1, None


def parse_actions(reply, max_actions=5):
    """Multi style -> (list of action ids, None or error message); valid pieces are kept, the rest dropped."""
    content, error = _tag(_as_text(reply), "answer")
    if error:
        return [], error
    pieces = [p.strip() for p in content.split("||", max_actions)]   # at most max_actions + 1 pieces
    actions = [ACTION_NAMES.index(p) + 1 for p in pieces[:max_actions] if p in ACTION_NAMES]
    if len(pieces) > max_actions:
        return actions, f"more than {max_actions} actions; only the first {max_actions} were considered"
    bad = [p for p in pieces if p not in ACTION_NAMES]
    if bad:
        return actions, f"{_snippet(bad[0])} is not one of Up, Down, Left, Right"
    return actions, None


# ----------------------------------------------------------------------------------------------------------------
# The episode protocol (common.Episode, METHOD.md §11)

class SokobanEpisode:
    """One level played by a model, turn by turn (the episode protocol, common.Episode)."""

    def __init__(self, level, max_turns=40, action_style="single", format_penalty=0.0, reward="completion",
                 max_actions_per_turn=5):
        if action_style not in FORMAT_TEXT or reward not in ("completion", "gym", "success"):
            raise ValueError(f"action_style must be single/multi and reward completion/gym/success, "
                             f"got {action_style!r}, {reward!r}")
        self.level, self.task_id = level, level.task_id
        self.max_turns, self.action_style, self.format_penalty = int(max_turns), action_style, float(format_penalty)
        self.reward_kind, self.max_actions_per_turn = reward, int(max_actions_per_turn)
        self.game = SokobanGame(level.room_fixed, level.room_state, level.max_steps)
        self.trajectory, self.done, self.aborted = [], False, None
        self.turns = self.format_errors = 0
        self.gym_return = 0.0

    def _observation(self, feedback=""):
        g = self.game
        if self.done:
            status = ("Solved: every box is on a target." if g.solved else
                      f"Episode over ({self.aborted or 'no turns or steps left'}).")
            status += f" Boxes on target: {g.boxes_on_target}/{g.num_boxes}."
        else:
            status = f"Turn {self.turns + 1}/{self.max_turns}. Boxes on target: {g.boxes_on_target}/{g.num_boxes}."
        # The player's cell in words, with the coordinates the skills use ("at (row 1, col 2): left"): an agent can
        # look its state up in a skill's workflow without counting grid cells.
        where = f"You are at {position_text(g.player)}."
        return "\n".join(line for line in (feedback, status, where, g.render()) if line)

    def task_text(self):
        g = self.game
        return (f"Sokoban level {self.task_id}: push {g.num_boxes} box(es) onto the targets of this "
                f"{g.room_state.shape[0]}x{g.room_state.shape[1]} room within {self.max_turns} turns.\n"
                + render(self.level.room_fixed, self.level.room_state))

    def initial_messages(self):
        limit = f"{self.max_turns} turns" + (", one action per turn" if self.action_style == "single" else "")
        if self.game.max_steps < self.max_turns or self.action_style == "multi":
            limit += f", and at most {self.game.max_steps} actions in total"
        text = (RULES_TEXT.format(limit=limit) + "\n"
                + FORMAT_TEXT[self.action_style].format(k=self.max_actions_per_turn))
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": text + "\n\n" + self._observation()}]

    def summary_context(self):
        """The initial room, for the rule summariser's replay (rule_skills.SokobanRuleSummarizer)."""
        return {"room_fixed": self.level.room_fixed.tolist(), "room_state": self.level.room_state.tolist()}

    def privileged_context(self):
        plan = self.level.optimal_plan
        return (f"A shortest solution from the initial state ({len(plan)} moves): "
                + ", ".join(ACTION_NAMES[a - 1] for a in plan))

    def step(self, reply):
        """Play one turn; never raises. Returns (next observation, done)."""
        if self.done:
            return "", True
        text = _as_text(reply)
        if self.action_style == "single":
            action, error = parse_action(text)
            actions = [] if action is None else [action]
        else:
            actions, error = parse_actions(text, self.max_actions_per_turn)
        self.turns += 1
        env_reward, moved, box_moved, done_actions = 0.0, False, False, []
        for a in actions:
            if self.game.done:
                break
            r, _, info = self.game.step(a)
            env_reward += r
            moved |= info["action.moved_player"]
            box_moved |= info["action.moved_box"]
            done_actions.append(a)
        self.gym_return += env_reward
        if error:
            self.format_errors += 1
        self.done = self.game.done or self.turns >= self.max_turns
        obs = self._observation(self._feedback(done_actions, moved, box_moved, error))
        self.trajectory.append({"reply": text, "observation": obs, "valid": error is None, "error": error,
                                "action": done_actions[0] if done_actions else None, "actions": done_actions,
                                "moved": moved, "box_moved": box_moved,
                                "reward": env_reward - (self.format_penalty if error else 0.0)})
        return obs, self.done

    def _feedback(self, actions, moved, box_moved, error):
        example = "<action>up</action>" if self.action_style == "single" else "<answer>Up || Left</answer>"
        lines = [f"Invalid reply: {error} (write e.g. {example})." + ("" if actions else
                 " Nothing moved; the turn is used.")] if error else []
        if self.action_style == "single" and actions:
            name = ACTION_NAMES[actions[0] - 1]
            lines.append(f"You pushed a box {name}." if box_moved else f"You moved {name}." if moved
                         else f"You cannot move {name} (blocked); nothing moved.")
        elif actions:
            lines.append(f"Executed: {', '.join(ACTION_NAMES[a - 1].capitalize() for a in actions)}"
                         + ("." if moved else " (nothing moved)."))
        return "\n".join(lines)

    def abort(self, reason):
        """End the episode now (e.g. the context cap); the result keeps the boxes placed so far."""
        if not self.done:
            self.done, self.aborted = True, str(reason)

    def result(self):
        """reward = completion (default) | gym return | success, minus format_penalty * format_errors."""
        g = self.game
        completion = g.boxes_on_target / g.num_boxes if g.num_boxes else 1.0
        base = {"completion": completion, "gym": self.gym_return, "success": float(g.solved)}[self.reward_kind]
        return {"reward": base - self.format_penalty * self.format_errors, "success": bool(g.solved),
                "completion": completion, "gym_return": self.gym_return, "turns": self.turns, "steps": g.steps,
                "format_errors": self.format_errors, "optimal_steps": self.level.optimal_length,
                "aborted": self.aborted}


# ----------------------------------------------------------------------------------------------------------------
# Self-demo: render a level and its BFS solution, or play it in the terminal

if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="paper", choices=sorted(PRESETS))
    ap.add_argument("--split", default="train", choices=("train", "test"))
    ap.add_argument("--index", type=int, default=0, help="level index in the split")
    ap.add_argument("--seed", type=int, default=None, help="generate this seed instead (the preset's size and boxes)")
    ap.add_argument("--play", action="store_true", help="play in the terminal: w/a/s/d or up/down/left/right, q quits")
    ap.add_argument("--prompt", action="store_true", help="print the model's first prompt")
    args = ap.parse_args()
    cfg = PRESETS[args.preset]
    level = (load_levels(args.preset, args.split)[args.index] if args.seed is None else
             make_level(args.seed, cfg.dim_room, cfg.num_boxes, cfg.search_depth, cfg.max_steps, args.preset))
    episode = SokobanEpisode(level, max_turns=level.max_steps)
    print(f"{level.task_id} (effective seed {level.effective_seed})\n{render(level.room_fixed, level.room_state)}\n")
    if args.prompt:
        print("\n\n".join(f"[{m['role']}]\n{m['content']}" for m in episode.initial_messages()) + "\n")
    if args.play:
        keys = {"w": "up", "s": "down", "a": "left", "d": "right"}
        for line in sys.stdin:
            word = line.strip().lower()
            if word in ("q", "quit"):
                break
            print(episode.step(f"<action>{keys.get(word, word)}</action>")[0] + "\n")
            if episode.done:
                break
    else:
        print(episode.privileged_context())
        for a in level.optimal_plan:
            obs, _ = episode.step(f"<think>follow the plan</think><action>{ACTION_NAMES[a - 1]}</action>")
        print(obs)
    print(episode.result())
