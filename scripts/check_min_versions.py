"""The steps of scripts/check_min_versions.sh that need Python: it proves that requirements.txt's floors work.

    python scripts/check_min_versions.py constraints requirements.txt --torch 2.13.0 > constraints.txt
    python scripts/check_min_versions.py installed constraints.txt          # every package at exactly its floor?
    python scripts/check_min_versions.py tiny-model OUT_DIR                 # tools/build_tiny_model.py, readers loaded
    python scripts/check_min_versions.py deepspeed-config accelerate_configs/deepspeed.yaml OUT_DIR
    python scripts/check_min_versions.py options                            # each optional optimizer steps
    python scripts/check_min_versions.py reload MODEL_DIR LORA_DIR --rank 4 --lora_alpha 8
    python scripts/check_min_versions.py floors requirements.txt            # `name floor` of each, this platform's
    python scripts/check_min_versions.py imports requirements.txt           # the pipelines, and every requirement
    python scripts/check_min_versions.py moved BEFORE.txt AFTER.txt         # what changed between two pip freezes
    python scripts/check_min_versions.py unneeded requirements.txt          # installed, but nothing requires them

`constraints` (and `read_floors`, which tests/test_install.py uses) needs only the standard library: it runs before
the environment exists. The other commands run inside the environment under test (MODE=each-floor: the newest one
with one package moved to its floor).
"""

import argparse
import json
import re
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent

# name, optional [extras], version specifiers, optional "; marker", optional "# comment"
_REQUIREMENT = re.compile(
    r"^(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)\s*(?:\[[^\]]*\])?\s*(?P<spec>[^;#]*?)\s*(?:;(?P<marker>[^#]*))?\s*(?:#.*)?$"
)


def canonical(name):
    """A distribution name as pip compares them (PEP 503)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_floors(path):
    """[(name, floor or None, marker or "")] of a requirements file, in file order. The floor is the version after
    `>=`; a requirement without one has floor None."""
    requirements = []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("-"):
            raise ValueError(f"{path}:{number}: options are not supported here: {line}")
        match = _REQUIREMENT.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: cannot read requirement: {line}")
        floors = re.findall(r">=\s*([0-9][^,\s]*)", match["spec"])
        requirements.append((match["name"], floors[0] if floors else None, (match["marker"] or "").strip()))
    return requirements


def constraint_lines(path, torch_version):
    """Each requirement pinned to its floor (`name==floor; marker`); torch pinned to `torch_version`, the build the
    environment really has. Raises ValueError naming any requirement without a floor."""
    requirements = read_floors(path)
    missing = [name for name, floor, _ in requirements if floor is None and canonical(name) != "torch"]
    if missing:
        raise ValueError(f"{path}: no >= floor for {', '.join(missing)}: every runtime requirement needs one")
    lines = []
    for name, floor, marker in requirements:
        pin = f"{name}=={torch_version if canonical(name) == 'torch' else floor}"
        lines.append(f"{pin}; {marker}" if marker else pin)
    return lines


def cmd_constraints(args):
    try:
        print("\n".join(constraint_lines(args.requirements, args.torch)))
    except ValueError as error:
        sys.exit(f"error: {error}")


def cmd_installed(args):
    """Compare what is installed with the pins; list every package. Fails if one is not at its pin."""
    from importlib.metadata import PackageNotFoundError, version

    from packaging.markers import Marker
    from packaging.specifiers import SpecifierSet
    from packaging.version import Version

    wrong = []
    print(f"{'package':<16} {'required':<12} installed")
    for line in Path(args.constraints).read_text().splitlines():
        pin, _, marker = line.partition(";")
        name, _, wanted = pin.strip().partition("==")
        if marker.strip() and not Marker(marker.strip()).evaluate():
            print(f"{name:<16} {wanted:<12} (not for this platform: {marker.strip()})")
            continue
        try:
            found = version(name)
        except PackageNotFoundError:
            found = "missing"
        ok = found != "missing" and SpecifierSet(f"=={wanted}").contains(Version(found), prereleases=True)
        print(f"{name:<16} {wanted:<12} {found}{'' if ok else '   <-- not the floor'}")
        if not ok:
            wrong.append(name)
    if wrong:
        sys.exit(f"error: not installed at the floor: {', '.join(wrong)}")


def cmd_tiny_model(args):
    """tools/build_tiny_model.py's model, built in a process that has loaded the toolkit's video readers first, as
    the test suite's process has: sentencepiece 0.2.0 segfaults training the tiny tokenizer once decord is loaded."""
    sys.path.insert(0, str(ROOT))
    from tools.build_tiny_model import save_tiny_model  # imports sentencepiece only when it builds
    from training import video_io  # loads decord

    print(f"video readers loaded: decord {'yes' if video_io.decord is not None else 'no (not installed)'}")
    save_tiny_model(args.output_dir)
    print(f"tiny CogVideoX-2b-style pipeline written to {args.output_dir}")


def cmd_deepspeed_config(args):
    """The shipped DeepSpeed accelerate config, made runnable as one CPU process: the same ZeRO stage, offload and
    clipping, fp32, and DeepSpeed told to keep the trainer's torch optimizer for the offloaded states (its CPU Adam
    is a C++ op that takes minutes to compile; the trainer's code path is the same)."""
    import yaml

    shipped = yaml.safe_load(Path(args.config).read_text())
    ds = shipped["deepspeed_config"]
    zero = {"stage": ds["zero_stage"], "overlap_comm": False, "contiguous_gradients": True}
    for key in ("offload_optimizer", "offload_param"):
        device = ds.get(f"{key}_device", "none")
        if device != "none" and (key == "offload_optimizer" or ds["zero_stage"] == 3):
            zero[key] = {"device": device}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    json_file = out / "deepspeed_cpu.json"
    json_file.write_text(json.dumps({
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": ds.get("gradient_accumulation_steps", 1),
        "gradient_clipping": ds.get("gradient_clipping", 1.0),
        "zero_optimization": zero,
        "zero_force_ds_cpu_optimizer": False,
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
    }, indent=2))
    accelerate_config = {
        "compute_environment": "LOCAL_MACHINE",
        "distributed_type": "DEEPSPEED",
        "deepspeed_config": {"deepspeed_config_file": str(json_file.resolve()),
                             "zero3_init_flag": ds.get("zero3_init_flag", False)},
        "machine_rank": 0,
        "num_machines": 1,
        "num_processes": 1,
        "rdzv_backend": "static",
        "same_network": True,
        "use_cpu": True,
    }
    (out / "deepspeed_cpu.yaml").write_text(yaml.safe_dump(accelerate_config))
    print(out / "deepspeed_cpu.yaml")


def cmd_floors(args):
    """`name floor` for each requirement this platform installs (its marker holds), torch left out: the list that
    MODE=each-floor goes through."""
    from packaging.markers import Marker

    for name, floor, marker in read_floors(args.requirements):
        if canonical(name) != "torch" and floor is not None and (not marker or Marker(marker).evaluate()):
            print(name, floor)


# distribution -> module, where the names differ
_MODULES = {"pillow": "PIL", "pyyaml": "yaml", "imageio-ffmpeg": "imageio_ffmpeg", "came-pytorch": "came_pytorch",
            "huggingface-hub": "huggingface_hub"}


def cmd_imports(args):
    """What the trainers import from the libraries (the CogVideoX pipelines, T5, LoRA), then every requirement this
    platform installs; reports each and fails if any fails. Most mismatches between versions show here first."""
    import importlib
    import traceback
    from importlib.metadata import version

    from packaging.markers import Marker

    statements = [
        "from diffusers import CogVideoXPipeline, CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel",
        "from transformers import T5EncoderModel, T5Tokenizer",
        "from peft import LoraConfig, get_peft_model_state_dict",
        "from accelerate import Accelerator",
    ]
    for name, _, marker in read_floors(args.requirements):
        if not marker or Marker(marker).evaluate():
            statements.append(f"import {_MODULES.get(canonical(name), canonical(name).replace('-', '_'))}")
    failed = []
    for statement in statements:
        try:
            importlib.invalidate_caches()
            exec(statement, {})
            print(f"ok      {statement}", flush=True)
        except Exception as error:  # report every import, then fail
            chain = [error]  # down to the first error: diffusers wraps it in "Failed to import ..."
            while (chain[-1].__cause__ or chain[-1].__context__) is not None:
                chain.append(chain[-1].__cause__ or chain[-1].__context__)
            root = chain[-1]
            where = traceback.extract_tb(root.__traceback__)[-1] if root.__traceback__ else None
            at = f" ({where.filename.rsplit('site-packages/', 1)[-1]}:{where.lineno})" if where else ""
            errors = " <- ".join(f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:160]}" for e in chain[-3:])
            print(f"FAILED  {statement}: {errors}{at}", flush=True)
            failed.append(statement)
    core = ("torch", "diffusers", "transformers", "peft", "accelerate", "huggingface_hub", "torchao")
    print("versions: " + ", ".join(f"{name} {version(name)}" for name in core))
    if failed:
        sys.exit(f"error: {len(failed)} import(s) failed")


def _freeze(path):
    pins = {}
    for line in Path(path).read_text().splitlines():
        name, sep, pinned = line.partition("==")
        if sep:
            pins[canonical(name.strip())] = pinned.strip()
    return pins


def cmd_moved(args):
    """One line: the packages whose version differs between two `pip freeze` lists (`name old->new`)."""
    before, after = _freeze(args.before), _freeze(args.after)
    moved = [f"{name} {before.get(name, '-')}->{after.get(name, '-')}" for name in sorted(before.keys() | after.keys())
             if before.get(name) != after.get(name)]
    print(", ".join(moved) or "nothing")


def cmd_unneeded(args):
    """The installed distributions that neither the requirements nor anything they require (followed through the
    installed metadata, markers and extras evaluated) need, one a line: what an environment synced back from the
    newest keeps after a floor moved a package down (transformers 5 brings `kernels`, which then fails to import
    with transformers 4's huggingface_hub). A fresh install of the same set would not have them."""
    from importlib.metadata import PackageNotFoundError, distribution, distributions

    from packaging.markers import Marker
    from packaging.requirements import Requirement

    keep = {"pip", "setuptools", "wheel", "uv"}  # the environment's own tools
    todo = [(name, frozenset()) for name, _, marker in read_floors(args.requirements)
            if not marker or Marker(marker).evaluate()]
    seen = set()
    while todo:
        name, extras = todo.pop()
        if (canonical(name), extras) in seen:
            continue
        seen.add((canonical(name), extras))
        keep.add(canonical(name))
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for line in requires:
            requirement = Requirement(line)
            marker = requirement.marker
            if marker is None or any(marker.evaluate({"extra": extra}) for extra in (extras or {""})):
                todo.append((requirement.name, frozenset(requirement.extras)))
    installed = {canonical(d.metadata["Name"]) for d in distributions()}
    print("\n".join(sorted(installed - keep)))


def _step_changes(optimizer, parameter):
    import torch

    before = parameter.detach().clone()
    for _ in range(2):
        parameter.grad = torch.randn_like(parameter)
        optimizer.step()
        optimizer.zero_grad()
    return bool((parameter.detach() != before).any())


def cmd_options(args):
    """Every optional optimizer the flags offer, built by the trainer's own code, takes two steps on the CPU."""
    import torch

    sys.path.insert(0, str(ROOT))
    import training  # noqa: F401  (quiets optional-kernel import noise, as in a training run)
    from training.args import parse_args
    from training.optim import build_optimizer
    from training.sections import run_flags

    cases = {
        "--use_8bit (bitsandbytes AdamW8bit)": ["--optimizer", "adamw", "--use_8bit"],
        "--use_torchao --use_8bit (torchao AdamW8bit)": ["--optimizer", "adamw", "--use_torchao", "--use_8bit"],
        "--use_torchao --use_4bit (torchao AdamW4bit)": ["--optimizer", "adamw", "--use_torchao", "--use_4bit"],
        "--optimizer prodigy (prodigyopt)": ["--optimizer", "prodigy", "--learning_rate", "1.0"],
        "--optimizer came (came-pytorch)": ["--optimizer", "came"],
    }
    failed = []
    for what, flags in cases.items():
        flags = ["--pretrained_model_name_or_path", "unused", "--learning_rate", "1e-3", *flags]
        parameter = torch.nn.Parameter(torch.randn(64, 128))  # large enough for the low-bit optimizers' blocks
        try:
            sections = run_flags(parse_args(flags))
            changed = _step_changes(build_optimizer(sections.optimizer, sections.memory, [parameter],
                                                    sections.training.learning_rate), parameter)
            result = "ok" if changed else "FAILED: the weights did not change"
        except Exception as error:  # report every option, then fail
            changed, result = False, f"FAILED: {type(error).__name__}: {error}"
        print(f"{what}: {result}", flush=True)
        if not changed:
            failed.append(what)
    if failed:
        sys.exit(f"error: {len(failed)} optimizer option(s) failed")


def _generate(pipe):
    import torch

    return pipe(
        prompt="a cat walks on the grass", height=32, width=32, num_frames=9, num_inference_steps=2,
        max_sequence_length=16, generator=torch.Generator().manual_seed(42), output_type="np",
    ).frames[0]


def cmd_reload(args):
    """Load the trained LoRA as a user would (`pipe.load_lora_weights`): the stored alpha is applied (scale
    alpha/rank), the video changes, and at adapter weight 0 the base video comes back exactly. Also requires the
    trainer's own parity check (final test against the last validation) to have found the saved file exact."""
    import numpy as np
    from diffusers import CogVideoXDPMScheduler, CogVideoXPipeline

    summary_file = Path(args.lora_dir) / "summary.json"
    if summary_file.is_file():
        parity = json.loads(summary_file.read_text()).get("parity")
        if parity is not None and not parity.get("exact"):
            sys.exit(f"error: the trainer's parity check failed: {parity}")
        print(f"trainer's parity check: {parity}")
    pipe = CogVideoXPipeline.from_pretrained(args.model)
    pipe.scheduler = CogVideoXDPMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    base = _generate(pipe)
    pipe.load_lora_weights(args.lora_dir, weight_name="pytorch_lora_weights.safetensors", adapter_name="trained")
    scales = {m.scaling["trained"] for m in pipe.transformer.modules() if "trained" in getattr(m, "scaling", {})}
    expected = args.lora_alpha / args.rank
    print(f"LoRA layers' scale: {sorted(scales)} (alpha/rank = {expected})")
    if scales != {expected}:
        sys.exit("error: the stored lora_alpha was not applied when loading")
    with_lora = _generate(pipe)
    difference = float(np.abs(with_lora - base).max())
    print(f"max |video with LoRA - base video| = {difference:.6f}")
    if difference == 0.0:
        sys.exit("error: loading the LoRA did not change the output")
    pipe.set_adapters(["trained"], [0.0])
    if not np.array_equal(_generate(pipe), base):
        sys.exit("error: at adapter weight 0 the output differs from the base model's")
    print("adapter weight 0 reproduces the base video exactly")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("constraints", help="requirements.txt's floors as == pins")
    p.add_argument("requirements")
    p.add_argument("--torch", required=True, help="the torch version the environment has")
    p.set_defaults(run=cmd_constraints)
    p = commands.add_parser("installed", help="check that every pinned package is installed at its pin")
    p.add_argument("constraints")
    p.set_defaults(run=cmd_installed)
    p = commands.add_parser("tiny-model", help="build the tiny model with the video readers loaded")
    p.add_argument("output_dir")
    p.set_defaults(run=cmd_tiny_model)
    p = commands.add_parser("deepspeed-config", help="a one-process CPU version of a DeepSpeed accelerate config")
    p.add_argument("config")
    p.add_argument("out_dir")
    p.set_defaults(run=cmd_deepspeed_config)
    p = commands.add_parser("options", help="step every optional optimizer")
    p.set_defaults(run=cmd_options)
    p = commands.add_parser("reload", help="load a trained LoRA into the pipeline and check its effect")
    p.add_argument("model")
    p.add_argument("lora_dir")
    p.add_argument("--rank", type=int, required=True)
    p.add_argument("--lora_alpha", type=float, required=True)
    p.set_defaults(run=cmd_reload)
    p = commands.add_parser("floors", help="`name floor` of each requirement this platform installs, torch aside")
    p.add_argument("requirements")
    p.set_defaults(run=cmd_floors)
    p = commands.add_parser("imports", help="import the pipelines and every requirement; report each")
    p.add_argument("requirements")
    p.set_defaults(run=cmd_imports)
    p = commands.add_parser("moved", help="what differs between two pip freeze lists")
    p.add_argument("before")
    p.add_argument("after")
    p.set_defaults(run=cmd_moved)
    p = commands.add_parser("unneeded", help="installed distributions nothing in the requirements needs")
    p.add_argument("requirements")
    p.set_defaults(run=cmd_unneeded)
    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    main()
