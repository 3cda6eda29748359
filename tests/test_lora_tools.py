"""The LoRA tools: extract (full fine-tune -> LoRA), merge (LoRA -> transformer), resize, combine; and one line for a
file that is missing, not safetensors, not a CogVideoX LoRA or not for the model, from these and from convert_lora.py
and infer.py. The LoRAs here are random (every linear of the tiny 2b model, the Conv2d patch embedding included,
alpha != rank), written by lora_formats; what the tools write is checked against what diffusers' own
load_lora_weights does with the inputs."""

import re

import pytest
import torch
from conftest import tiny_pipeline, transformer_output
from test_comfyui_lora import comfyui_weights


RANK, ALPHA = 4, 6.0


def run(main, *argv):
    """The tool's exit status (a return value or a SystemExit)."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as stop:
        return stop.code


def base_transformer(model):
    from diffusers import CogVideoXTransformer3DModel

    return CogVideoXTransformer3DModel.from_pretrained(model, subfolder="transformer")


def random_lora(model, folder, seed, rank=RANK, alpha=ALPHA):
    """A random LoRA on every module a LoRA can hold, written in both forms; returns {module: Adapter}."""
    from tools.lora_math import lora_modules, write_lora
    from training.lora_formats import Adapter

    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    for key, weight in base_transformer(model).state_dict().items():
        if key[: -len(".weight")] in lora_modules([key]):
            down = torch.randn(rank, *weight.shape[1:], generator=generator) * 0.2
            up = torch.randn(weight.shape[0], rank, *([1] * (weight.dim() - 2)), generator=generator) * 0.2
            adapters[key[: -len(".weight")]] = Adapter(down, up, alpha)
    write_lora(adapters, folder)
    return adapters


@pytest.fixture(scope="module")
def loras(tiny_model_2b, tmp_path_factory):
    folder = tmp_path_factory.mktemp("loras")
    return {name: (folder / name, random_lora(tiny_model_2b, folder / name, seed)) for name, seed in (("a", 1), ("b", 2))}


def with_loras_loaded(model, weighted):
    """The base transformer with diffusers' load_lora_weights of each (folder, weight)."""
    pipe = tiny_pipeline(model)
    names = [f"l{i}" for i in range(len(weighted))]
    for name, (folder, _) in zip(names, weighted):
        pipe.load_lora_weights(str(folder), weight_name="pytorch_lora_weights.safetensors", adapter_name=name)
    pipe.set_adapters(names, [weight for _, weight in weighted])
    return pipe.transformer


def read(folder):
    from training.lora_formats import read_lora_file

    return read_lora_file(folder / "pytorch_lora_weights.safetensors")[0]


def report_rows(text):
    """{module: (rank, energy, error)} of a tool's per-module report."""
    rows = re.findall(r"^(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)$", text, re.M)
    return {module: (int(rank), float(energy), float(error)) for module, rank, energy, error in rows}


# ---------------------------------------------------------------------------------------------- merge


def test_a_merged_transformer_computes_what_the_base_with_the_loras_loaded_computes(tiny_model_2b, loras, tmp_path):
    from diffusers import CogVideoXTransformer3DModel
    from safetensors.torch import load_file

    from tools.merge_lora import main
    from training.lora_formats import native_transformer_state

    (a, _), (b, _) = loras["a"], loras["b"]
    # b given in its ComfyUI form: the merge reads every form
    assert run(main, "--base", tiny_model_2b, "--lora", f"{a}:0.7", "--lora",
               f"{b / 'pytorch_lora_weights_comfyui.safetensors'}:-0.5", "--output", tmp_path, "--comfyui") == 0
    merged = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "transformer")
    expected = transformer_output(with_loras_loaded(tiny_model_2b, [(a, 0.7), (b, -0.5)]))
    base = transformer_output(base_transformer(tiny_model_2b))
    assert (expected - base).abs().max() > 1e-2  # the LoRAs change the output
    torch.testing.assert_close(transformer_output(merged), expected, rtol=1e-4, atol=1e-4)
    comfy = load_file(tmp_path / "transformer_comfyui.safetensors")
    native = native_transformer_state(merged.state_dict())
    # 2b's sincos table, a buffer diffusers does not save: ComfyUI's loader needs it (tests/test_comfyui_lora.py)
    assert torch.equal(comfy.pop("patch_embed.pos_embedding"), merged.patch_embed.pos_embedding.float())
    assert comfy.keys() == native.keys() and all(torch.equal(comfy[k], native[k]) for k in comfy)
    # every weight of ComfyUI's own network (as tests/test_comfyui_lora.py reads its source) is there, shaped so
    expected_weights = comfyui_weights(dict(merged.config))
    weights = {f"diffusion_model.{k}": tuple(v.shape) for k, v in comfy.items() if k.endswith(".weight")}
    assert weights == {k: tuple(v) for k, v in expected_weights.items()}
    assert len(comfy) == len(merged.state_dict())


def test_merge_without_a_lora_writes_the_base_in_comfyuis_names(tiny_model_2b, tmp_path, capsys):
    """--comfyui alone: the base's own tensors in ComfyUI's names (its Load Diffusion Model file), no transformer/
    copy; neither --lora nor --comfyui is one line."""
    from safetensors.torch import load_file

    from tools.merge_lora import main
    from training.lora_formats import native_transformer_state

    assert run(main, "--base", tiny_model_2b, "--output", tmp_path, "--comfyui") == 0
    base = base_transformer(tiny_model_2b)
    comfy = load_file(tmp_path / "transformer_comfyui.safetensors")
    comfy.pop("patch_embed.pos_embedding")
    native = native_transformer_state(base.state_dict())
    assert comfy.keys() == native.keys() and all(torch.equal(comfy[k], native[k]) for k in comfy)
    assert not (tmp_path / "transformer").exists()
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["--base", str(tiny_model_2b), "--output", str(tmp_path / "x")])
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: no --lora to merge"), lines


# ---------------------------------------------------------------------------------------------- extract


def fine_tune(model, folder, rank=None, seed=3):
    """A 'full fine-tune' of the tiny model: every LoRA-able weight changed (by a rank-`rank` product, or at full
    rank), and one bias too (which no LoRA holds). Returns the transformer folder."""
    from tools.lora_math import lora_modules

    transformer = base_transformer(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in lora_modules(transformer.state_dict()):
            weight = transformer.get_submodule(module).weight
            matrix = weight.flatten(1)
            if rank is None:
                change = torch.randn(matrix.shape, generator=generator)
            else:
                change = torch.randn(matrix.shape[0], rank, generator=generator) @ torch.randn(rank, matrix.shape[1],
                                                                                               generator=generator)
            weight += 0.05 * change.reshape(weight.shape)
        transformer.proj_out.bias += 0.1
    transformer.save_pretrained(folder)
    return folder


def differences(model, tuned):
    from diffusers import CogVideoXTransformer3DModel

    from tools.lora_math import lora_modules

    base, after = base_transformer(model).state_dict(), CogVideoXTransformer3DModel.from_pretrained(tuned).state_dict()
    return {m: after[f"{m}.weight"] - base[f"{m}.weight"] for m in lora_modules(base)}


def test_extract_at_full_rank_reproduces_a_full_fine_tune_and_by_energy_keeps_what_it_says(tiny_model_2b, tmp_path,
                                                                                           capsys):
    from tools.extract_lora import main

    tuned = fine_tune(tiny_model_2b, tmp_path / "sft" / "transformer")
    change = differences(tiny_model_2b, tuned)
    full = max(max(d.flatten(1).shape) for d in change.values())
    assert run(main, "--base", tiny_model_2b, "--tuned", tuned, "--rank", full, "--output", tmp_path / "full") == 0
    out = capsys.readouterr().out
    assert "not in the LoRA: 1 changed tensor(s)" in out and "proj_out.bias" in out
    extracted = read(tmp_path / "full")
    assert extracted.keys() == change.keys()
    for module, adapter in extracted.items():
        torch.testing.assert_close(adapter.delta(), change[module], rtol=1e-4, atol=1e-5)

    assert run(main, "--base", tiny_model_2b, "--tuned", tuned, "--energy", "0.8", "--output", tmp_path / "e") == 0
    rows = report_rows(capsys.readouterr().out)
    extracted = read(tmp_path / "e")
    assert len({adapter.rank for adapter in extracted.values()}) > 1  # a rank per module
    for module, adapter in extracted.items():
        rank, energy, error = rows[module]
        assert adapter.rank == rank and energy >= 0.8
        actual = (change[module] - adapter.delta()).norm() / change[module].norm()
        assert abs(actual - error) < 1e-3, module  # the reported error is the error made
    # diffusers loads the per-module ranks (rank_pattern) and applies each module's own update at 1.0
    loaded = with_loras_loaded(tiny_model_2b, [(tmp_path / "e", 1.0)])
    loaded.fuse_lora(lora_scale=1.0)
    base = base_transformer(tiny_model_2b).state_dict()
    for module, adapter in extracted.items():
        fused = loaded.state_dict()[f"{module}.base_layer.weight"] - base[f"{module}.weight"]
        torch.testing.assert_close(fused, adapter.delta(), rtol=1e-4, atol=1e-5)


def test_extract_at_rank_r_reproduces_a_rank_r_change_exactly(tiny_model_2b, tmp_path, capsys):
    from tools.extract_lora import main

    tuned = fine_tune(tiny_model_2b, tmp_path / "sft" / "transformer", rank=3)
    assert run(main, "--base", tiny_model_2b, "--tuned", tuned, "--rank", 3, "--output", tmp_path / "r3") == 0
    rows = report_rows(capsys.readouterr().out)
    assert rows and all(rank == 3 and error < 1e-3 for rank, _, error in rows.values())
    change = differences(tiny_model_2b, tuned)
    for module, adapter in read(tmp_path / "r3").items():
        assert adapter.rank == 3 and adapter.alpha == 3.0
        torch.testing.assert_close(adapter.delta(), change[module], rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_extract_on_a_gpu_writes_what_it_writes_on_the_cpu(tiny_model_2b, tmp_path):
    from tools.extract_lora import main

    tuned = fine_tune(tiny_model_2b, tmp_path / "sft" / "transformer", rank=3)
    for device in ("cpu", "cuda"):
        assert run(main, "--base", tiny_model_2b, "--tuned", tuned, "--rank", 3, "--output", tmp_path / device,
                   "--device", device) == 0
    on_cpu, on_gpu = read(tmp_path / "cpu"), read(tmp_path / "cuda")
    assert on_cpu.keys() == on_gpu.keys()
    for module, adapter in on_cpu.items():
        torch.testing.assert_close(on_gpu[module].delta(), adapter.delta(), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------- resize, combine


def test_resize_to_its_own_rank_is_lossless_and_lower_ranks_report_their_error(loras, tmp_path, capsys):
    from tools.resize_lora import main

    folder, adapters = loras["a"]
    assert run(main, folder / "pytorch_lora_weights_comfyui.safetensors", "--rank", RANK, "--output", tmp_path / "same") == 0
    capsys.readouterr()
    for module, adapter in read(tmp_path / "same").items():
        torch.testing.assert_close(adapter.delta(), adapters[module].delta(), rtol=1e-4, atol=1e-5)
    assert run(main, folder, "--rank", 2, "--output", tmp_path / "r2") == 0
    rows = report_rows(capsys.readouterr().out)
    for module, adapter in read(tmp_path / "r2").items():
        original = adapters[module].delta()
        assert adapter.rank == rows[module][0] == 2
        actual = float((original - adapter.delta()).norm() / original.norm())
        assert 0.01 < actual and abs(actual - rows[module][2]) < 1e-3, module
        # the best rank-2 approximation (Eckart-Young): its error is that of the dropped singular values
        s = torch.linalg.svdvals(original.flatten(1))
        assert abs(actual - float(s[2:].norm() / s.norm())) < 1e-4


def test_combining_equals_loading_both_loras_at_their_weights(tiny_model_2b, loras, tmp_path):
    from tools.combine_loras import main

    (a, _), (b, _) = loras["a"], loras["b"]
    assert run(main, f"{a}:0.7", f"{b / 'pytorch_lora_weights_comfyui.safetensors'}:-0.5", "--output", tmp_path) == 0
    assert {adapter.rank for adapter in read(tmp_path).values()} == {2 * RANK}
    expected = transformer_output(with_loras_loaded(tiny_model_2b, [(a, 0.7), (b, -0.5)]))
    combined = transformer_output(with_loras_loaded(tiny_model_2b, [(tmp_path, 1.0)]))
    torch.testing.assert_close(combined, expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------- bad files


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    from safetensors.torch import save_file

    from training.lora_formats import Adapter, save_comfyui

    folder = tmp_path_factory.mktemp("bad")
    (folder / "text.safetensors").write_text("not a tensor file")
    save_file({"encoder.layer.0.weight": torch.zeros(2, 2)}, str(folder / "model.safetensors"))
    save_comfyui({"transformer_blocks.0.attn1.to_q": Adapter(torch.zeros(2, 7), torch.zeros(7, 2), 2.0)},
                 folder / "other_model.safetensors")  # a CogVideoX LoRA of another width
    return {"missing": (folder / "nothing.safetensors", "no such file"),
            "text": (folder / "text.safetensors", "not a safetensors file"),
            "model": (folder / "model.safetensors", "not a CogVideoX LoRA"),
            "other": (folder / "other_model.safetensors", "does not fit")}


def one_error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_each_tool_refuses_a_wrong_or_missing_file_with_one_line(tiny_model_2b, bad_files, tmp_path, capsys):
    from tools import combine_loras, convert_lora, infer, merge_lora, resize_lora

    commands = {
        "convert": lambda path: (convert_lora.main, path, tmp_path / "out"),
        "infer": lambda path: (infer.main, "--model_name_or_path", tiny_model_2b, "--lora_path", path, "--prompt", "a"),
        "merge": lambda path: (merge_lora.main, "--base", tiny_model_2b, "--lora", f"{path}:0.5", "--output", tmp_path),
        "resize": lambda path: (resize_lora.main, path, "--rank", 2, "--output", tmp_path / "out"),
        "combine": lambda path: (combine_loras.main, f"{path}:1", "--output", tmp_path / "out"),
    }
    for tool, command in commands.items():
        for case, (path, message) in bad_files.items():
            if case == "other" and tool != "merge":
                continue  # only merge knows the model
            if tool == "convert":  # its own wording since before
                message = {"missing": "is not a file", "model": "not a LoRA this tool knows"}.get(case, message)
            main, *argv = command(path)
            assert run(main, *argv) == 2, (tool, case)
            assert message in one_error_line(capsys), (tool, case)
    assert not (tmp_path / "out").exists() and not (tmp_path / "transformer").exists()


def test_extract_refuses_a_fine_tune_of_another_model_and_missing_folders(tiny_models, tmp_path, capsys):
    from tools.extract_lora import main

    other = f"{tiny_models('5b')}/transformer"
    tiny_models("2b")
    capsys.readouterr()  # building them
    assert run(main, "--base", tiny_models("2b"), "--tuned", other, "--rank", 2, "--output", tmp_path / "x") == 2
    assert "does not fit" in one_error_line(capsys)
    assert run(main, "--base", tiny_models("2b"), "--tuned", tmp_path, "--rank", 2, "--output", tmp_path / "x") == 2
    assert "neither a pipeline folder" in one_error_line(capsys)
    assert run(main, "--base", tiny_models("2b"), "--tuned", other, "--energy", 1.5, "--output", tmp_path / "x") == 2
    assert "--energy 1.5" in one_error_line(capsys)
    assert not (tmp_path / "x").exists()


def test_infer_refuses_a_transformer_path_that_is_not_a_transformer_folder(tiny_model_2b, tmp_path, capsys):
    """A missing or empty --transformer_path is one line before anything loads (not diffusers' Hub traceback)."""
    from tools import infer

    for path in (tmp_path / "missing", tmp_path):
        argv = ("--model_name_or_path", tiny_model_2b, "--transformer_path", path, "--prompt", "a")
        assert run(infer.main, *argv) == 2, path
        assert f"--transformer_path {path}: no transformer folder there" in one_error_line(capsys)
