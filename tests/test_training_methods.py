"""Training-side methods against hand-computed values: SpeeD, CAW, Min-SNR, P2, CLTS, log/logit-normal,
the adaptive sampler, MDLRC; empirical frequencies against each sampler's density; state round trips."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from timetuner.errors import UserError
from timetuner.trainers import MDLRC, SAMPLERS, make_sampler, make_weighting
from timetuner.trainers.samplers import default_alphas_cumprod, speed_dual_pivot, speed_threshold

T = 1000


def chi2_matches(t: torch.Tensor, p: torch.Tensor, buckets: int = 40) -> tuple[float, float]:
    """χ² of the draws against p over ~equal-mass buckets of consecutive timesteps; (statistic, 99.9 % bound)."""
    from scipy.stats import chi2

    edges = torch.searchsorted(torch.cumsum(p, 0), torch.linspace(0, 1, buckets + 1)[1:-1].double())
    bucket_of = torch.bucketize(torch.arange(p.numel()), edges, right=True)
    n = bucket_of.max().item() + 1
    expected = torch.zeros(n, dtype=torch.float64).index_add_(0, bucket_of, p) * t.numel()
    observed = torch.bincount(bucket_of[t], minlength=n).double()
    keep = expected > 0
    stat = float(((observed[keep] - expected[keep]) ** 2 / expected[keep]).sum())
    return stat, float(chi2.ppf(0.999, int(keep.sum()) - 1))


# -- SpeeD ----------------------------------------------------------------------------------------------------
def test_speed_probabilities_sum_to_one_and_put_k_over_k_tau_plus_rest_below_tau():
    k, tau = 2.0, 700
    p = make_sampler("speed", T, k=k, tau=tau, dual=False).probabilities(0)
    assert p.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert torch.allclose(p[:tau], torch.full((tau,), k / (k * tau + T - tau), dtype=torch.float64))
    assert torch.allclose(p[tau:], torch.full((T - tau,), 1 / (k * tau + T - tau), dtype=torch.float64))


def test_speed_threshold_formula_matches_the_paper_closed_form_for_the_linear_schedule():
    beta0, delta = 1e-4, 0.02 - 1e-4  # per-step β of DDPM's linear schedule
    alphas = default_alphas_cumprod(T)
    for r in (10.0, 100.0, 1000.0):
        closed = math.sqrt(2 * T * math.log(r) / delta + T**2 * beta0**2 / delta**2) - T * beta0 / delta
        assert abs(speed_threshold(alphas, r) - closed) <= 4  # discrete ᾱ vs the continuous integral
    sampler = make_sampler("speed", T, r=100.0)
    assert sampler.tau == speed_threshold(alphas, 100.0)


def test_speed_dual_pivot_is_the_official_642_and_its_marginal_is_the_mixture():
    assert speed_dual_pivot(default_alphas_cumprod(T)) == 642
    sampler = make_sampler("speed", T, dual=True)
    t, w = sampler.sample(100_000, 0, torch.Generator().manual_seed(0))
    stat, bound = chi2_matches(t, sampler.probabilities(0))
    assert stat < bound
    assert torch.equal(w, torch.ones(100_000))


def _published_band_masses(k: float, tau: int, lam: float) -> list[float]:
    """SpeeD's weight mass p(t)·w(t) per band, written again from the authors' code (numpy, `Speed_IDDPM`):
    n//2 + 1 draws from P̃ ∝ k below τ plus their dual partners about m, CAW weights below τ."""
    import numpy as np

    alphas = default_alphas_cumprod(T).numpy()
    p = np.where(np.arange(T) < tau, k, 1.0)
    p = p / p.sum()
    m = np.argmax(np.gradient(np.sqrt(1 - alphas)) < 1e-4) + 1
    t = np.arange(T)
    partner = np.zeros(T)
    np.add.at(partner, np.where(t < m, m - t, t - m), p)
    g = np.gradient(1 - alphas)
    w = (1 - lam) + (2 * lam - 1) * (g - g.min()) / (g.max() - g.min())
    w[tau:] = 1
    pw = (0.5 * p + 0.5 * partner) * w
    return [float(pw[lo:hi].sum() / pw.sum()) for lo, hi in BANDS]


BANDS = [(0, 100), (100, 300), (300, 500), (500, 700), (700, 1000)]


@pytest.mark.parametrize(
    ("setting", "expected"),
    # The issue's figures for the paper's setting (k = 5) and the authors' FFHQ config (k = 2).
    [("paper", [0.156, 0.320, 0.266, 0.183, 0.075]), ("ffhq", [0.140, 0.310, 0.236, 0.156, 0.159])],
)
def test_speed_band_masses_of_both_published_settings_from_the_formulas_and_from_the_draws(setting, expected):
    from timetuner.trainers import TrainConfig
    from timetuner.trainers.loop import build_sampler, build_weighting
    from timetuner.trainers.samplers import SPEED_SETTINGS

    published = SPEED_SETTINGS[setting]
    formulas = _published_band_masses(published["k"], published["tau"], published["lam"])
    assert formulas == pytest.approx(expected, abs=1e-3)
    # What `timetuner train --sampler speed [--speed-setting ffhq]` builds with no other flag.
    config = TrainConfig(out="unused", sampler="speed", speed_setting=setting)
    scheduler = DDPMScheduler(num_train_timesteps=T)
    sampler, weighting = build_sampler(config, scheduler), build_weighting(config)
    assert (sampler.k, sampler.tau, sampler.dual, weighting.name, weighting.lam, weighting.tau) == (
        published["k"], 700, True, "caw", 0.6, 700)
    t = torch.cat([sampler.sample(128, s, torch.Generator().manual_seed(s))[0] for s in range(2000)])
    w = weighting(t, scheduler).double()
    drawn = [float(w[(t >= lo) & (t < hi)].sum() / w.sum()) for lo, hi in BANDS]
    assert drawn == pytest.approx(formulas, abs=0.006)


def test_speed_k2_without_the_partner_and_with_caw_is_uniforms_objective_within_a_few_points():
    """Why the old default could not differ from uniform: its band masses sit within 0.02 of uniform's."""
    sampler = make_sampler("speed", T, k=2.0, dual=False)
    weights = make_weighting("caw").table(default_alphas_cumprod(T))
    pw = sampler.probabilities(0) * weights
    bands = [float(pw[lo:hi].sum() / pw.sum()) for lo, hi in BANDS]
    assert bands == pytest.approx([0.1, 0.2, 0.2, 0.2, 0.3], abs=0.035)


def test_caw_weights_for_the_linear_schedule_span_0407_to_06_below_tau_and_are_one_above():
    scheduler = DDPMScheduler(num_train_timesteps=T)
    w = make_weighting("caw", lam=0.6, tau=700)(torch.arange(T), scheduler)
    assert w[:700].min().item() == pytest.approx(0.407, abs=5e-4)
    assert w[:700].max().item() == pytest.approx(0.6, abs=1e-6)
    assert torch.equal(w[700:], torch.ones(300))
    g = torch.gradient(1 - scheduler.alphas_cumprod.double())[0]  # the weight peaks where 1 − ᾱ changes fastest
    assert int(w[:700].argmax()) == int(g.argmax())


# -- SNR weightings -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_min_snr_equals_the_diffusers_training_script_weights(prediction_type):
    from diffusers.training_utils import compute_snr

    scheduler = DDPMScheduler(num_train_timesteps=T, prediction_type=prediction_type)
    t = torch.tensor([0, 10, 100, 300, 500, 999])
    snr = compute_snr(scheduler, t)
    expected = torch.stack([snr, 5.0 * torch.ones_like(snr)], dim=1).min(dim=1)[0]
    if prediction_type == "epsilon":
        expected = expected / snr
    elif prediction_type == "v_prediction":
        expected = expected / (snr + 1)
    got = make_weighting("min-snr", gamma=5.0)(t, scheduler)
    assert torch.allclose(got, expected)
    if prediction_type == "epsilon":  # by hand: γ/SNR where SNR > γ, 1 where SNR ≤ γ
        a = scheduler.alphas_cumprod[t].double()
        by_hand = torch.where(a / (1 - a) > 5, 5 * (1 - a) / a, torch.ones_like(a)).float()
        assert torch.allclose(got, by_hand, rtol=1e-5)


def test_p2_is_one_over_k_plus_snr_to_the_gamma():
    scheduler = DDPMScheduler(num_train_timesteps=T)
    t = torch.tensor([0, 250, 999])
    a = scheduler.alphas_cumprod[t].double()
    expected = 1 / (0.5 + a / (1 - a)) ** 2.0
    assert torch.allclose(make_weighting("p2", k=0.5, gamma=2.0)(t, scheduler).double(), expected, rtol=1e-5)


# -- densities -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "options", "step"),
    [("uniform", {}, 0), ("speed", {"k": 5.0, "tau": 600}, 0), ("clts", {"ramp_steps": 100}, 50),
     ("clts", {"ramp_steps": 100}, 500), ("lognormal", {}, 0), ("logit-normal", {"mean": 0.5, "std": 0.8}, 0)],
)
def test_empirical_frequencies_match_the_density(name, options, step):
    sampler = make_sampler(name, T, **options)
    p = sampler.probabilities(step)
    assert p.shape == (T,) and p.sum().item() == pytest.approx(1.0, abs=1e-9) and (p >= 0).all()
    t, w = sampler.sample(100_000, step, torch.Generator().manual_seed(1))
    assert t.dtype == torch.int64 and 0 <= t.min() and t.max() < T
    stat, bound = chi2_matches(t, p)
    assert stat < bound, (name, stat, bound)


def test_logit_normal_direction_positive_mean_favours_noise():
    noisy = make_sampler("logit-normal", T, mean=1.0).probabilities(0)
    clean = make_sampler("logit-normal", T, mean=-1.0).probabilities(0)
    t = torch.arange(T, dtype=torch.float64)
    assert (noisy * t).sum() > 600 and (clean * t).sum() < 400


def test_lognormal_maps_sigma_to_the_nearest_timestep_of_the_schedule():
    sampler = make_sampler("lognormal", T, mean=0.0, std=1e-3)  # σ ≈ 1 ⇔ ᾱ ≈ 1/2
    t, _ = sampler.sample(1000, 0, torch.Generator().manual_seed(0))
    alphas = default_alphas_cumprod(T)
    nearest = int(torch.argmin((alphas - 0.5).abs()))
    assert set(t.tolist()) <= {nearest - 1, nearest, nearest + 1}


def test_importance_correction_makes_the_weighted_mean_uniform():
    sampler = make_sampler("speed", T, k=4.0, tau=500, importance=True)
    t, w = sampler.sample(200_000, 0, torch.Generator().manual_seed(2))
    f = torch.sin(t.double() / 100)  # any per-timestep quantity
    uniform_mean = torch.sin(torch.arange(T, dtype=torch.float64) / 100).mean()
    assert float((w.double() * f).mean()) == pytest.approx(float(uniform_mean), abs=0.01)
    assert float(w.double().mean()) == pytest.approx(1.0, abs=0.01)


def test_clts_mixture_weight_follows_its_schedule():
    sampler = make_sampler("clts", T, mu=0.3, sigma=0.1, lambda_start=0.1, lambda_end=0.7, ramp_steps=1000)
    assert [sampler.mixture_weight(s) for s in (0, 250, 500, 1000, 5000)] == pytest.approx([0.1, 0.25, 0.4, 0.7, 0.7])
    t = torch.arange(T, dtype=torch.float64)
    gauss = torch.exp(-0.5 * ((t - 300) / 100) ** 2)
    expected = 0.6 / T + 0.4 * gauss / gauss.sum()
    assert torch.allclose(sampler.probabilities(500), expected)
    # Mass moves towards μ as training goes on.
    early, late = sampler.probabilities(0), sampler.probabilities(1000)
    assert late[250:350].sum() > early[250:350].sum() and late[900:].sum() < early[900:].sum()


# -- adaptive ----------------------------------------------------------------------------------------------------------
def _adaptive(**options):
    return make_sampler("adaptive", 100, update_every=1, subset=2, buffer=5, lr=5e-2, entropy=0.0, **options)


def test_adaptive_starts_uniform_and_matches_its_beta_density():
    sampler = _adaptive()
    x0 = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    draws = torch.cat([sampler.sample(64, 1, torch.Generator().manual_seed(s), x0=x0)[0] for s in range(800)])
    p = sampler.probabilities(1)
    interior = p[1:-1]  # round(u·(T−1)) gives the end points half a bin
    assert torch.allclose(interior, torch.full_like(interior, 1 / 99), rtol=1e-3)
    stat, bound = chi2_matches(draws, p, buckets=20)
    assert stat < bound


def test_adaptive_policy_moves_probability_towards_higher_reward():
    """Synthetic reward: a sample's loss drops by t/(T−1) after the update, so large t pays more."""
    sampler = _adaptive()
    x0 = torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    state = {"t": None, "phase": "before"}

    def probe(x, t, noise):
        if x.shape[0] != 64:  # the F-statistic probe row: no signal
            return torch.zeros(x.shape[0])
        if state["phase"] == "before":
            return torch.ones(64)
        return 1.0 - state["t"].float() / 99

    sampler.bind(probe)
    t_mean = (sampler.probabilities(0) * torch.arange(100)).sum().item()
    for step in range(60):
        state["phase"] = "before"
        t, _ = sampler.sample(64, step, torch.Generator().manual_seed(step), x0=x0)
        state["t"], state["phase"] = t, "after"
        sampler.update(t, torch.ones(64), step)
    moved = (sampler.probabilities(60) * torch.arange(100)).sum().item()
    assert t_mean == pytest.approx(49.5, abs=0.1)
    assert moved > t_mean + 10, moved
    assert sampler.last_reward > 0


def test_adaptive_subset_follows_the_f_statistic():
    sampler = _adaptive(probe_stride=10)
    # Rows of per-timestep drops where the total is driven by timesteps 30 and 70.
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        row = 0.01 * torch.randn(10, generator=gen)
        row[3] += float(torch.randn(1, generator=gen))
        row[7] += float(torch.randn(1, generator=gen))
        sampler.buffer_x.append(row)
        sampler.buffer_y.append(float(row.sum()))
    assert sampler._select_subset() == [30, 70]


def test_adaptive_state_dict_round_trip():
    sampler = _adaptive()
    x0 = torch.randn(8, 1, 8, 8)
    sampler.bind(lambda x, t, noise: torch.rand(x.shape[0], generator=torch.Generator().manual_seed(int(t.sum()))))
    for step in range(4):
        t, _ = sampler.sample(8, step, torch.Generator().manual_seed(step), x0=x0)
        sampler.update(t, torch.ones(8), step)
    copy = _adaptive()
    copy.load_state_dict(sampler.state_dict())
    for a, b in zip(sampler.policy.state_dict().values(), copy.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert copy.selected == sampler.selected and copy.buffer_y == sampler.buffer_y
    assert torch.equal(copy.probabilities(4), sampler.probabilities(4))
    a, _ = sampler.sample(8, 5, torch.Generator().manual_seed(9), x0=x0)
    b, _ = copy.sample(8, 5, torch.Generator().manual_seed(9), x0=x0)
    assert torch.equal(a, b)


def test_adaptive_needs_the_clean_batch():
    with pytest.raises(UserError, match="x0"):
        make_sampler("adaptive", T).sample(4, 0, torch.Generator())


# -- MDLRC -------------------------------------------------------------------------------------------------------------
def test_mdlrc_beta1_and_learning_rate_follow_the_formula_under_a_scheduler():
    from diffusers.optimization import get_scheduler

    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.999))
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=10)
    mdlrc = MDLRC(optimizer, decay_steps=100, beta1_end=0.5)
    for step in range(150):
        param.grad = torch.ones(3)
        optimizer.step()
        lr_scheduler.step()
        mdlrc.step(step + 1)
        s = step + 1
        beta1 = 0.9 - 0.4 * min(s / 100, 1.0)
        scheduled = 1e-3 * min(s / 10, 1.0)
        group = optimizer.param_groups[0]
        assert group["betas"] == pytest.approx((beta1, 0.999))
        assert group["lr"] == pytest.approx(scheduled * (1 - 0.9) / (1 - beta1))
    assert mdlrc.lr_factor(100) == pytest.approx(0.2)
    # Calling step twice without a scheduler step in between does not compound the factor.
    mdlrc.step(150)
    assert optimizer.param_groups[0]["lr"] == pytest.approx(1e-3 * 0.2)
    copy = MDLRC(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], betas=(0.8, 0.99)), 100)
    copy.load_state_dict(mdlrc.state_dict())
    assert copy.beta1_start == [0.9] and copy.beta1(50) == pytest.approx(0.7)


# -- bad hyperparameters ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("build", "needle"),
    [
        (lambda: make_sampler("speed", T, k=0), "--speed-k 0"),
        (lambda: make_sampler("speed", T, k=-1.0), "--speed-k -1.0"),
        (lambda: make_sampler("speed", T, k=1.0), "--speed-k 1.0"),
        (lambda: make_sampler("speed", T, tau=T + 1), "--speed-tau 1001"),
        (lambda: make_sampler("speed", T, tau=0), "--speed-tau 0"),
        (lambda: make_sampler("speed", T, setting="cifar"), "--speed-setting 'cifar'"),
        (lambda: make_weighting("caw", tau=0), "--caw-tau 0"),
        (lambda: make_sampler("clts", T, ramp_steps=0), "--clts-ramp-steps 0"),
        (lambda: MDLRC(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), 0), "--mdlrc-steps 0"),
        (lambda: make_sampler("speed", T, tau=-1), "--speed-tau -1"),
        (lambda: make_sampler("speed", T, r=0.5), "--speed-r 0.5"),
        (lambda: make_weighting("caw", lam=0.4), "--caw-lambda 0.4"),
        (lambda: make_weighting("caw", lam=1.2), "--caw-lambda 1.2"),
        (lambda: make_weighting("min-snr", gamma=0.0), "--min-snr-gamma 0.0"),
        (lambda: make_weighting("p2", gamma=-1.0), "--p2-gamma -1.0"),
        (lambda: make_weighting("p2", k=0.0), "--p2-k 0.0"),
        (lambda: make_sampler("clts", T, lambda_end=1.5), "--clts-lambda-end 1.5"),
        (lambda: make_sampler("clts", T, sigma=0.0), "--clts-sigma 0.0"),
        (lambda: make_sampler("lognormal", T, std=0.0), "--lognormal-std 0.0"),
        (lambda: make_sampler("adaptive", T, subset=0), "--adaptive-subset 0"),
        (lambda: make_sampler("adaptive", T, lr=0.0), "--adaptive-lr 0.0"),
        (lambda: MDLRC(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]), 10, beta1_end=1.0),
         "--mdlrc-beta1-end 1.0"),
        (lambda: MDLRC(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1), 10), "Adam"),
    ],
)
def test_bad_hyperparameters_are_clear_errors(build, needle):
    with pytest.raises(UserError) as error:
        build()
    assert needle in str(error.value) and "accepted" in str(error.value).lower() or needle == "Adam"


def test_every_registered_sampler_has_a_normalised_distribution_and_a_state_round_trip():
    x0 = torch.randn(4, 1, 8, 8)
    for name in SAMPLERS:
        sampler = make_sampler(name, T)
        t, w = sampler.sample(4, 0, torch.Generator().manual_seed(0), x0=x0)
        assert t.shape == w.shape == (4,)
        assert sampler.probabilities(0).sum().item() == pytest.approx(1.0, abs=1e-9)
        make_sampler(name, T).load_state_dict(sampler.state_dict())


@pytest.mark.parametrize("name", ["speed", "adaptive", "clts"])
def test_plug_in_loop_of_the_readme_trains(name):
    """The dozen-line loop of docs/training.md, with a tiny UNet: the loss is finite and the weights move."""
    from diffusers import UNet2DModel
    from diffusers.optimization import get_scheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    noise_scheduler = DDPMScheduler(num_train_timesteps=T)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-3)
    lr_scheduler = get_scheduler("constant", optimizer)
    before = [p.detach().clone() for p in unet.parameters()]
    generator = torch.Generator().manual_seed(0)

    sampler = make_sampler(name, T, noise_scheduler=noise_scheduler, **({"update_every": 2} if name == "adaptive"
                                                                        else {}))
    weighting = make_weighting("caw")
    mdlrc = MDLRC(optimizer, decay_steps=4)

    def per_sample_loss_without_grad(x0, t, noise):
        with torch.no_grad():
            return (unet(noise_scheduler.add_noise(x0, noise, t), t).sample - noise).pow(2).mean(dim=(1, 2, 3))

    if name == "adaptive":
        sampler.bind(per_sample_loss_without_grad)
    for step in range(4):
        x0 = torch.rand(8, 1, 8, 8, generator=generator) * 2 - 1
        t, w = sampler.sample(x0.shape[0], step, generator, x0=x0)
        noise = torch.randn(x0.shape, generator=generator)
        pred = unet(noise_scheduler.add_noise(x0, noise, t), t).sample
        per_sample = (pred - noise).pow(2).mean(dim=(1, 2, 3))
        loss = (w * weighting(t, noise_scheduler) * per_sample).mean()
        loss.backward()
        optimizer.step()
        lr_scheduler.step()
        mdlrc.step(step + 1)
        optimizer.zero_grad()
        sampler.update(t, per_sample.detach(), step)
        assert torch.isfinite(loss)
    assert any(not torch.equal(a, b) for a, b in zip(before, unet.parameters(), strict=True))
    assert optimizer.param_groups[0]["betas"][0] == pytest.approx(0.5)


def _adaptive_worker(rank: int, world: int, init_file: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    torch.set_num_threads(1)
    sampler = _adaptive()
    calls = {"n": 0}

    def probe(x, t, noise):  # the "model" changes between calls, differently on each process
        calls["n"] += 1
        return (x.flatten(1).mean(1) * calls["n"] * (rank + 1) + t.float() / 100).abs()

    sampler.bind(probe)
    x0 = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(rank))  # each process its own data
    for step in range(3):
        t, _ = sampler.sample(16, step, torch.Generator().manual_seed(100 * rank + step), x0=x0)
        sampler.update(t, torch.ones(16), step)
    torch.save(sampler.state_dict()["policy"], f"{out}/policy{rank}.pt")
    dist.destroy_process_group()


@pytest.mark.slow  # two accelerate processes (~11 s)
def test_adaptive_keeps_one_policy_across_processes(tmp_path):
    """On several processes the policy gradients are averaged: every process ends with the same policy."""
    import torch.multiprocessing as mp

    mp.spawn(_adaptive_worker, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    a, b = (torch.load(tmp_path / f"policy{r}.pt") for r in (0, 1))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], v) for k, v in _adaptive_initial_policy().items())


def _adaptive_initial_policy() -> dict:
    sampler = _adaptive()
    sampler._ensure_policy(1, torch.device("cpu"))
    return sampler.policy.state_dict()
