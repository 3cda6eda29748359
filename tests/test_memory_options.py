"""Memory-saving options end to end: low-bit optimizers, an FP8-stored base, and (on a CUDA GPU) a 4-bit NF4 base
(the CPU-offloaded optimizer: tests/test_cuda_paths.py). Each trains, checkpoints, resumes, validates and saves a LoRA diffusers loads."""

import numpy as np
import pytest
import torch
from conftest import ASSETS, TINY_VALIDATION_FLAGS, generate, lora_argv, run_trainer, tiny_pipeline
from safetensors.torch import load_file


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (bitsandbytes 4-bit layers run "
                          "only on CUDA); runs on the GPU machine")


def _train_and_resume(model, output, *flags, steps=3, validation=()):
    """Train steps - 1, resume from the last checkpoint to `steps`; validation flags apply to the resumed run."""
    common = ["--checkpointing_steps", "1", *flags]
    run_trainer(lora_argv(model, ASSETS, output, "--max_train_steps", str(steps - 1), *common))
    return run_trainer(lora_argv(model, ASSETS, output, "--max_train_steps", str(steps), "--resume_from_checkpoint",
                                 "latest", *common, *validation))


def _assert_trained_lora(output):
    lora = load_file(output / "pytorch_lora_weights.safetensors")
    assert lora and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in lora.items())
    assert all(v.dtype == torch.float32 for v in lora.values())  # adapters keep their precision


@pytest.mark.slow  # torchao compiles its kernels
@pytest.mark.parametrize("bits", ["--use_8bit", "--use_4bit"])
def test_torchao_low_bit_adamw_trains_and_resumes(tiny_model_2b, tmp_path, bits):
    # Rank 256 makes the adapter matrices large enough (>= 4096 values) for torchao to quantize their states.
    summary = _train_and_resume(tiny_model_2b, tmp_path / "run", "--optimizer", "adamw", "--use_torchao", bits,
                                "--rank", "256", "--lora_alpha", "256", "--learning_rate", "1e-3")
    assert summary["global_step"] == 3 and np.isfinite(summary["final_loss"])
    state = torch.load(tmp_path / "run" / "checkpoint-3" / "optimizer.bin", weights_only=True)
    quantized = [v for s in state["state"].values() for v in s.values() if type(v).__name__.startswith("OptimState")]
    assert quantized, "no optimizer state was stored in low-bit form"
    _assert_trained_lora(tmp_path / "run")


def test_fp8_base_trains_resumes_validates_and_reproduces(tiny_model_2b, tmp_path, monkeypatch):
    import training.validation

    tested, generate_videos = [], training.validation.generate_videos

    def keep_test_frames(pipe, cases, validation, seed, num_frames, device, output_dir, tag):
        videos = generate_videos(pipe, cases, validation, seed, num_frames, device, output_dir, tag)
        if tag == "test":  # the trainer's final test: a fresh pipeline that loads the saved LoRA
            tested.extend(frames for _, frames in videos)
        return videos

    monkeypatch.setattr(training.validation, "generate_videos", keep_test_frames)
    output = tmp_path / "run"
    validation = ["--validation_prompt", "a cat walks", "--validation_steps", "3", *TINY_VALIDATION_FLAGS]
    summary = _train_and_resume(tiny_model_2b, output, "--quantize_base", "fp8", validation=validation)
    assert summary["global_step"] == 3 and summary["parity"]["exact"]
    _assert_trained_lora(output)

    # The README's inference recipe for an FP8-trained LoRA, in plain diffusers, at the run's compute dtype (fp32
    # here: no --mixed_precision; bf16 in the README's runs) and with the validation's settings (seed 7).
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    pipe = tiny_pipeline(tiny_model_2b)
    pipe.load_lora_weights(output, weight_name="pytorch_lora_weights.safetensors", adapter_name="trained")
    pipe.set_adapters(["trained"], [1.0])
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32,
                                              skip_modules_pattern=(*DEFAULT_SKIP_MODULES_PATTERN, "lora_"))
    dtypes = {name: p.dtype for name, p in pipe.transformer.named_parameters()}
    assert dtypes["transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)  # the adapter is not rounded to FP8
    recipe = generate(pipe, "a cat walks", seed=7)
    # Bit for bit what the trainer's own final test generated (same code, same order of operations).
    (final_test,) = tested
    np.testing.assert_array_equal(recipe, final_test)
    pipe.disable_lora()  # the same FP8 base without the adapter: the LoRA did change the video
    assert np.abs(generate(pipe, "a cat walks", seed=7) - recipe).mean() > 1e-4


def test_fp8_base_stores_frozen_linear_weights_in_fp8(tiny_model_2b):

    from diffusers import CogVideoXTransformer3DModel

    from training.models import prepare_frozen_base
    from training.modes import LoRA, cast_frozen

    transformer = CogVideoXTransformer3DModel.from_pretrained(tiny_model_2b, subfolder="transformer")
    from training.sections import LoraFlags, TrainingFlags

    prepare_frozen_base(transformer, "fp8", torch.float32)
    LoRA().prepare(transformer, TrainingFlags(seed=None, master_weight_dtype="fp32"),
                   LoraFlags(rank=4, lora_alpha=4, lora_target_modules="to_q,to_v"))
    cast_frozen(transformer, torch.bfloat16)
    dtypes = {name: p.dtype for name, p in transformer.named_parameters()}
    assert dtypes["transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.ff.net.0.proj.weight"] == torch.float8_e4m3fn
    assert all(d == torch.float32 for n, d in dtypes.items() if "lora_" in n)
    assert all(d == torch.bfloat16 for n, d in dtypes.items() if ".norm" in n)  # norms are not stored in FP8


@CUDA
def test_nf4_base_trains_resumes_and_validates(tiny_model_2b, tmp_path):
    output = tmp_path / "run"
    validation = ["--validation_prompt", "a cat walks", "--validation_steps", "3", *TINY_VALIDATION_FLAGS]
    summary = _train_and_resume(tiny_model_2b, output, "--quantize_base", "nf4", "--mixed_precision", "bf16",
                                validation=validation)
    assert summary["global_step"] == 3 and summary["parity"] is not None
    _assert_trained_lora(output)
    from diffusers import BitsAndBytesConfig, CogVideoXPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(
        tiny_model_2b, subfolder="transformer", torch_dtype=torch.bfloat16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"),
    )
    pipe = CogVideoXPipeline.from_pretrained(tiny_model_2b, transformer=transformer, torch_dtype=torch.bfloat16)
    pipe.load_lora_weights(output, adapter_name="trained")  # the README's inference recipe for a QLoRA
    assert any("lora_A" in name for name, _ in pipe.transformer.named_parameters())


def test_offloaded_activations_train_to_the_same_weights(tiny_model_2b, tmp_path, monkeypatch):
    """save_on_cpu only moves the saved tensors (a copy on a GPU; here the compute device is the CPU already):
    training is unchanged, and every tensor the forward saves for backward goes through its hook to the CPU."""
    stored = []

    class CountingSaveOnCpu(torch.autograd.graph.saved_tensors_hooks):
        def __init__(self, pin_memory=False):
            real = save_on_cpu(pin_memory=pin_memory)

            def pack(tensor):
                device, packed = real.pack_hook(tensor)
                stored.append((device, packed.device, packed.numel()))
                return device, packed

            super().__init__(pack, real.unpack_hook)

    save_on_cpu = torch.autograd.graph.save_on_cpu
    monkeypatch.setattr(torch.autograd.graph, "save_on_cpu", CountingSaveOnCpu)
    common = ["--max_train_steps", "2", "--checkpointing_steps", "10", "--gradient_checkpointing"]
    run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "plain", *common))
    assert stored == []  # the hook is not installed without the flag
    run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "offloaded", *common, "--offload_activations"))
    assert len(stored) > 10 and all(where.type == "cpu" for _, where, _ in stored)
    assert sum(numel for *_, numel in stored) > 5_000  # the activations (7432 values here), not a few scalars
    plain = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    offloaded = load_file(tmp_path / "offloaded" / "pytorch_lora_weights.safetensors")
    assert plain.keys() == offloaded.keys() and all(torch.equal(plain[k], offloaded[k]) for k in plain)
