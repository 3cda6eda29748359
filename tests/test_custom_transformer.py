"""--transformer_config / --transformer_ckpt_path: a transformer of another size, for full fine-tuning, the memory
estimate and the benchmark (a lab sizing a larger model before renting GPUs)."""

import json
import logging

import pytest
import yaml
from conftest import ASSETS, lora_argv, run_trainer, trainer_main
from safetensors.torch import load_file


SFT = "cogvideox_text_to_video_sft"


def bigger_config(model, tmp_path, **changes):
    """The tiny model's transformer with one block more (and any other changes), as a YAML file."""
    config = json.loads((tmp_path.parent / model / "transformer" / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    config.update(num_layers=config["num_layers"] + 1, **changes)
    path = tmp_path / "transformer.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, config


def test_a_larger_transformer_starts_from_the_weights_that_fit_and_trains(caplog, tiny_model_2b, tmp_path):
    path, config = bigger_config(tiny_model_2b, tmp_path)
    base = f"{tiny_model_2b}/transformer"
    output = tmp_path / "run"
    argv = lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "2", "--learning_rate", "1e-30",
                     "--transformer_config", path, "--transformer_ckpt_path", base)
    plan = run_trainer([*argv, "--dry_run"], main=trainer_main(SFT))["dry_run"]
    from diffusers import CogVideoXTransformer3DModel

    built = CogVideoXTransformer3DModel.from_config(config)
    assert plan["transformer_parameters"] == sum(p.numel() for p in built.parameters())  # the estimate's model

    with caplog.at_level(logging.INFO, logger="cogvideox_factory"):
        run_trainer(argv, main=trainer_main(SFT))
    saved = json.loads((output / "transformer" / "config.json").read_text())
    assert saved["num_layers"] == config["num_layers"]  # the trained model has the new size
    messages = "\n".join(record.getMessage() for record in caplog.records)
    block = f"transformer_blocks.{config['num_layers'] - 1}."
    assert "tensors loaded" in messages and f"initialised at random (not in {base}" in messages and block in messages
    # Every tensor the checkpoint had is where training started (learning rate ~0: nothing moved).
    trained = {k: v for f in (output / "transformer").glob("*.safetensors") for k, v in load_file(f).items()}
    original = load_file(f"{base}/diffusion_pytorch_model.safetensors")
    assert all((trained[k].float() - original[k].float()).abs().max() < 1e-6 for k in original)
    assert any(k.startswith(block) for k in trained) and not any(k.startswith(block) for k in original)


def test_custom_transformer_mistakes_are_one_line_each(capsys, tiny_model_2b, tmp_path):
    path, _ = bigger_config(tiny_model_2b, tmp_path, text_embed_dim=48)
    cases = [
        (SFT, ["--transformer_config", path], "text_embed_dim is 48, but the pipeline's T5 gives 32"),
        ("cogvideox_text_to_video_lora", ["--transformer_config", path], "--transformer_config is for full fine-tuning"),
        (SFT, ["--transformer_ckpt_path", tmp_path], "--transformer_ckpt_path goes with --transformer_config"),
    ]
    (tmp_path / "typo.yaml").write_text("num_layer: 3\n")
    cases.append((SFT, ["--transformer_config", tmp_path / "typo.yaml"], "CogVideoXTransformer3DModel takes no "
                                                                         "num_layer"))
    for trainer, flags, message in cases:
        with pytest.raises(SystemExit) as exit_:
            run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "run", *flags), main=trainer_main(trainer))
        err = capsys.readouterr().err
        assert exit_.value.code == 2 and message in err and "Traceback" not in err, err


def test_the_benchmark_and_the_estimate_take_the_custom_transformer(tmp_path):
    from benchmarks.benchmark_training import model_spec

    config = dict(model_spec("5b", "full").transformer, num_layers=60, num_attention_heads=64)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    (tmp_path / "30b.json").write_text(json.dumps(config))
    spec = model_spec("5b", "full", ["--rank", "64", "--transformer_config", tmp_path / "30b.json"])
    assert spec.transformer["num_layers"] == 60 and spec.transformer["num_attention_heads"] == 64
    assert model_spec("5b", "full").transformer["num_layers"] == 42  # the published one is left alone
