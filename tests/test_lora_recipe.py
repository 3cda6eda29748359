"""--init_lora starts a run from an existing LoRA (any form, rank and alpha from the file, a misfit stopped before
training); --loraplus_lr_ratio trains the B matrices at R times the learning rate."""

import json
import re

import pytest
import torch
from conftest import ASSETS, lora_argv, lora_weights, run_trainer, stopped_run_stderr
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def _effect(transformer):
    """{module: the weight change its adapter applies (scale x B @ A)}, from the prepared model itself."""
    effect = {}
    for name, module in transformer.named_modules():
        if hasattr(module, "lora_A") and "default" in module.lora_A:
            down, up = module.lora_A["default"].weight, module.lora_B["default"].weight
            effect[name] = module.scaling["default"] * (up.double().flatten(1) @ down.double().flatten(1))
    return effect


def _file_effect(path, alpha_when_absent=None):
    """{module: scale x up @ down} as the file's consumers apply it (a file without alpha: scale 1)."""
    from training.lora_formats import read_lora_file

    adapters, unmapped, _ = read_lora_file(path)
    assert not unmapped
    return {m: a.delta().double().flatten(1) for m, a in adapters.items()}


def _prepared(model, **lora):
    from diffusers import CogVideoXTransformer3DModel

    from training.args import build_parser
    from training.modes import LoRA
    from training.sections import run_flags

    transformer = CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer")
    argv = ["--pretrained_model_name_or_path", model, "--data_root", "x", "--output_dir", "y"]
    for key, value in lora.items():
        argv += [f"--{key}", str(value)]
    flags = run_flags(build_parser().parse_args(argv))
    LoRA().prepare(transformer, flags.training, flags.lora)
    return transformer


def _original_form(trained_file, path):
    """The file the original trainer wrote: the diffusers keys, no alpha anywhere (consumers use scale 1)."""
    save_file(load_file(trained_file), str(path))
    return path


@pytest.mark.parametrize("form", ["diffusers", "comfyui", "original"])
def test_init_lora_starts_from_the_given_lora_in_each_form(trained_lora, tmp_path, form):
    output = trained_lora["output"]
    path = {"diffusers": output / "pytorch_lora_weights.safetensors",
            "comfyui": output / "pytorch_lora_weights_comfyui.safetensors",
            "original": tmp_path / "original.safetensors"}[form]
    if form == "original":
        _original_form(output / "pytorch_lora_weights.safetensors", path)
    # --rank and --lora_alpha given differently: the file's own shape wins.
    transformer = _prepared(trained_lora["model"], init_lora=path, rank=16, lora_alpha=1)
    effect, expected = _effect(transformer), _file_effect(path)
    assert set(effect) == set(expected) and len(effect) == 4  # to_q/k/v/out.0 of the tiny model's one block
    for module, change in expected.items():
        torch.testing.assert_close(effect[module], change, rtol=1e-6, atol=1e-9)
    ranks = {m.lora_A["default"].weight.shape[0] for m in transformer.modules() if hasattr(m, "lora_A")}
    scales = {m.scaling["default"] for m in transformer.modules() if hasattr(m, "lora_A")}
    assert ranks == {4} and scales == ({1.0} if form == "original" else {8 / 4})  # trained with --rank 4 --lora_alpha 8


def test_a_run_from_init_lora_saves_it_unchanged_when_nothing_is_learned(trained_lora, tmp_path):
    """Step 0 of the new run is the given LoRA: at a learning rate too small to change an fp32 weight, the run's
    own file is that LoRA, shape and all."""
    given = trained_lora["output"] / "pytorch_lora_weights_comfyui.safetensors"
    output = tmp_path / "out"
    run_trainer(lora_argv(trained_lora["model"], ASSETS, output, "--max_train_steps", "1", "--learning_rate", "1e-30",
                          "--rank", "16", "--lora_alpha", "1", "--init_lora", given, "--mixed_precision", "no"))
    saved, original = lora_weights(output), lora_weights(trained_lora["output"])
    assert set(saved) == set(original)
    for key in original:
        torch.testing.assert_close(saved[key].float(), original[key].float(), rtol=0, atol=0)
    with safe_open(str(output / "pytorch_lora_weights.safetensors"), "pt") as f:
        metadata = json.loads(f.metadata()["lora_adapter_metadata"])
    assert metadata["transformer.r"] == 4 and metadata["transformer.lora_alpha"] == 8
    summary = json.loads((output / "summary.json").read_text())
    assert summary["adapter"] == {"adapter": "lora", "rank": 4, "alpha": 8, "target modules": "4 modules", "started from": str(given)}
    assert f"| started from | {given} |" in (output / "README.md").read_text()


def _misfit(trained_file, path, change):
    state = load_file(trained_file)
    save_file(dict(change(k, v) for k, v in state.items()), str(path))
    return path


def _deeper(key, tensor):
    return key.replace("transformer_blocks.0.", "transformer_blocks.7."), tensor


def _wider(key, tensor):
    return key, torch.cat([tensor, tensor], dim=1) if ".lora_A." in key else tensor


def _foreign(key, tensor):
    return key.replace("attn1.to_q", "attn9.to_q"), tensor


@pytest.mark.parametrize("change, message", [
    (_deeper, r"this model has no transformer_blocks\.7\.attn1\.to_\w+"),
    (_wider, r"lora_A\.weight has shape \(4, 32\), which does not fit this model's transformer_blocks\.\d\.attn1"),
    (_foreign, r"2 tensor\(s\) fit no CogVideoX transformer module"),
    (None, r"no such file"),
], ids=["deeper", "wider", "foreign", "missing"])
def test_an_init_lora_that_does_not_fit_is_one_line_before_training(trained_lora, tmp_path, capsys, change, message):
    path = tmp_path / "given.safetensors"
    if change is not None:
        _misfit(trained_lora["output"] / "pytorch_lora_weights.safetensors", path, change)
    stderr = stopped_run_stderr(capsys, lora_argv(trained_lora["model"], ASSETS, tmp_path / "out",
                                                  "--max_train_steps", "1", "--init_lora", path))
    error = "\n".join(stderr)
    lines = [line for line in stderr if "error:" in line]
    assert len(lines) == 1 and re.search(message, lines[0]), error
    assert not list((tmp_path / "out").glob("*.safetensors")) and not list((tmp_path / "out").glob("checkpoint-*"))


def test_loraplus_trains_the_b_matrices_at_r_times_the_learning_rate(trained_lora, monkeypatch, tmp_path):
    """The optimizer holds A at --learning_rate and B at R x it, the schedule keeps the ratio, and one AdamW step
    moves each matrix by its own rate (AdamW's first step is lr x sign(grad) where the gradient is nonzero). From a
    trained LoRA, so that A's gradient is not zero (a fresh B is)."""
    import training.core as core

    seen = {}
    build = core.build_models_and_optimizer

    def recording_build(job):
        trainer = build(job)
        named = dict(trainer.transformer.named_parameters())
        ids = {id(p): n for n, p in named.items()}
        seen["groups"] = [([ids[id(p)] for p in g["params"]], g["lr"]) for g in trainer.optimizer.param_groups]
        seen["before"] = {n: p.detach().clone() for n, p in named.items() if p.requires_grad}
        seen["trainer"] = trainer
        return trainer

    monkeypatch.setattr(core, "build_models_and_optimizer", recording_build)
    run_trainer(lora_argv(trained_lora["model"], ASSETS, tmp_path / "out", "--max_train_steps", "1",
                          "--learning_rate", "1e-3", "--loraplus_lr_ratio", "16", "--lr_scheduler", "constant",
                          "--mixed_precision", "no", "--epsilon", "1e-30", "--weight_decay", "0",
                          "--max_grad_norm", "1e9",
                          "--init_lora", trained_lora["output"] / "pytorch_lora_weights.safetensors"))
    (a_names, a_lr), (b_names, b_lr) = seen["groups"]
    assert a_lr == pytest.approx(1e-3) and b_lr == pytest.approx(16e-3)
    assert a_names and all(".lora_A." in n for n in a_names) and all(".lora_B." in n for n in b_names)
    assert len(a_names) == len(b_names) == 4
    after = {n: p.detach() for n, p in seen["trainer"].transformer.named_parameters() if p.requires_grad}
    for name, start in seen["before"].items():
        moved = (after[name] - start).abs()
        rate = 16e-3 if ".lora_B." in name else 1e-3
        torch.testing.assert_close(moved[moved > 0], torch.full_like(moved[moved > 0], rate), rtol=1e-3, atol=0)
        assert (moved > 0).any()


def test_dry_run_counts_the_init_lora_rank_not_the_flag(trained_lora, tmp_path):
    """The plan (and so the memory estimate and --train_batch_size auto) prepares the adapter from the file."""
    def plan(*extra):
        return run_trainer(lora_argv(trained_lora["model"], ASSETS, tmp_path / "out", "--dry_run", "--height_buckets",
                                     "32", "--width_buckets", "32", "--frame_buckets", "9", *extra))["dry_run"]

    given = trained_lora["output"] / "pytorch_lora_weights.safetensors"
    from_file = plan("--rank", "16", "--init_lora", given, "--caption_dropout_rate", "0.1")
    assert from_file["trainable_parameters"] == plan("--rank", "4")["trainable_parameters"]
    # the plan names the recipe as the model card will
    assert from_file["recipe"]["started from"] == str(given) and from_file["recipe"]["rank"] == 4
    assert from_file["recipe"]["caption dropout"] == 0.1
    assert from_file["trainable_parameters"] < plan("--rank", "16")["trainable_parameters"]


def test_a_run_with_init_lora_and_loraplus_resumes_bit_for_bit(trained_lora, tmp_path):
    """The optimizer's two groups and the started-from adapter come back from a checkpoint exactly."""
    import shutil

    def argv(output, steps):
        return lora_argv(trained_lora["model"], ASSETS, output, "--max_train_steps", steps, "--checkpointing_steps",
                         "1", "--mixed_precision", "no", "--loraplus_lr_ratio", "4",
                         "--init_lora", trained_lora["output"] / "pytorch_lora_weights_comfyui.safetensors")

    run_trainer(argv(tmp_path / "reference", "2"))
    (tmp_path / "run").mkdir()
    shutil.copytree(tmp_path / "reference" / "checkpoint-1", tmp_path / "run" / "checkpoint-1")
    run_trainer([*argv(tmp_path / "run", "2"), "--resume_from_checkpoint", "latest"])
    ours, reference = lora_weights(tmp_path / "run"), lora_weights(tmp_path / "reference")
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    started = lora_weights(trained_lora["output"])
    assert any(not torch.equal(started[k].float(), reference[k].float()) for k in reference)  # it did train


@pytest.mark.parametrize("lora_type", ["lora", "loha"])
def test_conv_rank_sets_the_rank_of_the_targeted_convolutions_only(tiny_model_2b, lora_type):
    """CogVideoX 1.0's patch_embed.proj is a Conv2d: --conv_rank is its rank, --rank the linears'; a LoRA's file says
    so in its rank_pattern, so diffusers rebuilds the same shapes."""
    from training.modes import adapter_metadata

    transformer = _prepared(tiny_model_2b, rank=4, conv_rank=2, lora_type=lora_type,
                            lora_target_modules="to_q,patch_embed.proj")
    ranks = {name: module.r["default"] for name, module in transformer.named_modules()
             if "default" in getattr(module, "r", {})}
    assert ranks == {"patch_embed.proj": 2, "transformer_blocks.0.attn1.to_q": 4}
    if lora_type == "lora":
        assert adapter_metadata(transformer)["rank_pattern"] == {"patch_embed.proj": 2}
