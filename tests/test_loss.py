"""Tests for loss.py (CPU, float64), following METHOD.md §7.

The exact-enumeration tests put each of the V = 6 vocabulary items in its own one-token batch, so the expectation
E_{y~p_old}[f(y)] = sum_y p_old(y) f(y) is computed exactly by calling the real loss functions, and compared with the
closed form grad_z KL(p || p_T) = p * (l - KL), l = log p - log p_T (softmax Jacobian), which never uses autograd.
"""
import math

import pytest
import torch

from loss import _check, _masked, _normaliser, diagnostics, grpo_loss, group_advantages, guard_hits, k3, sdl_loss

V = 6
D = torch.float64


def kl_k3_loss(logp, logp_ref, mask, num_tokens=None):
    """The naive counterexample (verl's "low_var_kl"): token-mean of k3(logp - logp_ref) with no importance weight.
    Its value estimates KL(pi_theta || pi_ref), but at theta_old its gradient is the FORWARD KL's (test below); the
    trainer never uses it."""
    m = _check(logp, logp_ref, mask=mask)
    ell = _masked(logp, m) - _masked(logp_ref.detach(), m)                   # (B, T)
    return _masked(k3(ell), m).sum() / _normaliser(m, num_tokens)


def _logits(seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(V, generator=g, dtype=D)


def reverse_kl_and_grad(z, z_t):
    """KL(p || p_T) = sum p log(p / p_T) and its gradient in z, p = softmax(z), in closed form."""
    logp, logp_t = torch.log_softmax(z, -1), torch.log_softmax(z_t, -1)
    p, ell = logp.exp(), logp - logp_t
    kl = (p * ell).sum()
    return kl, p * (ell - kl)


def forward_kl_grad(z, z_t):
    """grad_z KL(p_T || p) = grad_z (-sum p_T log p) = p - p_T."""
    return torch.softmax(z, -1) - torch.softmax(z_t, -1)


def expected(loss_fn, z, z_old, z_t, with_old=True):
    """sum_y p_old(y) * loss(one token y) and its autograd gradient in z."""
    z = z.clone().requires_grad_(True)
    logp = torch.log_softmax(z, -1).view(1, V)                  # (1, V): token y of the vocabulary in column y
    logp_old = torch.log_softmax(z_old, -1).view(1, V)          # (1, V)
    logp_t = torch.log_softmax(z_t, -1).view(1, V)              # (1, V)
    p_old = logp_old.exp().view(V)
    ones = torch.ones(1, 1, dtype=D)
    total = 0.0
    for y in range(V):
        sl = slice(y, y + 1)
        args = (logp[:, sl], logp_old[:, sl], logp_t[:, sl], ones) if with_old else (logp[:, sl], logp_t[:, sl], ones)
        total = total + p_old[y] * loss_fn(*args)
    total.backward()
    return total.detach(), z.grad


# ---------------------------------------------------------------------------------------------------------------------
# SDL: exact enumeration

@pytest.mark.parametrize("move", [0.0, 0.7])
def test_sdl_expected_gradient_is_reverse_kl_gradient(move):
    z_old, z_t = _logits(0), _logits(1)
    z = z_old + move * _logits(2)            # move = 0: theta = theta_old; move > 0: a later mini-batch
    value, grad = expected(sdl_loss, z, z_old, z_t)
    kl, kl_grad = reverse_kl_and_grad(z, z_t)
    assert abs(value - kl) < 1e-12           # E[rho k3] = KL(pi_theta || pi_T) exactly, for every theta
    assert torch.allclose(grad, kl_grad, atol=1e-10, rtol=0)
    assert kl_grad.abs().max() > 1e-2        # the check is not vacuous


def test_sdl_is_unbiased_under_any_sampler_off_policy():
    # teacher-owned rollouts: the sampler is the teacher itself, rho_off = pi_theta / pi_T
    z, z_t = _logits(3), _logits(4)
    value, grad = expected(sdl_loss, z, z_t, z_t)        # OPD / teacher rollouts: the same sdl_loss
    kl, kl_grad = reverse_kl_and_grad(z, z_t)
    assert abs(value - kl) < 1e-12 and torch.allclose(grad, kl_grad, atol=1e-10, rtol=0)


def test_without_rho_gradient_is_forward_kl():
    # naive k3 (no importance weight) at theta = theta_old: value estimates KL(p || p_T), gradient is the FORWARD one
    z, z_t = _logits(0), _logits(1)
    value, grad = expected(kl_k3_loss, z, z, z_t, with_old=False)
    kl, rev_grad = reverse_kl_and_grad(z, z_t)
    assert abs(value - kl) < 1e-12
    assert torch.allclose(grad, forward_kl_grad(z, z_t), atol=1e-10, rtol=0)
    assert (grad - rev_grad).abs().max() > 1e-2   # and it is NOT the reverse-KL gradient: this is why rho is there


def test_sdl_monte_carlo_error_shrinks_like_inverse_sqrt_m():
    z_old, z_t = _logits(7), _logits(8)
    z = z_old + 0.5 * _logits(9)
    _, kl_grad = reverse_kl_and_grad(z, z_t)
    p_old = torch.softmax(z_old, -1)
    g = torch.Generator().manual_seed(0)
    rms = {}
    for m in (64, 4096):
        errs = []
        for _ in range(40):
            y = torch.multinomial(p_old, m, replacement=True, generator=g)       # (M,) samples from the sampler
            zz = z.clone().requires_grad_(True)
            logp = torch.log_softmax(zz, -1)[y].view(1, m)                        # (1, M)
            sdl_loss(logp, torch.log_softmax(z_old, -1)[y].view(1, m),
                     torch.log_softmax(z_t, -1)[y].view(1, m), torch.ones(1, m)).backward()
            errs.append(((zz.grad - kl_grad) ** 2).sum().item())
        rms[m] = math.sqrt(sum(errs) / len(errs))
    ratio = rms[64] / rms[4096]   # expected sqrt(4096 / 64) = 8
    assert 5.0 < ratio < 12.0, rms


def test_sdl_zero_when_teacher_equals_student():
    g = torch.Generator().manual_seed(1)
    logp = (-torch.rand(3, 5, generator=g, dtype=D) * 3).requires_grad_(True)
    logp_old = logp.detach() - 0.3 * torch.rand(3, 5, generator=g, dtype=D)   # rho != 1: theta has moved
    loss = sdl_loss(logp, logp_old, logp.detach(), torch.ones(3, 5))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(logp.grad, torch.zeros_like(logp))


def test_sdl_worked_example_from_docstring():
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=D, requires_grad=True)
    loss = sdl_loss(logp, logp.detach(), torch.full((1, 3), -1.0, dtype=D), torch.ones(1, 3))
    loss.backward()
    k3 = [0.0, math.e - 2.0, math.exp(-0.5) - 0.5]
    assert abs(loss.item() - sum(k3) / 3) < 1e-14
    assert torch.allclose(logp.grad, torch.tensor([[0.0, -1 / 3, 0.5 / 3]], dtype=D), atol=1e-14)


def test_sdl_guards_fire_and_are_counted():
    logp = torch.tensor([[-30.0, -1.0, -1.0]], dtype=D, requires_grad=True)
    logp_old = torch.tensor([[-30.0, -20.0, -1.0]], dtype=D)
    logp_t = torch.tensor([[-1.0, -1.0, -1.0]], dtype=D)   # token 0: -l = 29 > 20; token 1: log rho = 19 > 10
    loss = sdl_loss(logp, logp_old, logp_t, torch.ones(1, 3))
    loss.backward()
    assert math.isfinite(loss.item()) and torch.isfinite(logp.grad).all()
    hits = guard_hits(logp, logp_old, logp_t, torch.ones(1, 3))
    assert hits["guard_exp_neg_ell"] == 1 and hits["guard_log_rho"] == 1 and hits["guard_log_ratio"] == 0
    assert abs(loss.item() - (math.exp(20) - 1 - 29) / 3) < 1e-6 * math.exp(20)   # exp(-l) capped at e^20


# ---------------------------------------------------------------------------------------------------------------------
# GRPO

RATIOS = [0.5, 0.79, 0.81, 1.0, 1.2, 1.27, 1.29, 2.0]


@pytest.mark.parametrize("adv", [1.5, -0.5])
def test_grpo_clip_zeroes_gradient_exactly_where_it_should(adv):
    r = torch.tensor([RATIOS], dtype=D)                                          # (1, T)
    logp_old = torch.full_like(r, -2.0)
    logp = (logp_old + r.log()).requires_grad_(True)
    loss = grpo_loss(logp, logp_old, torch.tensor([adv], dtype=D), torch.ones_like(r), 0.2, 0.28)
    loss.backward()
    n = len(RATIOS)
    for t, ratio in enumerate(RATIOS):
        clipped = (adv > 0 and ratio > 1.28) or (adv < 0 and ratio < 0.8)
        want = 0.0 if clipped else -adv * ratio / n                              # d/dlogp of -(r A)/N = -r A / N
        assert abs(logp.grad[0, t].item() - want) < 1e-12, (ratio, logp.grad)
        if clipped:
            assert logp.grad[0, t].item() == 0.0
    clipped_r = [min(max(x, 0.8), 1.28) for x in RATIOS]
    want_value = -sum(min(x * adv, c * adv) for x, c in zip(RATIOS, clipped_r)) / n
    assert abs(loss.item() - want_value) < 1e-12


def test_masked_tokens_contribute_nothing_even_with_garbage():
    g = torch.Generator().manual_seed(3)
    B, T = 3, 7
    mask = torch.ones(B, T)
    mask[0, 5:] = 0          # padding
    mask[1, 2:4] = 0         # environment (observation) tokens
    mask[2, 0] = 0
    logp = -torch.rand(B, T, generator=g, dtype=D) * 2
    logp_old = logp - 0.1 * torch.randn(B, T, generator=g, dtype=D)
    logp_t = logp - 0.5 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.tensor([1.0, -0.7, 0.3], dtype=D)
    junk = torch.tensor([float("inf"), float("nan"), 1e30, -1e30, float("-inf")], dtype=D)

    def dirty(x):
        x = x.clone()
        idx = (mask == 0).nonzero()
        for k, (b, t) in enumerate(idx):
            x[b, t] = junk[k % len(junk)]
        return x

    for fn, extra in ((grpo_loss, lambda lp, lo, lt: (lp, lo, adv, mask)),
                      (sdl_loss, lambda lp, lo, lt: (lp, lo, lt, mask)),
                      (kl_k3_loss, lambda lp, lo, lt: (lp, lt, mask))):
        clean = logp.clone().requires_grad_(True)
        v_clean = fn(*extra(clean, logp_old, logp_t))
        v_clean.backward()
        bad = dirty(logp).requires_grad_(True)
        v_bad = fn(*extra(bad, dirty(logp_old), dirty(logp_t)))
        v_bad.backward()
        assert v_bad.item() == v_clean.item(), fn.__name__
        assert torch.equal(bad.grad, clean.grad), fn.__name__
        assert torch.equal(bad.grad[mask == 0], torch.zeros(int((mask == 0).sum()), dtype=D))
        assert (clean.grad[mask == 1] != 0).any()
    d = diagnostics(dirty(logp), dirty(logp_old), dirty(logp_t), mask, 0.2, 0.28, adv)
    assert all(math.isfinite(v) for v in d.values()) and d["tokens"] == mask.sum().item()


@pytest.mark.parametrize("name", ["grpo", "sdl"])
def test_num_tokens_accumulation_equals_full_batch(name):
    g = torch.Generator().manual_seed(4)
    B, T = 4, 6
    logp = -torch.rand(B, T, generator=g, dtype=D) * 2
    logp_old = logp + 0.2 * torch.randn(B, T, generator=g, dtype=D)
    logp_t = logp + 0.5 * torch.randn(B, T, generator=g, dtype=D)
    adv = torch.randn(B, generator=g, dtype=D)
    mask = (torch.rand(B, T, generator=g) > 0.3).float()

    def run(rows, num_tokens):
        x = logp.clone().requires_grad_(True)
        s = slice(*rows)
        if name == "grpo":
            loss = grpo_loss(x[s], logp_old[s], adv[s], mask[s], num_tokens=num_tokens)
        else:
            loss = sdl_loss(x[s], logp_old[s], logp_t[s], mask[s], num_tokens=num_tokens)
        loss.backward()
        return loss.item(), x.grad

    v_full, g_full = run((0, B), None)
    n = mask.sum().item()
    v1, g1 = run((0, 2), n)
    v2, g2 = run((2, B), n)
    assert abs(v1 + v2 - v_full) < 1e-14
    assert torch.allclose(g1 + g2, g_full, atol=1e-15, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# advantages and diagnostics

def test_group_advantages_zero_variance_groups():
    rewards = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 1.0, 0.1, 0.1, 0.1, 0.1], dtype=D)
    adv, nz = group_advantages(rewards, 4)
    assert nz == 2
    assert torch.equal(adv[:4], torch.zeros(4, dtype=D)) and torch.equal(adv[8:], torch.zeros(4, dtype=D))
    std = math.sqrt(4 * 0.25 / 3)                  # unbiased std of [0, 1, 0, 1]
    want = torch.tensor([-0.5, 0.5, -0.5, 0.5], dtype=D) / (std + 1e-6)
    assert torch.allclose(adv[4:8], want, atol=1e-15)
    adv1, nz1 = group_advantages(torch.tensor([0.3, 0.9]), 1)      # G = 1: no variance by definition
    assert nz1 == 2 and torch.equal(adv1, torch.zeros(2)) and not torch.isnan(adv1).any()
    with pytest.raises(ValueError):
        group_advantages(torch.ones(5), 2)


def test_diagnostics_values_and_empty_mask():
    logp = torch.tensor([[-1.0, -1.0, -1.0, -1.0]], dtype=D)
    logp_old = logp - torch.log(torch.tensor([[0.5, 1.0, 1.2, 2.0]], dtype=D))   # ratios 0.5, 1, 1.2, 2
    logp_t = logp - torch.tensor([[-1.0, 0.0, 1.0, 2.0]], dtype=D)              # l = -1, 0, 1, 2
    mask = torch.ones(1, 4)
    d = diagnostics(logp, logp_old, logp_t, mask, 0.2, 0.28)
    assert d["clip_frac"] == 0.5 and d["clip_frac_low"] == 0.25 and d["clip_frac_high"] == 0.25
    assert abs(d["ratio_mean"] - 4.7 / 4) < 1e-12 and abs(d["ratio_max"] - 2.0) < 1e-12
    assert abs(d["ell_mean"] - 0.5) < 1e-12 and abs(d["ell_p50"] - 0.5) < 1e-12
    assert d["logp_mean"] == -1.0 and d["entropy_proxy"] == 1.0
    d = diagnostics(logp, logp_old, logp_t, mask, 0.2, 0.28, advantages=torch.tensor([1.0], dtype=D))
    assert d["clip_frac"] == 0.25 and d["clip_frac_low"] == 0.0    # with A > 0 only the high side binds
    d = diagnostics(logp, logp_old, logp_t, mask, 0.2, 0.28, sdl_mask=torch.tensor([[0, 0, 1, 1]]))
    assert d["teacher_frac"] == 0.5 and d["ell_mean"] == 1.5 and d["ratio_max"] == 2.0   # ratios use the full mask
    empty = diagnostics(logp, logp_old, logp_t, torch.zeros(1, 4), 0.2, 0.28, torch.tensor([1.0]))
    assert empty["tokens"] == 0 and all(math.isfinite(v) for v in empty.values())
    assert grpo_loss(logp, logp_old, torch.tensor([1.0], dtype=D), torch.zeros(1, 4)).item() == 0.0


# ---------------------------------------------------------------------------------------------------------------------
# sequence level, tiny model (METHOD.md §7)

def test_tiny_model_teacher_equal_to_student_gives_zero_sdl(tiny):
    from conftest import OneTurn
    from model import SamplingConfig, encode_prompt, rollout, score, score_under_prompt
    from skills import Skill, with_skill

    model, tok = tiny
    ep = OneTurn()
    ledger = rollout(model, tok, [ep], SamplingConfig(max_new_tokens=6), generator=torch.Generator().manual_seed(0))[0]
    mask = torch.tensor([ledger.trainable], dtype=torch.float32)                 # (1, T)
    assert mask.sum() > 0
    logp = score(model, [ledger.ids], grad=True)                                 # (1, T)
    logp_old = score(model, [ledger.ids]).detach()                               # same full forward: rho == 1
    same = score_under_prompt(model, [ledger], [ledger.ids[:ledger.prompt_len]])
    loss = sdl_loss(logp, logp_old, same, mask)
    loss.backward()
    assert loss.item() == 0.0
    assert all(p.grad is None or torch.count_nonzero(p.grad) == 0 for p in model.parameters())
    assert torch.equal(torch.exp(logp - logp_old)[mask.bool()], torch.ones(int(mask.sum())))
    skill = Skill("push right", "none", "1. right").to_prompt()
    teacher = score_under_prompt(model, [ledger], [encode_prompt(tok, with_skill(ep.initial_messages(), skill))])
    model.zero_grad()
    logp = score(model, [ledger.ids], grad=True)
    loss = sdl_loss(logp, logp_old, teacher, mask)
    loss.backward()
    assert loss.item() > 0 and any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
