import pytest
import torch

from bindweave.model.flow import RectifiedFlow, euler_sigmas, euler_step, foreground_weights, shift_sigmas, velocity_from_sample


def test_shift_keeps_endpoints_and_moves_towards_noise():
    s = torch.linspace(0, 1, 11)
    shifted = shift_sigmas(s, 5.0)
    assert shifted[0] == 0 and shifted[-1] == 1
    assert (shifted[1:-1] > s[1:-1]).all()
    torch.testing.assert_close(shift_sigmas(s, 1.0), s)


def test_shift_is_wans_closed_form():
    """σ' = sσ / (1 + (s − 1)σ), at values worked out by hand (s = 3: 1/4 → 1/2, 1/2 → 3/4, 3/4 → 9/10)."""
    s = torch.tensor([0.25, 0.5, 0.75])
    torch.testing.assert_close(shift_sigmas(s, 3.0), torch.tensor([0.5, 0.75, 0.9]))
    torch.testing.assert_close(shift_sigmas(s, 5.0), torch.tensor([0.625, 2.5 / 3, 0.9375]))
    torch.testing.assert_close(euler_sigmas(4, 3.0), torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))


def test_sampler_grids_are_the_shifted_flow_grids():
    """diffusers' schedulers as ``make_scheduler`` sets them up, against the closed form: Euler on
    linspace(1, 0, n + 1) shifted, at t = 1000σ; UniPC on diffusers' flow grid linspace(1, 1/1000, n + 1)[:-1]
    shifted (its first σ nudged 1e-6 below 1), then 0, integer timesteps."""
    from bindweave.inference.sampler import make_scheduler

    euler = make_scheduler("euler", 4, 3.0)
    torch.testing.assert_close(euler.sigmas, torch.tensor([1.0, 0.9, 0.75, 0.5, 0.0]))
    torch.testing.assert_close(euler.timesteps, torch.tensor([1000.0, 900.0, 750.0, 500.0]))
    unipc = make_scheduler("unipc", 4, 3.0)
    grid = torch.linspace(1, 1 / 1000, 5, dtype=torch.float64)[:-1]
    expected = torch.cat([3 * grid / (1 + 2 * grid), torch.zeros(1, dtype=torch.float64)])
    expected[0] -= 1e-6
    torch.testing.assert_close(unipc.sigmas.double(), expected, atol=1e-6, rtol=0)
    assert ((unipc.timesteps.double() - 1000 * expected[:-1]).abs() < 1).all()


def test_training_sigmas_follow_the_shifted_uniform():
    """σ' = sσ/(1 + (s − 1)σ) of σ ~ U(0, 1) is below x with probability x / (s − (s − 1)x): at s = 5,
    1/6 below 1/2 and 9/14 below 9/10 (20 000 draws; bounds ~5 standard deviations)."""
    sigmas = RectifiedFlow(shift=5.0).sample_sigmas(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert abs((sigmas < 0.5).float().mean().item() - 1 / 6) < 0.013
    assert abs((sigmas < 0.9).float().mean().item() - 9 / 14) < 0.017


def test_noising_and_velocity_are_consistent():
    x0, noise = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    sigmas = torch.tensor([0.0, 0.5, 1.0])
    xt = RectifiedFlow.noisy(x0, noise, sigmas)
    torch.testing.assert_close(xt[0], x0[0])
    torch.testing.assert_close(xt[2], noise[2])
    # Moving along the true velocity from σ to 0 lands on x0.
    v = RectifiedFlow.velocity(x0, noise)
    torch.testing.assert_close(euler_step(xt[1:2], v[1:2], torch.tensor(0.5), torch.tensor(0.0)), x0[1:2])


def test_euler_sampler_with_exact_velocity_recovers_data():
    x0, noise = torch.randn(2, 3), torch.randn(2, 3)
    sigmas = euler_sigmas(7, shift=3.0)
    assert sigmas[0] == 1 and sigmas[-1] == 0 and (sigmas.diff() < 0).all()
    x = noise
    for i in range(7):
        x = euler_step(x, noise - x0, sigmas[i], sigmas[i + 1])
    torch.testing.assert_close(x, x0)


def test_training_sigmas_are_in_range():
    for sampling in ("uniform", "logit_normal"):
        s = RectifiedFlow(shift=3.0, timestep_sampling=sampling).sample_sigmas(1000, torch.device("cpu"))
        assert s.min() > 0 and s.max() < 1


def test_velocity_from_an_exact_sample_prediction_is_the_true_velocity():
    x0, noise = torch.randn(3, 4, 2, 2, 2), torch.randn(3, 4, 2, 2, 2)
    sigmas = torch.tensor([0.05, 0.5, 1.0])
    xt = RectifiedFlow.noisy(x0, noise, sigmas)
    torch.testing.assert_close(velocity_from_sample(xt, x0, sigmas), RectifiedFlow.velocity(x0, noise))
    # Below min_sigma the division is clamped: bounded, and a step to σ = 0 still lands near x0.
    tiny = torch.tensor([1e-4])
    v = velocity_from_sample(RectifiedFlow.noisy(x0[:1], noise[:1], tiny), x0[:1], tiny)
    assert v.abs().max() < 1e-2 * noise.abs().max() + 1e-2 * x0.abs().max()


def test_foreground_weights_mark_what_differs_from_the_clip_background():
    background = torch.tensor([0.3, -0.2, 0.5, 0.1])  # per channel
    latents = background.view(1, 4, 1, 1, 1).repeat(2, 1, 3, 6, 6)  # (B, z, T, h, w)
    latents[0, 2, 1, 2:4, 1:3] += 0.4  # a subject in one channel of one clip, 4 latent pixels of 108
    weights = foreground_weights(latents, weight=10.0, threshold=0.05)
    assert weights.shape == (2, 1, 3, 6, 6)
    expected = torch.ones(2, 1, 3, 6, 6)
    expected[0, 0, 1, 2:4, 1:3] = 10.0
    torch.testing.assert_close(weights, expected)
    # Below the threshold (e.g. a bfloat16 cache's rounding) is background; weight 1 is uniform.
    assert (foreground_weights(latents + 0.01 * torch.rand_like(latents), 10.0, 0.05)[1] == 1).all()
    assert (foreground_weights(latents, 1.0) == 1).all()


def test_pure_noise_fraction_draws_exactly_one_that_often():
    flow = RectifiedFlow(shift=3.0, timestep_sampling="logit_normal", pure_noise_fraction=0.25)
    sigmas = flow.sample_sigmas(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    pure = sigmas == 1.0
    assert abs(pure.float().mean().item() - 0.25) < 0.02
    assert (sigmas[~pure] < 1.0).all() and (sigmas > 0).all()
    assert (RectifiedFlow(timestep_sampling="logit_normal").sample_sigmas(20000, torch.device("cpu")) < 1.0).all()
    with pytest.raises(ValueError, match="pure_noise_fraction must be in"):
        RectifiedFlow(pure_noise_fraction=1.0)
