"""The --dry_run memory estimate against real runs, and the optimizer-state layouts it assumes."""

import copy
import json
import sys

import pytest
import torch
from conftest import ASSETS, lora_argv, run_trainer, trainer_main

from training.memory import TRACK_ALLOCATIONS


@pytest.mark.slow  # a dry run and a tracked real run, three times
@pytest.mark.parametrize(
    "trainer, variant, flags",
    [
        # Raw videos: the VAE and T5 encode every step, LoRA on a checkpointed transformer.
        ("cogvideox_text_to_video_lora", "2b", ["--gradient_checkpointing"]),
        # Image-to-video full fine-tune in bf16: the VAE encodes the first frame every step.
        ("cogvideox_image_to_video_sft", "5b-i2v", ["--mixed_precision", "bf16", "--ignore_learned_positional_embeddings"]),
        # CogVideoX 1.5 with an FP8-stored base.
        ("cogvideox_text_to_video_lora", "1.5", ["--quantize_base", "fp8", "--mixed_precision", "bf16",
                                                 "--frame_buckets", "5", "13", "--max_num_frames", "13"]),
        # --blocks_to_swap: the swapped block's weights are host memory in both counts (training/block_swap.py).
        ("cogvideox_text_to_video_lora", "2b", ["--blocks_to_swap", "1"]),
    ],
    ids=["t2v-lora-raw", "i2v-sft-bf16", "1.5-lora-fp8", "t2v-lora-block-swap"],
)
def test_dry_run_estimate_matches_the_tracked_peak_of_a_real_run(tiny_models, tmp_path, monkeypatch, trainer, variant,
                                                                 flags):
    """The estimate simulates one batch of the heaviest bucket; the real run goes through every batch of an
    epoch with the same allocation counter switched on (COGVIDEOX_FACTORY_TRACK_ALLOCATIONS=1)."""
    argv = lora_argv(tiny_models(variant), ASSETS, tmp_path / "run", "--max_train_steps", "5",
                     "--checkpointing_steps", "100", *flags)
    plan = run_trainer([*argv, "--dry_run"], main=trainer_main(trainer))["dry_run"]
    estimate = plan["peak_memory_bytes"]["training"]
    monkeypatch.setenv(TRACK_ALLOCATIONS, "1")
    measured = run_trainer(argv, main=trainer_main(trainer))["tracked_training_peak_bytes"]
    assert abs(estimate / measured - 1) < 0.03, (estimate, measured)


def _mid_size_config():
    """A CogVideoX-5b-shaped transformer, narrow enough to simulate in a second: activations dominate."""
    return {
        "num_attention_heads": 4, "attention_head_dim": 32, "in_channels": 16, "out_channels": 16,
        "flip_sin_to_cos": True, "freq_shift": 0, "time_embed_dim": 64, "text_embed_dim": 128, "num_layers": 4,
        "dropout": 0.0, "attention_bias": True, "sample_width": 90, "sample_height": 60, "sample_frames": 49,
        "patch_size": 2, "patch_size_t": None, "temporal_compression_ratio": 4, "max_text_seq_length": 32,
        "activation_fn": "gelu-approximate", "timestep_activation_fn": "silu", "norm_elementwise_affine": True,
        "norm_eps": 1e-5, "spatial_interpolation_scale": 1.875, "temporal_interpolation_scale": 1.0,
        "use_rotary_positional_embeddings": True, "use_learned_positional_embeddings": False,
        "patch_bias": True,
    }


# A VAE the validation pipeline can build (the real one's tiling geometry: tiles of 240x360 pixels, as its
# sample_height/width are 480x720) and a small T5 whose width fits _mid_size_config's text_embed_dim.
PIPELINE_VAE = {"block_out_channels": [8, 8, 8, 8], "norm_num_groups": 2, "layers_per_block": 1,
                "scaling_factor": 0.7, "temporal_compression_ratio": 4}
SMALL_T5 = {"d_model": 128, "d_kv": 8, "d_ff": 64, "num_heads": 2, "num_layers": 1, "vocab_size": 1000,
            "feed_forward_proj": "gated-gelu"}


def _validation_config():
    """_mid_size_config with one block: the validation estimates need only a transformer phase below the decode."""
    return dict(_mid_size_config(), num_layers=1)


@pytest.fixture(scope="module")
def estimate():
    """estimate(**flags) -> estimate_training's bytes; estimate(phases=True, **flags) -> estimate_phases' (validation
    and final test, --validation_prompt given; the training phase is not simulated)."""
    from transformers import T5Config

    from training.args import parse_args
    from training.conditioning import TextToVideo
    from training.memory_estimate import estimate_phases, estimate_training
    from training.modes import MODES
    from training.sections import run_flags

    vae_config = {"block_out_channels": [8, 8, 8, 8], "scaling_factor": 0.7, "temporal_compression_ratio": 4}
    base = parse_args(["--pretrained_model_name_or_path", "-", "--load_tensors", "--train_batch_size", "1",
                       "--mixed_precision", "bf16", "--optimizer", "adamw"])

    done = {}  # tests share the simulations they both need

    def run(mode="lora", bucket=(17, 256, 384), phases=False, autocast=None, **changes):
        key = (mode, bucket, phases, autocast, tuple(sorted(changes.items())))
        if key not in done:
            args = copy.copy(base)
            vars(args).update(changes)
            if phases:
                args.validation_prompt = "a cat"
                batch = args.train_batch_size
                f = run_flags(args)
                done[key] = estimate_phases(f.data, f.buckets, f.training, f.optimizer, f.lora, f.validation, f.memory,
                                            f.parallelism, _validation_config(), PIPELINE_VAE, T5Config(**SMALL_T5),
                                            TextToVideo(), MODES[mode](), torch.bfloat16, {bucket: batch},
                                            known_peaks={(bucket, batch): 0})
            else:
                f = run_flags(args)
                done[key] = estimate_training(f.data, f.training, f.optimizer, f.lora, f.validation, f.memory,
                                              f.parallelism, _mid_size_config(), vae_config, None, TextToVideo(),
                                              MODES[mode](), torch.bfloat16, bucket, autocast)
        return done[key]

    return run


@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_the_estimates_cuda_rules_give_the_dtypes_of_cuda_autocast(variant):
    """The estimate runs on fake CPU tensors (autograd cannot run on fake CUDA ones in a CPU build of torch); for a
    GPU run it follows CUDA autocast's rules. Every norm and every linear of a forward gets the dtype CUDA autocast
    itself gives (fake CUDA tensors under CUDA autocast), which plain CPU autocast does not (its norms stay bf16)."""
    from cuda_semantics import fake_cuda
    from torch.utils._python_dispatch import TorchDispatchMode

    from tools.build_tiny_model import build_pipeline
    from training import attention
    from training.memory_estimate import cuda_autocast_rules

    class Dtypes(TorchDispatchMode):
        """(op, output dtype) of every norm and matmul."""

        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("native_layer_norm", "native_group_norm", "addmm", "mm"):
                self.seen.append((func.overloadpacket.__name__, (out[0] if isinstance(out, tuple) else out).dtype))
            return out

    transformer = attention.install(build_pipeline(variant).transformer.to(torch.bfloat16).requires_grad_(False))
    config = transformer.config

    def forward(device):
        tokens = 3 * (8 // config.patch_size) ** 2
        rotary = (tuple(torch.zeros(tokens, config.attention_head_dim, device=device) for _ in range(2))
                  if config.use_rotary_positional_embeddings else None)
        with Dtypes() as dtypes:
            transformer(hidden_states=torch.zeros(1, 3, config.in_channels, 8, 8, device=device),
                        encoder_hidden_states=torch.zeros(1, config.max_text_seq_length, config.text_embed_dim,
                                                          device=device),
                        timestep=torch.zeros(1, dtype=torch.long, device=device), image_rotary_emb=rotary)
        return dtypes.seen

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        plain_cpu = forward("cpu")
        with cuda_autocast_rules():
            simulated = forward("cpu")
    with fake_cuda(torch.bfloat16):
        transformer.to_empty(device="cuda")
        cuda = forward("cuda")
    assert ("native_layer_norm", torch.float32) in cuda and len(cuda) > 10
    assert simulated == cuda
    assert plain_cpu != cuda


def test_a_gpu_estimate_counts_the_norms_in_fp32(estimate, monkeypatch):
    """CUDA autocast keeps LayerNorm's output (and the input it saves for backward) in fp32: more memory than CPU
    autocast's bf16, most of all without gradient checkpointing. The default is where training would run."""
    from training.memory_estimate import machine_autocast

    for flags in ({}, {"gradient_checkpointing": True}):
        cpu, cuda = estimate(autocast="cpu", **flags), estimate(autocast="cuda", **flags)
        assert cuda["static"] == cpu["static"]
        assert cuda["training_peak"] > cpu["training_peak"], flags
    plain = estimate(autocast="cuda")["training_peak"] / estimate(autocast="cpu")["training_peak"]
    checkpointed = (estimate(autocast="cuda", gradient_checkpointing=True)["training_peak"]
                    / estimate(autocast="cpu", gradient_checkpointing=True)["training_peak"])
    assert plain > checkpointed > 1
    assert machine_autocast() == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert machine_autocast() == "cuda"


def test_estimate_follows_the_options_that_change_memory(estimate):
    plain = estimate()
    assert estimate(gradient_checkpointing=True)["training_peak"] < 0.6 * plain["training_peak"]
    assert estimate(train_batch_size=2)["training_peak"] > 1.5 * plain["training_peak"] - plain["static"]
    assert estimate(bucket=(33, 256, 384))["training_peak"] > plain["training_peak"]
    checkpointed = estimate(gradient_checkpointing=True)
    offloaded = estimate(gradient_checkpointing=True, offload_activations=True)
    block_input = 5 * 16 * 24 * 128 * 2  # one block's hidden states: 5 latent frames of 16x24 patches, width 128, bf16
    assert offloaded["training_peak"] < checkpointed["training_peak"] - block_input
    fp8 = estimate(quantize_base="fp8")
    assert fp8["static"] < plain["static"]  # frozen linear weights: 1 byte instead of 2
    full = estimate(mode="sft")
    assert estimate(mode="sft", use_8bit=True)["static"] < full["static"]
    assert estimate(mode="sft", master_weight_dtype="bf16")["static"] < full["static"]


def _weight_bytes(parameters, element_size):
    """Accelerator bytes of weights held in `element_size`-byte dtypes, in the CUDA allocator's 512-byte blocks."""
    return sum(-(-p.numel() * element_size // 512) * 512 for p in parameters)


def test_validation_estimate_follows_slicing_tiling_and_model_cpu_offload(estimate):
    """README: --enable_model_cpu_offload and --enable_tiling lower the validation and final-test peaks, and
    --enable_slicing a VAE call over several videos (validation decodes one per call); docs/memory.md: the estimate
    decodes with the VAE options as given, and with offload "only the working module counts". Validation at 9x192x576: the VAE decode is the peak of both phases, and tiling splits it in two
    tiles (the real VAE's 240x360-pixel tiles)."""
    from accelerate import init_empty_weights
    from diffusers import CogVideoXTransformer3DModel
    from torch._subclasses.fake_tensor import FakeTensorMode
    from transformers import T5Config, T5EncoderModel

    from training.args import parse_args
    from training.memory import AllocationTracker
    from training.memory_estimate import fake_vae
    from training.modes import MODES
    from training.sections import run_flags

    size = {"phases": True, "height": 192, "width": 576, "validation_num_frames": 9}
    plain, tiled = estimate(**size), estimate(enable_tiling=True, **size)
    for phase in ("validation", "final_test"):
        # Tiling: two overlapping tiles (latent columns 0-44 and 36-71 of 72) are decoded one after the other.
        assert tiled[phase] < 0.8 * plain[phase], phase

    # Slicing decodes a batch one video at a time: the VAE the estimate builds does so for a batch of two ...
    fake_mode = FakeTensorMode(allow_non_fake_inputs=True)
    vae = fake_vae(PIPELINE_VAE, torch.bfloat16, fake_mode, slicing=True)

    def decode_peak():
        tracker = AllocationTracker()
        with fake_mode, tracker, torch.no_grad():
            latents = torch.zeros(2, 16, 3, 8, 8, dtype=torch.bfloat16)
            tracker.reset_peak()
            vae.decode(latents)
        return tracker.peak

    sliced = decode_peak()
    vae.disable_slicing()
    whole = decode_peak()
    output = 2 * 3 * 9 * 64 * 64 * 2  # both decoded videos, bf16, held at the end either way
    assert sliced - output < 0.6 * (whole - output), (sliced, whole)
    # ... while validation decodes one video per call (as the pipeline does): nothing to slice. The offloaded run below
    # has --enable_slicing too, and the difference it shows is the offload's alone.
    offloaded = estimate(enable_model_cpu_offload=True, enable_slicing=True, **size)

    # Offload: during the decode only the VAE is on the accelerator; the transformer (bf16 base, fp32 LoRA while
    # training, all bf16 in the final test's fresh pipeline) and T5 (bf16) are not.
    with init_empty_weights():
        transformer = CogVideoXTransformer3DModel.from_config(_validation_config())
        t5 = T5EncoderModel(T5Config(**SMALL_T5))
    lora = MODES["lora"]()
    default = run_flags(parse_args(["--pretrained_model_name_or_path", "-"]))
    lora.prepare(transformer, default.training, default.lora)  # default rank, targets, fp32
    base = [p for p in transformer.parameters() if not p.requires_grad]
    adapters = lora.trainable_parameters(transformer)
    idle_weights = _weight_bytes(t5.parameters(), 2) + _weight_bytes(base, 2)
    assert plain["validation"] - offloaded["validation"] == idle_weights + _weight_bytes(adapters, 4)
    assert plain["final_test"] - offloaded["final_test"] == idle_weights + _weight_bytes(adapters, 2)


def test_estimate_of_one_process_of_a_shard_group(estimate):
    """--enable_sequence_parallelism: one process holds the activations of 1/shards of the video tokens (the
    exchanges are simulated with their real shapes); the weights and optimizer states stay whole."""
    plain = estimate()
    activations = plain["training_peak"] - plain["static"]
    for shards in (2, 4):
        sharded = estimate(enable_sequence_parallelism=True, sequence_parallel_shards=shards)
        assert sharded["static"] == pytest.approx(plain["static"], rel=1e-3)
        assert sharded["training_peak"] - sharded["static"] < activations * (1 / shards + 0.15), shards
    assert estimate(enable_sequence_parallelism=True, sequence_parallel_shards=4)["training_peak"] < \
        estimate(enable_sequence_parallelism=True, sequence_parallel_shards=2)["training_peak"]


def _state_bytes(optimizer):
    """Bytes of distinct state storages (bitsandbytes shares its quantization maps between tensors)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for state in optimizer.state.values()
                for t in state.values() if isinstance(t, torch.Tensor) and t.numel() > 1}
    return sum(storages.values())


@pytest.mark.parametrize(
    "flags",
    [
        {"optimizer": "adamw"},
        {"optimizer": "adamw", "use_8bit": True},
        {"optimizer": "prodigy"},
        {"optimizer": "came", "beta3": 0.9999},
    ],
    ids=["adamw", "bnb-adamw8bit", "prodigy", "came"],
)
def test_optimizer_state_bytes_match_what_the_optimizer_allocates(flags):
    """The estimate counts states from documented layouts (bitsandbytes kernels cannot run on fake tensors);
    check each layout against a real step on the CPU."""
    from training.args import parse_args
    from training.memory_estimate import optimizer_state_bytes
    from training.optim import build_optimizer
    from training.sections import run_flags

    args = parse_args(["--pretrained_model_name_or_path", "-"])
    vars(args).update(flags)
    parameters = [torch.nn.Parameter(torch.randn(512, 256)), torch.nn.Parameter(torch.randn(1024, 64)),
                  torch.nn.Parameter(torch.randn(100))]
    sections = run_flags(args)
    optimizer = build_optimizer(sections.optimizer, sections.memory, parameters, sections.training.learning_rate)
    for parameter in parameters:
        parameter.grad = torch.randn_like(parameter)
    optimizer.step()
    expected = optimizer_state_bytes(sections.optimizer, sections.memory, parameters)
    assert abs(expected / _state_bytes(optimizer) - 1) < 0.05, (expected, _state_bytes(optimizer))


def test_allocation_tracker_counts_views_once_and_frees():
    from training.memory import AllocationTracker

    tracker = AllocationTracker(granularity=1)
    with tracker:
        a = torch.zeros(1000)
        view = a[10:]  # same storage
        b = a * 2
        assert tracker.current == 8000
        del a, view, b
    assert tracker.current == 0 and tracker.peak == 8000


def test_dry_run_prints_every_phase(capsys, tiny_model_2b, tmp_path):
    argv = lora_argv(tiny_model_2b, ASSETS, tmp_path / "run", "--max_train_steps", "2", "--validation_prompt", "a cat",
                     "--height", "32", "--width", "32", "--validation_num_frames", "9", "--dry_run")
    plan = run_trainer(argv)["dry_run"]
    phases = plan["peak_memory_bytes"]
    assert set(phases) >= {"training", "validation", "final_test", "bucket", "batch_size"}
    assert all(phases[k] > 0 for k in ("training", "validation", "final_test"))
    out = capsys.readouterr().out
    assert "peak_memory_gib" in out and json.dumps(plan["peak_memory_gib"]["bucket"]).strip('"') in out


class MallocPeak(torch.utils._python_dispatch.TorchDispatchMode):
    """An independent measure of a CPU run's peak: glibc's own count of the bytes malloc has handed out and not taken
    back (mallinfo2: uordblks + hblkhd; torch's CPU allocator keeps no cache), read after every operator. Peak =
    the bytes of the tensors that exist when it starts (weights, optimizer state) + the highest growth after."""

    def __init__(self, start_bytes):
        super().__init__()
        import ctypes

        class MallInfo2(ctypes.Structure):
            _fields_ = [(name, ctypes.c_size_t) for name in
                        "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]

        self._mallinfo2 = ctypes.CDLL("libc.so.6").mallinfo2
        self._mallinfo2.restype = MallInfo2
        self.start_bytes, self.baseline, self.growth = start_bytes, self._in_use(), 0

    def _in_use(self):
        info = self._mallinfo2()
        return info.uordblks + info.hblkhd

    @property
    def peak(self):
        return self.start_bytes + self.growth

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.growth = max(self.growth, self._in_use() - self.baseline)
        return out


@pytest.mark.slow  # a wider model, trained for real
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads glibc's malloc statistics (Linux)")
def test_dry_run_estimate_matches_the_peak_malloc_measures(tmp_path, monkeypatch):
    """Not the estimate's own allocation counter: a full fine-tune of a model wide enough (6.3 M parameters, ~100 MB
    of weights, gradients and AdamW states) that malloc's bytes in use are the training's, measured while the real
    trainer runs."""
    import training.memory as memory
    from tools.build_tiny_model import save_tiny_model

    model = save_tiny_model(tmp_path / "wide", transformer={"num_attention_heads": 8, "attention_head_dim": 64,
                                                             "num_layers": 2, "time_embed_dim": 64})
    argv = lora_argv(str(model), ASSETS, tmp_path / "run", "--max_train_steps", "1", "--checkpointing_steps", "100",
                     "--optimizer", "adamw", "--train_batch_size", "1")  # the first step allocates the states
    full = trainer_main("cogvideox_text_to_video_sft")
    estimate = run_trainer([*argv, "--dry_run"], main=full)["dry_run"]["peak_memory_bytes"]["training"]

    def start_malloc_peak(transformer, optimizer, context):
        modules = [m for m in (transformer, context.vae, context.text_encoder) if m is not None]
        tensors = [t for m in modules for t in (*m.parameters(), *m.buffers())]
        tensors += [v for s in optimizer.state_dict()["state"].values() for v in s.values() if torch.is_tensor(v)]
        tracker = MallocPeak(sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values()))
        return tracker.__enter__()

    monkeypatch.setenv(memory.TRACK_ALLOCATIONS, "1")
    monkeypatch.setattr(memory, "start_allocation_tracking", start_malloc_peak)
    measured = run_trainer(argv, main=full)["tracked_training_peak_bytes"]
    assert estimate > 80e6
    # malloc also holds what is not a tensor (Python objects, decode buffers): 2026-12-01, 125.9 vs 133.2 MB, 0.945
    assert 0.9 < estimate / measured < 1.02, (estimate, measured)



def test_selective_checkpointing_buys_speed_with_memory_and_keeps_the_math(estimate, monkeypatch):
    """--gradient_checkpointing_ratio 0.5 checkpoints every other block: the same gradients as no checkpointing, half
    the recomputation, and a peak the estimate puts between none and all."""
    from argparse import Namespace

    from diffusers import CogVideoXTransformer3DModel

    from training.sections import ParallelismFlags
    from training.step import prepare_transformer

    none, half, full = (estimate(**flags)["training_peak"] for flags in (
        {}, {"gradient_checkpointing": True, "gradient_checkpointing_ratio": 0.5}, {"gradient_checkpointing": True}))
    assert full < half < none

    config = dict(_mid_size_config(), num_attention_heads=2, attention_head_dim=8, text_embed_dim=16, time_embed_dim=8,
                  sample_width=8, sample_height=8, sample_frames=5, in_channels=4, out_channels=4)
    inputs = dict(hidden_states=torch.randn(1, 2, 4, 8, 8), encoder_hidden_states=torch.randn(1, 32, 16),
                  timestep=torch.tensor([500]), image_rotary_emb=None)
    calls, checkpoint = [], torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or checkpoint(*a, **k))

    def gradients(**flags):
        torch.manual_seed(0)
        model = CogVideoXTransformer3DModel.from_config(config).train()
        args = Namespace(**{"gradient_checkpointing": bool(flags), "gradient_checkpointing_ratio": 1.0,
                            "quantize_base": "none", "blocks_to_swap": 0, **flags})
        conditioning = Namespace(adapt_transformer=lambda transformer, args: None)
        mode = Namespace(prepare=lambda transformer, training, lora: transformer.requires_grad_(True))
        prepare_transformer(model, args, args, args, ParallelismFlags(), conditioning, mode, torch.float32)
        calls.clear()
        model(**inputs, return_dict=False)[0].square().mean().backward()
        return [p.grad for p in model.parameters()], len(calls)

    plain, no_calls = gradients()
    selective, half_calls = gradients(gradient_checkpointing_ratio=0.5)
    _, all_calls = gradients(gradient_checkpointing_ratio=1.0)
    assert (no_calls, half_calls, all_calls) == (0, 2, 4)  # of the 4 blocks
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(plain, selective))
