"""RLHF math: GAE, whitening, clipped losses, entropy, KL estimators and controllers, DPO, GRPO.

References are independent: plain-Python loops, hand-computed numbers, closed-form KLs.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf import dpo_math, grpo_math, ppo_math
from rlhf import kl as kl_lib

# ----------------------------------------------------------------------------- GAE


def gae_reference(rewards, values, mask, gamma, lam):
    """Plain-Python backward loop, one row at a time."""
    adv = np.zeros_like(rewards, dtype=np.float64)
    for b in range(rewards.shape[0]):
        length = int(mask[b].sum())
        next_value, next_adv = 0.0, 0.0
        for t in reversed(range(length)):
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            next_adv = delta + gamma * lam * next_adv
            adv[b, t] = next_adv
            next_value = values[b, t]
    return adv, (adv + values) * mask


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 1.0), (0.99, 0.0), (1.0, 1.0)])
def test_gae_matches_backward_loop(gamma, lam):
    rng = np.random.default_rng(0)
    B, T = 5, 9
    lengths = [9, 1, 4, 7, 2]
    mask = (np.arange(T)[None] < np.array(lengths)[:, None]).astype(np.float32)
    rewards = rng.normal(size=(B, T)).astype(np.float32)
    values = rng.normal(size=(B, T)).astype(np.float32)
    adv, ret = ppo_math.gae(jnp.asarray(rewards), jnp.asarray(values), mask, gamma, lam)
    ref_adv, ref_ret = gae_reference(rewards, values * mask, mask, gamma, lam)
    np.testing.assert_allclose(adv, ref_adv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, ref_ret, rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(adv)[mask == 0] == 0)


def test_gae_monte_carlo_limit():
    """γ = λ = 1: advantages are reward-to-go minus V_t; returns are reward-to-go."""
    rewards = jnp.array([[0.0, 0.0, 1.0, 0.0]])
    values = jnp.array([[0.5, 0.2, 0.1, 9.0]])
    mask = jnp.array([[1, 1, 1, 0]])
    adv, ret = ppo_math.gae(rewards, values, mask, 1.0, 1.0)
    np.testing.assert_allclose(ret, [[1.0, 1.0, 1.0, 0.0]])
    np.testing.assert_allclose(adv, [[0.5, 0.8, 0.9, 0.0]], rtol=1e-6)
    jitted = jax.jit(ppo_math.gae, static_argnums=(3, 4))  # the mask check is host-only
    np.testing.assert_allclose(jitted(rewards, values, mask, 1.0, 1.0)[0], adv, rtol=1e-6)


def test_gae_rejects_bad_masks_and_shapes():
    with pytest.raises(ValueError, match="prefix"):
        ppo_math.gae(jnp.zeros((1, 3)), jnp.zeros((1, 3)), jnp.array([[1, 0, 1]]), 1.0, 1.0)
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        ppo_math.gae(jnp.zeros((1, 3)), jnp.zeros((1, 4)), jnp.ones((1, 3)), 1.0, 1.0)


# ----------------------------------------------------------------------------- rewards


def test_per_token_rewards_kl_and_score_at_last_token():
    logp = jnp.array([[-1.0, -2.0, -0.5], [-0.3, -0.7, 0.0]])
    ref = jnp.array([[-1.5, -1.0, -0.5], [-0.3, -0.2, 0.0]])
    mask = jnp.array([[1, 1, 1], [1, 1, 0]])
    scores = jnp.array([2.0, -1.0])
    rewards, kl = ppo_math.per_token_rewards(scores, logp, ref, mask, beta=0.1)
    np.testing.assert_allclose(kl, [[0.5, -1.0, 0.0], [0.0, -0.5, 0.0]], atol=1e-7)
    np.testing.assert_allclose(rewards, [[-0.05, 0.1, 2.0], [0.0, -1.0 + 0.05, 0.0]], atol=1e-6)


def test_missing_eos_penalty():
    tokens = jnp.array([[4, 7, 0], [4, 4, 4], [7, 0, 0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1], [1, 0, 0]])
    ended = ppo_math.ended_with(tokens, mask, eos_id=7)
    np.testing.assert_array_equal(ended, [True, False, True])
    scores = ppo_math.missing_eos_penalty(jnp.array([1.0, 1.0, 0.0]), ended, 3.0)
    np.testing.assert_allclose(scores, [1.0, -2.0, 0.0])


def test_whiten_and_explained_variance():
    x = jnp.array([[1.0, 2.0, 100.0], [3.0, 4.0, -50.0]])
    mask = jnp.array([[1, 1, 0], [1, 1, 0]])
    w = np.asarray(ppo_math.whiten(x, mask))
    real = np.array([1.0, 2.0, 3.0, 4.0])
    expected = (real - real.mean()) / np.sqrt(real.var() + 1e-8)
    np.testing.assert_allclose(w[:, :2].reshape(-1), expected, rtol=1e-5)
    assert np.all(w[:, 2] == 0)
    kept = np.asarray(ppo_math.whiten(x, mask, shift_mean=False))[:, :2].reshape(-1)
    np.testing.assert_allclose(kept, expected + real.mean(), rtol=1e-5)
    returns = jnp.array([[1.0, 2.0, 0.0], [3.0, 5.0, 0.0]])
    assert float(ppo_math.explained_variance(returns, returns, mask)) == pytest.approx(1.0)
    ev = ppo_math.explained_variance(jnp.full((2, 3), 2.75), returns, mask)
    assert float(ev) == pytest.approx(0.0, abs=1e-6)


# ----------------------------------------------------------------------------- losses


def test_policy_loss_hand_cases():
    """ε = 0.2; four tokens covering both signs of A inside and outside the clip range."""
    ratio = np.array([1.5, 0.5, 1.5, 0.9])
    adv = np.array([2.0, 1.0, -1.0, -1.0])
    # A > 0, ρ = 1.5: max(-3, -2.4) = -2.4 (clipped); A > 0, ρ = 0.5: max(-0.5, -0.8) = -0.5;
    # A < 0, ρ = 1.5: max(1.5, 1.2) = 1.5; A < 0, ρ = 0.9: max(0.9, 0.9) = 0.9.
    expected = np.mean([-2.4, -0.5, 1.5, 0.9])
    old = np.full((1, 4), -1.0, np.float32)
    new = old + np.log(ratio)[None].astype(np.float32)
    mask = jnp.ones((1, 4))
    loss, m = ppo_math.policy_loss(jnp.asarray(new), jnp.asarray(old), adv[None], mask, 0.2)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(m["clip_fraction"]) == pytest.approx(0.25)
    assert float(m["ratio_mean"]) == pytest.approx(ratio.mean(), rel=1e-5)
    assert float(m["ratio_var"]) == pytest.approx(ratio.var(), rel=1e-4)
    k3 = np.mean(ratio - 1 - np.log(ratio))
    assert float(m["approx_kl"]) == pytest.approx(k3, rel=1e-4)
    # A masked token changes nothing.
    pad = lambda a, v: jnp.concatenate([jnp.asarray(a), jnp.full((1, 1), v)], axis=1)  # noqa: E731
    masked, _ = ppo_math.policy_loss(
        pad(new, 5.0), pad(old, -9.0), pad(adv[None], 7.0), pad(mask, 0.0), 0.2
    )
    assert float(masked) == pytest.approx(expected, rel=1e-5)


def test_value_loss_hand_cases():
    """ε = 0.2: V moved past the clip range is held back by the max; inside it is not."""
    old = jnp.array([[1.0, 1.0, 0.0]])
    new = jnp.array([[2.0, 0.9, 0.5]])
    ret = jnp.array([[3.0, 0.0, 0.0]])
    # token 0: (2-3)^2 = 1 vs (1.2-3)^2 = 3.24 -> 3.24 (clipped); token 1: 0.81 vs 0.81;
    # token 2: 0.25 vs (0.2-0)^2 = 0.04 -> 0.25.
    loss, m = ppo_math.value_loss(new, old, ret, jnp.ones((1, 3)), 0.2)
    assert float(loss) == pytest.approx(0.5 * (3.24 + 0.81 + 0.25) / 3, rel=1e-5)
    assert float(m["value_clip_fraction"]) == pytest.approx(1 / 3)


def test_entropy_from_logits():
    rng = np.random.default_rng(1)
    logits = rng.normal(size=(2, 3, 11)) * 3
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    expected = -(p * np.log(p)).sum(-1)
    np.testing.assert_allclose(ppo_math.entropy_from_logits(jnp.asarray(logits)), expected, 1e-5)
    np.testing.assert_allclose(ppo_math.entropy_from_logits(jnp.zeros((4, 16))), np.log(16), 1e-6)
    limited = jnp.array([[0.0, 0.0, -jnp.inf, -jnp.inf]])  # vocab limit: uniform over 2
    np.testing.assert_allclose(ppo_math.entropy_from_logits(limited), [np.log(2)], 1e-6)


# ----------------------------------------------------------------------------- KL


def test_kl_estimators_two_gaussians():
    """q = N(0, 1) (policy, sampled), p = N(0.3, 1): KL(q ‖ p) = 0.3² / 2 = 0.045."""
    x = np.random.default_rng(2).normal(size=400_000)
    log_q = -0.5 * x**2
    log_p = -0.5 * (x - 0.3) ** 2
    k1 = np.asarray(kl_lib.kl_k1(jnp.asarray(log_q), jnp.asarray(log_p)))
    k3 = np.asarray(kl_lib.kl_k3(jnp.asarray(log_q), jnp.asarray(log_p)))
    k2 = np.asarray(kl_lib.kl_k2(jnp.asarray(log_q), jnp.asarray(log_p)))
    assert k1.mean() == pytest.approx(0.045, abs=3e-3)
    assert k3.mean() == pytest.approx(0.045, abs=3e-3)
    assert k2.mean() == pytest.approx(0.045, abs=3e-3)  # exact to second order here
    assert np.all(k3 >= 0) and np.any(k1 < 0)
    assert k3.std() < k1.std()  # the reason k3 exists


def test_kl_estimators_categorical_closed_form():
    q = np.array([0.5, 0.3, 0.15, 0.05])
    p = np.array([0.25, 0.25, 0.25, 0.25])
    exact = float(np.sum(q * np.log(q / p)))
    x = np.random.default_rng(3).choice(4, size=300_000, p=q)
    log_q, log_p = jnp.asarray(np.log(q[x])), jnp.asarray(np.log(p[x]))
    assert float(jnp.mean(kl_lib.kl_k1(log_q, log_p))) == pytest.approx(exact, abs=4e-3)
    assert float(jnp.mean(kl_lib.kl_k3(log_q, log_p))) == pytest.approx(exact, abs=4e-3)
    # Expectations taken exactly over the support.
    k3_exact = np.sum(q * (p / q - 1 - np.log(p / q)))
    assert k3_exact == pytest.approx(exact, rel=1e-12)
    with pytest.raises(ValueError, match="estimator"):
        kl_lib.kl_estimate(log_q, log_p, "k4")


def test_sequence_kl_ignores_padding():
    per_token = jnp.array([[0.1, 0.2, 5.0], [0.3, 7.0, 7.0]])
    mask = jnp.array([[1, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(kl_lib.sequence_kl(per_token, mask), [0.3, 0.3], rtol=1e-6)


def test_adaptive_controller_update_rule():
    ctl = kl_lib.make_kl_controller(0.1, target=6.0, horizon=10_000)
    # KL = 9: error = 9/6 - 1 = 0.5 -> clipped to 0.2; K_β = 256 / 10000.
    after = ctl.update(9.0, n_steps=256)
    assert after.value == pytest.approx(0.1 * (1 + 0.2 * 256 / 10_000))
    # KL = 5.4: error = -0.1 (inside the clip range).
    assert ctl.update(5.4, 256).value == pytest.approx(0.1 * (1 - 0.1 * 0.0256))
    # KL = 0: error clipped to -0.2; β shrinks but stays positive.
    assert ctl.update(0.0, 256).value == pytest.approx(0.1 * (1 - 0.2 * 0.0256))
    assert ctl.value == 0.1  # frozen: update returns a new controller
    fixed = kl_lib.make_kl_controller(0.05)
    assert fixed.update(100.0, 256).value == 0.05
    # Repeated updates drive β up while KL stays above target.
    c = ctl
    for _ in range(100):
        c = c.update(12.0, 1000)
    assert c.value == pytest.approx(0.1 * 1.02**100)
    with pytest.raises(ValueError):
        kl_lib.AdaptiveKLController(0.1, 0.0, 100.0)


# ----------------------------------------------------------------------------- DPO


def test_dpo_loss_hand_computation():
    pc, pr = jnp.array([-10.0, -4.0]), jnp.array([-12.0, -3.0])
    rc, rr = jnp.array([-11.0, -4.0]), jnp.array([-11.0, -4.0])
    beta = 0.5
    # pair 0: z = 0.5 * ((-10 + 11) - (-12 + 11)) = 1.0; pair 1: 0.5 * (0 - 1) = -0.5.
    z = np.array([1.0, -0.5])
    expected = np.mean(np.log1p(np.exp(-z)))
    loss, m = dpo_math.dpo_loss(pc, pr, rc, rr, beta)
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert float(m["reward_accuracy"]) == 0.5
    assert float(m["reward_margin"]) == pytest.approx(0.25)
    assert float(m["chosen_reward"]) == pytest.approx(0.25)  # (0.5 + 0) / 2
    assert float(m["rejected_reward"]) == pytest.approx(0.0)  # (-0.5 + 0.5) / 2
    smooth, _ = dpo_math.dpo_loss(pc, pr, rc, rr, beta, label_smoothing=0.1)
    ref = np.mean(0.9 * np.log1p(np.exp(-z)) + 0.1 * np.log1p(np.exp(z)))
    assert float(smooth) == pytest.approx(ref, rel=1e-6)
    # Policy = reference: z = 0, loss = log 2 whatever β.
    same, _ = dpo_math.dpo_loss(rc, rr, rc, rr, 3.0)
    assert float(same) == pytest.approx(math.log(2.0))
    with pytest.raises(ValueError, match=r"\[B\]"):
        dpo_math.dpo_loss(pc[:, None], pr[:, None], rc[:, None], rr[:, None], beta)


def test_dpo_gradient_raises_chosen_lowers_rejected():
    zero = jnp.zeros(1)

    def loss(chosen, rejected):
        return dpo_math.dpo_loss(chosen, rejected, zero, zero, 0.1)[0]

    g_chosen, g_rejected = jax.grad(loss, argnums=(0, 1))(zero, zero)
    assert float(g_chosen[0]) < 0 < float(g_rejected[0])  # descent: chosen up, rejected down


def test_preference_pairs_and_sequence_log_probs():
    assert dpo_math.preference_pairs([1, 0, 2, 1]) == [(1, 0), (0, 2), (1, 2), (1, 3), (3, 2)]
    assert dpo_math.preference_pairs([0, 0]) == []
    lp = jnp.array([[-1.0, -2.0, -9.0]])
    assert float(dpo_math.sequence_log_probs(lp, jnp.array([[1, 1, 0]]))[0]) == -3.0


# ----------------------------------------------------------------------------- GRPO


def test_group_advantages():
    scores = jnp.array([[1.0, 0.0, 0.0, 1.0], [0.2, 0.2, 0.2, 0.2], [3.0, 1.0, 2.0, 2.0]])
    adv = np.asarray(grpo_math.group_advantages(scores, eps=0.0 + 1e-12))
    np.testing.assert_allclose(adv[0], [1, -1, -1, 1], rtol=1e-5)
    np.testing.assert_allclose(adv[1], 0.0, atol=1e-6)  # no signal in an all-equal group
    row = np.array([3.0, 1.0, 2.0, 2.0])
    np.testing.assert_allclose(adv[2], (row - 2.0) / row.std(), rtol=1e-5)
    np.testing.assert_allclose(adv.mean(1), 0.0, atol=1e-6)
    unscaled = grpo_math.group_advantages(scores, scale_by_std=False)
    np.testing.assert_allclose(unscaled[2], row - 2.0, rtol=1e-6)
    with pytest.raises(ValueError):
        grpo_math.group_advantages(jnp.zeros(4))


def test_grpo_loss_on_policy_is_minus_mean_advantage():
    """On-policy (π = π_old = π_ref): ρ = 1, KL = 0, loss = -mean_i Â_i."""
    lp = jnp.array([[-1.0, -2.0, 0.0], [-0.5, -0.5, -0.5]])
    mask = jnp.array([[1, 1, 0], [1, 1, 1]])
    adv = jnp.array([1.0, -3.0])
    loss, m = grpo_math.grpo_loss(lp, lp, lp, adv, mask, 0.2, beta=0.04)
    assert float(loss) == pytest.approx(1.0)
    assert float(m["kl"]) == pytest.approx(0.0) and float(m["clip_fraction"]) == 0.0
    # KL term: π_ref differs on one token by log r = 0.5 -> k3 = e^0.5 - 1.5 on that token,
    # averaged over row 0's 2 tokens, then over the 2 rows.
    ref = lp.at[0, 0].add(0.5)
    with_kl, _ = grpo_math.grpo_loss(lp, lp, ref, adv, mask, 0.2, beta=0.04)
    k3 = math.exp(0.5) - 1.5
    assert float(with_kl) == pytest.approx(1.0 + 0.04 * k3 / 2 / 2, rel=1e-5)
