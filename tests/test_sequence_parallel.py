"""Sequence parallelism and --attention_backend (training/attention.py).

The proof that sharding a sample's video tokens changes nothing but where the work happens: two processes sharing
each sample (gloo) train what one process trains, loss and gradient norm at every step and the final weights, and
resume exactly; under FSDP too, with image-to-video CogVideoX 1.5 fully fine-tuned. The attention processor alone
gives diffusers' CogVideoX attention (outputs and gradients) on every kernel.
"""

import subprocess
import sys

import pytest
import test_bad_inputs
import torch
from conftest import (
    ASSETS,
    ROOT,
    launch_on_cpu,
    lora_argv,
    lora_weights,
    run_trainer,
    trainer_main,
    transformer_weights,
)
from test_args import _errors
from test_variants import FRAMES_1_5


no_model_file_opened = test_bad_inputs.no_model_file_opened  # the fixture


def _tiny_transformer(variant, heads=4):
    from diffusers import CogVideoXTransformer3DModel

    from tools.build_tiny_model import VARIANTS

    torch.manual_seed(0)
    config = dict(num_attention_heads=heads, in_channels=4, out_channels=4, time_embed_dim=4, text_embed_dim=32,
                  num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                  temporal_compression_ratio=4, max_text_seq_length=16, use_learned_positional_embeddings=False)
    config.update(VARIANTS[variant]["transformer"], num_attention_heads=heads)
    return CogVideoXTransformer3DModel(**config)


def _forward_backward(transformer):
    from training.models import rotary_embeddings

    generator = torch.Generator().manual_seed(1)
    frames = 4 if transformer.config.patch_size_t else 3
    latents = torch.randn(2, frames, transformer.config.in_channels, 8, 8, generator=generator)
    text = torch.randn(2, 16, 32, generator=generator)
    rotary = rotary_embeddings(transformer.config, frames, 8, 8, "cpu")
    out = transformer(hidden_states=latents, encoder_hidden_states=text, timestep=torch.tensor([10, 500]),
                      image_rotary_emb=rotary, return_dict=False)[0]
    (out ** 2).mean().backward()
    return out.detach(), {name: p.grad for name, p in transformer.named_parameters()}


@pytest.mark.parametrize("variant", ["2b", "5b", "1.5"])
@pytest.mark.parametrize("backend", [None, "native", "_native_math"])
def test_attention_processor_is_diffusers_attention(variant, backend):
    """Sin-cos and rotary positions, 1.0 and 1.5: outputs and every gradient as with diffusers' own processor."""
    from training.attention import CogVideoXAttention, install

    expected_out, expected_grads = _forward_backward(_tiny_transformer(variant))
    transformer = install(_tiny_transformer(variant), attention_backend=backend)
    assert all(isinstance(p, CogVideoXAttention) for p in transformer.attn_processors.values())
    out, grads = _forward_backward(transformer)
    torch.testing.assert_close(out, expected_out, rtol=1e-5, atol=1e-6)
    for name, grad in expected_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)


def test_the_readme_figures_for_the_published_models():
    """README "Many GPUs and machines": 40,800 video tokens for 1.5 at 77x768x1360; the shard counts that split the
    heads (2b: 30 heads, 5b and 1.5: 48)."""
    from benchmarks.benchmark_training import MODELS
    from training.attention import video_tokens

    assert video_tokens(77, 768, 1360, MODELS["1.5-5b"].transformer) == 40_800
    fits = lambda heads: [n for n in range(2, 9) if heads % n == 0]  # noqa: E731
    assert fits(MODELS["2b"].transformer["num_attention_heads"]) == [2, 3, 5, 6]
    assert fits(MODELS["5b"].transformer["num_attention_heads"]) == [2, 3, 4, 6, 8]
    assert fits(MODELS["1.5-5b"].transformer["num_attention_heads"]) == [2, 3, 4, 6, 8]
    assert fits(video_tokens(77, 768, 1360, MODELS["1.5-5b"].transformer)) == [2, 3, 4, 5, 6, 8]


def test_simulated_shards_shapes_match_the_exchange():
    """The memory estimate's stand-in for a shard group makes the shapes the real exchange makes."""
    from training.attention import SimulatedShards

    shards = SimulatedShards(4)
    x = torch.randn(2, 3 + 5, 8, 16)  # 3 text tokens, 5 of this process's 20 video tokens, 8 heads
    heads = shards.tokens_to_heads(x, 3)
    assert heads.shape == (2, 3 + 20, 2, 16)
    assert shards.heads_to_tokens(heads, 3).shape == x.shape
    assert shards.gather(torch.randn(2, 5, 7)).shape == (2, 20, 7)
    assert shards.split(torch.randn(2, 20, 7)).shape == (2, 5, 7)


def test_sequence_parallel_flags_are_checked_before_anything_loads(capsys, no_model_file_opened, tiny_model_5b,
                                                                  tmp_path):
    """One line each, no weight file opened (the data scan knows the buckets; one process: a --dry_run)."""
    def problems(*extra):
        with no_model_file_opened(tiny_model_5b):
            return _errors(capsys, lora_argv(tiny_model_5b, ASSETS, tmp_path / "out", "--dry_run", *extra))

    assert problems("--sequence_parallel_shards", "2") == [
        "error: --sequence_parallel_shards needs --enable_sequence_parallelism"]
    assert problems("--enable_sequence_parallelism") == [
        "error: --dry_run on one process estimates one process of a shard group: give --sequence_parallel_shards"]
    # Two heads: three shards cannot split them. The buckets' video tokens: 9x32x32 has 3x2x2 = 12, 9x48x96 3x3x6 = 54.
    assert problems("--enable_sequence_parallelism", "--sequence_parallel_shards", "3") == [
        "error: --sequence_parallel_shards 3: the model's 2 attention heads do not split evenly (shard counts that "
        "fit: 2)"]
    lines = problems("--enable_sequence_parallelism", "--sequence_parallel_shards", "4")
    assert "error: bucket 9x48x96: its 54 video tokens do not split into --sequence_parallel_shards 4 equal parts " \
           "(shard counts that fit: 2, 3, 6); change the shards or the bucket" in lines
    assert not any("bucket 9x32x32" in line for line in lines)
    assert problems("--attention_backend", "sage") == [
        "error: --attention_backend sage: not a kernel training can use (one with a backward pass): native, "
        "_native_math, _native_flash, _native_efficient, _native_cudnn, flash, _flash_3, flash_hub, _flash_3_hub"]
    assert problems("--attention_backend", "flash")[0].startswith("error: --attention_backend flash: Flash Attention")
    plan = run_trainer(lora_argv(tiny_model_5b, ASSETS, tmp_path / "dry", "--dry_run", "--enable_sequence_parallelism",
                                 "--sequence_parallel_shards", "2"))["dry_run"]
    assert plan["sequence_parallel_shards"] == 2 and plan["processes"] == 1


# ----------------------------------------------------------------------------------------------
# Two processes per sample (gloo) against one process
# ----------------------------------------------------------------------------------------------


def _scalars(output, tag):
    """{step: value} of a tensorboard scalar the run logged."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = {}
    for events in sorted((output / "logs").rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events.parent))
        accumulator.Reload()
        if tag in accumulator.Tags()["scalars"]:
            values.update({event.step: event.value for event in accumulator.Scalars(tag)})
    return values


SP = ["--enable_sequence_parallelism", "--sequence_parallel_shards", "2"]


@pytest.mark.slow
def test_two_processes_per_sample_train_what_one_process_trains(tiny_model_5b, tmp_path):
    """CogVideoX-5b (rotary positions) LoRA: loss and gradient norm at every step, and the LoRA, equal one process's
    within float tolerance (the group's gradient is summed from two halves); a copy of the pair's checkpoint-2
    resumes on the pair to the same LoRA as their straight run, bitwise."""
    # Gradient checkpointing on: the blocks' exchanges run again in the backward pass (the sweep scripts' default).
    flags = ["--max_train_steps", "3", "--checkpointing_steps", "2", "--report_to", "tensorboard",
             "--gradient_checkpointing"]
    one, pair, resumed = tmp_path / "one", tmp_path / "pair", tmp_path / "resumed"
    run_trainer(lora_argv(tiny_model_5b, ASSETS, one, *flags))
    script = ROOT / "training" / "cogvideox_text_to_video_lora.py"
    resumed.mkdir()
    stderr = launch_on_cpu([
        [script, *lora_argv(tiny_model_5b, ASSETS, pair, *flags, *SP)],
        [script, *lora_argv(tiny_model_5b, ASSETS, resumed, *flags, *SP, "--resume_from_checkpoint",
                            pair / "checkpoint-2")],
    ])
    assert "x 2 process(es) (1 data-parallel group(s) of 2 sharing each sample)" in stderr and "resumed from" in stderr
    for tag in ("loss", "grad_norm"):
        expected, got = _scalars(one, tag), _scalars(pair, tag)
        assert sorted(got) == [1, 2, 3] and sorted(expected) == [1, 2, 3]
        for step, value in expected.items():
            assert got[step] == pytest.approx(value, rel=1e-4), (tag, step)
    expected = lora_weights(one)
    for name, value in lora_weights(pair).items():
        torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-5, msg=name)
    assert any(v.abs().max() > 0 for k, v in expected.items() if "lora_B" in k)  # it trained
    assert all(torch.equal(v, lora_weights(pair)[k]) for k, v in lora_weights(resumed).items())


@pytest.mark.slow
def test_sequence_parallel_full_fine_tuning_under_fsdp(tiny_models, tmp_path):
    """CogVideoX 1.5 image-to-video (temporal patches, image latents, ofs), fully fine-tuned with FSDP2 sharding the
    weights over the same two processes that share each sample: the transformer equals one plain process's."""
    from test_distributed import CONFIGS, launch_env

    model = tiny_models("1.5-i2v")
    one, pair = tmp_path / "one", tmp_path / "pair"

    def argv(output, *extra):
        args = lora_argv(model, ASSETS, output, "--max_train_steps", "2", "--learning_rate", "1e-3", *extra)
        args[args.index("--frame_buckets"): args.index("--max_num_frames") + 2] = FRAMES_1_5
        return args

    run_trainer(argv(one), main=trainer_main("cogvideox_image_to_video_sft"))
    fsdp = launch_env(CONFIGS / "fsdp.yaml", "--num_processes", "2", "--mixed_precision", "no")
    launch_on_cpu([[ROOT / "training" / "cogvideox_image_to_video_sft.py", *argv(pair, *SP)]], env_extra=fsdp)
    expected, got = transformer_weights(one), transformer_weights(pair)
    assert sorted(got) == sorted(expected)
    for name, value in got.items():
        torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-5, msg=name)
    base = transformer_weights(model)  # the model folder holds transformer/ too: the run changed it
    assert sum(not torch.equal(value, base[name]) for name, value in got.items()) > len(got) // 2


@pytest.mark.slow
@pytest.mark.skipif(not torch.cuda.is_available() or torch.cuda.device_count() < 2,
                    reason="needs 2 CUDA GPUs: accelerate runs DeepSpeed over several processes only on GPUs")
@pytest.mark.parametrize("config", ["deepspeed.yaml", "deepspeed_zero3.yaml"])
def test_sequence_parallel_under_deepspeed_trains_what_one_gpu_trains(tiny_model_5b, tmp_path, config):
    """ZeRO-2 (optimizer offloaded, DeepSpeed's CPU Adam) and ZeRO-3 with two GPUs sharing each clip: the LoRA of
    one GPU without DeepSpeed's sharding, within float tolerance."""
    flags = ["--max_train_steps", "3", "--mixed_precision", "no"]

    def launch(output, *extra, config_args=()):
        command = [sys.executable, "-m", "accelerate.commands.launch", *config_args, ROOT / "training" /
                   "cogvideox_text_to_video_lora.py", *lora_argv(tiny_model_5b, ASSETS, output, *flags, *extra)]
        result = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, result.stderr[-3000:]

    launch(tmp_path / "one", config_args=["--num_processes", "1", "--mixed_precision", "no"])
    launch(tmp_path / "pair", *SP, config_args=["--config_file", ROOT / "accelerate_configs" / config,
                                                "--num_processes", "2", "--mixed_precision", "no"])
    expected = lora_weights(tmp_path / "one")
    for name, value in lora_weights(tmp_path / "pair").items():
        torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-5, msg=name)
