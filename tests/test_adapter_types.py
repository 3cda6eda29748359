"""--lora_type dora|loha|lokr: each trains, its saved form reproduces the last validation, it resumes bit for bit,
its ComfyUI file changes every weight as peft's adapter does (through ComfyUI's own arithmetic), and the estimate
counts its extra weights."""

import json
import shutil

import pytest
import torch
from conftest import (
    ASSETS,
    TINY_VALIDATION_FLAGS,
    generate,
    lora_argv,
    run_trainer,
    stopped_run_stderr,
    tiny_pipeline,
    transformer_output,
)
from safetensors.torch import load_file


TYPES = ["dora", "loha", "lokr"]
# Square (attention) and non-square (feed-forward) layers: DoRA's scale and LoKr's factors differ between them.
TARGETS = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2"


def _argv(model, output, lora_type, *extra):
    return lora_argv(model, ASSETS, output, "--lora_type", lora_type, "--lora_target_modules", TARGETS,
                     "--mixed_precision", "no", *extra)


@pytest.fixture(scope="module", params=TYPES)
def adapter_run(request, tiny_model_2b, tmp_path_factory):
    """One run per type: 2 steps, a checkpoint after each, validation at step 2 (and the parity check at the end)."""
    output = tmp_path_factory.mktemp(f"adapter-{request.param}")
    summary = run_trainer(_argv(tiny_model_2b, output, request.param, "--max_train_steps", "2",
                                "--checkpointing_steps", "1", "--validation_prompt", "a cat walks on the grass",
                                "--validation_steps", "2", *TINY_VALIDATION_FLAGS))
    return {"type": request.param, "model": tiny_model_2b, "output": output, "summary": summary}


def _saved_adapter(run, folder=None):
    """The run's final adapter as the mode reads it back (diffusers file or peft folder), keyed by peft's names."""
    from diffusers import CogVideoXPipeline

    from training.modes import LoRA

    mode = LoRA()
    mode.adapter_type = run["type"]
    return mode._saved(folder or run["output"], CogVideoXPipeline)


def test_each_type_saves_its_forms_and_they_reproduce_the_validation(adapter_run):
    output, kind = adapter_run["output"], adapter_run["type"]
    assert adapter_run["summary"]["parity"] == {"max_abs_difference": 0.0, "exact": True}
    assert adapter_run["summary"]["adapter"]["adapter"] == kind
    from training.lora_formats import _split_leaf

    leaves = {_split_leaf(key)[1] for key in _saved_adapter(adapter_run)}
    if kind == "dora":
        assert leaves == {"lora_A.weight", "lora_B.weight", "lora_magnitude_vector"}
    elif kind == "loha":
        assert leaves == {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"}
    else:
        assert all(leaf.startswith("lokr_") for leaf in leaves)
        assert {leaf[:7] for leaf in leaves} == {"lokr_w1", "lokr_w2"}
    if kind == "dora":
        assert (output / "pytorch_lora_weights.safetensors").is_file() and not (output / "adapter").exists()
    else:  # diffusers reads neither: a peft folder instead
        assert (output / "adapter" / "adapter_config.json").is_file()
        assert not (output / "pytorch_lora_weights.safetensors").exists()
        assert json.loads((output / "adapter" / "adapter_config.json").read_text())["peft_type"] == kind.upper()
    assert (output / "pytorch_lora_weights_comfyui.safetensors").is_file()
    card = (output / "README.md").read_text()
    assert ("load_peft_folder" in card) == (kind != "dora")


def test_each_type_resumes_bit_for_bit(adapter_run, tmp_path):
    """From the step-1 checkpoint, in a fresh folder, to step 2: the same adapter as the uninterrupted run."""
    run = tmp_path / "run"
    run.mkdir()
    shutil.copytree(adapter_run["output"] / "checkpoint-1", run / "checkpoint-1")
    run_trainer(_argv(adapter_run["model"], run, adapter_run["type"], "--max_train_steps", "2",
                      "--resume_from_checkpoint", "latest"))
    ours, reference = _saved_adapter(adapter_run, run), _saved_adapter(adapter_run)
    assert ours.keys() == reference.keys() and all(torch.equal(ours[k], reference[k]) for k in ours)
    # and training did move it since step 1: the comparison could fail
    step1 = _saved_adapter(adapter_run, adapter_run["output"] / "checkpoint-1")
    assert any(not torch.equal(step1[k], reference[k]) for k in reference)


# ------------------------------------------------------------------------------------------------ ComfyUI
# ComfyUI's patch arithmetic, written from its code (comfy/weight_adapter/lora.py, loha.py, lokr.py and base.py's
# weight_decompose, as of ComfyUI 0.3.x / 2026): `weight` is the model's weight in fp32, strength 1.0.


def _comfyui_weight_decompose(dora_scale, weight, lora_diff, alpha):
    lora_diff = lora_diff * alpha
    weight_calc = weight + lora_diff
    if dora_scale.shape[0] == weight_calc.shape[0]:  # output axis: ComfyUI takes the norm of the base weight
        weight_norm = weight.reshape(weight.shape[0], -1).norm(dim=1, keepdim=True)
        weight_norm = weight_norm.reshape(weight.shape[0], *[1] * (weight.dim() - 1))
    else:
        weight_norm = (weight_calc.transpose(0, 1).reshape(weight_calc.shape[1], -1).norm(dim=1, keepdim=True)
                       .reshape(weight_calc.shape[1], *[1] * (weight_calc.dim() - 1)).transpose(0, 1))
    weight_norm = weight_norm + torch.finfo(weight.dtype).eps
    return weight_calc * (dora_scale / weight_norm)


def _comfyui_patch(weight, file, prefix):
    """What ComfyUI's calculate_weight makes of `weight` from the file's entries for the module `prefix`."""
    get = lambda leaf: file.get(f"{prefix}.{leaf}")  # noqa: E731
    alpha = get("alpha")
    alpha = None if alpha is None else alpha.item()
    if get("lora_up.weight") is not None:
        up, down = get("lora_up.weight").float(), get("lora_down.weight").float()
        scale = alpha / down.shape[0] if alpha is not None else 1.0
        diff = (up.flatten(1) @ down.flatten(1)).reshape(weight.shape)
        if get("dora_scale") is not None:
            return _comfyui_weight_decompose(get("dora_scale").float(), weight, diff, scale)
        return weight + scale * diff
    if get("hada_w1_a") is not None:
        scale = alpha / get("hada_w1_b").shape[0] if alpha is not None else 1.0
        m1 = get("hada_w1_a").float() @ get("hada_w1_b").float()
        m2 = get("hada_w2_a").float() @ get("hada_w2_b").float()
        return weight + scale * (m1 * m2).reshape(weight.shape)
    w1, dim = get("lokr_w1"), None
    if w1 is None:
        dim, w1 = get("lokr_w1_b").shape[0], get("lokr_w1_a").float() @ get("lokr_w1_b").float()
    w2 = get("lokr_w2")
    if w2 is None:
        dim, w2 = get("lokr_w2_b").shape[0], get("lokr_w2_a").float() @ get("lokr_w2_b").float()
    scale = alpha / dim if alpha is not None and dim is not None else 1.0
    return weight + scale * torch.kron(w1.float(), w2.float()).reshape(weight.shape)


def test_each_types_comfyui_file_changes_every_weight_as_peft_does(adapter_run):
    """Every adapted module: ComfyUI's patched weight against peft's merged weight (the adapter the run trained,
    loaded back from its own saved form); max error under 1e-3 of the largest change."""
    from training.lora_formats import COMFYUI_PREFIX, native_module
    from training.modes import ADAPTER_NAME, LoRA

    output = adapter_run["output"]
    comfy = load_file(output / "pytorch_lora_weights_comfyui.safetensors")
    pipe = tiny_pipeline(adapter_run["model"])
    base = {name: module.weight.detach().float().clone() for name, module in pipe.transformer.named_modules()
            if hasattr(module, "weight") and isinstance(module, torch.nn.Linear)}
    mode = LoRA()
    mode.adapter_type = adapter_run["type"]
    mode.apply_to_pipeline(pipe, output)
    adapted = {name: m for name, m in pipe.transformer.named_modules() if ADAPTER_NAME in getattr(m, "scaling", {})}
    assert len(adapted) == 6  # TARGETS in the tiny model's one block
    used = set()
    for name, module in adapted.items():
        module.merge(adapter_names=[ADAPTER_NAME])
        peft_weight = module.get_base_layer().weight.detach().float()
        prefix = COMFYUI_PREFIX + native_module(name)
        used |= {key for key in comfy if key.startswith(prefix + ".")}
        comfy_weight = _comfyui_patch(base[name], comfy, prefix)
        change = (peft_weight - base[name]).abs().max()
        assert change > 0, name
        error = (comfy_weight - peft_weight).abs().max() / change
        assert error < 1e-3, (name, error.item())
    assert used == set(comfy)  # nothing in the file that ComfyUI would not use


@pytest.mark.parametrize("adapter_run", ["loha", "lokr"], indirect=True)  # a DoRA run is a diffusers file
def test_infer_loads_a_peft_folder_run(adapter_run, tmp_path):
    """tools/infer.py --lora_path <run> finds a LoHa/LoKr run's adapter/ (diffusers cannot load it); loaded, it
    changes the video, and at scale 0 the video is the base model's."""
    from training.modes import load_peft_folder, peft_folder_of

    folder = peft_folder_of(adapter_run["output"])
    assert folder == adapter_run["output"] / "adapter"
    base = generate(tiny_pipeline(adapter_run["model"]))
    adapted = tiny_pipeline(adapter_run["model"])
    load_peft_folder(adapted.transformer, folder, "lora")
    with_lora = generate(adapted)
    assert not (with_lora == base).all()
    for module in adapted.transformer.modules():
        if "lora" in getattr(module, "scaling", {}):
            module.set_scale("lora", 0.0)
    assert (generate(adapted) == base).all()


def test_each_type_merges_into_the_base_as_peft_computes_it(adapter_run, tmp_path):
    """tools/merge_lora.py takes a DoRA file and a LoHa/LoKr run: the merged transformer (plain weights, no adapter
    left) computes what the base computes with the run's adapter loaded at the same weight (peft's scale), here 0.5,
    and its ComfyUI file holds those merged weights."""
    from diffusers import CogVideoXTransformer3DModel

    from tools.merge_lora import COMFYUI_MODEL_NAME, main
    from training.lora_formats import native_transformer_state
    from training.modes import ADAPTER_NAME, LoRA

    assert main(["--base", str(adapter_run["model"]), "--lora", f"{adapter_run['output']}:0.5",
                 "--output", str(tmp_path), "--comfyui"]) == 0
    merged = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "transformer")
    assert not [name for name in merged.state_dict() if "base_layer" in name or ADAPTER_NAME in name]
    pipe = tiny_pipeline(adapter_run["model"])
    base = transformer_output(pipe.transformer, 500)
    mode = LoRA()
    mode.adapter_type = adapter_run["type"]
    mode.apply_to_pipeline(pipe, adapter_run["output"])
    for module in pipe.transformer.modules():
        if ADAPTER_NAME in getattr(module, "scaling", {}):
            module.set_scale(ADAPTER_NAME, 0.5)
    expected = transformer_output(pipe.transformer, 500)
    assert (expected - base).abs().max() > 1e-4  # the adapter at 0.5 changes the output
    torch.testing.assert_close(transformer_output(merged, 500), expected, rtol=1e-5, atol=1e-5)
    comfy = load_file(tmp_path / COMFYUI_MODEL_NAME)
    native = native_transformer_state(merged.state_dict())
    assert all(torch.equal(comfy[key], value) for key, value in native.items())


def test_the_other_lora_tools_refuse_these_types_in_one_line(adapter_run, tmp_path, capsys):
    """resize and combine work on a LoRA's low-rank product, which a DoRA, LoHa or LoKr is not: one line naming the
    tool that takes it."""
    from tools import combine_loras, resize_lora

    for main, argv in ((resize_lora.main, [str(adapter_run["output"]), "--rank", "2"]),
                       (combine_loras.main, [f"{adapter_run['output']}:1", f"{adapter_run['output']}:1"])):
        with pytest.raises(SystemExit):
            main([*argv, "--output", str(tmp_path)])
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].endswith("of the LoRA tools only merge_lora.py takes it"), lines
        assert ("a DoRA" in lines[0]) == (adapter_run["type"] == "dora")


@pytest.mark.parametrize("flags, problem", [
    (["--lora_type", "loha", "--loraplus_lr_ratio", "16"], "--loraplus_lr_ratio is for --lora_type lora or dora"),
    (["--lokr_factor", "4"], "--lokr_factor 4: a positive factor, with --lora_type lokr only"),
    (["--lora_type", "dora", "--quantize_base", "fp8"], "--lora_type dora with --quantize_base fp8 is not supported"),
    (["--lora_type", "lokr", "--init_lora", "x.safetensors"], "--init_lora starts a plain LoRA"),
], ids=["loraplus-loha", "lokr-factor-alone", "dora-fp8", "init-lora-lokr"])
def test_an_adapter_flag_that_does_not_apply_is_one_line(tiny_model_2b, tmp_path, capsys, flags, problem):
    stderr = stopped_run_stderr(capsys, lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", "--max_train_steps", "1",
                                                  *flags))
    lines = [line for line in stderr if line.startswith("error:")]
    assert len(lines) == 1 and problem in lines[0], lines


def test_the_estimate_counts_each_types_weights(tiny_model_2b, tmp_path):
    """--dry_run prepares the real adapter: DoRA adds one magnitude per output, LoHa two pairs per module."""
    def trainable(*extra):
        return run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", "--dry_run", "--height_buckets", "32",
                                     "--width_buckets", "32", "--frame_buckets", "9", "--lora_target_modules", TARGETS,
                                     *extra))["dry_run"]["trainable_parameters"]

    from diffusers import CogVideoXTransformer3DModel

    config = CogVideoXTransformer3DModel.load_config(tiny_model_2b, subfolder="transformer")
    width = config["num_attention_heads"] * config["attention_head_dim"]
    ff = 4 * width  # diffusers' FeedForward inner width
    outputs = 4 * width + ff + width  # to_q/k/v/out.0, ff.net.0.proj (GELU: ff outputs), ff.net.2
    lora = trainable()
    assert trainable("--lora_type", "dora") == lora + outputs
    assert trainable("--lora_type", "loha") == 2 * lora


def test_dora_is_refused_under_sharded_weights():
    """Its ComfyUI file needs the whole base weights when saving: one line under FSDP/ZeRO-3, nothing otherwise."""
    from types import SimpleNamespace

    from training.modes import adapter_engine_problems

    sharded, whole = SimpleNamespace(weights_sharded=True), SimpleNamespace(weights_sharded=False)
    problems = adapter_engine_problems(SimpleNamespace(lora_type="dora"), sharded)
    assert len(problems) == 1 and problems[0].startswith("--lora_type dora under sharded weights")
    assert adapter_engine_problems(SimpleNamespace(lora_type="dora"), whole) == []
    assert adapter_engine_problems(SimpleNamespace(lora_type="loha"), sharded) == []
