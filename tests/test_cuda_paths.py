"""The GPU-only paths, run in CI through the CUDA layer (tests/cuda_semantics.py): fake CUDA tensors under CUDA
autocast with CUDA's device rule and flash-attention's dtype rules, or real CPU tensors with CUDA's streams,
pinned memory and random states stubbed where numbers must be compared."""

from types import SimpleNamespace

import pytest
import torch
from conftest import ASSETS, free_port, lora_argv, lora_weights, prepare_argv, run_prepare, run_trainer
from cuda_semantics import (
    FLASH_BACKENDS,
    cuda_streams_on_cpu,
    fake_cuda,
    fp16_loss_scaling_on_cpu,
    install_fake_flash,
    offload_optimizer_on_cpu,
    synthetic_gradients,
)
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode


def _tiny_transformer(variant, dtype=torch.bfloat16):
    from tools.build_tiny_model import build_pipeline
    from training import attention

    transformer = build_pipeline(variant).transformer.to(dtype).requires_grad_(False)
    attention.install(transformer)
    return transformer


def _forward(transformer, frames=3, size=8, dtype=torch.float32, loaded_on_gpu=False):
    """One forward of the transformer on fake CUDA inputs of `dtype` (inside fake_cuda); its weights become fake
    CUDA ones (`loaded_on_gpu`: they are already, loaded inside fake_cuda)."""
    config = transformer.config
    if not loaded_on_gpu:
        transformer.to_empty(device="cuda")
    noisy = torch.empty(1, frames, config.in_channels, size, size, device="cuda", dtype=dtype)
    text = torch.empty(1, config.max_text_seq_length, config.text_embed_dim, device="cuda", dtype=dtype)
    rotary = None
    if config.use_rotary_positional_embeddings:
        tokens = frames * (size // config.patch_size) ** 2
        rotary = tuple(torch.empty(tokens, config.attention_head_dim, device="cuda") for _ in range(2))
    timestep = torch.zeros(1, dtype=torch.long, device="cuda")
    return transformer(hidden_states=noisy, encoder_hidden_states=text, timestep=timestep, image_rotary_emb=rotary,
                       return_dict=False)[0]


# ----------------------------------------------------------------------------------------------- attention kernels
@pytest.mark.parametrize("backend", FLASH_BACKENDS)
@pytest.mark.parametrize("variant", ["2b", "5b"])
def test_flash_backends_get_q_k_v_of_one_16_bit_dtype_under_cuda_autocast(monkeypatch, backend, variant):
    """Under CUDA bf16 autocast the norms of q and k return fp32 and the value projection bf16; flash-attention
    takes one 16-bit dtype, so before the fix every flash backend crashed at the first step."""
    calls = []
    install_fake_flash(monkeypatch, calls)
    transformer = _tiny_transformer(variant)
    for processor in transformer.attn_processors.values():
        processor._attention_backend = backend  # set_attention_backend would ask for the flash package
    with fake_cuda(torch.bfloat16):
        out = _forward(transformer)
    assert out.device.type == "cuda" and calls
    assert set(calls) == {(torch.bfloat16,) * 3}


def test_sequence_parallel_exchange_moves_the_kernel_dtype(monkeypatch):
    """The all-to-all before the kernel moves q, k and v in the autocast dtype (fp32 q and k: 1.67x the bytes)."""
    from training import attention

    moved = []

    class Recorded(attention.SimulatedShards):
        def _all_to_all(self, x):
            moved.append(x.dtype)
            return super()._all_to_all(x)

    transformer = _tiny_transformer("5b")
    attention.install(transformer, Recorded(2))
    with fake_cuda(torch.bfloat16):
        _forward(transformer, frames=2)
    exchanged_before_kernel = moved[0::4], moved[1::4], moved[2::4]  # per layer: q, k, v, then the output
    assert moved and all(set(dtypes) == {torch.bfloat16} for dtypes in exchanged_before_kernel), moved


@pytest.mark.parametrize("autocast", [torch.bfloat16, None], ids=["training-autocast", "inference-bf16"])
def test_an_fp8_stored_base_computes_every_matmul_in_bf16_on_cuda(autocast):
    """--quantize_base fp8 (diffusers' layerwise casting, which training, validation and the README's inference
    recipe use) on fake CUDA tensors, under CUDA bf16 autocast (training, validation) and without (the final test and
    the recipe, a bf16 pipeline): each layer's weights are cast to bf16 around its forward, so every matmul takes
    bf16 operands, and the weights are stored in FP8 again afterwards."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from training.memory_estimate import _module_conversion_assigns
    from training.models import prepare_frozen_base
    from training.modes import LoRA, cast_frozen

    class Matmuls(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.operands = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ in ("addmm", "mm"):  # the linears (attention is the kernel's)
                self.operands.add(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
            return func(*args, **(kwargs or {}))

    transformer = _tiny_transformer("5b")
    from training.sections import LoraFlags, TrainingFlags

    with _module_conversion_assigns():  # layerwise casting assigns cast copies (fake parameters cannot be swapped)
        prepare_frozen_base(transformer, "fp8", torch.bfloat16)
        LoRA().prepare(transformer, TrainingFlags(seed=None, master_weight_dtype="bf16"),
                       LoraFlags(rank=4, lora_alpha=4, lora_target_modules="to_q,to_v"))
        cast_frozen(transformer, torch.bfloat16)
        stored = {name: p.dtype for name, p in transformer.named_parameters()}
        assert stored["transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
        with fake_cuda(autocast), Matmuls() as matmuls:
            out = _forward(transformer, dtype=torch.float32 if autocast else torch.bfloat16)
    assert out.dtype == torch.bfloat16 and matmuls.operands == {(torch.bfloat16,) * 3, (torch.bfloat16,) * 2}
    assert {name: p.dtype for name, p in transformer.named_parameters()} == stored


def test_fp8_training_runs_its_matmuls_in_fp8_under_cuda_autocast(monkeypatch):
    """--fp8_training under LoRA on fake CUDA tensors under CUDA bf16 autocast, as on a GPU: each converted layer's
    matmul is the FP8 kernel with e4m3 operands and a bf16 result (its layout and size rules checked by torch's shape
    function on the fake CUDA tensors), and the adapters around the base layers compute in bf16."""
    from tools.build_tiny_model import build_pipeline
    from training import attention
    from training.compute import use_fp8_matmuls
    from training.modes import LoRA, cast_frozen
    from training.sections import LoraFlags, TrainingFlags

    class PlainMatmuls(TorchDispatchMode):  # the FP8 layers' own mm is the kernel's, counted below
        def __init__(self):
            super().__init__()
            self.operands = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if func.overloadpacket.__name__ in ("addmm", "mm") and all(type(t).__name__ == "FakeTensor" for t in tensors):
                self.operands.add(tuple(t.dtype for t in tensors))
            return func(*args, **(kwargs or {}))

    kernel, fp8_calls = torch._scaled_mm, []

    def scaled_mm(a, b, **kwargs):
        fp8_calls.append((a.dtype, b.dtype, kwargs["out_dtype"], a.device.type))
        return kernel(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", scaled_mm)
    # blocks 32 wide (2 heads x 16): the FP8 kernel takes sides that are multiples of 16
    transformer = build_pipeline("5b", transformer={"num_attention_heads": 2, "attention_head_dim": 16}).transformer
    attention.install(transformer.requires_grad_(False))
    use_fp8_matmuls(transformer, weights_train=False)
    LoRA().prepare(transformer, TrainingFlags(seed=None, master_weight_dtype="bf16"),
                   LoraFlags(rank=4, lora_alpha=4, lora_target_modules="to_q,to_v"))
    cast_frozen(transformer, torch.bfloat16)
    with fake_cuda(torch.bfloat16), PlainMatmuls() as plain:
        out = _forward(transformer)
    assert out.dtype == torch.bfloat16
    assert fp8_calls and set(fp8_calls) == {(torch.float8_e4m3fn, torch.float8_e4m3fn, torch.bfloat16, "cuda")}
    assert len(fp8_calls) == 6  # q, k, v, out and the feed-forward's two, of the one block
    assert plain.operands == {(torch.bfloat16,) * 2, (torch.bfloat16,) * 3}


class _Kernels(TorchDispatchMode):
    """The calls of bitsandbytes' 4-bit kernels ((name, quant_type, shape of the weight, dtype of A, dtype of B)) and
    the operand dtypes of the plain matmuls (mm, addmm)."""

    def __init__(self):
        super().__init__()
        self.four_bit, self.matmuls = [], []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if func.namespace == "bitsandbytes":
            if name == "gemm_4bit":  # (A, B, shapeB, absmax, blocksize, quant_type, ...)
                self.four_bit.append((name, args[5], tuple(args[2]), args[0].dtype, args[1].dtype))
            else:
                self.four_bit.append((name,))
        elif name in ("mm", "addmm"):
            self.matmuls.append(tuple(a.dtype for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


def test_nf4_qlora_forward_runs_under_cuda_autocast(tiny_model_5b):
    """--quantize_base nf4 (QLoRA) as the trainer does it, on fake CUDA tensors: load_transformer loads the base with
    diffusers' BitsAndBytesConfig onto the GPU, where bitsandbytes quantizes every linear layer to NF4 (packed uint8
    weights with their quant_state); LoRA.prepare puts peft's adapters on the 4-bit layers, in the fp32 master dtype,
    on the GPU; cast_frozen leaves the packed weights alone; the model is moved to the device as build_trainer does.
    A forward under CUDA bf16 autocast (with the diffusers attention the trainer uses without --attention_backend)
    runs each 4-bit layer through bitsandbytes' 4-bit matmul in bf16, and the adapters' matmuls in bf16; only the
    adapters train."""
    from training.args import DEFAULT_LORA_TARGET_MODULES
    from training.models import Pretrained, load_transformer, prepare_frozen_base
    from training.modes import LoRA, cast_frozen
    from training.optional_libraries import use_bitsandbytes
    from training.sections import LoraFlags, TrainingFlags

    bnb = use_bitsandbytes()  # before the layer: its import picks its kernels by torch.cuda.is_available()
    targets = DEFAULT_LORA_TARGET_MODULES.split(",")
    with fake_cuda(torch.bfloat16, loading=True):
        transformer = load_transformer(Pretrained(tiny_model_5b, quantize_base="nf4"), torch.bfloat16)
        prepare_frozen_base(transformer, "nf4", torch.bfloat16)  # the trainer's order (nothing to do for nf4)
        LoRA().prepare(transformer, TrainingFlags(seed=0, master_weight_dtype="fp32"),
                       LoraFlags(rank=4, lora_alpha=4, lora_target_modules=DEFAULT_LORA_TARGET_MODULES))
        cast_frozen(transformer, torch.bfloat16)
        transformer.to(torch.device("cuda", 0))
        with _Kernels() as kernels:
            out = _forward(transformer, dtype=torch.bfloat16, loaded_on_gpu=True)  # the trainer's bf16 inputs

    four_bit = {name.removesuffix(".base_layer"): m for name, m in transformer.named_modules()  # peft's base_layer
                if isinstance(m, bnb.nn.Linear4bit)}
    plain = [name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)
             and not isinstance(m, bnb.nn.Linear4bit) and ".lora_" not in name]
    assert four_bit and not plain, f"linear layers left in 16 bits: {plain}"
    for name, layer in four_bit.items():
        weight, state = layer.weight, layer.weight.quant_state
        assert isinstance(weight, bnb.nn.Params4bit) and weight.bnb_quantized, name
        assert weight.dtype == torch.uint8 and weight.device.type == "cuda", name
        assert weight.shape == ((layer.out_features * layer.in_features + 1) // 2, 1), name  # two weights a byte
        assert state.quant_type == "nf4" and state.dtype == torch.bfloat16, name
        assert tuple(state.shape) == (layer.out_features, layer.in_features), name
        assert state.absmax.device.type == state.code.device.type == "cuda", name
        assert layer.compute_dtype == torch.bfloat16, name
    frozen = [p for p in transformer.parameters() if not p.requires_grad and p.dtype != torch.uint8]
    assert frozen and all(p.dtype == torch.bfloat16 and p.device.type == "cuda" for p in frozen)  # biases, norms

    # Each 4-bit layer ran once, through the 4-bit kernel (never dequantized to a plain matmul), in bf16.
    assert sorted(kernels.four_bit) == sorted(("gemm_4bit", "nf4", (m.out_features, m.in_features), torch.bfloat16,
                                               torch.uint8) for m in four_bit.values())

    adapted = {name for name, m in transformer.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {name for name in four_bit if any(name.endswith(f".{target}") for target in targets)}
    assert kernels.matmuls == [(torch.bfloat16, torch.bfloat16)] * (2 * len(adapted))  # lora_A, lora_B: bf16

    trained = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    assert set(trained) == {f"{name}.lora_{ab}.default.weight" for name in adapted for ab in "AB"}
    assert [id(p) for p in LoRA().trainable_parameters(transformer)] == [id(p) for p in trained.values()]
    assert all(p.dtype == torch.float32 and p.device.type == "cuda" for p in trained.values())

    config = transformer.config
    assert out.device.type == "cuda" and out.shape == (1, 3, config.out_channels, 8, 8)
    assert out.dtype == torch.float32  # proj_out (4-bit) returns its input's dtype: LayerNorm's fp32 under autocast


# ----------------------------------------------------------------------------------------------- checkpoints
def _stepped_optimizer(name, weights):
    """torch's Adam or AdamW after one step (those whose step runs on fake tensors: Prodigy and CAME read values)."""
    optimizer = (torch.optim.Adam if name == "adam" else torch.optim.AdamW)(weights, lr=1e-3)
    synthetic_gradients(weights)
    optimizer.step()
    return optimizer


@pytest.mark.parametrize("optimizer_name", ["adam", "adamw"])
def test_the_finiteness_check_before_a_checkpoint_takes_a_gpu_training_state(optimizer_name):
    """Before every checkpoint one flag per weight and optimizer state is gathered; torch's Adam keeps its step
    counter on the CPU beside CUDA weights, and CUDA refuses to stack tensors of two devices: every GPU run crashed
    at its first checkpoint. The flags go to one device, and step counters are not weights."""
    from training.backend import Backend
    from training.core import optimizer_state_tensors

    reduced = []  # what goes into the all-reduce; every rank's flag said "finite" (a fake tensor has no value)
    backend = SimpleNamespace(device=torch.device("cuda", 0),
                              reduce_mean=lambda t: reduced.append(t) or SimpleNamespace(item=lambda: 1.0))
    with fake_cuda(None):
        weights = [torch.nn.Parameter(torch.empty(64, 32, device="cuda")), torch.nn.Parameter(torch.empty(32, device="cuda"))]
        optimizer = _stepped_optimizer(optimizer_name, weights)
        states = optimizer_state_tensors(optimizer)
        assert states and all(t.device.type == "cuda" for t in states)
        host_copy = torch.empty(64, 32)  # a CPU tensor beside them (torchao's offloaded weights)
        assert Backend.all_finite(backend, [*weights, *states, host_copy]) is True
    assert [t.device.type for t in reduced] == ["cuda"]


class _Killed(BaseException):
    pass


def _killed_at(step):
    def crash(where, at):
        if (where, at) == ("step", step):
            raise _Killed  # in place of the SIGKILL a subprocess gets: this run stops right there
    return crash


@pytest.mark.parametrize("flags", [["--optimizer", "adamw"], ["--optimizer", "adamw", "--offload_gradients"],
                                   ["--optimizer", "adamw", "--use_8bit"], ["--optimizer", "came"],
                                   ["--optimizer", "adamw", "--loraplus_lr_ratio", "4"]],
                         ids=["adamw", "offload-grads", "bnb8", "came", "loraplus"])
def test_cpu_offloaded_optimizer_resumes_to_the_weights_of_a_straight_run(tiny_model_2b, tmp_path, monkeypatch, flags):
    """torchao's CPUOffloadOptimizer (unchanged, its streams stubbed) copies each weight to the host once, when it is
    built; a resume loads the checkpoint's weights after that, so its first step brought back the initial weights
    plus one update. Killed at step 3 and resumed from checkpoint-2, a run ends bit for bit where a straight run
    does, and as the on-device optimizer within rounding (clipping acts on the host copies, the LR schedule runs)."""
    import training.checkpoint

    offload_optimizer_on_cpu(monkeypatch)
    # Rank 256: adapter matrices of >= 4096 values, which torchao moves to the host (smaller ones stay on the GPU).
    common = ["--max_grad_norm", "0.01", "--lr_scheduler", "linear", "--lr_warmup_steps", "1", "--rank", "256",
              "--lora_alpha", "256", "--checkpointing_steps", "2", "--max_train_steps", "4",
              "--use_cpu_offload_optimizer", *flags]
    run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "plain",
                          *[f for f in common if f not in ("--use_cpu_offload_optimizer", "--offload_gradients")]))
    run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "straight", *common))
    with monkeypatch.context() as killing:
        killing.setattr(training.checkpoint, "simulate_crash", _killed_at(3))
        with pytest.raises(_Killed):
            run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "resumed", *common))
    run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest"))
    plain, straight, resumed = (load_file(tmp_path / run / "pytorch_lora_weights.safetensors")
                                for run in ("plain", "straight", "resumed"))
    assert straight.keys() == resumed.keys() == plain.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0)
        torch.testing.assert_close(straight[key], plain[key], rtol=1e-3, atol=1e-5)


# ----------------------------------------------------------------------------------------------- random states
def test_cuda_random_states_are_saved_and_restored_by_gpu_index(monkeypatch):
    """A checkpoint keeps each GPU's state under its index; a resume restores each GPU present from its own index
    (12 GPUs: text order would give GPU 2 the state of GPU 10), and one that sees fewer GPUs than the run that wrote
    it (a sweep's GPU_IDS=0 after a run on all of them) restores those it has instead of failing."""
    from training.checkpoint import _rng_state, _set_rng_state

    cuda_streams_on_cpu(monkeypatch, devices=12, available=True)
    written = torch.cuda.get_rng_state_all()
    tensors, plain = _rng_state()
    torch.cuda.manual_seed_all(99)
    _set_rng_state(tensors, plain)
    for index, state in enumerate(written):
        assert torch.equal(torch.cuda.get_rng_state(index), state), f"GPU {index}"

    cuda_streams_on_cpu(monkeypatch, devices=1, available=True)
    _set_rng_state(tensors, plain)
    assert torch.equal(torch.cuda.get_rng_state(0), written[0])


def test_a_lora_starts_from_the_seed_on_the_gpu_too(monkeypatch):
    """modes._drawn_from_seed seeds the model's own GPU (and only it) inside a fork: the GPU streams are as they
    were afterwards."""
    from training.modes import _drawn_from_seed

    cuda_streams_on_cpu(monkeypatch, devices=2, available=True)
    before = torch.cuda.get_rng_state_all()
    seen = []
    with _drawn_from_seed(5, torch.device("cuda", 1)):
        seen = torch.cuda.get_rng_state_all()
    assert torch.equal(seen[1], torch.full((16,), 5, dtype=torch.uint8)) and torch.equal(seen[0], before[0])
    assert all(torch.equal(a, b) for a, b in zip(torch.cuda.get_rng_state_all(), before))


# ----------------------------------------------------------------------------------------------- several GPUs
@pytest.mark.parametrize("rank", [0, 1])
def test_prepare_ranks_wait_for_the_hashing_rank_on_a_group_with_a_long_timeout(tiny_model_2b, tmp_path, monkeypatch,
                                                                                rank):
    """With --hash_videos the other ranks wait while rank 0 hashes every video: in an NCCL barrier its default
    10 minutes killed them on large data sets. Every wait of prepare is on a gloo group with a long timeout (as the
    trainer's), on every rank (two ranks of one launch, their process group simulated)."""
    import datetime

    import torch.distributed as dist

    groups, barriers = {}, []
    monkeypatch.setenv("WORLD_SIZE", "2")
    for name, value in dict(is_initialized=lambda: True, get_rank=lambda group=None: rank,
                            get_world_size=lambda group=None: 2, init_process_group=lambda *a, **k: None,
                            destroy_process_group=lambda *a, **k: None,
                            new_group=lambda *a, **k: groups.setdefault(len(groups), k),
                            barrier=lambda group=None, **k: barriers.append(group)).items():
        monkeypatch.setattr(dist, name, value)
    run_prepare(prepare_argv(tiny_model_2b, ASSETS, tmp_path / "prepared", "--hash_videos", "--dry_run"))
    assert barriers, "no rank waited for the hashes"
    for group in barriers:
        assert group is not None and group["backend"] == "gloo", group
        assert group["timeout"] >= datetime.timedelta(hours=1), group


def test_gradient_checkpointing_ratio_checkpoints_its_blocks_under_fsdp1(monkeypatch):
    """--gradient_checkpointing_ratio 0.5 under FSDP1: the blocks were chosen by identity before accelerate wrapped
    them, and FSDP1 puts a wrapper in each block's place, so no block was checkpointed (a run meant to fit ran out of
    memory). Real FSDP1, one process on the CPU; the blocks checkpointed are the ones the ratio spreads over."""
    import torch.distributed as dist
    import torch.utils.checkpoint
    from diffusers.models.transformers.cogvideox_transformer_3d import CogVideoXBlock
    from torch.distributed.fsdp import FullyShardedDataParallel
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy

    from tools.build_tiny_model import build_pipeline
    from training.step import selective_checkpointing

    transformer = build_pipeline("2b", transformer=dict(num_layers=4)).transformer
    checkpointed = []
    checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint",
                        lambda call, *a, **k: checkpointed.append(call.__self__) or checkpoint(call, *a, **k))
    transformer.enable_gradient_checkpointing(selective_checkpointing(transformer.transformer_blocks, 0.5))
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        wrapped = FullyShardedDataParallel(transformer, auto_wrap_policy=ModuleWrapPolicy({CogVideoXBlock}),
                                           device_id=torch.device("cpu"), use_orig_params=True)
        blocks = list(transformer.transformer_blocks)
        assert all(isinstance(block, FullyShardedDataParallel) for block in blocks)
        config = transformer.config
        wrapped(hidden_states=torch.randn(1, 3, config.in_channels, 8, 8),
                encoder_hidden_states=torch.randn(1, config.max_text_seq_length, config.text_embed_dim),
                timestep=torch.tensor([10]), return_dict=False)
    finally:
        dist.destroy_process_group()
    assert [blocks.index(block) for block in checkpointed] == [0, 2]


# ----------------------------------------------------------------------------------------------- pinned memory
def _copies_from_pinned_memory(monkeypatch):
    """[(args, kwargs)] of the first Tensor.to called on each pinned tensor (stubbed pinning: cuda_streams_on_cpu):
    the copy to the device. (On the CPU that copy is the tensor itself, so later calls on it are not copies.)"""
    pinned = cuda_streams_on_cpu(monkeypatch)
    copies, to = [], torch.Tensor.to

    def recorded(self, *args, **kwargs):
        if self.data_ptr() in pinned:
            pinned.discard(self.data_ptr())
            copies.append((args, kwargs))
        return to(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", recorded)
    return copies


def _assert_copied_as_pinned(copies):
    """A copy from pinned memory is worth it only as it is (a dtype conversion on the host makes an unpinned
    tensor first) and without blocking."""
    assert copies, "nothing was copied from pinned memory"
    for args, kwargs in copies:
        assert kwargs.get("non_blocking") is True, (args, kwargs)
        assert "dtype" not in kwargs and not any(isinstance(a, torch.dtype) for a in args), (args, kwargs)


def test_prepare_copies_pinned_clips_to_the_device_without_blocking(monkeypatch):
    """--pin_memory in prepare: each clip was converted to the VAE's dtype on the host and the unpinned result
    copied (an fp32 VAE: pinned, but blocking)."""
    from tools.build_tiny_model import build_pipeline
    from training.prepare_dataset import _encode_batch

    vae = build_pipeline("2b").vae.to(torch.bfloat16)
    copies = _copies_from_pinned_memory(monkeypatch)
    batch = {"index": [0], "prompt": ["a cat"], "video": (torch.rand(1, 9, 3, 32, 32) * 2 - 1).pin_memory()}
    args = SimpleNamespace(save_latents_and_embeddings=True, save_image_latents=False)
    captions = SimpleNamespace(take=lambda prompt: torch.zeros(16, 32))
    (entry,) = _encode_batch(batch, SimpleNamespace(vae=vae), captions, args, torch.bfloat16, torch.device("cpu"))
    assert entry["video_latent_dist"].dtype == torch.bfloat16
    _assert_copied_as_pinned(copies)


@pytest.mark.parametrize("source", ["clips", "control"])
def test_low_vram_encodes_clips_on_the_gpu_without_a_trip_to_the_host(monkeypatch, source):
    """--low_vram (CogVideoX-Fun's guide) keeps the VAE in CPU memory between encodes. The clips, already on the GPU,
    were copied to the VAE's device (the CPU) without blocking and converted there, which can read them before the
    copy has arrived (wrong latents, silently), then copied back for the encode. Now they go to the GPU and the VAE
    comes to them: a training clip and a CogVideoX-Fun control clip."""
    import training.data_source as data_source
    from tools.build_tiny_model import build_pipeline
    from training.conditioning import FunControl
    from training.models import offload_between_uses

    class Copies(TorchDispatchMode):  # (source device, target device, dtype copied, non_blocking) of the clip
        def __init__(self):
            super().__init__()
            self.of_clip = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if func is torch.ops.aten._to_copy.default and tuple(args[0].shape) == tuple(clip.shape):
                target = torch.device(kwargs.get("device") or args[0].device).type
                self.of_clip.append((args[0].device.type, target, args[0].dtype, bool(kwargs.get("non_blocking"))))
            return func(*args, **kwargs)

    vae = build_pipeline("2b").vae.to(torch.bfloat16)
    encoded, encode = [], vae.encode
    vae.encode = lambda x, *args, **kwargs: encoded.append((x.device.type, x.dtype)) or encode(x, *args, **kwargs)
    monkeypatch.setattr(data_source, "encode_prompts", lambda *args: None)
    with fake_cuda(None, loading=True):
        offload_between_uses({"vae": vae.to("cuda")}, "cuda")
        context = SimpleNamespace(vae=vae, device=torch.device("cuda"), tokenizer=None, text_encoder=None,
                                  transformer_config={"max_text_seq_length": 16}, weight_dtype=torch.bfloat16,
                                  vae_scaling_factor=vae.config.scaling_factor)
        clip = torch.empty(1, 9, 3, 32, 32)  # as the loader gives it: fp32, in host memory
        with Copies() as copies:
            if source == "clips":
                latents = data_source.RawClips().encode({"video": clip, "prompt": ["a cat"]}, context)[0]
            else:
                noisy = torch.empty(1, 3, 4, 4, 4, device="cuda", dtype=torch.bfloat16)
                latents = FunControl().model_input(noisy, {"control": clip}, context)
    assert encoded == [("cuda", torch.bfloat16)] and latents.device.type == "cuda"
    # copied once, to the GPU, as loaded (without blocking: from pinned memory with --pin_memory), converted there
    assert copies.of_clip == [("cpu", "cuda", torch.float32, True)]
    assert next(vae.parameters()).device.type == "cpu"  # back in host memory after the encode


def test_after_offloaded_validation_the_low_vram_encoders_stay_in_host_memory():
    """--enable_model_cpu_offload parks the validation pipeline's modules in CPU memory behind hooks; afterwards the
    modules shared with training went to the GPU, the --low_vram encoders too (T5-XXL: 9.5 GB next to the transformer
    until their next call, on the cards --low_vram is for). Now each goes back where training keeps it."""
    from tools.build_tiny_model import build_pipeline
    from training.models import offload_between_uses
    from training.validation import kept_by_training, return_after_offload

    pipe = build_pipeline("2b").to(torch.bfloat16)
    with fake_cuda(None, loading=True):
        pipe.transformer.to("cuda")
        offload_between_uses({"vae": pipe.vae, "text_encoder": pipe.text_encoder}, "cuda")
        shared = kept_by_training(pipe.transformer, (pipe.vae, pipe.text_encoder), torch.device("cuda"))
        pipe.enable_model_cpu_offload(device="cuda")
        assert pipe.transformer.device.type == "cpu" and hasattr(pipe.transformer, "_hf_hook")
        return_after_offload(pipe, shared)
        devices = [module.device.type for module in (pipe.transformer, pipe.vae, pipe.text_encoder)]
    assert devices == ["cuda", "cpu", "cpu"]
    assert not any(hasattr(module, "_hf_hook") for module in (pipe.transformer, pipe.vae, pipe.text_encoder))


def test_an_fp16_run_resumes_its_loss_scale_exactly(monkeypatch, tiny_model_2b, tmp_path):
    """fp16 mixed precision on a GPU (CogVideoX-2b's precision) scales the loss: the scale backs off on each
    overflow, whose step is skipped, and grows after good steps. The checkpoint keeps the scale, so a resumed run
    skips and scales as the run that went on would have, and ends on its weights. The LR schedule advances with the
    steps taken (it advanced on skipped ones too, and torch warned that the schedule stepped before the optimizer)."""
    import json
    import warnings

    from torch.optim.optimizer import register_optimizer_step_post_hook

    scalers = fp16_loss_scaling_on_cpu(monkeypatch, init_scale=2.0**24, growth_interval=1)
    taken = []  # optimizer steps that ran (a skipped step never calls the optimizer)
    hook = register_optimizer_step_post_hook(lambda *args: taken.append(1))
    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, "--height_buckets", "32", "--width_buckets", "32",
                     "--frame_buckets", "9", "--max_train_steps", "4", "--checkpointing_steps", "2",
                     "--mixed_precision", "fp16", "--lr_scheduler", "linear")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_trainer(argv)
    finally:
        hook.remove()
    assert 0 < len(taken) < 4  # some steps overflowed at these scales and were skipped
    schedule = json.loads((output / "checkpoint-4" / "lr_scheduler.json").read_text())
    assert schedule["last_epoch"] == len(taken)
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
    straight, at_checkpoint = lora_weights(output), lora_weights(output / "checkpoint-2")
    assert any(not torch.equal(straight[k], at_checkpoint[k]) for k in straight)  # steps 3 and 4 trained
    # the scale has moved (backed off on overflows, grown after good steps) from where a new scaler starts
    assert json.loads((output / "checkpoint-2" / "grad_scaler.json").read_text())["scale"] != 2.0**24
    run_trainer([*argv, "--resume_from_checkpoint", "checkpoint-2"])
    assert len(scalers) == 2 and scalers[1].get_scale() == scalers[0].get_scale()
    assert all(torch.equal(straight[k], v) for k, v in lora_weights(output).items())


def test_image_to_video_training_copies_the_pinned_first_frame_without_blocking(monkeypatch):
    from tools.build_tiny_model import build_pipeline
    from training.conditioning import ImageToVideo

    vae = build_pipeline("5b-i2v").vae.to(torch.bfloat16)
    copies = _copies_from_pinned_memory(monkeypatch)
    context = SimpleNamespace(device=torch.device("cpu"), vae=vae, vae_scaling_factor=vae.config.scaling_factor,
                              vae_invert_scale_latents=False, training=SimpleNamespace(noised_image_dropout=0.0))
    batch = {"image": torch.rand(1, 1, 3, 32, 32).pin_memory()}
    model_input = ImageToVideo().model_input(torch.zeros(1, 3, 4, 4, 4, dtype=torch.bfloat16), batch, context)
    assert model_input.shape == (1, 3, 8, 4, 4)
    _assert_copied_as_pinned(copies)


# ----------------------------------------------------------------------------------------------- adapter types
@pytest.mark.parametrize("lora_type", ["lora", "dora", "loha", "lokr"])
def test_each_adapter_type_runs_under_cuda_autocast(lora_type):
    """The trainer's layout on a GPU (frozen base in bf16, adapters in fp32 master weights) through a forward under
    CUDA bf16 autocast: DoRA's weight norm, LoHa's Hadamard and LoKr's Kronecker products meet bf16 base weights and
    bf16 activations there. (The CUDA layer runs without autograd: the backward of these layers runs on CPU in
    tests/test_adapter_types.py.)"""
    from training.modes import LoRA, cast_frozen
    from training.sections import LoraFlags, TrainingFlags

    transformer = _tiny_transformer("5b")
    mode = LoRA()
    mode.prepare(transformer, TrainingFlags(seed=0, master_weight_dtype="fp32"),
                 LoraFlags(rank=4, lora_alpha=4, lora_type=lora_type, lora_target_modules="to_q,to_v,ff.net.2"))
    cast_frozen(transformer, torch.bfloat16)
    for module in transformer.modules():  # LoHa/LoKr's module dropout branches on a value, which fake tensors lack
        if type(module).__module__.startswith(("peft.tuners.loha", "peft.tuners.lokr")):
            module.eval()
    with fake_cuda(torch.bfloat16):
        out = _forward(transformer)
    assert out.device.type == "cuda"
    trained = {name: p for name, p in transformer.named_parameters() if p.requires_grad}
    assert trained and {(p.device.type, p.dtype) for p in trained.values()} == {("cuda", torch.float32)}
    leaves = {"lora": "lora_A", "dora": "lora_magnitude_vector", "loha": "hada_w1_a", "lokr": "lokr_w1"}
    assert any(f".{leaves[lora_type]}." in name for name in trained), sorted(trained)[:4]  # that adapter ran


# ----------------------------------------------------------------------------------------------- recipe on the GPU
@pytest.mark.parametrize("scheme", ["uniform", "logit_normal", "mode", "stratified"])
def test_timestep_draws_and_loss_weights_stay_on_the_gpu(scheme):
    """Each --timestep_sampling scheme draws long timesteps on the GPU, and each --loss_weighting weighs them there
    in fp32 with the scheduler's CPU schedule (a CPU tensor indexed by CUDA timesteps would fail on a GPU)."""
    import diffusers.training_utils  # noqa: F401  imported before the GPU is faked, as in a trainer
    from diffusers import CogVideoXDPMScheduler

    from tools.build_tiny_model import SCHEDULER_CONFIG
    from training.args import parse_args
    from training.sections import run_flags
    from training.timesteps import LOSS_WEIGHTINGS, draw_timesteps, loss_weights

    training = run_flags(parse_args(["--pretrained_model_name_or_path", "unused", "--timestep_sampling", scheme,
                                     "--min_timestep", "100", "--max_timestep", "900"])).training
    scheduler = CogVideoXDPMScheduler(**SCHEDULER_CONFIG)
    gpu = torch.device("cuda", 0)
    indexed = []  # the devices of every tensor an index op reads: one device each, as CUDA requires

    class IndexDevices(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.index.Tensor:
                indexed.append({args[0].device.type, *(i.device.type for i in args[1] if i is not None)})
            return func(*args, **(kwargs or {}))

    with fake_cuda(None, loading=True), IndexDevices():
        timesteps = draw_timesteps(training, 4, scheduler.config.num_train_timesteps, gpu)
        assert (timesteps.device, timesteps.dtype, tuple(timesteps.shape)) == (gpu, torch.long, (4,))
        for weighting in LOSS_WEIGHTINGS:
            weights = loss_weights(weighting, None, scheduler, timesteps, gpu)
            assert (weights.device, weights.dtype, tuple(weights.shape)) == (gpu, torch.float32, (4,)), weighting
    assert indexed and all(devices == {"cuda"} for devices in indexed), indexed


@pytest.mark.parametrize("on_cpu", [False, True], ids=["ema-on-gpu", "ema-on-cpu"])
def test_the_ema_of_gpu_weights_updates_swaps_and_saves(on_cpu):
    """--ema_decay with bf16 LoRA weights on the GPU: the average is fp32, on the GPU or (--ema_on_cpu) in CPU
    memory; an update, the swap in for validation (and back) and the saved state dict run with the weights where
    they are, and the weights keep their device and dtype."""
    from training.ema import EMA

    gpu = torch.device("cuda", 0)
    with fake_cuda(None, loading=True):
        model = torch.nn.Linear(8, 4, bias=True).to(gpu, torch.bfloat16)
        ema = EMA(list(model.named_parameters()), 0.99, 1, torch.device("cpu") if on_cpu else gpu)
        assert {(a.device.type, a.dtype) for a in ema.average.values()} == {("cpu" if on_cpu else "cuda",
                                                                                torch.float32)}
        ema.update(1)
        with ema.swapped_in():
            assert all((p.device, p.dtype) == (gpu, torch.bfloat16) for p in model.parameters())
        state = ema.state_dict(model)
    assert set(state) == {"weight", "bias"}
    assert all((p.device, p.dtype) == (gpu, torch.bfloat16) for p in model.parameters())
