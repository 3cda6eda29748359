"""training/step.py: the one training step, on a tiny model."""

import functools

import pytest
import torch
from conftest import reset_accelerate


class RecordingSGD(torch.optim.SGD):
    """Plain SGD that keeps a copy of the gradients it stepped with."""

    def step(self, closure=None):
        self.seen = [p.grad.detach().clone() for group in self.param_groups for p in group["params"]]
        return super().step(closure)


@pytest.fixture()
def backend():
    from accelerate import Accelerator

    from training.backend import Backend

    reset_accelerate()
    yield Backend(Accelerator(cpu=True))
    reset_accelerate()


def _trainer(model_path, backend, weights):
    """A Trainer on the tiny 2b transformer (LoRA rank 4), every trained weight set from `weights`, plain SGD."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDPMScheduler, CogVideoXTransformer3DModel

    from training.args import parse_args
    from training.conditioning import TextToVideo
    from training.data_source import PreparedEntries
    from training.modes import LoRA
    from training.sections import run_flags
    from training.step import Trainer, build_context, prepare_transformer

    args = parse_args(["--pretrained_model_name_or_path", model_path, "--rank", "4", "--max_grad_norm", "1e9"])
    flags = run_flags(args)
    transformer = CogVideoXTransformer3DModel.from_pretrained(model_path, subfolder="transformer")
    prepare_transformer(transformer, flags.training, flags.lora, flags.memory, flags.parallelism, TextToVideo(),
                        LoRA(), torch.float32)
    parameters = LoRA().trainable_parameters(transformer)
    with torch.no_grad():
        for parameter, value in zip(parameters, weights(parameters)):
            parameter.copy_(value)
    optimizer = RecordingSGD(parameters, lr=0.1)
    context = build_context(flags.training, flags.optimizer, flags.lora, flags.memory, flags.parallelism,
                            transformer.config, AutoencoderKLCogVideoX.load_config(model_path, subfolder="vae"),
                            CogVideoXDPMScheduler.from_pretrained(model_path, subfolder="scheduler"), "cpu",
                            torch.float32, PreparedEntries())
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Trainer(transformer, optimizer, schedule, parameters, context, TextToVideo(), LoRA(), backend)


def test_two_micro_batches_of_one_give_the_gradients_of_one_batch_of_two(tiny_model_2b, backend, monkeypatch):
    """Gradient accumulation: loss / group size per micro-batch, gradients summed, one optimizer step."""
    from training.data_source import PreparedEntries
    from training.step import compute_loss, train_step

    generator = torch.Generator().manual_seed(0)
    weights = lambda parameters: [torch.randn(p.shape, generator=generator) * 0.1 for p in parameters]  # noqa: E731
    first = _trainer(tiny_model_2b, backend, weights)
    generator.manual_seed(0)
    second = _trainer(tiny_model_2b, backend, weights)
    config = first.context.transformer_config
    batch = PreparedEntries().example_batch(2, (9, 32, 32), config, {"block_out_channels": [1] * 4}, False,
                                            fill=lambda *shape, **kw: torch.randn(*shape, generator=generator, **kw))
    batch["video_latent_dist"][:, config["out_channels"]:] = -30.0  # log-variance: the latent is the mean
    halves = [{k: (v[i : i + 1] if isinstance(v, torch.Tensor) else v[i : i + 1] if isinstance(v, list) else v)
               for k, v in batch.items()} for i in range(2)]
    # The same noise for a sample however the batch is cut: drawn from the sample itself, at one timestep.
    monkeypatch.setattr(torch, "randn_like", lambda x: torch.sin(x * 3.0 + 1.0))
    loss_at_t = functools.partial(compute_loss, timestep=600)

    whole = train_step(first, iter([batch]), 1, loss_fn=loss_at_t)
    accumulated = train_step(second, iter(halves), 2, loss_fn=loss_at_t)

    torch.testing.assert_close(accumulated.loss, whole.loss, rtol=1e-5, atol=1e-6)
    assert len(first.optimizer.seen) == len(second.optimizer.seen) > 0
    for ours, reference in zip(second.optimizer.seen, first.optimizer.seen):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-6)
    assert any(g.abs().sum() > 0 for g in first.optimizer.seen)  # gradients reached the adapters
    for a, b in zip(first.parameters, second.parameters):  # and one step was taken with them
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_a_short_group_is_an_error(tiny_model_2b, backend):
    from training.data_source import PreparedEntries
    from training.step import train_step

    trainer = _trainer(tiny_model_2b, backend, lambda parameters: [p.detach().clone() for p in parameters])
    config = trainer.context.transformer_config
    batch = PreparedEntries().example_batch(1, (9, 32, 32), config, {"block_out_channels": [1] * 4}, False,
                                            fill=torch.randn)
    with pytest.raises(RuntimeError, match="group of 2 micro-batches got 1"):
        train_step(trainer, iter([batch]), 2)


@pytest.mark.parametrize("master", ["fp32", "bf16"])
def test_trainer_precision_frozen_in_bf16_trained_in_master_dtype_noise_in_fp32(monkeypatch, tiny_model_2b, tmp_path,
                                                                             master):
    """Through the real trainer with --mixed_precision bf16: the frozen transformer computes in bf16, the LoRA weights
    live in --master_weight_dtype (fp32 by default), and noise is mixed into fp32 latents (bf16 would round
    alpha_bar near 1 to exactly 1)."""
    from conftest import ASSETS, lora_argv, run_trainer

    import training.core as core

    seen = {}
    real_train_step = core.train_step

    def spy_train_step(trainer, batches, group_size):
        if "frozen" not in seen:
            params = dict(trainer.transformer.named_parameters())
            seen["frozen"] = {p.dtype for n, p in params.items() if not p.requires_grad}
            seen["trained"] = {p.dtype for n, p in params.items() if p.requires_grad}
            scheduler = trainer.context.scheduler
            add_noise = scheduler.add_noise
            scheduler.add_noise = lambda latents, noise, t: seen.setdefault(
                "noise", (latents.dtype, noise.dtype)) and add_noise(latents, noise, t)
        return real_train_step(trainer, batches, group_size)

    monkeypatch.setattr(core, "train_step", spy_train_step)
    run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path, "--max_train_steps", "1", "--mixed_precision", "bf16",
                          *(["--master_weight_dtype", master] if master != "fp32" else [])))
    assert seen["frozen"] == {torch.bfloat16}
    assert seen["trained"] == {torch.float32 if master == "fp32" else torch.bfloat16}
    assert seen["noise"] == (torch.float32, torch.float32)


def test_the_logged_loss_is_the_mean_over_processes(monkeypatch, tiny_model_2b, tmp_path):
    """A second rank is simulated inside reduce_mean (its loss always 1.0): what the progress bar, the trackers and
    summary.json show is the mean of this rank's loss and the other's, not this rank's own."""
    from conftest import ASSETS, lora_argv, run_trainer

    import training.core as core
    from training.backend import Backend
    from training.step import compute_loss

    real_reduce, real_step = Backend.reduce_mean, core.train_step
    local, logged = [], []
    monkeypatch.setattr(Backend, "reduce_mean", lambda self, t: (real_reduce(self, t) + 1.0) / 2)  # finite: (1+1)/2

    def spy_loss(*args, **kwargs):
        local.append(compute_loss(*args, **kwargs))
        return local[-1]

    monkeypatch.setattr(core, "train_step", lambda trainer, batches, size: real_step(trainer, batches, size,
                                                                                       loss_fn=spy_loss))
    real_log = Backend.log
    monkeypatch.setattr(Backend, "log", lambda self, values, step: logged.append(values.get("loss")) or
                        real_log(self, values, step))
    summary = run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path, "--max_train_steps", "2"))
    expected = [(loss.item() + 1.0) / 2 for loss in local]
    assert len(local) == 2 and [v for v in logged if v is not None] == pytest.approx(expected)
    assert summary["final_loss"] == pytest.approx(expected[-1]) and local[-1].item() != pytest.approx(expected[-1])


def test_weights_are_finite_only_when_they_are_finite_on_every_rank(backend, monkeypatch):
    """The check before each checkpoint is a collective: a second rank is simulated inside reduce_mean (its flag
    1.0: finite, 0.0: not). Non-finite weights on either rank make it false on both, so every rank stops at the same
    step (one rank stopping alone would leave the others hanging in the next collective)."""
    from training.backend import Backend

    real_reduce = Backend.reduce_mean
    finite, broken = torch.ones(3), torch.tensor([1.0, float("nan"), float("inf")])
    for ours, other_rank, expected in ((finite, 1.0, True), (finite, 0.0, False), (broken, 1.0, False),
                                       (broken, 0.0, False)):
        monkeypatch.setattr(Backend, "reduce_mean", lambda self, t, other=other_rank: (real_reduce(self, t) + other) / 2)
        assert backend.all_finite([torch.ones(2, 2), ours]) is expected, (ours, other_rank)


def test_latents_are_drawn_as_diffusers_draws_them_without_importing_its_autoencoders():
    """models.sample_latents is diffusers' DiagonalGaussianDistribution(...).sample() written out: the same draw from
    the same random state (logvar clamped as there), scaled and laid out [B, F, C, H, W]; and a process that imports
    it (a run from prepared data, before its first step) does not import diffusers' autoencoders."""
    import subprocess
    import sys

    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from training.models import sample_latents

    parameters = torch.randn(2, 8, 3, 4, 5) * 3  # mean and a log-variance reaching both clamps
    parameters[:, 4:, 0] = 40.0
    parameters[:, 4:, 1] = -40.0
    torch.manual_seed(7)
    drawn = sample_latents(parameters, 0.7)
    torch.manual_seed(7)
    expected = (DiagonalGaussianDistribution(parameters).sample() * 0.7).permute(0, 2, 1, 3, 4)
    assert drawn.shape == (2, 3, 4, 4, 5) and torch.equal(drawn, expected)
    code = ("import sys, torch; from training.models import sample_latents, read_config; import training.core; "
            "sample_latents(torch.zeros(1, 32, 1, 2, 2), 1.0); "
            "print(sorted(m for m in sys.modules if m.startswith(('diffusers.models.autoencoders', 'diffusers.pipelines'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
