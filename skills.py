"""Skills for Skill-SD: the skill record and its parser, the summary prompt, the LLM and HTTP summarisers, an
asynchronous worker, the per-task skill bank with UCB retrieval, and the teacher-prompt builder.

Paper: Skill-SD (arXiv 2604.10674), METHOD.md §3 (skills) and §4 (bank and retrieval). After every iteration each
completed trajectory is summarised into a JSON skill {success_analysis, mistake_analysis, golden_workflow} and appended
to that task's bank B(x); before re-scoring, one skill per task is picked by UCB (untried first, else mean reward +
c sqrt(ln N / n)) and put into the teacher's prompt only ("S(x) + Task"). The student never sees it. Rule-based
summarisers (the built-in tiny models cannot write JSON) are in rule_skills.py.

Choices (numbered; [C] = ours, with the public source it follows):
 1. [C] Skill text in the prompt = compact one-line JSON of the three keys, capped at MAX_SKILL_CHARS = 1600 characters
    (about 400 tokens at ~4 characters per token for English BPE, METHOD.md §3); over the cap, the longest fields are
    trimmed first (water-filling) and end in "...". The bank stores the full fields; the cap applies to the prompt.
 2. [C] parse_skill takes the first JSON object (anywhere: code fences, prose around it, nested inside another object)
    holding one of the three keys; repairs trailing commas, smart quotes, single quotes (Python literal syntax) and a
    truncated tail; a missing field gets a fallback string; no field at all -> None. It never raises.
 3. [C] The summariser is pluggable (the paper used the external Seed1.8): LLMSummarizer (any `generate(chats) ->
    replies` function; train.py passes the policy itself through model.complete, greedy, our JSON-only prompt) and
    HTTPSummarizer (any OpenAI-compatible endpoint, urllib only). Parse failure -> one retry with a stricter reminder
    -> None (dropped). FallbackSummarizer(primary, fallback) gives every None to a second summariser (train.py: the
    rule summariser behind --summarizer http), so an unreachable server loses no trajectory; the count is logged.
 4. [C] Bank (METHOD.md §4): one per task, capacity 16, FIFO eviction of the oldest, exact duplicates of the prompt
    text dropped; UCB1 with c = sqrt(2); among untried skills the newest; ties -> lowest index (oldest). The reward of a
    pick = the mean group reward of the rollouts the skill re-scored (the literal reading of the paper).
 5. [C] The skill block = SKILL_HEADER line + JSON + a blank line, put before the task text of the first user message
    (the figure's "S(x) + Task"; SDAR uses a similar "[Privileged Skill Information]" header). It ends in a newline,
    so BPE pre-tokenisation splits there and the teacher ids are the student ids with one contiguous block inserted
    (tested). The OPD teacher gets a fixed ground-truth block (privileged_block) in the same place.
 6. [C] AsyncSummarizer runs summaries on one worker thread: skills submitted at iteration k show up in collect() at a
    later iteration (the paper does this asynchronously). A summariser that runs the policy's own weights should be
    used with synchronous=True (the optimizer changes the weights in place).
 7. No imports from the project: the bank, the parser and the summarisers load without torch.

Run: `python -m pytest -q tests/test_skills.py` (or `python skills.py` for a demo of the bank and the prompt).
"""
import ast
import copy
import http.client
import json
import logging
import math
import os
import queue
import re
import socket
import threading
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

log = logging.getLogger("skills")

SKILL_KEYS = ("success_analysis", "mistake_analysis", "golden_workflow")
FALLBACKS = {"success_analysis": "No success analysis given.",
             "mistake_analysis": "No mistake analysis given.",
             "golden_workflow": "No workflow given."}
MAX_SKILL_CHARS = 1600        # choice 1: ~400 tokens
MAX_PARSE_CHARS = 50_000      # parse_skill looks at most at this many characters
SKILL_HEADER = "[Skill from an earlier attempt at this task]"
PRIVILEGED_HEADER = "[Reference solution for this task]"


# ---------------------------------------------------------------------------------------------------------------------
# The skill record and its parser

def valid_text(text: str) -> str:
    """text with every surrogate code point resolved: an escaped pair ("\\ud83d\\ude00" decoded) becomes its character, a
    lone half (a summary cut inside an escape) becomes U+FFFD, so the text always encodes as UTF-8 (the tokenizer and
    SkillBank.save need it)."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


@dataclass
class Skill:
    success_analysis: str
    mistake_analysis: str
    golden_workflow: str

    def to_dict(self):
        return {k: getattr(self, k) for k in SKILL_KEYS}

    @classmethod
    def from_dict(cls, d):
        """Missing, empty or non-string fields get FALLBACKS / their text form; never raises on a dict."""
        return cls(**{k: _as_text(d.get(k)) or FALLBACKS[k] for k in SKILL_KEYS})

    def to_prompt(self, max_chars=MAX_SKILL_CHARS):
        """The JSON as it appears in the teacher prompt (choice 1)."""
        fields = self.to_dict()
        text = json.dumps(fields, ensure_ascii=False)
        budget = max_chars - len(json.dumps(dict.fromkeys(SKILL_KEYS, ""), ensure_ascii=False))
        while len(text) > max_chars and budget > 0:
            caps = _water_fill([len(fields[k]) for k in SKILL_KEYS], budget)
            trimmed = {k: v if len(v) <= c else v[:max(c - 3, 0)] + "..." for (k, v), c in zip(fields.items(), caps)}
            text = json.dumps(trimmed, ensure_ascii=False)
            budget -= max(len(text) - max_chars, 1)           # escapes (\n, \") may cost extra characters
        return text


def _water_fill(lengths, budget):
    """Per-field character caps summing to <= budget; short fields keep their length, long ones share the rest."""
    caps, left = [0] * len(lengths), budget
    for k, i in enumerate(sorted(range(len(lengths)), key=lambda j: lengths[j])):
        caps[i] = min(lengths[i], left // (len(lengths) - k))
        left -= caps[i]
    return caps


def _as_text(v):
    if v is None:
        return ""
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, (list, tuple)):
        items = [_as_text(x) for x in v if _as_text(x)]
        numbered = all(re.match(r"\s*\d+[.)]", x) for x in items)
        return "\n".join(x if numbered else f"{i}. {x}" for i, x in enumerate(items, 1))
    if isinstance(v, dict):
        return json.dumps(v, ensure_ascii=False, default=str)
    return str(v)


_KEY_ALIASES = {"successanalysis": "success_analysis", "success": "success_analysis", "whatworked": "success_analysis",
                "mistakeanalysis": "mistake_analysis", "mistakesanalysis": "mistake_analysis",
                "mistake": "mistake_analysis", "mistakes": "mistake_analysis", "failureanalysis": "mistake_analysis",
                "goldenworkflow": "golden_workflow", "workflow": "golden_workflow", "golden": "golden_workflow"}


def _skill_fields(obj, depth=0):
    """The first dict (depth-first, at most 6 levels down) with one of the skill keys -> {key: text}, else None."""
    if depth > 6:
        return None
    if isinstance(obj, dict):
        found = {}
        for k, v in obj.items():
            key = _KEY_ALIASES.get(re.sub(r"[^a-z]", "", str(k).lower()))
            if key and key not in found:
                found[key] = _as_text(v)
        if any(found.values()):
            return found
        children = list(obj.values())
    elif isinstance(obj, (list, tuple)):
        children = list(obj)
    else:
        return None
    for child in children:
        got = _skill_fields(child, depth + 1)
        if got:
            return got
    return None


def _json_objects(text, limit=20):
    """Balanced {...} substrings at top level, string-aware (both quote kinds); an unterminated tail is the last one."""
    out, depth, start, quote, escape = [], 0, 0, None, False
    for i, ch in enumerate(text):
        if quote:
            if escape:
                escape = False
            elif ch == "\\":
                escape = True
            elif ch == quote:
                quote = None
        elif ch in "\"'" and depth > 0:
            quote = ch
        elif ch == "{":
            if depth == 0:
                start = i
            depth += 1
        elif ch == "}" and depth > 0:
            depth -= 1
            if depth == 0:
                out.append(text[start:i + 1])
                if len(out) >= limit:
                    return out
    if depth > 0:
        out.append(text[start:])
    return out


def _load_loose(s):
    """json.loads, then with repairs (trailing commas, smart quotes), then Python literal syntax; None on failure."""
    s = s.replace("\u201c", '"').replace("\u201d", '"').replace("\u2018", "'").replace("\u2019", "'")
    fixed = re.sub(r",(\s*[}\]])", r"\1", s)
    py = re.sub(r"\btrue\b", "True", re.sub(r"\bfalse\b", "False", re.sub(r"\bnull\b", "None", fixed)))
    for attempt in (lambda: json.loads(s), lambda: json.loads(fixed, strict=False), lambda: ast.literal_eval(py)):
        try:
            with warnings.catch_warnings():     # literal_eval warns on odd escapes such as "\d"
                warnings.simplefilter("ignore")
                return attempt()
        except Exception:       # ValueError, SyntaxError, RecursionError, MemoryError on hostile input
            continue
    return None


_QUOTED_FIELD = re.compile(                     # "key": "value... (the value may be cut off)
    r"[\"']?(success_analysis|mistake_analysis|golden_workflow)[\"']?\s*:\s*\"((?:[^\"\\]|\\.)*)", re.S)


def parse_skill(text):
    """Model output -> Skill | None (choice 2), its fields valid text (valid_text). Never raises."""
    skill = _parse_skill(text)
    return None if skill is None else Skill(*(valid_text(v) for v in skill.to_dict().values()))


def _parse_skill(text):
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not isinstance(text, str):
            return None
        text = text[:MAX_PARSE_CHARS]
        for cand in _json_objects(text):
            fields = _skill_fields(_load_loose(cand))
            if fields:
                return Skill.from_dict(fields)
        # last resort: a truncated object, e.g. generation stopped by max_new_tokens mid-string
        fields = {}
        for key, raw in _QUOTED_FIELD.findall(text):
            try:
                fields.setdefault(key, json.loads(f'"{raw}"', strict=False))
            except ValueError:
                fields.setdefault(key, raw)
        return Skill.from_dict(fields) if any(v.strip() for v in fields.values()) else None
    except Exception as e:      # the contract is "never raises": log what slipped through instead
        log.warning("parse_skill failed unexpectedly: %r", e)
        return None


# ---------------------------------------------------------------------------------------------------------------------
# Summary requests and the LLM prompt

@dataclass
class SummaryRequest:
    task_id: str
    env: str                                    # "sokoban" | "appworld"
    task_text: str
    trajectory: list                            # ep.trajectory
    result: dict                                # ep.result()
    extra: dict = field(default_factory=dict)   # ep.summary_context(): Sokoban's initial room, for the rule replay
    order: tuple = ()                           # where the episode stood in its iteration (train.py merges ranks by it)

    @classmethod
    def from_episode(cls, env, ep):
        """The request of a finished episode, with the episode's optional summary_context() as `extra`."""
        extra = ep.summary_context() if hasattr(ep, "summary_context") else {}
        return cls(ep.task_id, env, ep.task_text(), list(ep.trajectory), dict(ep.result()), dict(extra))


SUMMARY_SYSTEM = ("You review an AI agent's attempt at a task and write a short, reusable skill for the next attempt "
                  "at the same task. Reply with only a JSON object: no prose, no code fences.")
SUMMARY_INSTRUCTIONS = """Write a JSON object with exactly these three string fields:
"success_analysis": which intents, actions or tool choices were right and worth reusing;
"mistake_analysis": what went wrong, why, and which wrong assumption or misuse caused it;
"golden_workflow": the ideal procedure for this task as short numbered steps.
Reply with only the JSON object."""


def clip_text(text, n):
    """text cut to n characters, with a marker saying how many were cut (valid text: see valid_text)."""
    text = valid_text(str(text or "").strip())
    return text if len(text) <= n else text[:n] + f" ...[{len(text) - n} chars cut]"


def summary_messages(req, max_action_chars=400, max_obs_chars=400, max_chars=6000, reminder=False):
    """Chat messages asking for a skill: task, trajectory as action/observation text (long parts cut; the middle
    turns are dropped when the whole would exceed max_chars), outcome, and the JSON-only instruction."""
    turns = []
    for i, t in enumerate(req.trajectory, 1):
        action = t.get("code") or t.get("reply") or ""
        turns.append(f"Turn {i} action: {clip_text(action, max_action_chars)}\n"
                     f"Turn {i} observation: {clip_text(t.get('observation'), max_obs_chars)}")
    while len(turns) > 2 and sum(len(x) + 1 for x in turns) > max_chars:
        mid = len(turns) // 2                       # drop from the middle: the start and the end say the most
        turns[mid - 1:mid + 1] = [f"... ({_omitted(turns[mid - 1:mid + 1])} turns omitted) ..."]
    r = req.result or {}
    outcome = (f"Outcome: success={'yes' if r.get('success') else 'no'}, "
               f"completion={float(r.get('completion') or 0.0):.2f}, reward={float(r.get('reward') or 0.0):.2f}, "
               f"turns={len(req.trajectory)}")
    user = (f"Task:\n{clip_text(req.task_text, 2000)}\n\nTrajectory ({len(req.trajectory)} turns):\n" + "\n".join(turns)
            + f"\n\n{outcome}\n\n{SUMMARY_INSTRUCTIONS}")
    if reminder:
        user += "\nYour previous reply was not a valid JSON object. Start your reply with { and end it with }."
    return [{"role": "system", "content": SUMMARY_SYSTEM}, {"role": "user", "content": user}]


def _omitted(parts):
    n = 0
    for p in parts:
        m = re.match(r"\.\.\. \((\d+) turns omitted\)", p)
        n += int(m.group(1)) if m else 1
    return n


# ---------------------------------------------------------------------------------------------------------------------
# Summarizers: an LLM behind a generate function, and an OpenAI-compatible HTTP endpoint

class LLMSummarizer:
    """Summaries from a language model: `generate(chats) -> replies`, one reply string per chat (train.py passes
    `lambda chats: model.complete(policy, tokenizer, chats, greedy)`). Parse + one retry -> None (choice 3)."""

    def __init__(self, generate, **prompt_kwargs):
        self.generate, self.prompt_kwargs = generate, prompt_kwargs
        self.num_generated = self.num_failed = 0

    def _generate(self, message_lists):
        replies = [r or "" for r in self.generate(message_lists)]
        self.num_generated += len(replies)
        return replies

    def summarize(self, requests):
        skills = [parse_skill(t) for t in self._generate([summary_messages(r, **self.prompt_kwargs) for r in requests])]
        retry = [i for i, s in enumerate(skills) if s is None]
        if retry:
            again = self._generate([summary_messages(requests[i], reminder=True, **self.prompt_kwargs) for i in retry])
            for i, text in zip(retry, again):
                skills[i] = parse_skill(text)
        self.num_failed += sum(s is None for s in skills)
        return skills


class HTTPSummarizer:
    """Summaries from an OpenAI-compatible /v1/chat/completions endpoint (urllib only). Any error -> None, logged.

    A server that cannot be reached (refused connection, timeout, reset) is not retried: the first such failure of a
    summarize() call logs one clear line and the call's remaining requests are not sent (None, counted in
    num_unsent), so a dead server costs one timeout per call, not two per trajectory. Wrap it in FallbackSummarizer
    so that those trajectories still get a skill."""

    def __init__(self, base_url, model, api_key=None, timeout=60, max_tokens=512, temperature=0.0, max_workers=4,
                 **prompt_kwargs):
        base = base_url.rstrip("/")
        self.url = base + ("/chat/completions" if base.endswith("/v1") else "/v1/chat/completions")
        self.model, self.api_key, self.timeout = model, api_key, timeout
        self.max_tokens, self.temperature, self.max_workers, self.prompt_kwargs = \
            max_tokens, temperature, max_workers, prompt_kwargs
        self._lock = threading.Lock()
        self._down = None                   # this summarize() call's first unreachable-server error, or None
        self.num_errors = self.num_failed = self.num_unsent = 0

    def _chat(self, messages):
        if self._down is not None:
            with self._lock:
                self.num_unsent += 1
            return None
        body = json.dumps({"model": self.model, "messages": messages, "temperature": self.temperature,
                           "max_tokens": self.max_tokens}).encode("utf-8")
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        try:
            req = urllib.request.Request(self.url, data=body, headers=headers, method="POST")
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                return json.loads(resp.read().decode("utf-8"))["choices"][0]["message"]["content"]
        except Exception as e:      # HTTP errors, timeouts, refused connections, malformed JSON
            unreachable = _unreachable(e)
            with self._lock:
                self.num_errors += 1
                first = unreachable and self._down is None
                if unreachable:
                    self._down = e
            if first:
                log.warning("HTTPSummarizer: the server at %s %s: the rest of this batch is not sent (check "
                            "--summarizer-url and that the server is running)", self.url, unreachable)
            elif not unreachable:
                log.warning("HTTPSummarizer: request to %s failed: %r", self.url, e)
            return None

    def _one(self, req):
        text = self._chat(summary_messages(req, **self.prompt_kwargs))
        skill = parse_skill(text)
        if skill is None and self._down is None:
            skill = parse_skill(self._chat(summary_messages(req, reminder=True, **self.prompt_kwargs)))
        if skill is None:
            with self._lock:
                self.num_failed += 1
        return skill

    def summarize(self, requests):
        self._down = None                   # every call tries the server again
        with ThreadPoolExecutor(max_workers=max(1, self.max_workers)) as pool:
            return list(pool.map(self._one, requests))

    def stats(self):
        return {"http_errors": self.num_errors, "http_unsent": self.num_unsent, "http_no_skill": self.num_failed}


def _unreachable(err):
    """A sentence saying why the server could not be reached, or "" when it answered (an HTTP error status, a reply
    that is not the expected JSON)."""
    if isinstance(err, urllib.error.HTTPError):
        return ""
    reason = err.reason if isinstance(err, urllib.error.URLError) else err
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "did not answer in time (timeout)"
    if isinstance(reason, ConnectionRefusedError):
        return "refused the connection (nothing listens there)"
    if isinstance(reason, (OSError, http.client.HTTPException)):
        return f"cannot be reached ({type(reason).__name__}: {reason})"
    return ""


class FallbackSummarizer:
    """`primary`, then `fallback` for every request the primary gave no skill for (a dead server, a timeout, a reply
    that does not parse, a primary that raised): no trajectory is lost. Each such batch logs one line and the
    counts are in stats() (AsyncSummarizer.stats, so in train.py's log.jsonl)."""

    def __init__(self, primary, fallback):
        self.primary, self.fallback = primary, fallback
        self.num_primary = self.num_fallback = 0

    def summarize(self, requests):
        requests = list(requests)
        try:
            skills = list(self.primary.summarize(requests))
            if len(skills) != len(requests):
                raise RuntimeError(f"primary summarizer returned {len(skills)} skills for {len(requests)} requests")
        except Exception:
            log.exception("FallbackSummarizer: the primary summarizer failed on %d requests", len(requests))
            skills = [None] * len(requests)
        missing = [i for i, s in enumerate(skills) if not isinstance(s, Skill)]
        if missing:
            log.warning("FallbackSummarizer: %d of %d trajectories got no skill from %s; %s summarises them",
                        len(missing), len(requests), type(self.primary).__name__, type(self.fallback).__name__)
            for i, skill in zip(missing, self.fallback.summarize([requests[i] for i in missing])):
                skills[i] = skill
        self.num_primary += len(requests) - len(missing)
        self.num_fallback += len(missing)
        return skills

    def stats(self):
        inner = self.primary.stats() if hasattr(self.primary, "stats") else {}
        return {**inner, "skills_primary": self.num_primary, "skills_fallback": self.num_fallback}


# ---------------------------------------------------------------------------------------------------------------------
# Summarization off the critical path (choice 6)

class AsyncSummarizer:
    """submit(iteration, requests) queues a summary job; collect() returns the (task_id, Skill, source outcome)
    triples finished since the last collect. synchronous=True runs each job inside submit (tests, determinism)."""

    def __init__(self, summarizer, synchronous=False):
        self.summarizer, self.synchronous = summarizer, synchronous
        self._lock, self._done, self._closed = threading.Lock(), [], False
        self.num_jobs = self.num_requests = self.num_skills = self.num_dropped = self.num_errors = 0
        self._queue, self._thread = queue.Queue(), None
        if not synchronous:
            self._thread = threading.Thread(target=self._work, name="skill-summarizer", daemon=True)
            self._thread.start()

    def _run(self, iteration, requests):
        try:
            skills = self.summarizer.summarize(requests)
            if len(skills) != len(requests):
                raise RuntimeError(f"summarizer returned {len(skills)} skills for {len(requests)} requests")
        except Exception:
            log.exception("AsyncSummarizer: summary job of iteration %s failed", iteration)
            with self._lock:
                self.num_errors += 1
            return
        with self._lock:
            for req, skill in zip(requests, skills):
                if isinstance(skill, Skill):
                    r = req.result or {}
                    source = {"reward": float(r.get("reward") or 0.0), "success": bool(r.get("success")),
                              "order": tuple(req.order)}
                    self._done.append((req.task_id, skill, source))
                    self.num_skills += 1
                else:
                    self.num_dropped += 1

    def _work(self):
        while True:
            job = self._queue.get()
            try:
                if job is None:
                    return
                self._run(*job)
            finally:
                self._queue.task_done()

    def submit(self, iteration, requests):
        """Queue the requests of one iteration."""
        if self._closed:
            raise RuntimeError("AsyncSummarizer is closed")
        requests = list(requests)
        self.num_jobs += 1
        self.num_requests += len(requests)
        if self.synchronous:
            self._run(iteration, requests)
        else:
            self._queue.put((iteration, requests))

    def collect(self, wait=False):
        """The (task_id, Skill, source outcome) triples finished since the last call (bank.add takes them as they
        are); wait=True first waits for every pending job."""
        if wait:
            self.wait()
        with self._lock:
            out, self._done = self._done, []
        return out

    def wait(self):
        """Block until every submitted job is done (end of training, tests)."""
        if self._thread is not None:
            self._queue.join()

    @property
    def pending(self):
        return 0 if self._thread is None else self._queue.unfinished_tasks

    def stats(self):
        inner = self.summarizer.stats() if hasattr(self.summarizer, "stats") else {}   # e.g. the fallback's counts
        return {**inner, "summary_jobs": self.num_jobs, "summary_requests": self.num_requests,
                "skills_made": self.num_skills, "summaries_dropped": self.num_dropped,
                "summary_job_errors": self.num_errors, "summary_pending": self.pending}

    def close(self):
        if self._thread is not None and not self._closed:
            self._queue.put(None)
            self._thread.join()
        self._closed = True

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------------------------------
# The per-task skill bank with UCB retrieval (choice 4)

class SkillBank:
    """B(x) per task id. retrieve -> (skill_id, Skill) | None; update(task_id, skill_id, reward) credits the pick.

    Each entry keeps: id (per-task counter, never reused, so a late update of an evicted skill is a no-op), the skill,
    picks n(e), updates, reward_sum, and the outcome of the episode it was summarised from (source_reward,
    source_success) when add() is told it. UCB score = reward_sum / updates + c sqrt(ln N / n), N = retrievals of the
    task. Retrieval has no randomness; `last_untried` says whether the last pick was an untried skill.

    prior_from_source (a labelled variant, METHOD.md §4): a new skill enters with one virtual pick credited with its
    source episode's reward, so it counts as tried and UCB ranks it at once (a success's skill above a failure's)
    instead of "untried first, the newest of them".
    """

    def __init__(self, capacity=16, c=math.sqrt(2), prior_from_source=False):
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity, self.c, self.prior_from_source = int(capacity), float(c), bool(prior_from_source)
        self.last_untried = None
        self.tasks = {}     # task_id -> {"next_id": int, "retrievals": int, "entries": [entry, ...] oldest first}
        self.counters = {"added": 0, "duplicates": 0, "evicted": 0, "retrievals": 0, "untried_picks": 0}

    def _task(self, task_id):
        return self.tasks.setdefault(str(task_id), {"next_id": 0, "retrievals": 0, "entries": []})

    def add(self, task_id, skill, source=None):
        """Append a skill; False for None or an exact duplicate (same to_prompt text) already in the bank.
        source: {"reward", "success"} of the episode it was summarised from (logged; the prior with
        prior_from_source)."""
        if not isinstance(skill, Skill):
            return False
        skill = Skill(*(valid_text(str(v)) for v in skill.to_dict().values()))   # never an unencodable skill
        bank = self._task(task_id)
        text = skill.to_prompt()
        if any(e["skill"].to_prompt() == text for e in bank["entries"]):
            self.counters["duplicates"] += 1
            return False
        entry = {"id": bank["next_id"], "skill": skill, "picks": 0, "updates": 0, "reward_sum": 0.0}
        if source is not None:
            entry.update(source_reward=float(source["reward"]), source_success=bool(source["success"]))
            if self.prior_from_source:
                entry.update(prior=1, updates=1, reward_sum=float(source["reward"]))
        bank["entries"].append(entry)
        bank["next_id"] += 1
        self.counters["added"] += 1
        if len(bank["entries"]) > self.capacity:
            bank["entries"].pop(0)                              # FIFO: the oldest goes
            self.counters["evicted"] += 1
        return True

    def entry(self, task_id, skill_id):
        """The bank's record of one skill (picks, updates, reward_sum, source), or {} once evicted."""
        return next((e for e in self.tasks.get(str(task_id), {"entries": []})["entries"] if e["id"] == skill_id), {})

    def skills(self, task_id):
        return [(e["id"], e["skill"]) for e in self.tasks.get(str(task_id), {"entries": []})["entries"]]

    def scores(self, task_id):
        """UCB score per entry, oldest first (inf for untried); for logs and tests."""
        bank = self.tasks.get(str(task_id))
        if not bank:
            return []
        n_total = max(bank["retrievals"], 1)
        n = [e["picks"] + e.get("prior", 0) for e in bank["entries"]]
        return [math.inf if k == 0 else
                e["reward_sum"] / max(e["updates"], 1) + self.c * math.sqrt(math.log(n_total) / k)
                for e, k in zip(bank["entries"], n)]

    def retrieve(self, task_id):
        """Untried skills first, the newest of them; else argmax UCB, ties -> lowest index. None for an empty bank."""
        bank = self.tasks.get(str(task_id))
        if not bank or not bank["entries"]:
            return None
        entries = bank["entries"]
        untried = [j for j, e in enumerate(entries) if e["picks"] + e.get("prior", 0) == 0]
        self.last_untried = bool(untried)
        if untried:
            j = untried[-1]
            self.counters["untried_picks"] += 1
        else:
            bank["retrievals"] += 1                             # N counts this pick: ln N >= ln n always
            scores = self.scores(task_id)
            bank["retrievals"] -= 1
            j = max(range(len(entries)), key=lambda i: (scores[i], -i))
        bank["retrievals"] += 1
        entries[j]["picks"] += 1
        self.counters["retrievals"] += 1
        return entries[j]["id"], entries[j]["skill"]

    def best(self, task_id):
        """Exploitation only (evaluation with skills): the highest mean reward among credited skills, ties -> lowest
        index; the newest skill if none was credited yet; None for an empty bank."""
        entries = self.tasks.get(str(task_id), {"entries": []})["entries"]
        credited = [e for e in entries if e["updates"]]
        if not credited:
            return entries[-1]["skill"] if entries else None
        return max(credited, key=lambda e: e["reward_sum"] / e["updates"])["skill"]   # first max = lowest index

    def update(self, task_id, skill_id, reward):
        """Credit a pick with the mean group reward of the rollouts it re-scored. False if the skill was evicted."""
        for e in self.tasks.get(str(task_id), {"entries": []})["entries"]:
            if e["id"] == skill_id:
                e["updates"] += 1
                e["reward_sum"] += float(reward)
                return True
        return False

    def stats(self):
        sizes = [len(b["entries"]) for b in self.tasks.values()]
        r = self.counters["retrievals"]
        return {"tasks": len(sizes), "skills": sum(sizes), "size_mean": sum(sizes) / max(len(sizes), 1),
                "size_max": max(sizes, default=0), "untried_pick_rate": self.counters["untried_picks"] / max(r, 1),
                **self.counters}

    def to_json(self):
        tasks = {t: {**b, "entries": [{**e, "skill": e["skill"].to_dict()} for e in b["entries"]]}
                 for t, b in self.tasks.items()}
        return json.dumps({"version": 1, "capacity": self.capacity, "c": self.c, "counters": self.counters,
                           "prior_from_source": self.prior_from_source, "tasks": tasks}, ensure_ascii=False)

    @classmethod
    def from_json(cls, s):
        d = json.loads(s)
        bank = cls(d["capacity"], d["c"], d.get("prior_from_source", False))
        bank.counters.update(d.get("counters", {}))
        for t, b in d["tasks"].items():
            bank.tasks[t] = {**b, "entries": [{**e, "skill": Skill.from_dict(e["skill"])} for e in b["entries"]]}
        return bank

    def save(self, path):
        """Atomic: write path.tmp, then os.replace, so a crash never leaves half a checkpoint."""
        tmp = f"{path}.tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(self.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        with open(path, encoding="utf-8") as f:
            return cls.from_json(f.read())


# ---------------------------------------------------------------------------------------------------------------------
# Teacher prompts (choice 5)

def with_skill(messages, skill_text, header=SKILL_HEADER):
    """Copy of messages with "header\\nskill_text\\n\\n" before the content of the first user message. skill_text
    None or "" -> an unchanged copy (cold start: teacher prompt = student prompt)."""
    out = copy.deepcopy(list(messages))
    if not skill_text:
        return out
    for m in out:
        if m.get("role") == "user":
            m["content"] = f"{header}\n{skill_text}\n\n{m['content']}"
            return out
    raise ValueError("with_skill: the messages have no user message to put the skill in")


def privileged_block(text, max_chars=4000):
    """OPD's fixed ground-truth context (ep.privileged_context(): Sokoban's optimal plan, AppWorld's solution code),
    cut to max_chars; None when there is none (that task gets no teacher). Insert it with
    with_skill(messages, privileged_block(text), header=PRIVILEGED_HEADER)."""
    text = str(text).strip() if text is not None else ""
    return clip_text(text, max_chars) if text else None


if __name__ == "__main__":
    # a demo without any model: two skills in a bank, UCB's picks, and the teacher prompt that carries the pick
    bank = SkillBank()
    good = Skill("Pushing the box right from the left side worked.", "Walked into the top wall twice.",
                 "1. down\n2. right (push the box)\n3. right (push the box)")
    bank.add("level-1", parse_skill("Sure: {'success_analysis': 'none', 'mistake_analysis': 'looped left-right',"
                                    " 'golden_workflow': ['up', 'right']}"))
    bank.add("level-1", good)
    for reward in (1.0, 0.0, 1.0):
        skill_id, skill = bank.retrieve("level-1")
        bank.update("level-1", skill_id, reward)
        scores = [round(x, 3) for x in bank.scores("level-1")]
        print(f"picked skill {skill_id}, credited {reward}; UCB scores now {scores}")
    prompt = with_skill([{"role": "system", "content": "You play Sokoban."},
                         {"role": "user", "content": "The room: ..."}], good.to_prompt())
    print(prompt[1]["content"])
