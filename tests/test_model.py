"""Tests for model.py: cached multi-turn generation vs an uncached forward, ledger masks, scoring, loading.

CPU, fp32, no network: the built-in tiny Qwen3 (tiny tokenizer) and a random Llama config on the same tokenizer.
Reference log-probs come from a plain `model(ids).logits` forward on each ledger alone (no padding, default positions),
so they share no code with model.py's cache, masks or positions. Run: `python -m pytest -q tests/test_model.py`.
"""
import contextlib

import pytest
import torch
import transformers
from transformers import LlamaConfig, LlamaForCausalLM

import model as M

TOL = 1e-4
# greedy chatty() settings per architecture under which some rows stop and others hit the cap (found by a probe)
GREEDY = {"qwen3": dict(bias=-1.0, spread=2.0), "llama": dict(bias=-1.0, spread=1.0)}


# ------------------------------------------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def models(tok):
    qwen = M.build_tiny_model(tok, seed=0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=None,
                      attn_implementation="sdpa")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        llama = LlamaForCausalLM(cfg).eval()
    return {"qwen3": qwen, "llama": llama}


@pytest.fixture(params=["qwen3", "llama"])
def model(request, models):
    return models[request.param]


class EchoEpisode:
    """A fake env: ragged prompts and observations, done after `turns` replies; records everything it sees."""

    def __init__(self, k, turns=3):
        self.task_id, self.k, self.turns = f"echo-{k}", k, turns
        self.done, self.trajectory, self.aborted = False, [], None

    def initial_messages(self):
        return [{"role": "system", "content": "You are solving the Sokoban puzzle."},
                {"role": "user", "content": "Push the box X onto the target O. " * (1 + 2 * self.k)}]

    def step(self, reply):
        assert not self.done, "step() called on a finished episode"
        n = len(self.trajectory) + 1
        self.done = n >= self.turns
        obs = "" if self.done else f"Turn {n}: " + "# _ √ X P\n" * (1 + (self.k * 3 + n * 2) % 5)
        self.trajectory.append({"reply": reply, "observation": obs, "valid": True, "error": None})
        return obs, self.done

    def abort(self, reason):
        self.done, self.aborted = True, reason


@contextlib.contextmanager
def chatty(model, tok, bias=5.0, spread=1.0):
    """Make the model end turns sometimes: a forward hook on the LM head (so sampling and scoring both see it) adds
    bias + spread * h[0] to the <|im_end|> logit, h = the normed hidden state (~N(0, 1) entries), so whether a row
    stops depends on its context. Sampling, bias 5: p(stop) ~ e^5 / (1137 + e^5) ~ 0.1 per token."""
    eot = M.stop_token_ids(tok)[0]

    def hook(module, inputs, out):
        out = out.clone()
        out[..., eot] += bias + spread * inputs[0][..., 0].to(out.dtype)
        return out
    handle = model.get_output_embeddings().register_forward_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def play(model, tok, turns=(3, 3, 2, 3), temperature=1.0, seed=0, max_new=8, **kw):
    eps = [EchoEpisode(k, t) for k, t in enumerate(turns)]
    gen = torch.Generator().manual_seed(seed)
    ledgers = M.rollout(model, tok, eps, M.SamplingConfig(temperature=temperature, max_new_tokens=max_new), gen, **kw)
    return eps, ledgers


@torch.no_grad()
def reference_logprobs(model, ids, temperature=1.0):
    """log pi(ids[t] | ids[:t]) from one plain forward on the unpadded row (HF's own positions and mask), under
    softmax(logits / temperature)."""
    logits = model(torch.tensor([ids])).logits[0].float() / temperature      # (T, V)
    lp = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0]
    return torch.cat([torch.zeros(1), lp])                                     # (T,)


def max_cached_error(model, ledgers, temperature=1.0):
    err = 0.0
    for L in ledgers:
        ref, rec = reference_logprobs(model, L.ids, temperature), torch.tensor(L.logprobs)
        t = torch.tensor(L.trainable).bool()
        err = max(err, (ref[t] - rec[t]).abs().max().item())
    return err


# ------------------------------------------------------------------------------------------------------ tokenizer

def test_tiny_tokenizer_roundtrip_and_determinism(tok):
    assert 1000 <= len(tok) <= 2048
    assert tok.get_vocab() == M.build_tiny_tokenizer().get_vocab()           # trained deterministically
    junk = bytes(range(256)).decode("latin-1")
    for s in ["# _ O √ X P S", "<think>go</think><action>Up</action>", junk, "日本語 √ \x00 {\"a\": [1]}", ""]:
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    assert M.stop_token_ids(tok) == [tok.convert_tokens_to_ids("<|im_end|>")]
    assert tok.pad_token == "<|endoftext|>"


def test_segment_tokenization_roundtrip(tok):
    """Concatenated segment ids of a 3-turn chat == ids of the fully templated chat."""
    msgs = [{"role": "system", "content": "Solve it."}, {"role": "user", "content": "# _ O √ X P"}]
    replies, observations = ["<think>a</think><action>Up</action>", "√ Left", " x\n"], ["# P √", "\n done?", "O"]
    eot = M.stop_token_ids(tok)[0]
    ids = M.encode_prompt(tok, msgs)
    for reply, obs in zip(replies, observations):
        ids += tok(reply, add_special_tokens=False)["input_ids"] + [eot] + M.encode_segment(tok, obs)
        msgs = msgs + [{"role": "assistant", "content": reply}, {"role": "user", "content": obs}]
    full = tok(tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True), add_special_tokens=False)
    assert ids == full["input_ids"]
    assert M.encode_segments(tok, observations) == [M.encode_segment(tok, o) for o in observations]   # batched
    assert M.encode_segments(tok, []) == []


# ------------------------------------------------------------------------------------------------------ parity

def test_cached_logprobs_equal_full_forward(model, tok):
    """4 rows, ragged prompts and observations, 3 turns (one row 2): sampled log-probs == an uncached forward."""
    with chatty(model, tok):
        eps, ledgers = play(model, tok)
        assert [len(L.replies) for L in ledgers] == [3, 3, 2, 3]
        assert max_cached_error(model, ledgers) <= TOL


def test_logprobs_are_the_samplers_at_any_temperature(model, tok):
    """At T = 0.7 the sampler draws from softmax(logits / T): the recorded log-probs equal an uncached forward of
    logits / T, and so does score(temperature=T), while the untempered ones are visibly different."""
    with chatty(model, tok):
        _, ledgers = play(model, tok, temperature=0.7)
        assert max_cached_error(model, ledgers, temperature=0.7) <= TOL
        assert max_cached_error(model, ledgers) > 1e-2                   # the check can fail
        scored = M.score(model, [L.ids for L in ledgers], temperature=0.7)                        # (B, T)
        recorded = M.recorded_logprobs(ledgers)                   # (B, T) train.py's log π_old (--old-logp rollout)
        assert recorded.shape == scored.shape
        for b, L in enumerate(ledgers):
            t = torch.tensor(L.trainable).bool()
            assert (scored[b, :len(L.ids)][t] - torch.tensor(L.logprobs)[t]).abs().max() <= TOL
            assert (scored[b, :len(L.ids)][t] - recorded[b, :len(L.ids)][t]).abs().max() <= TOL
            assert (recorded[b, :len(L.ids)][~t] == 0).all() and (recorded[b, len(L.ids):] == 0).all()


def test_cached_logprobs_equal_full_forward_eager(tok):
    """Same parity with eager attention."""
    model = M.build_tiny_model(tok, seed=0, attn_implementation="eager")
    with chatty(model, tok):
        _, ledgers = play(model, tok)
        assert max_cached_error(model, ledgers) <= TOL


def test_physical_positions_break_parity(model, tok, monkeypatch):
    """The parity check can fail: physical positions (the model default) shift RoPE for padded rows."""
    def physical(mask, n):
        S = mask.shape[1]
        return torch.arange(S - n, S).expand(mask.shape[0], n)                # (B, n)
    monkeypatch.setattr(M, "position_ids", physical)
    with chatty(model, tok):
        _, ledgers = play(model, tok)
        assert max_cached_error(model, ledgers) > 1e-3


def test_alone_equals_in_batch_greedy(model, tok):
    with chatty(model, tok, **GREEDY[model.config.model_type]):
        _, batch = play(model, tok, temperature=0)
        for k, turns in enumerate((3, 3, 2, 3)):
            eps = [EchoEpisode(k, turns)]
            alone = M.rollout(model, tok, eps, M.SamplingConfig(temperature=0, max_new_tokens=8))[0]
            assert alone.ids == batch[k].ids and alone.trainable == batch[k].trainable
            assert max(abs(a - b) for a, b in zip(alone.logprobs, batch[k].logprobs)) <= 1e-5


def test_greedy_equals_model_generate(model, tok):
    eps = [EchoEpisode(k, turns=1) for k in range(5)]
    with chatty(model, tok, **GREEDY[model.config.model_type]):
        ledgers = M.rollout(model, tok, eps, M.SamplingConfig(temperature=0, max_new_tokens=12))
        ids, mask = M._left_pad([L.ids[:L.prompt_len] for L in ledgers], tok.pad_token_id, "cpu")
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=12,
                             eos_token_id=M.stop_token_ids(tok), pad_token_id=tok.pad_token_id)
    eot, stopped = M.stop_token_ids(tok)[0], 0
    for L, row in zip(ledgers, out[:, ids.shape[1]:].tolist()):
        ours = [t for t, m in zip(L.ids, L.trainable) if m]
        theirs = row[:row.index(eot) + 1] if eot in row else row
        assert ours == theirs
        stopped += ours[-1] == eot
    assert 0 < stopped < 5                                                     # both stopped and capped rows


def test_reprefill_and_rebuild_equal_cache_reuse(models, tok, monkeypatch):
    model = models["qwen3"]
    with chatty(model, tok, **GREEDY[model.config.model_type]):
        base_stats, re_stats, auto_stats = {}, {}, {}
        _, base = play(model, tok, temperature=0, stats=base_stats)
        _, again = play(model, tok, temperature=0, reprefill=True, stats=re_stats)
        monkeypatch.setattr(M, "REBUILD_FACTOR", 1.0)                         # any hole triggers a rebuild
        _, auto = play(model, tok, temperature=0, stats=auto_stats)
    assert base_stats["rebuilds"] == 0 and re_stats["rebuilds"] == 2 and auto_stats["rebuilds"] == 2
    assert re_stats["prefill_tokens"] > base_stats["prefill_tokens"]
    assert base_stats["decode_tokens"] == re_stats["decode_tokens"]
    for a, b, c in zip(base, again, auto):
        assert a.ids == b.ids == c.ids and a.trainable == b.trainable == c.trainable
        assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) <= 1e-5


# ------------------------------------------------------------------------------------------------------ ledger

def test_trainable_mask(models, tok):
    """Sampled tokens incl. the sampled <|im_end|> are trainable; a forced <|im_end|> at the cap, template and
    observation tokens are not; replies and observations are exactly what the env saw."""
    model, max_new = models["qwen3"], 6
    with chatty(model, tok):
        eps, ledgers = play(model, tok, max_new=max_new, seed=3)
    eot = M.stop_token_ids(tok)[0]
    seen = {"stopped": 0, "capped": 0}
    for ep, L in zip(eps, ledgers):
        assert L.ids[:L.prompt_len] == M.encode_prompt(tok, ep.initial_messages())
        assert L.trainable[:L.prompt_len] == [0] * L.prompt_len
        j = L.prompt_len
        for turn, step in enumerate(ep.trajectory):
            n = next((k for k in range(j, len(L.ids)) if not L.trainable[k]), len(L.ids)) - j
            reply = L.ids[j:j + n]
            assert eot not in reply[:-1]                                       # a turn ends at its first stop
            assert all(lp < 0 for lp in L.logprobs[j:j + n])
            if reply[-1] == eot:                                               # sampled end-of-turn: trainable
                seen["stopped"] += 1
                reply, j = reply[:-1], j + n
            else:                                                              # cap hit: forced, not trainable
                seen["capped"] += 1
                assert n == max_new and L.ids[j + n] == eot and L.trainable[j + n] == 0
                j += n + 1
            assert tok.decode(reply) == step["reply"] == L.replies[turn]
            if turn + 1 < len(ep.trajectory):
                seg = M.encode_segment(tok, step["observation"])
                assert L.ids[j:j + len(seg)] == seg and L.trainable[j:j + len(seg)] == [0] * len(seg)
                j += len(seg)
        assert j == len(L.ids) and len(L.trainable) == len(L.logprobs) == len(L.ids)
        assert all(lp == 0.0 for lp, m in zip(L.logprobs, L.trainable) if not m)
    assert seen["stopped"] > 0 and seen["capped"] > 0


def test_finished_episodes_leave_the_batch(models, tok):
    sizes = []

    def step_fn(episodes, replies):
        sizes.append(len(episodes))
        return [ep.step(r) for ep, r in zip(episodes, replies)]
    eps, ledgers = play(models["qwen3"], tok, turns=(1, 3, 2), step_fn=step_fn)
    assert sizes == [3, 2, 1] and all(ep.done for ep in eps)
    assert [len(L.replies) for L in ledgers] == [1, 3, 2]


def test_context_cap_aborts(models, tok):
    model, max_new = models["qwen3"], 8
    eps = [EchoEpisode(k, turns=10) for k in range(3)]
    p = [len(M.encode_prompt(tok, ep.initial_messages())) for ep in eps]
    cap = p[2] + max_new                                   # row 2's prompt leaves no room for a reply; rows 0, 1 do
    assert p[0] < p[1] and p[1] + max_new + 1 <= cap < p[2] + max_new + 1
    ledgers = M.rollout(model, tok, eps, M.SamplingConfig(max_new_tokens=max_new), torch.Generator().manual_seed(0),
                        max_context=cap)
    assert all(ep.aborted == "context cap" and L.truncated for ep, L in zip(eps, ledgers))
    assert all(len(L.ids) <= cap for L in ledgers)
    assert ledgers[2].replies == [] and ledgers[2].ids == ledgers[2].ids[:ledgers[2].prompt_len]
    assert all(1 <= len(L.replies) < 10 for L in ledgers[:2])


# ------------------------------------------------------------------------------------------------------ sampling

def test_seeded_determinism(models, tok):
    model = models["qwen3"]
    _, a = play(model, tok, seed=7)
    _, b = play(model, tok, seed=7)
    _, c = play(model, tok, seed=8)
    assert [L.ids for L in a] == [L.ids for L in b] and [L.logprobs for L in a] == [L.logprobs for L in b]
    assert [L.ids for L in a] != [L.ids for L in c]
    _, g1 = play(model, tok, temperature=0, seed=1)
    _, g2 = play(model, tok, temperature=0, seed=2)
    assert [L.ids for L in g1] == [L.ids for L in g2]                          # greedy ignores the seed


def test_group_rows_sample_first_tokens_independently(models, tok):
    """G = 8 rows of one prompt, prefilled once. Sampling once and broadcasting would give 8 equal first tokens; by
    chance that happens with probability sum_v p(v)^8, computed below: ~1e-19 for the tiny model (near-uniform over
    ~1.1k tokens, max p ~ 0.004); the test asserts it is < 1e-9."""
    model, G = models["qwen3"], 8
    ep0 = EchoEpisode(0)
    stats = {}
    ledgers = M.rollout(model, tok, [EchoEpisode(0, 1) for _ in range(G)], M.SamplingConfig(max_new_tokens=4),
                        torch.Generator().manual_seed(0), prompts=[ep0.initial_messages()] * G, stats=stats)
    P = ledgers[0].prompt_len
    probs = torch.softmax(model(torch.tensor([ledgers[0].ids[:P]])).logits[0, -1].float(), -1)
    assert (probs ** G).sum().item() < 1e-9
    assert len({L.ids[P] for L in ledgers}) > 1
    assert stats["prefill_tokens"] == P                                        # the prompt was prefilled once
    assert max_cached_error(model, ledgers) <= TOL


@pytest.mark.parametrize("order", ["contiguous", "interleaved"])
def test_shared_prefill_equals_separate(models, tok, order):
    model = models["qwen3"]
    msgs = [EchoEpisode(0).initial_messages(), EchoEpisode(2).initial_messages()]
    layout = [0, 0, 1, 1] if order == "contiguous" else [0, 1, 0, 1]
    stats, sampling = {}, M.SamplingConfig(temperature=0, max_new_tokens=6)
    M.rollout(model, tok, [EchoEpisode(0, 1) for _ in layout], sampling, prompts=[msgs[k] for k in layout],
              stats=stats)
    shared = M.rollout(model, tok, [EchoEpisode(0, 2) for _ in layout], sampling, prompts=[msgs[k] for k in layout])
    alone = [M.rollout(model, tok, [EchoEpisode(0, 2)], sampling, prompts=[m])[0] for m in msgs]
    assert stats["prefill_tokens"] == alone[0].prompt_len + alone[1].prompt_len   # each distinct prompt once
    for k, L in zip(layout, shared):
        assert L.ids == alone[k].ids
        assert max(abs(a - b) for a, b in zip(L.logprobs, alone[k].logprobs)) <= 1e-5


def test_sample_filters():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    gen = torch.Generator().manual_seed(0)
    greedy, lp = M.sample(logits, M.SamplingConfig(temperature=0))
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(lp, torch.log_softmax(logits, -1).max(-1).values)
    assert torch.equal(M.sample(logits, M.SamplingConfig(top_k=1), gen)[0], greedy)
    assert torch.equal(M.sample(logits, M.SamplingConfig(top_p=1e-6), gen)[0], greedy)
    top5 = logits.topk(5, -1).indices
    for _ in range(50):
        tok, lp = M.sample(logits, M.SamplingConfig(temperature=2.0, top_k=5), gen)
        assert (top5 == tok[:, None]).any(-1).all()
        # the sampler's own log-prob: softmax over the 5 kept logits / T (METHOD.md §6), not the untempered one
        z = torch.full_like(logits, float("-inf")).scatter(1, top5, logits.gather(1, top5) / 2.0)
        assert torch.allclose(lp, torch.log_softmax(z, -1).gather(1, tok[:, None])[:, 0])


# ------------------------------------------------------------------------------------------------------ scoring

def test_micro_batches_are_cut_from_rows_sorted_by_length(model, tok, monkeypatch):
    """Rows given in no order of length: each padded forward holds rows of neighbouring lengths (pads little), and the
    output is in the input's row order, equal to one row per forward."""
    seqs = [tok("# _ O √ X P S " * k, add_special_tokens=False)["input_ids"] for k in (3, 1, 6, 2, 5, 1)]
    widths, real = [], M._score_batch
    monkeypatch.setattr(M, "_score_batch", lambda scorer, rows, *a: widths.append(sorted(map(len, rows))) or
                        real(scorer, rows, *a))
    out = M.score(model, seqs, micro_batch_size=2)                                            # (6, T)
    lengths = sorted(map(len, seqs))
    assert widths == [lengths[0:2], lengths[2:4], lengths[4:6]]
    widths.clear()
    assert (out - M.score(model, seqs, micro_batch_size=1)).abs().max() <= 1e-5
    for b, s in enumerate(seqs):
        assert (out[b, :len(s)] - reference_logprobs(model, s)).abs().max() <= 1e-5


def test_score_matches_plain_forward_chunked_and_micro_batched(model, tok, monkeypatch):
    seqs = [tok("# _ O √ X P S " * k, add_special_tokens=False)["input_ids"] for k in (1, 4, 2)]
    monkeypatch.setattr(M, "LOGIT_CHUNK_ELEMS", 3 * len(tok) * 5)              # 5 tokens per chunk
    out = M.score(model, seqs)                                                 # (3, T)
    assert out.shape == (3, max(map(len, seqs))) and not out.requires_grad
    for b, s in enumerate(seqs):
        assert (out[b, :len(s)] - reference_logprobs(model, s)).abs().max() <= 1e-5
        assert (out[b, len(s):] == 0).all()
    assert torch.allclose(M.score(model, seqs, micro_batch_size=1), out, atol=1e-5)
    assert torch.allclose(M.score(model, seqs, micro_batch_size=2), out, atol=1e-5)
    with_grad = M.score(model, seqs, grad=True)
    assert with_grad.requires_grad and torch.allclose(with_grad.detach(), out, atol=1e-6)
    with_grad.sum().backward()
    assert model.get_output_embeddings().weight.grad is not None
    model.zero_grad(set_to_none=True)


def test_teacher_empty_skill_equals_student(model, tok):
    """Teacher prompt == the ledger's own prompt -> identical log-probs (same code path); a real skill changes them."""
    _, ledgers = play(model, tok, seed=1)
    student = M.score(model, [L.ids for L in ledgers])
    teacher = M.score_under_prompt(model, ledgers, [L.ids[:L.prompt_len] for L in ledgers])
    for b, L in enumerate(ledgers):
        assert torch.equal(teacher[b, L.prompt_len:len(L.ids)], student[b, L.prompt_len:len(L.ids)])
        assert (teacher[b, :L.prompt_len] == 0).all() and (teacher[b, len(L.ids):] == 0).all()
    skill = "[Skill] push boxes away from corners; check each move.\n"
    skilled = [M.encode_prompt(tok, [ep[0], {"role": "user", "content": skill + ep[1]["content"]}])
               for ep in (e.initial_messages() for e in (EchoEpisode(k) for k in range(4)))]
    teacher = M.score_under_prompt(model, ledgers, skilled)
    for b, L in enumerate(ledgers):
        seq = skilled[b] + L.ids[L.prompt_len:]
        ref = reference_logprobs(model, seq)[len(skilled[b]):]                 # ledger tokens under the skill prompt
        assert (teacher[b, L.prompt_len:len(L.ids)] - ref).abs().max() <= 1e-5
        assert (teacher[b, L.prompt_len:len(L.ids)] - student[b, L.prompt_len:len(L.ids)]).abs().max() > 1e-3


# ------------------------------------------------------------------------------------------------------ cache API

def test_cache_keyword_and_growth_assertion(models, tok, monkeypatch):
    model = models["qwen3"]
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    if version >= (5, 24):
        assert M.cache_keyword(model) == "cache"
    elif version <= (5, 21):
        assert M.cache_keyword(model) == "past_key_values"
    state, _ = M.prefill(model, [[1, 2, 3], [4, 5]], tok.pad_token_id)
    assert state.cache.get_seq_length() == 3 and state.mask.tolist() == [[1, 1, 1], [0, 1, 1]]
    monkeypatch.setattr(M, "cache_keyword", lambda m: "kv_cache_typo")       # silently swallowed by **kwargs
    with pytest.raises(RuntimeError, match="did not grow"):
        play(model, tok)


# ------------------------------------------------------------------------------------------------------ loading

def test_save_and_reload(tok, models, tmp_path):
    model = models["qwen3"]
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    model2, tok2 = M.load(str(tmp_path), device="cpu")
    ids = torch.tensor([M.encode_prompt(tok, EchoEpisode(1).initial_messages())])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, model2(ids).logits)
    for s in ["# _ O √ X P S", bytes(range(256)).decode("latin-1"), "<|im_start|>user\nhi<|im_end|>"]:
        assert tok2(s, add_special_tokens=False)["input_ids"] == tok(s, add_special_tokens=False)["input_ids"]
    assert tok2.chat_template == tok.chat_template
    assert M.stop_token_ids(tok2) == M.stop_token_ids(tok) and tok2.pad_token_id == tok.pad_token_id


def test_load_tiny():
    model, tok = M.load("tiny", device="cpu")
    assert model.config.model_type == "qwen3" and model.dtype == torch.float32
    assert model.config.tie_word_embeddings and len(tok) == model.config.vocab_size
    with pytest.raises(M.ModelLoadError, match="tiny_base.ensure_built"):   # a CLI name, resolved by tiny_base.py
        M.load("tiny-sokoban")


def test_complete_gives_one_reply_per_chat(models, tok):
    """model.complete = a one-turn rollout per chat, in batches: greedy replies equal the batch-of-one replies, and
    the reply is the decoded ledger reply."""
    model = models["qwen3"]
    chats = [[{"role": "user", "content": "Say something about boxes number %d." % k}] for k in range(5)]
    greedy = M.SamplingConfig(temperature=0.0, max_new_tokens=6)
    together = M.complete(model, tok, chats, greedy, batch_size=3)
    alone = [M.complete(model, tok, [c], greedy)[0] for c in chats]
    assert together == alone and len(together) == 5 and all(isinstance(r, str) and r for r in together)
    assert M.complete(model, tok, chats[:1], greedy, max_context=4) == [""]     # the prompt does not fit: no reply


def test_unloadable_name_gives_clear_error(monkeypatch):
    import huggingface_hub.constants
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)   # fail fast instead of retrying
    for name in ["skill-sd-tests/no-such-model", "/no/such/dir"]:
        with pytest.raises(M.ModelLoadError) as info:
            M.load(name, device="cpu")
        msg = str(info.value)
        assert name in msg and '"tiny"' in msg and "tried:" in msg
        # the advice fits the name: download a hub id; check a local folder (no download of a path)
        assert ("huggingface-cli download" in msg) == (not name.startswith("/")), msg
        assert ("check the path" in msg) == name.startswith("/"), msg
        assert info.value.__suppress_context__ and info.value.__cause__ is None


def test_score_trainable_only_equals_full_on_reply_tokens(model, tok):
    """trainable_only computes the LM head at the reply tokens only: same values there (and same gradients), 0
    elsewhere, for micro-batches with padding and under a different (teacher) prompt."""
    _, ledgers = play(model, tok, seed=2)
    skilled = [M.encode_prompt(tok, [ep[0], {"role": "user", "content": "[Skill] go left.\n" + ep[1]["content"]}])
               for ep in (e.initial_messages() for e in (EchoEpisode(k) for k in range(len(ledgers))))]
    for prompts in ([L.ids[:L.prompt_len] for L in ledgers], skilled):
        full = M.score_under_prompt(model, ledgers, prompts)                       # (B, T)
        for mbs in (None, 1):
            part = M.score_under_prompt(model, ledgers, prompts, micro_batch_size=mbs, trainable_only=True)
            for b, L in enumerate(ledgers):
                m = torch.zeros(part.shape[1], dtype=torch.bool)
                m[:len(L.ids)] = torch.tensor(L.trainable, dtype=torch.bool)
                assert m.any() and (part[b, m] - full[b, m]).abs().max() <= 1e-5
                assert (part[b, ~m] == 0).all()
    weights = torch.randn(full.shape)
    grads = []
    for only in (False, True):
        model.zero_grad(set_to_none=True)
        lp = M.score_under_prompt(model, ledgers, skilled, grad=True, trainable_only=only)
        mask = torch.zeros_like(lp)
        for b, L in enumerate(ledgers):
            mask[b, :len(L.ids)] = torch.tensor(L.trainable, dtype=torch.float32)
        (lp * mask * weights).sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-5)
    model.zero_grad(set_to_none=True)
    with pytest.raises(ValueError, match="positions"):
        M.score(model, [[1, 2, 3]], keep=[[3]])


@pytest.mark.parametrize("arch", ["qwen3", "llama"])
def test_packed_scoring_equals_one_row_in_log_probs_and_gradients(tiny, arch):
    """score(pack=True) runs a micro-batch as one packed row (positions restarting per sequence, no attention mask:
    transformers attends block-diagonally): log-probs equal the one-row path <= 1e-5, full and keep= alike, and the
    gradients of their sum equal it <= 1e-5 relative, on the tiny Qwen3 and on a Llama config (SmolLM2's)."""
    model = tiny[0] if arch == "qwen3" else LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tiny[1]), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, attn_implementation="sdpa"))
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(5, len(tiny[1]), (n,), generator=g).tolist() for n in (30, 55, 17, 80, 3)]
    keep = [[t for t in range(1, len(s)) if t % 3 == 0] for s in seqs]
    one = M.score(model, seqs, micro_batch_size=1)                                     # (B, T)
    assert (M.score(model, seqs, micro_batch_size=5, pack=True) - one).abs().max() <= 1e-5
    assert (M.score(model, seqs, micro_batch_size=2, keep=keep, pack=True)
            - M.score(model, seqs, micro_batch_size=1, keep=keep)).abs().max() <= 1e-5
    grads = []
    for pack in (False, True):
        model.zero_grad(set_to_none=True)
        M.score(model, seqs, grad=True, micro_batch_size=1 if not pack else 5, keep=keep, pack=pack).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    model.zero_grad(set_to_none=True)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for n, ref in grads[0].items():
        assert (grads[1][n] - ref).norm() <= 1e-5 * ref.norm() + 1e-12, n


# ------------------------------------------------------------------------------------------------------ compiled path

def _moves(monkeypatch):
    """Record every bucket StaticState moves to: (rows, slots)."""
    seen, move = [], M.StaticState.move

    def spy(self, rows, slots, source=None):
        seen.append((rows, slots))
        return move(self, rows, slots, source)
    monkeypatch.setattr(M.StaticState, "move", spy)
    return seen


def test_compiled_decoding_equals_dynamic(model, tok, monkeypatch):
    """The static-cache path (aot_eager here: the same graph as inductor's, without its C++ build) gives the dynamic
    path's tokens and log-probs over several turns, while rows finish at different turns (5 rows in a bucket of 8,
    then 4 when 3 are left), some replies stop and others hit the cap, and the cache outgrows its slot bucket."""
    turns = (1, 3, 2, 3, 1)
    seen = _moves(monkeypatch)
    decoder = M.StaticDecoder(model, backend="aot_eager", min_slots=32)
    with chatty(model, tok, **GREEDY[model.config.model_type]):
        _, dynamic = play(model, tok, turns=turns, temperature=0)
        _, static = play(model, tok, turns=turns, temperature=0, compile=decoder)
        assert max_cached_error(model, static) <= TOL                           # the hook is on: same model
    assert [L.ids for L in static] == [L.ids for L in dynamic]
    assert [L.trainable for L in static] == [L.trainable for L in dynamic]
    assert max(abs(a - b) for s, d in zip(static, dynamic) for a, b in zip(s.logprobs, d.logprobs)) <= 1e-5
    rows = [r for r, _ in seen]
    assert rows[0] == 8 and 4 in rows                                           # the bucket shrank
    assert len({s for _, s in seen}) >= 2                                       # and the slots grew
    replies = [r for L in static for r in L.replies]
    assert len(replies) == sum(turns)


def test_compiled_sampling_and_rebuilds_equal_dynamic(models, tok, monkeypatch):
    """Sampling with per-row streams draws the same tokens on both paths (the logits agree to ~1e-6), and a rebuild
    (re-prefill from the ledgers) moves the state into the static cache again."""
    model = models["qwen3"]
    decoder = M.StaticDecoder(model, backend="aot_eager", min_slots=16)
    eps = lambda: [EchoEpisode(k, t) for k, t in enumerate((3, 1, 2))]
    gens = lambda: [torch.Generator().manual_seed(7 + k) for k in range(3)]
    sampling = M.SamplingConfig(temperature=1.0, max_new_tokens=6)
    with chatty(model, tok):
        dynamic = M.rollout(model, tok, eps(), sampling, gens())
        static = M.rollout(model, tok, eps(), sampling, gens(), compile=decoder)
        monkeypatch.setattr(M, "REBUILD_FACTOR", 1.0)                         # any hole triggers a rebuild
        stats = {}
        rebuilt = M.rollout(model, tok, eps(), sampling, gens(), compile=decoder, stats=stats)
    assert stats["rebuilds"] >= 1
    assert [L.ids for L in static] == [L.ids for L in dynamic] == [L.ids for L in rebuilt]
    assert max(abs(a - b) for s, d in zip(rebuilt, dynamic) for a, b in zip(s.logprobs, d.logprobs)) <= 1e-5


def test_compiled_decoding_with_inductor_compiles_once(models, tok):
    """The real thing on CPU: inductor's C++ decode step equals the dynamic path, and a second rollout of the same
    shapes reuses the compiled graph (no recompilation)."""
    from torch._dynamo.utils import counters
    model = models["qwen3"]
    decoder = M.StaticDecoder(model, min_slots=64)
    with chatty(model, tok, **GREEDY["qwen3"]):
        _, dynamic = play(model, tok, temperature=0)
        _, static = play(model, tok, temperature=0, compile=decoder)
        graphs = counters["stats"]["unique_graphs"]
        _, again = play(model, tok, temperature=0, compile=decoder)
    assert counters["stats"]["unique_graphs"] == graphs
    assert [L.ids for L in static] == [L.ids for L in dynamic] == [L.ids for L in again]
    assert max(abs(a - b) for s, d in zip(static, dynamic) for a, b in zip(s.logprobs, d.logprobs)) <= 1e-5


def test_compiled_decoding_refuses_what_it_cannot_do(tok):
    sliding = M.build_tiny_model(tok, seed=0, layer_types=["sliding_attention", "full_attention"],
                                 sliding_window=16, use_sliding_window=True)
    with pytest.raises(ValueError, match="sliding-window"):
        M.StaticDecoder(sliding)
    flash = M.build_tiny_model(tok, seed=0)
    flash.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="sdpa"):
        M.StaticDecoder(flash)
