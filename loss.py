"""Losses of Skill-SD: GRPO with clip-higher and the importance-weighted reverse-KL self-distillation (SDL), which
between them also give the baselines' objectives (OPD, teacher-owned rollouts), plus the diagnostics we log every step.

Paper: Skill-SD (arXiv 2604.10674), overview figure / Eq. 10-14; METHOD.md §5 (losses), §7 (why rho), §8 (baselines).

    r      = pi_theta(y) / pi_old(y)                                       per sampled token y
    L_GRPO = -(1/N) sum_{i,t} min(r A_i, clip(r, 1 - eps_l, 1 + eps_h) A_i)
    l      = log pi_theta(y | x) - log pi_teacher(y | x + skill)          (Eq. 10)
    rho    = pi_theta(y) / sg(pi_old(y))       -- NOT detached: the correction lives in the gradient
    L_SDL  = (1/N) sum_{i,t} rho * (exp(-l) - 1 + l)                       (Eq. 12, "rho * k3")
    L      = L_GRPO + lambda * L_SDL,  lambda = 0.001                      (Eq. 14)

Why rho (METHOD.md §7, checked by exact enumeration in tests/test_loss.py):
E_{y~pi_old}[rho k3] = sum_y pi_theta (pi_T/pi_theta - 1 + log(pi_theta/pi_T)) = KL(pi_theta || pi_T) for EVERY theta,
and its gradient is sum_y pi_theta l grad log pi_theta = grad KL(pi_theta || pi_T) (reverse KL, mode seeking).
Without rho the same k3 value follows grad KL(pi_T || pi_theta) (forward KL) at theta = theta_old.

Shapes: B rows (episodes), T tokens; every per-token tensor is (B, T), `mask` (B, T) is 1 on policy-sampled
(trainable) tokens only; advantages are (B,), one value per episode.

Choices (numbered; [C] = ours, with the public source it follows):
 1. Token-mean over the mask ("token-mean", verl): normaliser N = mask.sum(), or `num_tokens` = the N of the whole
    mini-batch when gradients are accumulated over micro-batches, so that two micro-batches sum to one full batch.
 2. Asymmetric clip eps_l = 0.2, eps_h = 0.28 (DAPO clip-higher); the PPO log-ratio is clamped to [-20, 20] before exp
    as verl does, an overflow guard that never binds in a sane run.
 3. SDL overflow guards as in SDAR's re-implementation (ZJU-REAL/SDAR): -l <= 20 inside exp(-l), log rho <= 10.
    No other clip on rho (the paper shows none). `guard_hits` counts how often they fire, for the logs.
 4. Masked slots are replaced by 0 BEFORE any arithmetic (torch.where), so garbage there (inf, nan, 1e30 from
    padding) changes neither the value nor the gradient, and the gradient at masked slots is exactly 0.
 5. Group std is the unbiased one (torch.std, n - 1), as verl's GRPO advantage; groups whose rewards are all equal get
    advantage exactly 0 (checked with max == min, not std < eps, so float round-off cannot leak 1e-11 advantages);
    G = 1 groups count as zero-variance.
 6. OPD baseline = sdl_loss alone with weight 1 and no GRPO term; the teacher gets a fixed ground-truth block instead
    of a skill (interpretation, METHOD.md §8). Under Adam the weight 1 vs lambda hardly matters (only relative to
    gradient clipping).
 7. Off-policy ablation: the skill-conditioned teacher samples, so the behaviour log-prob is the teacher's: pass it as
    `logp_old` to both grpo_loss (r_off = pi_theta / pi_teacher) and sdl_loss (rho_off = pi_theta / sg(pi_teacher)).
    rho_off * k3 is still unbiased for KL(pi_theta || pi_T) (any sampler with full support, tested), but rho_off is
    not 1 at the start and grows as student and teacher diverge: the collapse the paper reports (inference, §8).
 8. A KL to a reference model (train.py's labelled --ref-kl variant) uses sdl_loss with the reference as "teacher":
    the plain k3 without rho (verl's "low_var_kl") would follow the FORWARD KL's gradient at theta_old (the naive
    counterexample in tests/test_loss.py).

Run: .venv/bin/python -m pytest -q tests/test_loss.py     (or `python loss.py` for a worked three-token example)
"""
import torch

EXP_NEG_ELL_MAX = 20.0  # guard: exp(-l) <= e^20 (SDAR)
LOG_RHO_MAX = 10.0      # guard: rho <= e^10 (SDAR)
LOG_RATIO_MAX = 20.0    # guard on the PPO log-ratio (verl clamps to [-20, 20])


# ---------------------------------------------------------------------------------------------------------------------
# helpers

def _masked(x, m):
    """x with masked-out slots replaced by exact zeros (choice 4): later exp/log never see the garbage."""
    return torch.where(m, x, torch.zeros((), dtype=x.dtype, device=x.device))


def _normaliser(m, num_tokens):
    if num_tokens is None:
        return m.sum().clamp(min=1)   # empty mask -> value 0, not NaN
    if num_tokens <= 0:
        raise ValueError(f"num_tokens must be positive, got {num_tokens}")
    return num_tokens


def _check(logp, *others, mask):
    for x in others:
        if x is not None and x.shape != logp.shape:
            raise ValueError(f"per-token tensors must all be {tuple(logp.shape)}, got {tuple(x.shape)}")
    if mask.shape != logp.shape:
        raise ValueError(f"mask must be {tuple(logp.shape)}, got {tuple(mask.shape)}")
    return mask.to(logp.device).bool()        # binary: 1 = trainable (policy-sampled) token


def k3(ell):
    """k3 = exp(-l) - 1 + l >= 0, with l = log pi - log pi_T; E_{y~pi}[k3] = KL(pi || pi_T). Guard 3 on exp(-l)."""
    return torch.exp(torch.clamp(-ell, max=EXP_NEG_ELL_MAX)) - 1 + ell


# ---------------------------------------------------------------------------------------------------------------------
# GRPO

def group_advantages(rewards, group_size, eps=1e-6, valid=None):
    """Group-normalised advantages A_i = (R_i - mean_g R) / (std_g R + eps), groups = consecutive runs of group_size.

    Returns (advantages (B,), num_zero_variance_groups). std is unbiased (choice 5); all-equal groups get exactly 0.
    valid (B,) bools, optional: rows to leave out (an episode the environment failed to play): their advantage is 0
    and each group is normalised over its valid rows; a group with fewer than 2 of them counts as zero-variance.
    Example: rewards [1, 0, 1, 0, 1, 1], G = 2 -> [0.7071, -0.7071, 0.7071, -0.7071, 0, 0] (approx), 1 zero group.
    """
    rewards = torch.as_tensor(rewards)
    if not rewards.is_floating_point():
        rewards = rewards.double()
    if rewards.dim() != 1 or group_size < 1 or rewards.numel() % group_size != 0:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    if valid is not None and not all(valid):
        adv, zero = torch.zeros_like(rewards), 0
        for g in range(0, rewards.numel(), group_size):
            rows = [i for i in range(g, g + group_size) if valid[i]]
            if len(rows) < 2:
                zero += 1
                continue
            a, z = group_advantages(rewards[rows], len(rows), eps)
            adv[rows], zero = a, zero + z
        return adv, zero
    r = rewards.detach().view(-1, group_size)                              # (B/G, G)
    mean = r.mean(dim=1, keepdim=True)                                     # (B/G, 1)
    std = r.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(mean)  # (B/G, 1), unbiased
    flat = (r.max(dim=1, keepdim=True).values == r.min(dim=1, keepdim=True).values)  # (B/G, 1) zero variance
    adv = torch.where(flat, torch.zeros_like(r), (r - mean) / (std + eps))  # (B/G, G)
    return adv.reshape(-1), int(flat.sum())


def grpo_loss(logp, logp_old, advantages, mask, clip_low=0.2, clip_high=0.28, num_tokens=None):
    """PPO clipped surrogate with asymmetric clip, token-mean over the mask (choices 1-2, 4).

    logp (B, T) = log pi_theta of the sampled tokens (with grad); logp_old (B, T) = behaviour log-probs (detached);
    advantages (B,). Where the clip binds (r > 1 + eps_h with A > 0, or r < 1 - eps_l with A < 0) the gradient is 0.
    """
    m = _check(logp, logp_old, mask=mask)
    logp, logp_old = _masked(logp, m), _masked(logp_old.detach(), m)
    log_ratio = torch.clamp(logp - logp_old, -LOG_RATIO_MAX, LOG_RATIO_MAX)   # (B, T)
    ratio = torch.exp(log_ratio)                                              # (B, T)
    adv = advantages.detach().to(logp.device, logp.dtype).unsqueeze(-1)      # (B, 1)
    surr = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_low, 1 + clip_high) * adv)  # (B, T)
    return -_masked(surr, m).sum() / _normaliser(m, num_tokens)


# ---------------------------------------------------------------------------------------------------------------------
# self-distillation

def sdl_loss(logp, logp_old, logp_teacher, mask, num_tokens=None):
    """Importance-weighted k3 estimate of the REVERSE KL(pi_theta || pi_T) = sum_y pi_theta(y) log(pi_theta(y)/pi_T(y)).

    logp (B, T) student log-probs under the plain prompt (with grad); logp_old (B, T) sampler log-probs (detached);
    logp_teacher (B, T) teacher log-probs under prompt + skill (constants). Per token rho * k3(l), l = logp - logp_T,
    rho = exp(logp - sg(logp_old)) with the gradient flowing through logp (METHOD.md §5, §7).

    Worked example, three tokens, theta = theta_old (rho = 1 in value):
      logp = [-1.0, -2.0, -0.5], logp_T = [-1.0, -1.0, -1.0] -> l = [0, -1, 0.5]
      k3 = [0, e^1 - 1 - 1, e^-0.5 - 1 + 0.5] = [0, 0.7183, 0.1065] -> loss 0.2749; d loss / d logp = rho * (k3 + 1 -
      e^-l) / 3 = rho * l / 3 = [0, -0.333, 0.167]: the token the teacher likes more (l < 0) is pushed up.
    """
    m = _check(logp, logp_old, logp_teacher, mask=mask)
    logp = _masked(logp, m)                                                  # (B, T)
    ell = logp - _masked(logp_teacher.detach(), m)                           # (B, T)  l = log pi_theta - log pi_T
    log_rho = torch.clamp(logp - _masked(logp_old.detach(), m), max=LOG_RHO_MAX)  # (B, T), grad through logp
    # E_{y~pi_old}[rho k3] = KL(pi_theta || pi_T) = sum_y pi_theta(y) log(pi_theta(y) / pi_T(y))  (reverse KL)
    per_token = torch.exp(log_rho) * k3(ell)                                 # (B, T)  rho * k3
    return _masked(per_token, m).sum() / _normaliser(m, num_tokens)


def guard_hits(logp, logp_old, logp_teacher, mask):
    """How often the SDL overflow guards (choice 3) and the PPO log-ratio guard fire on the masked tokens."""
    with torch.no_grad():
        m = _check(logp, logp_old, logp_teacher, mask=mask)
        logp, logp_old, logp_t = _masked(logp, m), _masked(logp_old, m), _masked(logp_teacher, m)
        return {
            "guard_exp_neg_ell": int(((logp_t - logp > EXP_NEG_ELL_MAX) & m).sum()),
            "guard_log_rho": int(((logp - logp_old > LOG_RHO_MAX) & m).sum()),
            "guard_log_ratio": int((((logp - logp_old).abs() > LOG_RATIO_MAX) & m).sum()),
        }


# ---------------------------------------------------------------------------------------------------------------------
# diagnostics

def _quantile(x, q):
    return float(torch.quantile(x, q)) if x.numel() > 0 else 0.0


def diagnostics(logp, logp_old, logp_teacher, mask, clip_low=0.2, clip_high=0.28, advantages=None, sdl_mask=None):
    """Floats for the logs (METHOD.md §6): clip fraction, ratio/rho stats, l mean and quantiles, mean log-prob
    (entropy proxy: -E[log pi(y)] estimates the entropy on on-policy samples), guard hits. logp_teacher may be None.
    The teacher statistics (l, k3, rho, guards) use sdl_mask (tokens that have a teacher; default mask);
    teacher_frac = its share of the masked tokens.

    clip_frac = fraction of masked tokens where the clip binds (zero gradient): with advantages, r > 1 + eps_h with
    A > 0 or r < 1 - eps_l with A < 0; without, any r outside [1 - eps_l, 1 + eps_h]. An empty mask gives zeros.
    """
    with torch.no_grad():
        m = mask.to(logp.device).bool()
        n = int(m.sum())
        logp64, old64 = logp.detach().double()[m], logp_old.detach().double()[m]   # (N,)
        ratio = torch.exp(torch.clamp(logp64 - old64, -LOG_RATIO_MAX, LOG_RATIO_MAX))  # (N,)
        high, low = ratio > 1 + clip_high, ratio < 1 - clip_low                  # (N,)
        if advantages is not None:
            adv = advantages.detach().to(logp.device).double().unsqueeze(-1).expand_as(logp)[m]  # (N,)
            high, low = high & (adv > 0), low & (adv < 0)
        out = {
            "tokens": float(n),
            "clip_frac": float((high | low).sum()) / max(n, 1),
            "clip_frac_high": float(high.sum()) / max(n, 1),
            "clip_frac_low": float(low.sum()) / max(n, 1),
            "ratio_mean": float(ratio.mean()) if n else 0.0,
            "ratio_max": float(ratio.max()) if n else 0.0,
            "ratio_min": float(ratio.min()) if n else 0.0,
            "logp_mean": float(logp64.mean()) if n else 0.0,
            "entropy_proxy": float(-logp64.mean()) if n else 0.0,
        }
        if logp_teacher is not None:
            sm = m if sdl_mask is None else (sdl_mask.to(logp.device).bool() & m)
            n, lp, lo = int(sm.sum()), logp.detach().double()[sm], logp_old.detach().double()[sm]   # (N',)
            ell = lp - logp_teacher.detach().double()[sm]                        # (N',)
            rho = torch.exp(torch.clamp(lp - lo, max=LOG_RHO_MAX))              # (N',)
            out.update({
                "teacher_frac": n / max(out["tokens"], 1),
                "ell_mean": float(ell.mean()) if n else 0.0,
                "ell_p10": _quantile(ell, 0.1), "ell_p50": _quantile(ell, 0.5), "ell_p90": _quantile(ell, 0.9),
                "k3_mean": float(k3(ell).mean()) if n else 0.0,
                "rho_mean": float(rho.mean()) if n else 0.0,
                "rho_max": float(rho.max()) if n else 0.0,
            })
            out.update({k: float(v) for k, v in guard_hits(logp, logp_old, logp_teacher, sm).items()})
        return out


if __name__ == "__main__":
    # the worked example of sdl_loss's docstring, then one GRPO step's numbers
    logp = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.float64, requires_grad=True)
    logp_t = torch.tensor([[-1.0, -1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 3)
    loss = sdl_loss(logp, logp.detach(), logp_t, mask)
    loss.backward()
    print(f"sdl = {loss.item():.4f}, grad = {logp.grad.tolist()}")
    adv, nz = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0]), 2)
    print(f"advantages = {adv.tolist()}, zero-variance groups = {nz}")
    print(diagnostics(logp.detach(), logp.detach() + 0.3, logp_t, mask, advantages=torch.tensor([1.0])))
