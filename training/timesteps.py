"""The training recipe's noise levels: which timesteps a batch is noised at (--timestep_sampling, --min_timestep,
--max_timestep) and how each sample's loss is weighted (--loss_weighting). Read from the [training] section.

CogVideoX trains on a discrete DDPM schedule of `num_train_timesteps` (1000) steps with v-prediction
(CogVideoXDPMScheduler, prediction_type "v_prediction"). A scheme draws u in [0, 1) per sample; the timestep is
`min + floor(u * (max - min))`: the scheme's density stretched over the range, as musubi-tuner's
--min_timestep/--max_timestep do (hv_train_network.py), rather than clipped (which would pile the mass outside the
range onto its two ends).

- uniform: every timestep equally often (the original's torch.randint, drawn exactly as before).
- logit_normal, mode: SD3's densities (Esser et al. 2024, "Scaling Rectified Flow Transformers", section 3.1),
  drawn by diffusers.training_utils.compute_density_for_timestep_sampling: u = sigmoid(N(mean, std)), and
  u = 1 - v - scale * (cos(pi v / 2)^2 - 1 + v) for v ~ U(0, 1).
- stratified: one draw per stratum of the batch, u_i = (i + U_i) / B, shuffled: a batch of B covers the range evenly.

Weights multiply the squared error of the predicted x0 (`step.compute_loss` scores in x0 space). With
x0 = sqrt(a) x_t - sqrt(1 - a) v (a = alpha_bar), |x0_pred - x0|^2 = (1 - a) |v_pred - v|^2, so:
- cogvideox: 1 / (1 - a) (the original's): exactly the plain v-prediction MSE.
- min_snr: Min-SNR-gamma (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): on the
  v loss min(snr, gamma) / (snr + 1), as diffusers' examples weight v-prediction (train_text_to_image.py), with snr
  from diffusers.training_utils.compute_snr; on the x0 loss that is min(snr, gamma).
- none: 1, the x0 error unweighted (the v loss times 1 - a: the noisiest timesteps count most).
The draws use torch's global generators (seeded by --seed, saved in each checkpoint), so a resumed run draws what an
uninterrupted one would.
"""

import math

import torch


SAMPLING_SCHEMES = ("uniform", "logit_normal", "mode", "stratified")
LOSS_WEIGHTINGS = ("cogvideox", "min_snr", "none")
NUM_TRAIN_TIMESTEPS = 1000  # every CogVideoX scheduler's; the flags are checked against it before loading
# Values used when the flag is not given: SD3's and diffusers' examples' (logit_mean, logit_std, mode_scale) and
# the Min-SNR paper's gamma.
DEFAULTS = {"logit_mean": 0.0, "logit_std": 1.0, "mode_scale": 1.29, "snr_gamma": 5.0}
# Where SD3's mode density is one (its u(v) increases from 0 to 1): -1 <= scale <= 2 / (pi - 2).
MODE_SCALE_RANGE = (-1.0, 2 / (math.pi - 2))
# Each option belongs to one value of one flag: given with another, it is refused (settings.py).
OPTION_OWNERS = {"logit_mean": ("timestep_sampling", "logit_normal"),
                 "logit_std": ("timestep_sampling", "logit_normal"),
                 "mode_scale": ("timestep_sampling", "mode"), "snr_gamma": ("loss_weighting", "min_snr")}


def option(training, name):
    """An option's value: the flag's, or its default when not given."""
    value = getattr(training, name)
    return DEFAULTS[name] if value is None else value


def timestep_range(training, num_train_timesteps):
    """(low, high): timesteps are drawn from low to high - 1."""
    high = num_train_timesteps if training.max_timestep is None else training.max_timestep
    if not 0 <= training.min_timestep < high <= num_train_timesteps:
        raise ValueError(f"--min_timestep {training.min_timestep} / --max_timestep {high}: not a range within "
                         f"0..{num_train_timesteps} of this schedule")
    return training.min_timestep, high


def unit_draws(training, batch_size, device):
    """u in [0, 1) per sample, from the --timestep_sampling density (not uniform: that one draws integers)."""
    scheme = training.timestep_sampling
    if scheme == "stratified":
        u = (torch.arange(batch_size, device=device) + torch.rand(batch_size, device=device)) / batch_size
        return u[torch.randperm(batch_size, device=device)]
    from diffusers.training_utils import compute_density_for_timestep_sampling

    return compute_density_for_timestep_sampling(scheme, batch_size, logit_mean=option(training, "logit_mean"),
                                                 logit_std=option(training, "logit_std"),
                                                 mode_scale=option(training, "mode_scale"), device=device)


def draw_timesteps(training, batch_size, num_train_timesteps, device):
    """One timestep per sample (long), as the [training] flags say."""
    low, high = timestep_range(training, num_train_timesteps)
    if training.timestep_sampling == "uniform":
        return torch.randint(low, high, (batch_size,), device=device).long()
    u = unit_draws(training, batch_size, device).to(device=device, dtype=torch.float32)
    # clamp: u * (high - low) can round up to high (sigmoid gives exactly 1.0 far in the tail)
    return (low + (u * (high - low)).long()).clamp(low, high - 1)


def loss_weights(weighting, snr_gamma, scheduler, timesteps, device):
    """Per-sample weights [B] (fp32) of the x0-space squared error: `weighting` is --loss_weighting, `snr_gamma`
    --snr_gamma (None: its default)."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)[timesteps]
    weights = 1.0 / (1.0 - alphas_cumprod)
    if weighting == "cogvideox":
        return weights
    if weighting == "none":
        return torch.ones_like(weights)
    if weighting != "min_snr":
        raise ValueError(f"--loss_weighting {weighting}: not one of {', '.join(LOSS_WEIGHTINGS)}")
    from diffusers.training_utils import compute_snr

    # diffusers' v-prediction weight min(snr, gamma) / (snr + 1), moved from the v loss to the x0 loss.
    gamma = DEFAULTS["snr_gamma"] if snr_gamma is None else snr_gamma
    snr = compute_snr(scheduler, timesteps).to(device)
    return weights * torch.clamp(snr, max=gamma) / (snr + 1)


def recipe(training):
    """The model card's and summary.json's record of the recipe: {"timestep sampling": ..., "loss weighting": ...}."""
    scheme = training.timestep_sampling
    options = {"logit_normal": ("logit_mean", "logit_std"), "mode": ("mode_scale",)}.get(scheme, ())
    sampling = scheme + "".join(f", {name} {option(training, name):g}" for name in options)
    low, high = timestep_range(training, NUM_TRAIN_TIMESTEPS)
    if (low, high) != (0, NUM_TRAIN_TIMESTEPS):
        sampling += f", timesteps {low}..{high - 1}"
    weighting = training.loss_weighting
    if weighting == "min_snr":
        weighting += f", snr_gamma {option(training, 'snr_gamma'):g}"
    return {"timestep sampling": sampling, "loss weighting": weighting}
