"""--config: a whole run in one file. The flags a run resolved are written to <output_dir>/config.toml, a run from
that file trains bit for bit the same LoRA, a bad key or value is one line before anything loads, and no token
reaches what a run writes or logs."""

import pytest
import test_bad_inputs
from conftest import ASSETS, lora_argv, lora_weights, run_trainer, tiny_run_config
from test_args import _errors


no_model_file_opened = test_bad_inputs.no_model_file_opened  # the fixture


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return path


def test_a_run_from_the_config_another_run_wrote_trains_the_same_lora(tiny_model_2b, tmp_path):
    first = tmp_path / "first"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, first, "--max_train_steps", "2", "--checkpointing_steps", "1",
                          "--rank", "8", "--lora_alpha", "4", "--resume_from_checkpoint", "latest",
                          "--weight_decay", "0"))  # a zero whose default is not: it must be written too
    written = (first / "config.toml").read_text()
    assert "[lora]\nrank = 8\nlora_alpha = 4\n" in written
    assert "resume_from_checkpoint" not in written and "dry_run" not in written  # how to start, not what the run is
    again = tmp_path / "again"
    run_trainer(["--config", first / "config.toml", "--output_dir", again])  # the command line overrides the file
    assert "output_dir = " + repr(str(again)).replace("'", '"') in (again / "config.toml").read_text()
    first_lora, second_lora = lora_weights(first), lora_weights(again)
    assert first_lora.keys() == second_lora.keys()
    assert all((first_lora[k] == second_lora[k]).all() for k in first_lora)


def test_command_line_flags_override_the_file_and_print_config_shows_the_result(tiny_model_2b, tmp_path, capsys):
    config = tiny_run_config(tmp_path / "run.toml", tiny_model_2b, tmp_path / "out", learning_rate=0.001, rank=16)
    config.write_text(config.read_text() + "[memory]\ngradient_checkpointing = true\n")
    with pytest.raises(SystemExit) as stopped:
        run_trainer(["--config", config, "--rank", "4", "--print_config"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    import tomllib

    resolved = tomllib.loads(printed)
    assert resolved["lora"]["rank"] == 4 and resolved["training"]["learning_rate"] == 0.001
    assert resolved["memory"]["gradient_checkpointing"] is True and resolved["buckets"]["frame_buckets"] == [9]
    assert resolved["optimizer"]["optimizer"] == "adam"  # a default, written out
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("text, expected", [
    ("[lora]\nrnak = 4\n", "[lora] rnak: unknown setting (did you mean rank?)"),
    ("[training]\nlearning_rate = \"fast\"\n", "[training] learning_rate = \"fast\": expected a number"),
    ("[lora]\nrank = 4.5\n", "[lora] rank = 4.5: expected a whole number"),
    ("[memory]\ngradient_checkpointing = \"yes\"\n", "[memory] gradient_checkpointing = \"yes\": expected true or false"),
    ("[buckets]\nframe_buckets = 49\n", "[buckets] frame_buckets = 49: expected a list, e.g. [1, 2]"),
    ("[optimizer]\noptimizer = \"sgd\"\n", "[optimizer] optimizer = \"sgd\": expected one of adam, adamw, prodigy, came"),
    ("[training]\nrank = 4\n", "[training] rank: belongs in [lora]"),
    ("[optimiser]\noptimizer = \"adamw\"\n", "[optimiser]: unknown section (did you mean [optimizer]?)"),
    ("rank = 4\n", "rank = 4 is outside any section"),
    ("[lora\nrank = 4\n", "not valid TOML"),
])
def test_a_bad_config_is_one_line_naming_file_section_and_key(capsys, no_model_file_opened, tiny_model_2b, tmp_path,
                                                               text, expected):
    config = _write(tmp_path / "run.toml", text)
    with no_model_file_opened(tiny_model_2b, expect=()):  # refused at parsing: not even a config file read
        lines = _errors(capsys, lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", "--config", config))
    assert len(lines) == 1 and lines[0].startswith(f"error: --config {config}") and expected in lines[0], lines


def test_yaml_configs_and_other_tools_sections(tiny_model_2b, tmp_path, capsys):
    """The same sections in YAML; [prepare] and [infer] belong to those tools and a trainer passes over them."""
    config = _write(tmp_path / "run.yaml", "lora:\n  lora_target_modules: to_q,to_v\nprepare:\n  batch_size: 3\n"
                                           "infer:\n  lora_scale: 0.5\n")
    with pytest.raises(SystemExit):
        run_trainer(lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", "--config", config, "--print_config"))
    assert '\nlora_target_modules = "to_q,to_v"\n' in capsys.readouterr().out


def test_no_token_reaches_what_a_run_writes_or_its_trackers(tiny_model_2b, tmp_path, monkeypatch):
    import training.backend

    seen = {}
    monkeypatch.setattr(training.backend.Backend, "init_trackers", lambda self, name, config: seen.update(config))
    token = "hf_secretTOKEN123"
    output = tmp_path / "run"
    run_trainer(lora_argv(tiny_model_2b, ASSETS, output, "--max_train_steps", "1", "--hub_token", token,
                          "--report_to", "tensorboard"))
    assert seen and "hub_token" not in seen and token not in repr(seen)
    written = [p for p in output.rglob("*") if p.is_file()]
    assert any(p.name == "config.toml" for p in written)
    leaks = [p for p in written if token.encode() in p.read_bytes()]
    assert not leaks, leaks


def test_prepare_and_infer_read_their_own_sections(tiny_model_2b, tmp_path, capsys):
    """One file for the pipeline: prepare_dataset.py reads [prepare], tools/infer.py [infer]; each passes over the
    trainer's sections and refuses an unknown key of its own."""
    from conftest import run_prepare

    from tools.infer import main as infer_main

    prepared = tmp_path / "prepared"
    config = _write(tmp_path / "pipeline.toml", f'''
[lora]
rank = 8
[prepare]
model_id = "{tiny_model_2b}"
data_root = "{ASSETS}"
caption_column = "prompts.txt"
video_column = "videos.txt"
height_buckets = [32]
width_buckets = [32]
frame_buckets = [9]
max_sequence_length = 16
save_latents_and_embeddings = true
output_dir = "{prepared}"
[infer]
model_name_or_path = "{tiny_model_2b}"
prompt = ["a cat walks", "a dog runs"]
num_inference_steps = 2
''')
    run_prepare(["--config", config])
    assert (prepared / "manifest.json").is_file() and len(list((prepared / "latents").iterdir())) > 0
    with pytest.raises(SystemExit) as stopped:
        infer_main(["--config", str(config), "--num_inference_steps", "3", "--print_config"])
    assert stopped.value.code == 0
    printed = capsys.readouterr().out
    assert '[infer]\nmodel_name_or_path = ' in printed and 'prompt = ["a cat walks", "a dog runs"]' in printed
    assert "num_inference_steps = 3" in printed and "rank" not in printed
    with pytest.raises(SystemExit):  # prompts on the command line replace the file's, they do not add to them
        infer_main(["--config", str(config), "--prompt", "a bird sings", "--print_config"])
    assert 'prompt = ["a bird sings"]' in capsys.readouterr().out
    bad = _write(tmp_path / "bad.toml", "[prepare]\nbatch_sise = 2\n")
    lines = _errors(capsys, ["--config", bad], runner=run_prepare)
    assert lines == [f"error: --config {bad}: [prepare] batch_sise: unknown setting (did you mean batch_size?)"]
