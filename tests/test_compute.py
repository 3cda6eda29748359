"""--fp8_training and --regional_compile (training/compute.py): what they change in the model, that training with
them follows training without them, and their flag errors; --pin_memory, the copy lever (CUDA only)."""

import pytest
import torch
from conftest import ASSETS, lora_argv, lora_weights, run_trainer, trainer_main, transformer_weights
from cuda_semantics import fp8_kernel_on_cuda_rules
from test_args import _errors


ONE_BUCKET = ["--height_buckets", "32", "--width_buckets", "32", "--frame_buckets", "9", "--max_train_steps", "2"]


def test_fp8_layers_are_the_blocks_linear_layers_under_lora():
    """Base layers of the blocks become Float8Linear, LoRA wraps them, nothing outside the blocks changes, and the
    state dict (what checkpoints and the saved files hold) keeps its names."""
    from diffusers import CogVideoXTransformer3DModel
    from peft import LoraConfig

    from tools.build_tiny_model import VARIANTS
    from training.compute import use_fp8_matmuls

    config = dict(num_attention_heads=2, in_channels=4, out_channels=4, time_embed_dim=4, text_embed_dim=32,
                  num_layers=2, sample_width=8, sample_height=8, sample_frames=9, max_text_seq_length=16,
                  use_learned_positional_embeddings=False, **VARIANTS["5b"]["transformer"])
    transformer = CogVideoXTransformer3DModel(**config)
    names = set(transformer.state_dict())
    use_fp8_matmuls(transformer, weights_train=False)
    assert set(transformer.state_dict()) == names
    fp8 = {name for name, m in transformer.named_modules() if type(m).__name__ == "Float8Linear"}
    linear = {name for name, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    assert fp8 and all(name.startswith("transformer_blocks.") for name in fp8)
    modules = dict(transformer.named_modules())
    left = {name for name in linear - fp8 if name.startswith("transformer_blocks.")}
    assert left and all(modules[name].in_features % 16 for name in left)  # the AdaLN linears: 4 inputs here
    transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    base = dict(transformer.named_modules())["transformer_blocks.0.attn1.to_q"]
    assert type(base.base_layer).__name__ == "Float8Linear" and type(base.lora_A["default"]).__name__ == "Linear"


def _fp8_backward(model, x, monkeypatch):
    """(input gradient, weight gradients, matmuls in the backward pass) of a sum of squares through `model`."""
    matmuls, mm = [], torch.mm
    out = model(x).pow(2).sum()
    monkeypatch.setattr(torch, "mm", lambda *a, **k: matmuls.append(1) or mm(*a, **k))
    out.backward()
    monkeypatch.setattr(torch, "mm", mm)
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    return x.grad, grads, len(matmuls)


@pytest.mark.parametrize("frozen", [True, False], ids=["lora-base", "trained"])
def test_fp8_frozen_layers_compute_only_the_input_gradient(monkeypatch, frozen):
    """Under LoRA the FP8 base layers are frozen: torchao's backward computed their weights' gradients anyway (two
    matmuls per layer instead of one). Now one, giving bit for bit torchao's input gradient; a trained layer runs
    torchao's own backward."""
    import copy

    from training.compute import use_fp8_matmuls
    from training.optional_libraries import use_torchao

    use_torchao()  # `import training` hides it
    import torchao.float8.float8_linear as float8_linear
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    torch.manual_seed(0)
    layers = torch.nn.Sequential(torch.nn.Linear(32, 48), torch.nn.Linear(48, 64)).requires_grad_(not frozen)
    plain = torch.nn.ModuleDict({"transformer_blocks": layers})  # where use_fp8_matmuls converts layers
    ours = use_fp8_matmuls(copy.deepcopy(plain), weights_train=not frozen)["transformer_blocks"]
    config = Float8LinearConfig(pad_inner_dim=not frozen)  # trained layers pad the tokens' side (8 here) to 16
    reference = convert_to_float8_training(copy.deepcopy(plain), config=config)["transformer_blocks"]
    # only the weight gradient's matmul pads (zeros: the same numbers as torchao padding every matmul)
    assert [tuple(layer.linear_mm_config[i].pad_inner_dim for i in range(3)) for layer in ours] == \
        [(False, False, not frozen)] * 2
    assert all(type(m).__name__ == "Float8Linear" for m in (*ours, *reference))
    x = torch.randn(8, 32, requires_grad=True)
    grad, weight_grads, matmuls = _fp8_backward(ours, x, monkeypatch)
    x.grad = None
    with monkeypatch.context() as torchao_own:
        installed = float8_linear.matmul_with_hp_or_float8_args
        own = installed.__bases__[0] if getattr(installed, "skips_frozen_weights", False) else installed
        torchao_own.setattr(float8_linear, "matmul_with_hp_or_float8_args", own)
        expected, expected_weight_grads, expected_matmuls = _fp8_backward(reference, x, monkeypatch)
    assert torch.equal(grad, expected)
    assert all(torch.equal(a, b) for a, b in zip(weight_grads, expected_weight_grads))
    assert (matmuls, expected_matmuls) == ((2, 4) if frozen else (4, 4))


def test_fp8_training_follows_plain_training(tiny_model_5b, tmp_path, caplog, monkeypatch):
    """Same seed: the loss after two steps within FP8's rounding of the plain run's; the LoRA trains and has the
    plain run's tensors (names and shapes), so it loads wherever that one does. Every FP8 matmul keeps the CUDA
    kernel's rules."""
    import logging

    plain = run_trainer(lora_argv(tiny_model_5b, ASSETS, tmp_path / "plain", *ONE_BUCKET))
    kernel_calls = fp8_kernel_on_cuda_rules(monkeypatch)
    with caplog.at_level(logging.INFO, logger="cogvideox_factory"):
        fp8 = run_trainer(lora_argv(tiny_model_5b, ASSETS, tmp_path / "fp8", *ONE_BUCKET, "--fp8_training"))
    assert "FP8 matmuls in 6 linear layers of the transformer blocks" in caplog.text  # q, k, v, out, 2 feed-forward
    # two steps: six forwards, and the input's gradient of the three layers after a trained adapter (to_out, the
    # feed-forward's two); the base weights are frozen, so no weight's gradient
    assert len(kernel_calls) == 2 * (6 + 3)
    assert fp8["final_loss"] == pytest.approx(plain["final_loss"], rel=0.02)
    assert fp8["final_loss"] != plain["final_loss"]  # it did compute in FP8
    expected, got = lora_weights(tmp_path / "plain"), lora_weights(tmp_path / "fp8")
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in expected.items()}
    assert all(v.abs().max() > 0 for k, v in got.items() if "lora_B" in k)


def test_fp8_full_fine_tuning_keeps_the_cuda_kernels_rules(tiny_model_5b, tmp_path, monkeypatch):
    """Full fine-tuning trains the FP8 layers' weights, and a weight's gradient is a matmul over the batch's tokens
    (here 2 clips x (16 text + 12 video tokens) = 56); CUDA's FP8 kernel takes only inner sides that are multiples
    of 16, so the first backward stopped on a GPU. The token side is now padded to 64, and the run follows plain
    training."""
    sft = trainer_main("cogvideox_text_to_video_sft")

    def argv(output, *extra):
        flags = lora_argv(tiny_model_5b, ASSETS, output, *ONE_BUCKET, *extra)
        for lora_flag in ("--rank", "--lora_alpha"):
            del flags[flags.index(lora_flag):flags.index(lora_flag) + 2]
        return flags

    plain = run_trainer(argv(tmp_path / "plain"), sft)
    kernel_calls = fp8_kernel_on_cuda_rules(monkeypatch)
    fp8 = run_trainer(argv(tmp_path / "fp8", "--fp8_training"), sft)
    weight_gradients = [call for call in kernel_calls if call[0][1] == 64]  # (out, tokens) @ (tokens, in)
    assert len(weight_gradients) == 2 * 6 and len(kernel_calls) == 2 * 6 * 3
    assert fp8["final_loss"] == pytest.approx(plain["final_loss"], rel=0.02) and fp8["final_loss"] != plain["final_loss"]
    base, expected, got = (transformer_weights(folder)
                           for folder in (tiny_model_5b, tmp_path / "plain", tmp_path / "fp8"))
    for name in ("transformer_blocks.0.attn1.to_q.weight", "transformer_blocks.0.ff.net.2.weight"):
        plain_update, fp8_update = expected[name] - base[name], got[name] - base[name]
        assert (fp8_update - plain_update).norm() < 0.3 * plain_update.norm(), name  # FP8 rounding moves a few


@pytest.mark.slow  # inductor compiles the block (C++ on this CPU): about 30 s
def test_regional_compile_trains_what_eager_trains(tiny_model_5b, tmp_path, caplog):
    import logging

    eager = run_trainer(lora_argv(tiny_model_5b, ASSETS, tmp_path / "eager", *ONE_BUCKET))
    with caplog.at_level(logging.INFO, logger="cogvideox_factory"):
        compiled = run_trainer(lora_argv(tiny_model_5b, ASSETS, tmp_path / "compiled", *ONE_BUCKET,
                                         "--regional_compile"))
    assert "compiling each of the 1 transformer blocks on first use" in caplog.text
    assert compiled["final_loss"] == pytest.approx(eager["final_loss"], rel=1e-4)
    expected = lora_weights(tmp_path / "eager")
    for name, value in lora_weights(tmp_path / "compiled").items():
        torch.testing.assert_close(value, expected[name], rtol=1e-3, atol=1e-5)


def test_compute_flag_errors(capsys, tiny_model_2b, tmp_path, monkeypatch):
    def problems(*extra):
        return _errors(capsys, lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", *extra))

    assert problems("--compile_mode", "max-autotune") == ["error: --compile_mode goes with --regional_compile"]
    assert problems("--fp8_training", "--quantize_base", "fp8") == [
        "error: --fp8_training with --quantize_base fp8: the base weights would be stored quantized and computed in "
        "FP8 again; use one of them"]
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "INDUCTOR")  # what compiled_1.yaml gives accelerate launch
    assert problems("--regional_compile") == [
        "error: --regional_compile with an accelerate config that compiles the whole model (dynamo_backend, e.g. "
        "compiled_1.yaml): use one of them (uncompiled_1.yaml with --regional_compile)"]


def test_pin_memory_reaches_the_training_loader_where_cuda_is(monkeypatch):
    """--pin_memory: batches go to page-locked memory (then copied with non_blocking=True) when there is a CUDA device
    to copy to; without one, pinning does nothing and is not asked for."""
    from types import SimpleNamespace

    from training.data_source import build_dataloader

    dataset = SimpleNamespace(bucket_keys=[(9, 32, 32)] * 4)
    backend = SimpleNamespace(data_parallel_size=1, data_parallel_rank=0)

    def loader(pin, cuda):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
        return build_dataloader(dataset, backend, {(9, 32, 32): 2}, seed=0, num_workers=0, pin_memory=pin)[0]

    assert loader(pin=True, cuda=True).pin_memory
    assert not loader(pin=False, cuda=True).pin_memory and not loader(pin=True, cuda=False).pin_memory


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU: pinned memory and asynchronous copies "
                    "exist only for CUDA devices (on a CPU --pin_memory is not used)")
def test_pinned_asynchronous_copies_train_what_plain_copies_train(tiny_model_2b, tmp_path):
    """The copies change when data reaches the GPU, not what arrives: the same LoRA, bit for bit."""
    runs = {}
    for name, extra in (("plain", []), ("pinned", ["--pin_memory"])):
        runs[name] = run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / name, *ONE_BUCKET, *extra))
    assert runs["plain"]["final_loss"] == runs["pinned"]["final_loss"]
    plain, pinned = lora_weights(tmp_path / "plain"), lora_weights(tmp_path / "pinned")
    assert plain.keys() == pinned.keys() and all(torch.equal(plain[k], pinned[k]) for k in plain)
