"""requirements.txt: every floor is at least what the code needs, every option's package is listed, and importing
the toolkit prints no alarm about optional kernels. scripts/check_min_versions.sh proves the floors by running
them; these checks are fast and offline."""

import ast
import importlib.util
import json
import os
import re
import subprocess
import sys

import pytest
from conftest import ROOT
from packaging.markers import Marker
from packaging.version import Version


REQUIREMENTS = ROOT / "requirements.txt"
_spec = importlib.util.spec_from_file_location("check_min_versions", ROOT / "scripts" / "check_min_versions.py")
check_min_versions = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(check_min_versions)
canonical = check_min_versions.canonical


def _source(*names):
    return "\n".join((ROOT / "training" / name).read_text() for name in names)


def _all_training_source():
    return _source(*sorted(p.name for p in (ROOT / "training").glob("*.py")))


def _names_imported_from(package):
    """Every name training/ imports from `package` (`from package... import name`), docstrings and comments aside."""
    names = set()
    for path in (ROOT / "training").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == package:
                names |= {alias.name for alias in node.names}
    return names


# (distribution, lowest version that has it, what needs it, whether the code needs it now). A row whose condition
# is false no longer binds (the code stopped using that API): delete it then. Rows whose condition is always true are
# the floors' own dependencies: requirements.txt's floors must install together (scripts/check_min_versions.sh
# installs exactly them), so each is at least what the others' floors require.
NEEDS = [
    ("torch", "2.5", "torch.serialization.safe_globals (DeepSpeed resume)",
     lambda code: "safe_globals(" in code),
    ("torch", "2.5", "public torch.distributed.tensor.DTensor (FSDP2 gather)",
     lambda code: "from torch.distributed.tensor import DTensor" in code),
    ("torch", "2.6", "accelerate's FSDP2 (accelerate_configs/fsdp.yaml, fsdp_version 2)",
     lambda code: "is_fsdp2" in code),
    ("diffusers", "0.34.0", "save_lora_weights(transformer_lora_adapter_metadata=); the stored alpha on load",
     lambda code: "transformer_lora_adapter_metadata" in code),
    ("diffusers", "0.33.0", "enable_layerwise_casting (--quantize_base fp8)",
     lambda code: "enable_layerwise_casting" in code),
    ("transformers", "4.43.0", "peft 0.15 (diffusers 0.34's minimum) imports transformers.EncoderDecoderCache",
     lambda code: True),
    ("accelerate", "1.8.0", "DeepSpeedEngineWrapper.backward(sync_gradients=)", lambda code: "sync_gradients=" in code),
    ("accelerate", "1.6.0", "Accelerator.is_fsdp2", lambda code: "is_fsdp2" in code),
    ("accelerate", "1.2.0", "unwrap_model(keep_torch_compile=)", lambda code: "keep_torch_compile" in code),
    ("peft", "0.15.0", "diffusers 0.34 refuses an older peft at import (ImportError)", lambda code: True),
    ("huggingface_hub", "0.23.0", "split_torch_state_dict_into_shards",
     lambda code: "split_torch_state_dict_into_shards" in code),
    ("huggingface_hub", "0.27.0", "diffusers 0.34 requires it", lambda code: True),
    ("safetensors", "0.4.3", "accelerate 1.8 requires it", lambda code: True),
    ("sentencepiece", "0.2.1", "tools/build_tiny_model.py trains a tokenizer (0.2.0 segfaults once decord is loaded)",
     lambda code: "SentencePieceTrainer" in (ROOT / "tools" / "build_tiny_model.py").read_text()),
    ("deepspeed", "0.14.0", "_zero3_consolidated_16bit_state_dict(exclude_frozen_parameters=)",
     lambda code: "_zero3_consolidated_16bit_state_dict(exclude_frozen_parameters" in code),
    ("deepspeed", "0.14.4", "imports with torch 2.13 (0.14.0-0.14.3 import names torch removed)", lambda code: True),
    ("bitsandbytes", "0.50.0", "8-bit AdamW steps on the CPU", lambda code: "bnb.optim.AdamW8bit" in code),
    ("torchao", "0.10.0", "torchao.optim (AdamW8bit/4bit, CPUOffloadOptimizer)", lambda code: "torchao.optim" in code),
    ("wandb", "0.17.0", "imports without setuptools' pkg_resources", lambda code: True),
]


@pytest.fixture(scope="module")
def floors():
    return {canonical(name): floor for name, floor, _ in check_min_versions.read_floors(REQUIREMENTS)}


@pytest.mark.parametrize("package, version, what, needed", NEEDS, ids=[f"{p}>={v}" for p, v, *_ in NEEDS])
def test_floor_covers_the_api_the_code_uses(floors, package, version, what, needed):
    if not needed(_all_training_source()):
        pytest.fail(f"the code no longer needs {package} {version} for {what}: delete this row of NEEDS")
    floor = floors.get(canonical(package))
    assert floor is not None, f"requirements.txt does not list {package}"
    assert Version(floor) >= Version(version), f"{package}>={floor} in requirements.txt, but {what} needs {version}"


def test_lora_metadata_has_what_the_diffusers_floor_reads(floors):
    """diffusers 0.34-0.39 read rank_pattern and alpha_pattern from a LoRA file's adapter metadata and raise KeyError
    'rank_pattern' on a file without them (0.40 does not): training/modes.py writes them (empty: one rank and alpha
    for every layer) so that the diffusers floor below 0.40 loads the files it writes."""
    from types import SimpleNamespace

    from training.modes import adapter_metadata

    config = SimpleNamespace(r=4, lora_alpha=8, target_modules={"to_q", "to_k"}, rank_pattern={}, alpha_pattern={},
                             use_dora=False)
    metadata = adapter_metadata(SimpleNamespace(peft_config={"default": config}))
    json.dumps(metadata)  # diffusers stores it as JSON in the safetensors header
    assert metadata["r"] == 4 and metadata["lora_alpha"] == 8 and metadata["target_modules"] == ["to_k", "to_q"]
    if Version(floors["diffusers"]) < Version("0.40.0"):
        missing = {"rank_pattern", "alpha_pattern"} - set(metadata)
        assert not missing, f"diffusers>={floors['diffusers']} cannot load a LoRA whose metadata lacks {missing}"
        assert metadata["rank_pattern"] == {} and metadata["alpha_pattern"] == {}


def test_tokenizer_class_is_one_the_pipelines_accept_with_the_transformers_floor(floors):
    """With transformers 4, AutoTokenizer gives T5TokenizerFast, which the CogVideoX pipelines refuse as their
    tokenizer component (validation fails): below transformers 5 the code must load T5Tokenizer itself."""
    if Version(floors["transformers"]) >= Version("5"):
        return
    imported = _names_imported_from("transformers")
    assert "AutoTokenizer" not in imported, (
        f"transformers>={floors['transformers']}: AutoTokenizer gives T5TokenizerFast there; load T5Tokenizer")
    assert "T5Tokenizer" in imported
    models = ast.parse((ROOT / "training" / "models.py").read_text())
    load_tokenizer = next(node for node in ast.walk(models)
                          if isinstance(node, ast.FunctionDef) and node.name == "load_tokenizer")
    calls = {ast.unparse(node.func) for node in ast.walk(load_tokenizer) if isinstance(node, ast.Call)}
    assert "T5Tokenizer.from_pretrained" in calls, calls


def test_every_requirement_has_a_floor_for_the_minimum_environment():
    lines = check_min_versions.constraint_lines(REQUIREMENTS, "2.13.0")
    assert "torch==2.13.0" in lines
    assert all("==" in line and ">=" not in line for line in lines)


def test_constraints_keep_markers_and_refuse_a_requirement_without_floor(tmp_path):
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("# comment\ntorch>=2.6\nfoo>=1.2,<2  # why\nbar>=0.5; sys_platform == \"linux\"\n")
    assert check_min_versions.constraint_lines(requirements, "2.13.0") == [
        "torch==2.13.0", "foo==1.2", 'bar==0.5; sys_platform == "linux"']
    requirements.write_text("torch>=2.6\nbaz\n")
    with pytest.raises(ValueError, match="no >= floor for baz"):
        check_min_versions.constraint_lines(requirements, "2.13.0")


@pytest.mark.parametrize("script", ["check_min_versions.sh", "check_newest_versions.sh", "setup_env.sh"])
def test_the_version_scripts_parse(script):
    result = subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _third_party_imports():
    """Top-level modules that training/ and tools/ import, besides the standard library and themselves."""
    modules = set()
    for path in [*(ROOT / "training").glob("*.py"), *(ROOT / "tools").glob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m not in ("training", "tools")}


# Imported only when installed, with a fallback that requirements.txt covers (named in the docs).
OPTIONAL_ACCELERATORS = {"vllm": "tools/caption_videos.py's fast path (CUDA, several GB); transformers otherwise"}


def test_every_package_the_code_imports_is_a_requirement_for_this_platform():
    """Every option's package comes with `pip install -r requirements.txt` (on Linux x86_64: hardware- or
    platform-specific ones are limited by markers, which the README names)."""
    from importlib.metadata import packages_distributions

    distributions = packages_distributions()
    listed = {canonical(name): marker for name, _, marker in check_min_versions.read_floors(REQUIREMENTS)}
    imported = _third_party_imports()
    assert {"bitsandbytes", "torchao", "deepspeed", "wandb", "prodigyopt", "came_pytorch"} <= imported
    missing = []
    for module in sorted(imported - set(OPTIONAL_ACCELERATORS)):
        names = [canonical(d) for d in distributions.get(module, [module])]
        if not any(name in listed for name in names):
            missing.append(module)
    assert not missing, f"imported by the toolkit but not in requirements.txt: {missing}"
    assert "tensorboard" in listed  # --report_to tensorboard (accelerate's tracker imports it, not our code)
    if sys.platform == "linux" and Marker('platform_machine == "x86_64"').evaluate():
        skipped = [name for name, marker in listed.items()  # a Python-version marker is not a platform's
                   if marker and "python_version" not in marker and not Marker(marker).evaluate()]
        assert not skipped, f"requirements.txt leaves these out on Linux x86_64: {skipped}"


_TORCHAO_ON_DEMAND = """
import sys
import training
import deepspeed
from diffusers import CogVideoXPipeline, CogVideoXTransformer3DModel
import diffusers.loaders, transformers, accelerate, peft
from peft import LoraConfig
assert "torchao" not in {name for name, module in sys.modules.items() if module is not None}, "imported"
from training.args import _missing_module
assert not _missing_module("torchao")  # hidden, yet the options that need it are not refused
from diffusers.utils import is_torchao_available
from peft.import_utils import is_torchao_available as peft_sees_it
from transformers.utils import is_torchao_available as transformers_sees_it
assert not (is_torchao_available() or peft_sees_it() or transformers_sees_it())  # asked while hidden: cached
from training.optional_libraries import use_bitsandbytes, use_torchao
use_torchao()
import torchao.optim, torchao.float8
assert is_torchao_available() and peft_sees_it() and transformers_sees_it()
use_bitsandbytes()
"""


def test_importing_the_toolkit_prints_no_alarm_about_optional_kernels():
    """torchao's CUDA libraries cannot load on a CPU torch, diffusers then reports torchao types it cannot import,
    and DeepSpeed says it found no GPU: announced at import through loggers that `import training` quiets. A run's
    output shows nothing that is not about the user's data. torchao (1.5 to 2 s of imports) stays out until an option
    asks for it (use_torchao), which then tells diffusers, peft and transformers."""
    code = _TORCHAO_ON_DEMAND
    result = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300, cwd=ROOT)  # DeepSpeed's logger writes to stdout
    assert result.returncode == 0, result.stdout
    alarms = [line for line in result.stdout.splitlines()
              if re.search(r"Failed to load|Unable to import|Skipping import|unable to detect|Traceback|Error|is deprecated"
                           r"|kernels|bitsandbytes|publisher trust", line)]
    assert not alarms, "\n".join(alarms)


# Run online (HF_HUB_OFFLINE unset) and offline: every socket a process opens is recorded by an audit hook.
_BITSANDBYTES_ON_DEMAND = """
import sys
connections = []
sys.addaudithook(lambda event, args: connections.append(args) if event == "socket.connect" else None)
import training
from diffusers import CogVideoXPipeline
import diffusers.loaders, peft, transformers, accelerate
from peft import LoraConfig
from training.models import load_transformer
assert "bitsandbytes" not in {name for name, module in sys.modules.items() if module is not None}, "imported"
from training.args import _missing_module
assert not _missing_module("bitsandbytes")  # hidden, yet the options that need it are not refused
from training.optional_libraries import use_bitsandbytes
bnb = use_bitsandbytes()
import torch
from diffusers import BitsAndBytesConfig
from diffusers.quantizers.bitsandbytes.utils import replace_with_bnb_linear
from diffusers.utils import is_bitsandbytes_available
from peft.import_utils import is_bnb_4bit_available, is_bnb_available
from transformers.utils import is_bitsandbytes_available as transformers_sees_it
assert is_bitsandbytes_available() and is_bnb_available() and is_bnb_4bit_available() and transformers_sees_it()
layers = replace_with_bnb_linear(torch.nn.Sequential(torch.nn.Linear(64, 64)), modules_to_not_convert=[],
                                 quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4"))
assert isinstance(layers[0], bnb.nn.Linear4bit), layers
optimizer = bnb.optim.AdamW8bit(torch.nn.Linear(64, 64).parameters())
assert not connections, connections
print("ok")
"""


@pytest.mark.parametrize("online", [True, False], ids=["online", "offline"])
def test_bitsandbytes_is_imported_only_when_an_option_needs_it_and_never_asks_the_hub(online):
    """bitsandbytes 0.50 with `kernels` (transformers 5.25 depends on it) asks the Hub for a CPU kernel at import:
    a network request online, a "Skipping publisher trust check" line offline. `import training` keeps it out;
    use_bitsandbytes (--use_8bit, --quantize_base nf4) brings it in for diffusers, peft and transformers alike,
    without that request."""
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_OFFLINE"}
    if not online:
        env["HF_HUB_OFFLINE"] = "1"
    result = subprocess.run([sys.executable, "-c", _BITSANDBYTES_ON_DEMAND], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, timeout=300, cwd=ROOT, env=env)
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "ok", result.stdout
    noise = [line for line in result.stdout.splitlines() if re.search(r"kernels|bitsandbytes|publisher trust", line)]
    assert not noise, "\n".join(noise)


@pytest.mark.parametrize("page", ["docs/install.md", "docs/zh/install.md"])
def test_the_install_page_says_how_to_choose_torch_and_the_python_version(page):
    text = (ROOT / page).read_text(encoding="utf-8")
    start = text.index("## Installation for real training" if "zh" not in page else "## 用于真实训练的安装")
    section = text[start:]
    for needed in ("TORCH_INDEX_URL", "scripts/check_min_versions.sh", "Python 3.10", "requirements.txt",
                   "torchvision"):
        assert needed in section, f"{page}: the install section does not mention {needed}"


def test_the_environment_is_the_lock():
    """scripts/setup_env.sh installs requirements-lock.txt exactly (LOCK=none: the newest, which this does not check)."""
    if os.environ.get("LOCK") == "none":
        pytest.skip("LOCK=none: the environment holds the newest versions, not the lock's")
    import importlib.metadata

    locked = dict(line.split("==") for line in (ROOT / "requirements-lock.txt").read_text().splitlines()
                  if line and not line.startswith("#"))
    # The environment's own site-packages: once setuptools is imported (torch's extension builder does), sys.path also
    # holds its _vendor folder, whose older packaging, zipp, ... would be read too.
    import sysconfig

    site_packages = sorted({sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]})
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions(path=site_packages)}
    wrong = {name: (version, installed.get(canonical(name))) for name, version in locked.items()
             if installed.get(canonical(name)) not in (version, None)}
    assert not wrong, f"(locked, installed) differ: {wrong}; run bash scripts/setup_env.sh"
    # Every requirement this Python on this platform installs (its marker, if any, holds) is in the lock.
    required = {canonical(name) for name, _, marker in check_min_versions.read_floors(REQUIREMENTS)
                if not marker or Marker(marker).evaluate()}
    assert required - {"torch"} <= {canonical(name) for name in locked}, "a requirement is missing from the lock"


def test_a_script_that_imported_diffusers_first_keeps_bitsandbytes():
    """Hiding bitsandbytes after diffusers has looked for it would break diffusers' quantizers (they import it where
    they found it): a script that imports diffusers before `training` gets bitsandbytes as diffusers saw it."""
    code = ("import sys\nimport diffusers\nimport training\nfrom diffusers import BitsAndBytesConfig\n"
            "import diffusers.quantizers.bitsandbytes.utils as u\nassert hasattr(u, 'bnb')\n"
            "assert sys.modules.get('bitsandbytes') is not None\nprint('ok')\n")
    result = subprocess.run([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=300, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0 and result.stdout.splitlines()[-1] == "ok", result.stdout[-2000:]
