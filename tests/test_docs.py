"""What the README and the docs tell a user, checked against the code: commands, paths, links and figures, in both
languages (README.md / README_zh.md, docs/<page>.md / docs/zh/<page>.md)."""

import importlib
import os
import re
import shlex
import subprocess

import pytest
from conftest import ROOT

from training.args import build_parser


READMES = [ROOT / "README.md", ROOT / "README_zh.md"]
PAGES = sorted((ROOT / "docs").glob("*.md")) + sorted((ROOT / "docs" / "zh").glob("*.md"))
DOCS = [*READMES, ROOT / "CONTRIBUTING.md", *(ROOT / "assets").glob("*.md"), *PAGES, *ROOT.glob("*.sh")]
MARKDOWN = [path for path in DOCS if path.suffix == ".md"]
# (English, Chinese): the README and every docs/ page that has a translation in docs/zh/.
TRANSLATED = [(ROOT / "README.md", ROOT / "README_zh.md")] + [
    (page, ROOT / "docs" / "zh" / page.name) for page in sorted((ROOT / "docs").glob("*.md"))
    if (ROOT / "docs" / "zh" / page.name).exists()]


def _rel(path):
    return str(path.relative_to(ROOT))


def _text(path):
    return path.read_text(encoding="utf-8")


def _block(path, after, language="bash", index=0):
    """The index-th fenced code block of `language` after the first line that starts with `after` in `path`."""
    text = _text(path)
    start = re.compile(rf"^{re.escape(after)}", re.M).search(text).start()
    return re.compile(rf"```{language}\n(.*?)```", re.S).findall(text[start:])[index]


def _code_blocks(text):
    """(language, code) of every fenced block; indented blocks (inside list items) are dedented."""
    blocks = []
    for indent, language, code in re.findall(r"^( *)```(\w*)\n(.*?)^\1```", text, re.M | re.S):
        blocks.append((language, "\n".join(line[len(indent):] for line in code.splitlines())))
    return blocks


def _command_lines(code):
    """The shell commands of a bash block: continuation lines joined, comments and blank lines dropped."""
    code = code.replace("\\\n", " ")
    return [line for line in (shlex.join(shlex.split(raw, comments=True)) if raw.strip() else "" for raw in
                              code.splitlines()) if line]


def test_no_doc_tells_a_user_to_run_a_cli_that_is_not_installed():
    """huggingface_hub's old `huggingface-cli` is gone from the versions installed; `hf download` takes the options
    the docs use."""
    stale = [_rel(path) for path in DOCS if "huggingface-cli" in _text(path)]
    assert not stale
    help_text = subprocess.run([str(ROOT / ".venv" / "bin" / "hf"), "download", "--help"], capture_output=True,
                               text=True, timeout=120).stdout
    assert "--repo-type" in help_text and "--local-dir" in help_text
    assert any("hf download" in _text(path) for path in DOCS)


def _dry_run_commands(script, **env):
    result = subprocess.run(["bash", str(ROOT / script)], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "DRY_RUN": "1", **env})
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if ".py" in line]


def _trainer_flags(command):
    (position,) = [i for i, word in enumerate(command) if word.endswith(".py")]
    return command[position], build_parser().parse_args(command[position + 1 :])


def _environment(command_line):
    """The VAR=value words in front of a command line."""
    words = shlex.split(command_line)
    return dict(word.split("=", 1) for word in words[: next(i for i, w in enumerate(words) if "=" not in w)])


@pytest.mark.parametrize("language", ["", "zh/"])
def test_the_training_page_command_is_what_the_sweep_script_runs(language):
    """docs/training.md: the "underlying command" is the first run `DRY_RUN=1` prints for the page's own sweep command
    line, and docs/inference.md loads the LoRA from that run's output folder (both languages)."""
    training = ROOT / "docs" / f"{language}training.md"
    heading = "## The sweep scripts" if not language else "## 遍历脚本及其运行的命令"
    sweep = _block(training, heading)
    first = _dry_run_commands("train_text_to_video_lora.sh", **_environment(sweep.splitlines()[0]))[0]
    shown = shlex.split(_block(training, heading, index=1).replace("\\\n", " "))
    assert shown[:2] == ["accelerate", "launch"] and first[1:2] == ["launch"]
    script, ours = _trainer_flags(shown)
    expected_script, expected = _trainer_flags(first)
    assert script == str(expected_script).removeprefix(str(ROOT) + "/")
    expected = {k: v for k, v in vars(expected).items()}
    for key in ("data_root", "output_dir"):  # the script makes them absolute
        expected[key] = str(expected[key]).removeprefix(str(ROOT) + "/")
    assert vars(ours) == expected
    inference = _block(ROOT / "docs" / f"{language}inference.md", "## diffusers", "python")
    assert f'pipe.load_lora_weights("{ours.output_dir}"' in inference


@pytest.mark.parametrize("readme", READMES, ids=lambda path: path.name)
def test_the_quickstart_trains_one_run_on_the_users_own_data_and_loads_it(readme, tmp_path):
    """README's quickstart: prepare writes the folder training reads, with the user's id token; training is one run
    (not the original's 4-run grid) with that token in every validation prompt and none of the example's prompts; the
    diffusers snippet loads the LoRA from that run's folder and prompts with the token."""
    from training.prepare_dataset import build_parser as prepare_parser

    text = _text(readme)
    blocks = [code for language, code in _code_blocks(text) if language == "bash"]
    prepare_lines = [line for block in blocks for line in _command_lines(block) if "prepare_dataset.sh" in line]
    (train_line,) = [line for block in blocks for line in _command_lines(block) if "train_text_to_video_lora.sh" in line]
    assert len(prepare_lines) == 2 and "--dry_run" in _environment(prepare_lines[0])["EXTRA_ARGS"]
    prepared = {}
    for line in prepare_lines:
        env = {k: v for k, v in _environment(line).items()}
        (command,) = _dry_run_commands("prepare_dataset.sh", **env)
        position = next(i for i, word in enumerate(command) if word.endswith("prepare_dataset.py"))
        prepared[line] = prepare_parser().parse_args(command[position + 1 :])
    dry, real = prepared[prepare_lines[0]], prepared[prepare_lines[1]]
    assert dry.dry_run and not real.dry_run and vars(dry) | {"dry_run": False} == vars(real)
    environment = _environment(train_line)
    assert {"ID_TOKEN", "VALIDATION_PROMPT", "LEARNING_RATES", "OPTIMIZERS", "MAX_TRAIN_STEPS"} <= set(environment)
    (run,) = _dry_run_commands("train_text_to_video_lora.sh", **environment)
    _, flags = _trainer_flags(run)
    token = environment["ID_TOKEN"]
    assert real.id_token == flags.id_token == token != "BW_STYLE"
    assert os.path.basename(real.output_dir) == os.path.basename(flags.data_root) == environment["DATA_ROOT"]
    prompts = flags.validation_prompt.split(flags.validation_prompt_separator)
    assert prompts and all(prompt.startswith(token + " ") for prompt in prompts)
    assert flags.load_tensors and flags.max_train_steps == int(environment["MAX_TRAIN_STEPS"])
    output_dir = str(flags.output_dir).removeprefix(str(ROOT) + "/")
    assert f"`{output_dir}/`" in text  # step 5 names the run folder
    (snippet,) = [code for language, code in _code_blocks(text) if language == "python"]
    assert f'pipe.load_lora_weights("{output_dir}"' in snippet and f'pipe("{token} ' in snippet
    caption = next(line for block in blocks for line in _command_lines(block) if "caption_videos.py" in line)
    caption_flags = importlib.import_module("tools.caption_videos").build_parser().parse_args(shlex.split(caption)[2:])
    # captions go where prepare reads them: prompts.txt and videos.txt in the folder of clips
    assert os.path.basename(caption_flags.input_dir) == os.path.basename(real.data_root)
    assert caption_flags.output == "lists" and (real.caption_column, real.video_column) == ("prompts.txt", "videos.txt")


def _sweep_rows(path):
    """{script: [training, validation, final test, card]} from the sweep-defaults table of a memory page."""
    rows = {}
    for line in _text(path).splitlines():
        match = re.match(r"\| `(train_\w+\.sh)` \|[^|]*\| ([\d.-]+) \| ([\d.-]+) \| ([\d.-]+) \| (\d+) GB \|", line)
        if match:
            rows[match.group(1)] = list(match.groups()[1:])
    return rows


def test_the_sweep_defaults_tables_agree_with_the_scripts_and_the_readmes():
    """docs/memory.md's table of the sweep scripts' defaults is the same in both languages, names the card each
    script's header names, every estimate fits that card's budget, and the READMEs quote the text-to-video LoRA row
    (tests/test_presets.py recomputes the estimates)."""
    from benchmarks.estimate_presets import budget_bytes

    english, chinese = _sweep_rows(ROOT / "docs" / "memory.md"), _sweep_rows(ROOT / "docs" / "zh" / "memory.md")
    assert english == chinese and len(english) >= 3
    for script, (*figures, card) in english.items():
        assert re.search(rf"^# Fits one {card} GB GPU with these defaults", _text(ROOT / script), re.M), script
        assert all(float(f) < budget_bytes(int(card)) / 2**30 for f in figures if f != "-"), script
    training, validation, _, card = english["train_text_to_video_lora.sh"]
    assert f"estimated {training} GiB in training and {validation} GiB in validation, a {card} GB card" in \
        _text(ROOT / "README.md")
    assert f"估算训练 {training} GiB、验证\n{validation} GiB，一张 {card} GB 的显卡" in _text(ROOT / "README_zh.md")


@pytest.mark.parametrize("page", ["docs/memory.md", "docs/zh/memory.md"])
def test_figures_quoted_in_the_memory_pages_are_those_of_docs_memory(page):
    """The original's reported peaks and the estimate's accuracy appear with the same values everywhere."""
    memory = _text(ROOT / "docs" / "memory.md")
    text = _text(ROOT / page)
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


def test_the_memory_glance_table_is_the_estimate_table_of_docs_memory():
    """Each row of the at-a-glance table (both languages) carries the figures of the docs/memory.md row for the same
    model, mode and options (it names only the options beyond rank 64 and gradient checkpointing; fp32 master
    weights are the default)."""
    docs = {(model, mode, batch, options): figures for model, mode, _, batch, options, *figures, _ in
            _table_rows(_text(ROOT / "docs" / "memory.md"), "| model | mode |")}
    english = _table_rows(_text(ROOT / "docs" / "memory.md"), "| configuration | training |")
    chinese = _table_rows(_text(ROOT / "docs" / "zh" / "memory.md"), "| 配置 |")
    assert len(english) == len(chinese) >= 7
    for (label, *figures), (_, *figures_zh) in zip(english, chinese):
        model = re.match(r"CogVideoX-(\S+) ", label).group(1)
        mode = "lora" if " LoRA" in label else "sft"
        base = "--rank 64 --gradient_checkpointing" if mode == "lora" else "--gradient_checkpointing"
        options = " ".join([base, *re.findall(r"`([^`]+)`", label)])
        assert docs[(model, mode, "1", options)] == figures == figures_zh, label


@pytest.mark.parametrize("page", ["docs/training.md", "docs/zh/training.md"])
def test_the_example_config_is_a_complete_5b_lora_run(page, tmp_path):
    """The config in "One run, one config" (the same in both languages) is read by the trainer as it stands, and its
    commands parse; the flags beside --config override it."""
    from training.args import parse_args

    heading = "## One run, one config" if "zh" not in page else "## 一次运行，一个配置文件"
    config = _block(ROOT / page, heading, "toml")
    assert config == _block(ROOT / "docs" / "training.md", "## One run, one config", "toml")
    (tmp_path / "run.toml").write_text(config, encoding="utf-8")
    args = parse_args(["--config", str(tmp_path / "run.toml")])
    assert args.pretrained_model_name_or_path == "THUDM/CogVideoX-5b" and args.rank == 64 and args.load_tensors
    assert args.gradient_checkpointing and args.optimizer == "adamw" and args.frame_buckets == [49]
    for line in _block(ROOT / page, heading).splitlines():
        words = shlex.split(line, comments=True)
        words = [str(tmp_path / "run.toml") if w == "run.toml" else w for w in words]
        if words[0].startswith("CONFIG="):
            continue  # the sweep: tests/test_scripts.py
        args = parse_args([w for w in words[words.index(next(w for w in words if w.endswith(".py"))) + 1:]
                           if w != "--print_config"])
        assert args.rank == 64
        if "--learning_rate" in words:
            assert args.learning_rate == 3e-4 and args.output_dir == "outputs/lr3e-4"


# --------------------------------------------------------------------------------------------------- links


def _slug(heading):
    """GitHub's anchor for a heading: lower case, punctuation (ASCII and CJK) dropped, spaces to hyphens."""
    heading = re.sub(r"`|\*\*", "", heading.strip()).lower()
    return re.sub(r"[^\w\- ]", "", heading).replace(" ", "-")


def _anchors(path):
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)
    return {_slug(heading) for heading in re.findall(r"^#{1,6} (.+)$", text, re.M)}


def _links(path):
    """(target, anchor) of every relative markdown link and image outside code."""
    text = re.sub(r"```.*?```", "", _text(path), flags=re.S)
    text = re.sub(r"`[^`\n]*`", "", text)
    links = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        links.append((file, anchor))
    return links


@pytest.mark.parametrize("path", MARKDOWN, ids=_rel)
def test_every_link_in_the_docs_resolves(path):
    """A relative link or picture names a file of the repository, and an anchor names a heading of its page."""
    broken = []
    for file, anchor in _links(path):
        target = (path.parent / file).resolve() if file else path
        if not target.exists():
            broken.append(f"{file} (no such file)")
        elif anchor and target.suffix == ".md" and anchor not in _anchors(target):
            broken.append(f"{file}#{anchor} (no such heading)")
    assert not broken, f"{_rel(path)}: {broken}"


def test_the_readmes_link_every_docs_page_and_stay_short():
    """Both READMEs stay under 200 lines, show a picture that exists, and link every docs/ page in their language
    (the Chinese one the English page where there is no translation)."""
    for readme, prefix in ((ROOT / "README.md", "docs/"), (ROOT / "README_zh.md", "docs/zh/")):
        assert len(_text(readme).splitlines()) < 200, readme.name
        linked = {file for file, _ in _links(readme)}
        assert any(file.endswith(".png") for file in linked), f"{readme.name}: no picture"
        for page in sorted((ROOT / "docs").glob("*.md")):
            translated = ROOT / prefix / page.name
            wanted = f"{prefix}{page.name}" if translated.exists() else f"docs/{page.name}"
            assert wanted in linked, f"{readme.name} does not link {wanted}"


def test_every_docs_page_has_its_translation():
    """docs/<page>.md and docs/zh/<page>.md come in pairs (flags.md, generated from the parser, is English only) and
    link each other."""
    english = {page.name for page in (ROOT / "docs").glob("*.md")} - {"flags.md"}
    chinese = {page.name for page in (ROOT / "docs" / "zh").glob("*.md")}
    assert english == chinese
    for name in english:
        assert f"](zh/{name})" in _text(ROOT / "docs" / name) and f"](../{name})" in _text(ROOT / "docs" / "zh" / name)


# ----------------------------------------------------------------------------------- both languages agree


def _numbers(text):
    """The numbers of the prose (code blocks and link targets left out)."""
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    text = re.sub(r"\]\([^)]*\)", "]", text)
    return set(re.findall(r"(?<![\w.])\d+(?:\.\d+)?(?![\d.]*\d)", text))


def _commands(text):
    """Every fenced block with its comments dropped (comments are translated, commands are not)."""
    blocks = []
    for language, code in _code_blocks(text):
        if language in ("bash", "python", "toml", "yaml", ""):
            code = "\n".join(re.sub(r"(^|\s+)#.*$", "", line).rstrip() for line in code.splitlines())
        blocks.append((language, code.strip()))
    return blocks


@pytest.mark.parametrize("english, chinese", TRANSLATED, ids=lambda path: _rel(path))
def test_both_languages_carry_the_same_commands_and_numbers(english, chinese):
    en, zh = _text(english), _text(chinese)
    assert _commands(en) == _commands(zh)
    if english.name == "memory.md":  # the Chinese page is the part users need; the English one also explains it
        missing = _numbers(zh) - _numbers(en) - _numbers(_text(ROOT / "README.md"))
        assert not missing, f"{_rel(chinese)} has numbers its English page lacks: {sorted(missing)}"
    else:
        assert _numbers(en) == _numbers(zh), (sorted(_numbers(en) - _numbers(zh)), sorted(_numbers(zh) - _numbers(en)))


# ------------------------------------------------------------------------------- every command parses

# The parser of each Python entry point a doc may show.
PARSERS = {
    "training/prepare_dataset.py": lambda: importlib.import_module("training.prepare_dataset").build_parser(),
    **{f"training/cogvideox_{kind}_{mode}.py": build_parser for kind in ("text_to_video", "image_to_video")
       for mode in ("lora", "sft")},
    **{f"tools/{name}.py": (lambda name=name: importlib.import_module(f"tools.{name}").build_parser())
       for name in ("average_checkpoints", "caption_videos", "combine_loras", "convert_lora", "extract_lora",
                    "import_prepared", "infer", "merge_lora", "resize_lora")},
}
SWEEPS = ("train_text_to_video_lora.sh", "train_text_to_video_sft.sh", "train_image_to_video_lora.sh",
          "train_image_to_video_sft.sh", "prepare_dataset.sh", "run_infer_text_to_video.sh",
          "run_infer_image_to_video.sh")


def _parse(script, arguments):
    """Parse `arguments` with `script`'s own parser, required flags not enforced (a doc may leave them to a config)."""
    parser = PARSERS[script]()
    for action in parser._actions:
        action.required = False
    # "..." stands for a value after a flag ("--prompt ..."), and for "more flags" elsewhere
    arguments = [("x" if i and arguments[i - 1].startswith("--") else None) if word == "..." else word
                 for i, word in enumerate(arguments)]
    return parser.parse_args([word for word in arguments if word is not None])


def _check_command(line):
    """Parse a documented command line: a Python entry point with its parser, a script run with DRY_RUN=1 and each
    command it prints with its parser. Returns how many commands were parsed."""
    words, optional = [], False
    for word in shlex.split(line):  # usage notation, [--output new-folder], is left out
        optional = optional or word.startswith("[")
        if not optional:
            words.append(word)
        optional = optional and not word.endswith("]")
    script = next((w for w in words if w.removeprefix("./") in SWEEPS), None)
    if script is not None:
        env = _environment(line) if "=" in words[0] else {}
        if "CONFIG" in env:
            return 0  # a sweep over a config file: tests/test_scripts.py
        commands = _dry_run_commands(script.removeprefix("./"), **env)
        for command in commands:
            position = next(i for i, w in enumerate(command) if w.endswith(".py"))
            _parse(str(command[position]).removeprefix(str(ROOT) + "/"), command[position + 1 :])
        return len(commands)
    position = next((i for i, w in enumerate(words) if w in PARSERS), None)
    if position is None or words[0] in ("sbatch",):
        return 0
    _parse(words[position], words[position + 1 :])
    return 1


@pytest.mark.parametrize("path", [path for path in MARKDOWN if "```bash" in _text(path)], ids=_rel)
def test_every_command_in_the_docs_parses(path, capsys):
    """Every command line of every bash block (README, docs/ in both languages, CONTRIBUTING, assets/) that runs one
    of our entry points or scripts parses against the real parser; a sweep is run with DRY_RUN=1 and what it would
    launch parses too."""
    parsed, failures = 0, []
    for language, code in _code_blocks(_text(path)):
        if language != "bash":
            continue
        for line in _command_lines(code):
            try:
                parsed += _check_command(line)
            except (SystemExit, AssertionError, StopIteration, ValueError) as error:
                failures.append(f"{line[:120]}: {error!r} {capsys.readouterr().err[-300:]}")
    assert not failures, "\n".join(failures)
    if path.name in ("README.md", "README_zh.md", "training.md", "inference.md", "lora-tools.md"):
        assert parsed >= 3, f"{_rel(path)}: only {parsed} commands recognised"


def test_the_readmes_give_the_test_command_ci_runs():
    """CI runs .ci/run on a fresh clone: the command it calls is the one both READMEs tell a new user to run."""
    commands = [line.strip() for line in _text(ROOT / ".ci" / "run").splitlines()
                if line.strip() and not line.startswith("#") and not line.startswith(("set ", "cd "))]
    assert commands == ["bash scripts/test.sh"]
    for readme in ("README.md", "README_zh.md"):
        assert f"`{commands[0]}`" in _text(ROOT / readme), readme
