"""What the README and the docs tell a user, checked against the code: commands, paths and figures."""

import re
import shlex
import subprocess

import pytest
from conftest import ROOT

from training.args import build_parser


DOCS = [ROOT / "README.md", ROOT / "README_zh.md", *(ROOT / "assets").glob("*.md"), *(ROOT / "docs").glob("*.md"),
        *ROOT.glob("*.sh")]


def _readme_block(after_heading, language="bash"):
    """The first fenced code block of `language` after the line `after_heading` in README.md."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(after_heading)
    match = re.compile(rf"```{language}\n(.*?)```", re.S).search(text, start)
    return match.group(1)


def test_no_doc_tells_a_user_to_run_a_cli_that_is_not_installed():
    """huggingface_hub's old `huggingface-cli` is gone from the versions installed; `hf download` takes the options
    the docs use."""
    stale = [str(path.relative_to(ROOT)) for path in DOCS if "huggingface-cli" in path.read_text(encoding="utf-8")]
    assert not stale
    help_text = subprocess.run([str(ROOT / ".venv" / "bin" / "hf"), "download", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--repo-type" in help_text and "--local-dir" in help_text
    assert any("hf download" in path.read_text(encoding="utf-8") for path in DOCS)


def _dry_run_commands(script, **env):
    import os

    result = subprocess.run(["bash", str(ROOT / script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DRY_RUN": "1", **env})
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if ".py" in line]


def _trainer_flags(command):
    (position,) = [i for i, word in enumerate(command) if word.endswith(".py")]
    return command[position], build_parser().parse_args(command[position + 1 :])


def test_the_readme_training_command_is_what_the_sweep_script_runs():
    """Step 3's "underlying command" is the first run `DRY_RUN=1` prints for step 3's own command line, and step 4
    loads the LoRA from that run's output folder."""
    step_3 = _readme_block("### 3. Train")
    environment = dict(word.split("=", 1) for word in shlex.split(step_3.splitlines()[0]) if "=" in word)
    first = _dry_run_commands("train_text_to_video_lora.sh", **environment)[0]
    shown = shlex.split(_readme_block("The underlying command").replace("\\\n", " "))
    assert shown[:2] == ["accelerate", "launch"] and first[1:2] == ["launch"]
    script, ours = _trainer_flags(shown)
    expected_script, expected = _trainer_flags(first)
    assert script == str(expected_script).removeprefix(str(ROOT) + "/")
    expected = {k: v for k, v in vars(expected).items()}
    for key in ("data_root", "output_dir"):  # the script makes them absolute
        expected[key] = str(expected[key]).removeprefix(str(ROOT) + "/")
    assert vars(ours) == expected
    inference = _readme_block("### 4. Inference", "python")
    assert f'pipe.load_lora_weights("{ours.output_dir}"' in inference


@pytest.mark.parametrize("readme", ["README.md", "README_zh.md"])
def test_figures_quoted_in_the_readmes_are_those_of_docs_memory(readme):
    """The original's reported peaks and the estimate's accuracy appear with the same values everywhere."""
    memory = (ROOT / "docs" / "memory.md").read_text(encoding="utf-8")
    text = (ROOT / readme).read_text(encoding="utf-8")
    original = re.search(r"CogVideoX-5b LoRA (\d+\.\d) (?:during )?training", memory).group(1)
    assert original == "20.8"  # the original README's memory_before_validation (batch 1, rank 64, checkpointing)
    assert f"5b LoRA {original} / 30.3 / 38.7" in text
    ratios = [float(r) for r in re.findall(r"\| (\d\.\d{3}) \|\n", memory)]
    assert ratios and f"{min(ratios):.3f}-{max(ratios):.3f}" in text


def _table_rows(text, header_start):
    """The cells of each row of the markdown table whose header line starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def test_the_readme_memory_table_is_the_estimate_table_of_docs_memory():
    """Each row of the README's estimate table (both languages) carries the figures of the docs/memory.md row for the
    same model, mode and options (the README names only the options beyond rank 64 and gradient checkpointing; fp32
    master weights are the default)."""
    docs = {(model, mode, batch, options): figures for model, mode, _, batch, options, *figures, _ in
            _table_rows((ROOT / "docs" / "memory.md").read_text(encoding="utf-8"), "| model | mode |")}
    english = _table_rows((ROOT / "README.md").read_text(encoding="utf-8"), "| configuration | training |")
    chinese = _table_rows((ROOT / "README_zh.md").read_text(encoding="utf-8"), "| 配置 |")
    assert len(english) == len(chinese) >= 7
    for (label, *figures), (_, *figures_zh) in zip(english, chinese):
        model = re.match(r"CogVideoX-(\S+) ", label).group(1)
        mode = "lora" if " LoRA" in label else "sft"
        base = "--rank 64 --gradient_checkpointing" if mode == "lora" else "--gradient_checkpointing"
        options = " ".join([base, *re.findall(r"`([^`]+)`", label)])
        assert docs[(model, mode, "1", options)] == figures == figures_zh, label


@pytest.mark.parametrize("readme", ["README.md", "README_zh.md"])
def test_the_readme_example_config_is_a_complete_5b_lora_run(readme, tmp_path, capsys):
    """The config in "One run, one config" (the same in both languages) is read by the trainer as it stands, and its
    commands parse; the flags beside --config override it."""
    from training.args import parse_args

    text = (ROOT / readme).read_text(encoding="utf-8")
    start = text.index("#### One run, one config" if readme == "README.md" else "#### 一次运行，一个配置文件")
    config = re.compile(r"```toml\n(.*?)```", re.S).search(text, start).group(1)
    english = (ROOT / "README.md").read_text(encoding="utf-8")
    assert config in english
    (tmp_path / "run.toml").write_text(config, encoding="utf-8")
    args = parse_args(["--config", str(tmp_path / "run.toml")])
    assert args.pretrained_model_name_or_path == "THUDM/CogVideoX-5b" and args.rank == 64 and args.load_tensors
    assert args.gradient_checkpointing and args.optimizer == "adamw" and args.frame_buckets == [49]
    commands = re.compile(r"```bash\n(.*?)```", re.S).search(text, start).group(1).splitlines()
    for line in commands:
        words = shlex.split(line, comments=True)
        words = [str(tmp_path / "run.toml") if w == "run.toml" else w for w in words]
        if words[0].startswith("CONFIG="):
            continue  # the sweep: tests/test_scripts.py
        args = parse_args([w for w in words[words.index(next(w for w in words if w.endswith(".py"))) + 1:]
                           if w != "--print_config"])
        assert args.rank == 64
        if "--learning_rate" in words:
            assert args.learning_rate == 3e-4 and args.output_dir == "outputs/lr3e-4"
