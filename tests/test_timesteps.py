"""training/timesteps.py: --timestep_sampling, --min_timestep/--max_timestep, --loss_weighting.

The draws are compared with the named densities (written here from their definitions, not through diffusers) by a
chi-square test over 20 bins of 200,000 seeded draws; each comparison also checks that it rejects a wrong density.
Runs with each option train, resume bitwise after a SIGKILL, and record the recipe in summary.json and the model
card."""

import json
import math
import subprocess
import sys

import pytest
import torch
from conftest import ASSETS, ROOT, crashing_env, lora_argv, lora_weights, run_trainer, stopped_run_stderr

from training.args import parse_args
from training.sections import run_flags
from training.timesteps import draw_timesteps, loss_weights


DRAWS, BINS = 200_000, 20


def _training(*argv):
    return run_flags(parse_args(["--pretrained_model_name_or_path", "unused", *argv])).training


def _draws(training, batch_size=50):
    torch.manual_seed(1234)
    return torch.cat([draw_timesteps(training, batch_size, 1000, "cpu") for _ in range(DRAWS // batch_size)])


def _uniform_cdf(u):
    return u


def _logit_normal_cdf(mean, std):
    return lambda u: torch.special.ndtr((torch.logit(u) - mean) / std)


def _mode_cdf(scale):
    """SD3's mode density (Esser et al. 2024, eq. 20): u = f(v) = 1 - v - s (cos^2(pi v / 2) - 1 + v), v ~ U(0, 1),
    f decreasing, so P(u <= x) = 1 - f^-1(x); f is inverted by bisection."""
    def f(v):
        return 1 - v - scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)

    def cdf(x):
        low, high = torch.zeros_like(x), torch.ones_like(x)
        for _ in range(60):
            middle = (low + high) / 2
            above = f(middle) > x  # f decreases: the root lies right of middle
            low, high = torch.where(above, middle, low), torch.where(above, high, middle)
        return 1 - (low + high) / 2

    return cdf


def _chi_square_p(timesteps, cdf, low=0, high=1000):
    """p-value of the draws' histogram (BINS equal bins of timesteps low..high-1) against the density whose CDF in
    u = (t - low) / (high - low) is `cdf`."""
    edges = torch.linspace(0, 1, BINS + 1, dtype=torch.float64)
    expected = torch.diff(cdf(edges.clamp(1e-12, 1 - 1e-12))) * len(timesteps)
    expected[0] += cdf(torch.tensor([1e-12], dtype=torch.float64))[0] * len(timesteps)
    expected[-1] += (1 - cdf(torch.tensor([1 - 1e-12], dtype=torch.float64))[0]) * len(timesteps)
    observed = torch.bincount((timesteps - low) * BINS // (high - low), minlength=BINS).double()  # whole timesteps
    statistic = float(((observed - expected) ** 2 / expected).sum())
    return float(torch.special.gammaincc(torch.tensor((BINS - 1) / 2), torch.tensor(statistic / 2)))


# Bins are whole timesteps: 1000 / 20 = 50 per bin, and 500 / 20 = 25 with the range 200..699.
CASES = {
    "uniform": ([], _uniform_cdf, _logit_normal_cdf(0.0, 1.0)),
    "logit_normal": (["--timestep_sampling", "logit_normal"], _logit_normal_cdf(0.0, 1.0), _uniform_cdf),
    "logit_normal-shifted": (["--timestep_sampling", "logit_normal", "--logit_mean", "0.5", "--logit_std", "0.8"],
                             _logit_normal_cdf(0.5, 0.8), _logit_normal_cdf(0.4, 0.8)),
    "mode": (["--timestep_sampling", "mode"], _mode_cdf(1.29), _mode_cdf(1.0)),
    "mode-negative": (["--timestep_sampling", "mode", "--mode_scale", "-0.5"], _mode_cdf(-0.5), _uniform_cdf),
    "stratified": (["--timestep_sampling", "stratified"], _uniform_cdf, _mode_cdf(0.3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_drawn_timesteps_follow_the_named_density(case):
    argv, density, wrong = CASES[case]
    timesteps = _draws(_training(*argv))
    assert timesteps.dtype == torch.long and 0 <= timesteps.min() and timesteps.max() <= 999
    assert _chi_square_p(timesteps, density) > 1e-3
    assert _chi_square_p(timesteps, wrong) < 1e-6  # the comparison can tell a wrong density


@pytest.mark.parametrize("scheme, density", [("uniform", _uniform_cdf), ("logit_normal", _logit_normal_cdf(0, 1)),
                                             ("stratified", _uniform_cdf)])
def test_a_range_stretches_the_density_over_it(scheme, density):
    timesteps = _draws(_training("--timestep_sampling", scheme, "--min_timestep", "200", "--max_timestep", "700"))
    assert 200 <= timesteps.min() and timesteps.max() <= 699
    assert _chi_square_p(timesteps, density, 200, 700) > 1e-3


def test_stratified_puts_one_timestep_in_each_stratum_of_the_batch_in_shuffled_order():
    training = _training("--timestep_sampling", "stratified", "--min_timestep", "100", "--max_timestep", "900")
    torch.manual_seed(0)
    firsts = []
    for _ in range(200):
        timesteps = draw_timesteps(training, 4, 1000, "cpu")
        strata = ((timesteps - 100) // 200).tolist()
        assert sorted(strata) == [0, 1, 2, 3], timesteps
        firsts.append(strata[0])
    assert set(firsts) == {0, 1, 2, 3}  # not always in stratum order


def test_uniform_draws_exactly_what_the_original_drew():
    torch.manual_seed(5)
    ours = draw_timesteps(_training(), 16, 1000, "cpu")
    torch.manual_seed(5)
    assert torch.equal(ours, torch.randint(0, 1000, (16,)).long())


def test_loss_weights_cogvideox_is_the_v_loss_min_snr_its_capped_form_none_the_x0_error():
    """On the x0 error (what step.compute_loss scores): cogvideox must give the v-prediction MSE, min_snr the v MSE
    weighted min(snr, gamma) / (snr + 1) (Hang et al. 2023, for v-prediction), none the plain x0 MSE."""
    from diffusers import CogVideoXDPMScheduler

    scheduler = CogVideoXDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True)
    timesteps = torch.tensor([0, 1, 50, 300, 600, 900, 998, 999])
    generator = torch.Generator().manual_seed(3)
    x0, noise, v_pred = (torch.randn(8, 64, generator=generator, dtype=torch.float64) for _ in range(3))
    noisy = scheduler.add_noise(x0, noise, timesteps)
    v = scheduler.get_velocity(x0, noise, timesteps)
    predicted_x0 = scheduler.get_velocity(v_pred, noisy, timesteps)  # as compute_loss turns v into x0
    x0_error, v_error = ((predicted_x0 - x0) ** 2).mean(1), ((v_pred - v) ** 2).mean(1)
    alpha_bar = scheduler.alphas_cumprod[timesteps]
    snr = alpha_bar / (1 - alpha_bar)

    def weighted(name, gamma=None):
        return loss_weights(name, gamma, scheduler, timesteps, "cpu").double() * x0_error

    torch.testing.assert_close(weighted("cogvideox"), v_error, rtol=1e-5, atol=1e-9)
    for gamma in (None, 1.0):
        expected = torch.clamp(snr, max=5.0 if gamma is None else gamma) / (snr + 1) * v_error
        torch.testing.assert_close(weighted("min_snr", gamma), expected, rtol=1e-5, atol=1e-9)
    torch.testing.assert_close(weighted("none"), x0_error)


def test_held_out_loss_is_the_same_whatever_the_recipe_the_training_loss_is_not(tiny_model_2b):
    """compute_loss at a fixed timestep (the held-out evaluation) ignores the recipe, so runs with different recipes
    compare; without one it draws and weighs as the recipe says."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    from training.conditioning import TextToVideo
    from training.data_source import PreparedEntries
    from training.step import build_context, compute_loss

    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model_2b, subfolder="transformer")
    vae_config = AutoencoderKLCogVideoX.load_config(tiny_model_2b, subfolder="vae")
    scheduler = CogVideoXDPMScheduler.from_pretrained(tiny_model_2b, subfolder="scheduler")
    batch = PreparedEntries().example_batch(2, (9, 32, 32), transformer.config, {"block_out_channels": [1] * 4}, False,
                                            fill=lambda *shape, **kw: torch.randn(*shape, **kw))

    def loss(*recipe, timestep=None):
        flags = run_flags(parse_args(["--pretrained_model_name_or_path", tiny_model_2b, *recipe]))
        context = build_context(flags.training, flags.optimizer, flags.lora, flags.memory, flags.parallelism,
                                transformer.config, vae_config, scheduler, "cpu", torch.float32, PreparedEntries())
        torch.manual_seed(11)
        with torch.no_grad():
            return compute_loss(transformer, batch, context, TextToVideo(), timestep=timestep)

    recipe = ["--timestep_sampling", "logit_normal", "--loss_weighting", "min_snr", "--snr_gamma", "0.5"]
    assert torch.equal(loss(*recipe, timestep=100), loss(timestep=100))
    assert not torch.equal(loss(*recipe), loss())


@pytest.mark.parametrize("changes, problem", [
    (["--min_timestep", "500", "--max_timestep", "500"], "--min_timestep 500 --max_timestep 500: need 0 <= min < max"),
    (["--max_timestep", "1001"], "--max_timestep 1001: need 0 <= min < max <= 1000"),
    (["--min_timestep", "-1"], "--min_timestep -1 --max_timestep 1000: need"),
    (["--logit_std", "1.0"], "--logit_std is an option of --timestep_sampling logit_normal"),
    (["--timestep_sampling", "mode", "--logit_mean", "0.3"], "--logit_mean is an option of --timestep_sampling logit"),
    (["--mode_scale", "1.0"], "--mode_scale is an option of --timestep_sampling mode"),
    (["--snr_gamma", "5"], "--snr_gamma is an option of --loss_weighting min_snr"),
    (["--timestep_sampling", "logit_normal", "--logit_std", "0"], "--logit_std must be positive (got 0)"),
    (["--timestep_sampling", "mode", "--mode_scale", "2"], "--mode_scale must lie from -1 to 1.75"),
    (["--loss_weighting", "min_snr", "--snr_gamma", "-1"], "--snr_gamma must be positive (got -1)"),
], ids=["empty-range", "max-beyond-schedule", "negative-min", "logit_std-without-scheme", "logit_mean-with-mode",
        "mode_scale-without-scheme", "snr_gamma-without-min_snr", "zero-logit_std", "mode_scale-beyond-range",
        "negative-snr_gamma"])
def test_bad_recipe_flags_are_one_line_each_before_loading(capsys, tiny_model_2b, tmp_path, changes, problem):
    lines = stopped_run_stderr(capsys, lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", *changes))
    assert len(lines) == 1 and lines[0].startswith("error: ") and problem in lines[0], lines


def test_the_recipe_leaves_the_memory_estimate_as_it_is(tiny_model_2b, tmp_path):
    """--dry_run runs the real step (and so the recipe's draws and weights) on fake tensors: the same peaks."""
    def peaks(*recipe):
        plan = run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", "--dry_run", "--height_buckets", "32",
                                     "--width_buckets", "32", "--frame_buckets", "9", *recipe))["dry_run"]
        return plan["peak_memory_bytes"]

    default = peaks()
    assert default["training"] > 0
    recipe = ["--timestep_sampling", "logit_normal", "--min_timestep", "10", "--loss_weighting", "min_snr"]
    assert peaks(*recipe) == default


RECIPES = {
    "logit_normal-range-min_snr": (["--timestep_sampling", "logit_normal", "--logit_std", "1.5", "--min_timestep",
                                    "100", "--max_timestep", "800", "--loss_weighting", "min_snr"],
                                   {"timestep sampling":
                                    "logit_normal, logit_mean 0, logit_std 1.5, timesteps 100..799",
                                    "loss weighting": "min_snr, snr_gamma 5"}),
    "mode-none": (["--timestep_sampling", "mode", "--loss_weighting", "none"],
                  {"timestep sampling": "mode, mode_scale 1.29", "loss weighting": "none"}),
    "stratified": (["--timestep_sampling", "stratified"],
                   {"timestep sampling": "stratified", "loss weighting": "cogvideox"}),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(RECIPES))
def test_a_run_with_the_recipe_trains_resumes_bitwise_and_records_it(tiny_model_2b, tmp_path, name):
    recipe, recorded = RECIPES[name]

    def argv(output):
        return lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "4", "--checkpointing_steps", "2",
                         "--mixed_precision", "no", *recipe)

    run_trainer(argv(tmp_path / "reference"))
    summary = json.loads((tmp_path / "reference" / "summary.json").read_text())
    assert summary["recipe"] == recorded and math.isfinite(summary["final_loss"])
    card = (tmp_path / "reference" / "README.md").read_text()
    assert all(f"| {key} | {value} |" in card for key, value in recorded.items()), card

    command = [sys.executable, ROOT / "training" / "cogvideox_text_to_video_lora.py", *argv(tmp_path / "run")]
    killed = subprocess.run([str(c) for c in command], capture_output=True, text=True, env=crashing_env("step:3"),
                            timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    run_trainer([*argv(tmp_path / "run"), "--resume_from_checkpoint", "latest"])
    ours, reference = lora_weights(tmp_path / "run"), lora_weights(tmp_path / "reference")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
