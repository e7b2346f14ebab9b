"""visalign.advantages: exact values for group advantages, PPO-clip, KL estimators and reward shaping."""

from __future__ import annotations

import math

import pytest
import torch

from visalign import advantages as A
from visalign.errors import ConfigError, VisalignError

F64 = torch.float64


def t(values, dtype=F64):
    return torch.tensor(values, dtype=dtype)


# Three prompts: a group of three, a tied pair, and a singleton.
REWARDS = [1.0, 2.0, 4.0, 5.0, 5.0, 7.0]
GROUPS = [0, 0, 0, 1, 1, 2]


def pstd(xs):
    m = sum(xs) / len(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def test_grpo_per_group_std():
    adv = A.group_advantages(t(REWARDS), torch.tensor(GROUPS))
    s = pstd([1.0, 2.0, 4.0])
    expected = [(1 - 7 / 3) / (s + 1e-4), (2 - 7 / 3) / (s + 1e-4), (4 - 7 / 3) / (s + 1e-4), 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, t(expected), rtol=1e-12, atol=0)
    assert adv.dtype == F64
    # Tied group: 0 / (0 + eps) = 0; singleton: exactly 0 by convention.
    assert adv[3:].tolist() == [0.0, 0.0, 0.0]


def test_grpo_batch_std_and_dr_grpo_and_unbiased():
    r, g = t(REWARDS), torch.tensor(GROUPS)
    batch = A.group_advantages(r, g, std="batch", eps=0.0)
    means = [7 / 3] * 3 + [5.0, 5.0, 7.0]
    expected = [(x - m) / pstd(REWARDS) for x, m in zip(REWARDS, means)]
    expected[-1] = 0.0  # singleton
    torch.testing.assert_close(batch, t(expected), rtol=1e-12, atol=1e-15)
    dr = A.group_advantages(r, g, std="none")
    torch.testing.assert_close(dr, t([x - m for x, m in zip(REWARDS, means)][:5] + [0.0]), rtol=1e-12, atol=1e-15)
    unbiased = A.group_advantages(r, g, unbiased=True, eps=0.0)
    torch.testing.assert_close(unbiased[:3], (r[:3] - r[:3].mean()) / r[:3].std())  # torch.std is ddof = 1


def test_group_size_equals_contiguous_ids_and_order_does_not_matter():
    r = torch.randn(12, dtype=F64, generator=torch.Generator().manual_seed(0))
    by_size = A.group_advantages(r, group_size=4)
    by_ids = A.group_advantages(r, torch.arange(12) // 4 * 7 + 3)  # any integer labels
    torch.testing.assert_close(by_size, by_ids)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    shuffled = A.group_advantages(r[perm], (torch.arange(12) // 4)[perm])
    torch.testing.assert_close(shuffled, by_size[perm])
    # Each group is zero-mean with unit population std (up to eps).
    groups = by_size.view(3, 4)
    torch.testing.assert_close(groups.mean(dim=1), torch.zeros(3, dtype=F64), atol=1e-12, rtol=0)
    torch.testing.assert_close(groups.std(dim=1, correction=0), torch.ones(3, dtype=F64), atol=1e-3, rtol=0)


def test_rloo_leave_one_out():
    adv = A.rloo_advantages(t(REWARDS), torch.tensor(GROUPS))
    expected = [1 - 3.0, 2 - 2.5, 4 - 1.5, 0.0, 0.0, 0.0]
    torch.testing.assert_close(adv, t(expected), rtol=1e-12, atol=0)
    # K/(K-1) times the group-centred reward.
    torch.testing.assert_close(adv[:3], 1.5 * (t(REWARDS[:3]) - 7 / 3))


def test_singletons_are_zero_everywhere_even_without_eps():
    r, g = t([3.0, -1.0, 2.0]), torch.tensor([0, 1, 2])
    for adv in [A.group_advantages(r, g, eps=0.0), A.group_advantages(r, g, std="batch"), A.rloo_advantages(r, g),
                A.group_advantages(r, g, std="none"), A.group_advantages(r, g, eps=0.0, unbiased=True)]:  # fmt: skip
        assert adv.tolist() == [0.0, 0.0, 0.0]
    tied = A.group_advantages(t([2.0, 2.0]), torch.tensor([0, 0]), eps=0.0)
    assert tied.tolist() == [0.0, 0.0]  # 0/0 -> 0, not NaN
    assert A.group_advantages(torch.tensor([1, 3]), group_size=2).dtype == torch.float32  # integer rewards -> fp32


def test_flat_groups_are_the_valid_members_of_groups_that_tie():
    r = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.7, 0.3, 0.3, math.nan, 0.9, 0.9 + 1e-7])
    valid = torch.tensor([1, 1, 1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    ids = torch.tensor([5, 5, 1, 1, 2, 3, 3, 3, 4, 4])  # any integers; an invalid member does not break a tie
    flat = A.flat_groups(r, valid, ids)
    assert flat.tolist() == [True, True, False, False, True, True, True, False, False, False]
    adv = A.group_advantages(r[valid], ids[valid], std="none")
    assert (adv[flat[valid]] == 0).all() and (adv[~flat[valid]] != 0).all()  # flat = exactly no signal
    assert not A.flat_groups(r, torch.zeros_like(valid), ids).any()
    with pytest.raises(VisalignError, match="alike"):
        A.flat_groups(r, valid[:3], ids)


def test_clip_advantages():
    assert A.clip_advantages(t([-9.0, -1.0, 0.0, 7.0])).tolist() == [-5.0, -1.0, 0.0, 5.0]
    assert A.clip_advantages(t([3.0]), max_abs=2.0).tolist() == [2.0]


def test_ppo_clip_surrogate_values_and_gradients():
    adv = t([1.0, 1.0, -1.0, -1.0, 2.0])
    log_ratio = t([0.1, -0.1, 0.1, -0.1, 0.0])  # rho = e^{+-0.1}; clip range 0.05
    logp_old = t([-1.0, -2.0, -3.0, -4.0, -5.0])
    logp = (logp_old + log_ratio).requires_grad_()
    losses, m = A.ppo_clip_loss(logp, logp_old, adv, clip_range=0.05)
    rho = log_ratio.exp()
    clipped = rho.clamp(0.95, 1.05)
    torch.testing.assert_close(losses, torch.maximum(-adv * rho, -adv * clipped))
    # The pessimistic side: A > 0 with rho > 1 + c, and A < 0 with rho < 1 - c, are clipped (no gradient).
    torch.testing.assert_close(losses.detach(), t([-1.05, -math.exp(-0.1), math.exp(0.1), 0.95, -2.0]))
    losses.sum().backward()
    torch.testing.assert_close(logp.grad, t([0.0, -math.exp(-0.1), math.exp(0.1), 0.0, -2.0]))
    assert m["clipfrac"].item() == pytest.approx(4 / 5)
    assert m["approx_kl"].item() == pytest.approx(0.5 * 0.04 / 5)
    assert m["ratio"].item() == pytest.approx(rho.mean().item())
    # Clip-higher: a wider upper bound lets A > 0 samples move further.
    high, _ = A.ppo_clip_loss(logp.detach(), logp_old, adv, clip_range=0.05, clip_range_high=0.2)
    assert high[0].item() == pytest.approx(-math.exp(0.1))
    # At rho = 1 the surrogate is -A.
    same, _ = A.ppo_clip_loss(logp_old.clone(), logp_old, adv)
    torch.testing.assert_close(same, -adv)


def test_kl_estimators_exact_and_unbiased():
    logp, logp_ref = t([-1.0, -2.0, -0.5]), t([-1.5, -1.0, -0.5])
    log_u = logp_ref - logp
    torch.testing.assert_close(A.kl_estimate(logp, logp_ref, "k1"), -log_u)
    torch.testing.assert_close(A.kl_estimate(logp, logp_ref, "k2"), 0.5 * log_u**2)
    torch.testing.assert_close(A.kl_estimate(logp, logp_ref, "k3"), log_u.exp() - 1 - log_u)
    assert bool((A.kl_estimate(logp, logp_ref, "k3") >= 0).all())
    # Exact expectation under pi over a categorical: k1 and k3 are unbiased for KL(pi || pi_ref); k2 is not.
    p = t([0.5, 0.3, 0.2])
    q = t([0.2, 0.2, 0.6])
    kl = (p * (p / q).log()).sum()
    for kind in ("k1", "k3"):
        assert (p * A.kl_estimate(p.log(), q.log(), kind)).sum().item() == pytest.approx(kl.item(), rel=1e-12)
    assert (p * A.kl_estimate(p.log(), q.log(), "k2")).sum().item() != pytest.approx(kl.item(), rel=1e-3)
    # The gradient flows to the policy only.
    lp = logp.clone().requires_grad_()
    lr = logp_ref.clone().requires_grad_()
    A.kl_estimate(lp, lr, "k3").sum().backward()
    assert lp.grad is not None and lr.grad is None


def test_gaussian_mean_kl_equals_normal_kl():
    g = torch.Generator().manual_seed(0)
    mu, mu_ref = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    std = torch.tensor([0.3, 0.7])
    kl = A.gaussian_mean_kl(mu, mu_ref, std)
    ref = torch.distributions.kl_divergence(
        torch.distributions.Normal(mu, std.view(2, 1, 1, 1)), torch.distributions.Normal(mu_ref, std.view(2, 1, 1, 1))
    )
    torch.testing.assert_close(kl, ref.flatten(1).mean(dim=1))
    torch.testing.assert_close(A.gaussian_mean_kl(mu, mu_ref, 0.5), ((mu - mu_ref) ** 2).flatten(1).mean(1) / 0.5)


def test_par_shaping():
    r = t([1.0, 0.0, -2.0])
    one_ref = A.par_shaping(r, t([0.0, 0.0, 1.0]))
    torch.testing.assert_close(one_ref, t([1 / (1 + math.exp(-1)), 0.5, 1 / (1 + math.exp(3))]))
    many = A.par_shaping(r, t([[0.0, 2.0], [1.0, -1.0], [-2.0, -2.0]]))
    sig = torch.sigmoid
    expected = [(sig(t(1.0)) + sig(t(-1.0))) / 2, (sig(t(-1.0)) + sig(t(1.0))) / 2, t(0.5)]
    torch.testing.assert_close(many, torch.stack(expected))
    # Bounded in (0, 1) whatever the reward scale.
    huge = A.par_shaping(t([1e6, -1e6]), t([0.0, 0.0]))
    assert 0 <= huge.min() and huge.max() <= 1


def test_prompt_stat_tracker_history_and_modes():
    tracker = A.PromptStatTracker()
    first = tracker.update(["a", "a", "b", "c", "b"], t([1.0, 3.0, 2.0, 9.0, 6.0]))
    # First update equals per-group GRPO advantages (population std, eps 1e-4); "c" is a singleton -> 0.
    expected = A.group_advantages(t([1.0, 3.0, 2.0, 9.0, 6.0]), torch.tensor([0, 0, 1, 2, 1]))
    torch.testing.assert_close(first, expected)
    # Second update: statistics include the history of each prompt.
    second = tracker.update(["a", "c"], t([5.0, 1.0]))
    hist_a, hist_c = [1.0, 3.0, 5.0], [9.0, 1.0]
    torch.testing.assert_close(second, t([(5 - 3) / (pstd(hist_a) + 1e-4), (1 - 5) / (pstd(hist_c) + 1e-4)]))
    assert len(tracker) == 3
    # State round-trips (exact resume).
    state = tracker.state_dict()
    other = A.PromptStatTracker()
    other.load_state_dict(state)
    torch.testing.assert_close(other.update(["a"], t([0.0])), tracker.update(["a"], t([0.0])))
    tracker.clear()
    assert len(tracker) == 0


def test_prompt_stat_tracker_buffer_min_count_global_std():
    buffered = A.PromptStatTracker(buffer_size=2)
    buffered.update(["a", "a"], t([100.0, 0.0]))
    out = buffered.update(["a", "a"], t([1.0, 3.0]))  # the old rewards fell out of the buffer
    torch.testing.assert_close(out, t([-1 / (1 + 1e-4), 1 / (1 + 1e-4)]))
    # Fewer than min_count rewards for a prompt: use the batch statistics (ddpo-pytorch).
    fallback = A.PromptStatTracker(min_count=3)
    out = fallback.update(["a", "b", "b"], t([1.0, 2.0, 6.0]))
    torch.testing.assert_close(out, (t([1.0, 2.0, 6.0]) - 3.0) / (pstd([1.0, 2.0, 6.0]) + 1e-4))
    # global_std: per-prompt mean, batch std (flow_grpo).
    glob = A.PromptStatTracker(global_std=True)
    out = glob.update(["a", "a", "b", "b"], t([1.0, 3.0, 10.0, 20.0]))
    s = pstd([1.0, 3.0, 10.0, 20.0]) + 1e-4
    torch.testing.assert_close(out, t([-1 / s, 1 / s, -5 / s, 5 / s]))


def test_group_ids_from_prompts():
    assert A.group_ids_from_prompts(["x", "y", "x", "z"]).tolist() == [0, 1, 0, 2]


def test_bad_inputs():
    r = t([1.0, 2.0, 3.0])
    with pytest.raises(VisalignError, match="group_ids must be a tensor of shape \\[3\\]"):
        A.group_advantages(r, torch.tensor([0, 1]))
    with pytest.raises(VisalignError, match="do not split into groups of group_size=2"):
        A.group_advantages(r, group_size=2)
    with pytest.raises(VisalignError, match="pass group_ids \\[N\\]"):
        A.group_advantages(r)
    with pytest.raises(VisalignError, match="not both"):
        A.group_advantages(r, torch.tensor([0, 0, 1]), group_size=3)
    with pytest.raises(VisalignError, match="rewards\\[1\\] is nan"):
        A.group_advantages(t([1.0, math.nan]), group_size=2)
    with pytest.raises(VisalignError, match="non-empty 1-D"):
        A.rloo_advantages(torch.zeros(2, 2), group_size=2)
    with pytest.raises(ConfigError, match="std must be one of"):
        A.group_advantages(r, group_size=3, std="global")
    with pytest.raises(ConfigError, match="kind must be one of"):
        A.kl_estimate(r, r, "k4")
    with pytest.raises(ConfigError, match="clip ranges"):
        A.ppo_clip_loss(r, r, r, clip_range=0.0)
    with pytest.raises(VisalignError, match="share one shape"):
        A.ppo_clip_loss(r, r, r[:2])
    with pytest.raises(VisalignError, match="got 2 prompts but rewards of shape \\[3\\]"):
        A.PromptStatTracker().update(["a", "b"], r)
    with pytest.raises(VisalignError, match="reference_rewards must be"):
        A.par_shaping(r, torch.zeros(2))
