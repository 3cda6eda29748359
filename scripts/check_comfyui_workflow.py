"""Check by hand, in ComfyUI's own code, the workflow this repository ships (assets/comfyui/cogvideox_lora_t2v.json).

Needs a ComfyUI checkout with native CogVideoX; the toolkit and its tests do not (tests/test_comfyui_workflow.py
checks the file against the docs without ComfyUI).

1. Every node's class is in ComfyUI's NODE_CLASS_MAPPINGS (nodes.py and comfy_extras, loaded as ComfyUI starts them);
   every linked input is one of that node's INPUT_TYPES with the type the link carries (the origin's RETURN_TYPES);
   the widget values are as many as its widget inputs, and a choice from a fixed list is in the list.
2. The workflow, turned into the API prompt the frontend queues (widget values named by INPUT_TYPES), passes
   ComfyUI's own validation (execution.validate_prompt), with empty placeholder files under the names the workflow
   picks in models/diffusion_models, loras, text_encoders and vae.
3. With --model and --lora_dir (a plain LoRA run on a model ComfyUI's loader detects: head dim 64, 16 latent
   channels), the graph runs on CPU through ComfyUI's executor (execution.PromptExecutor): Load Diffusion Model
   reads the base written by `tools/merge_lora.py --comfyui` (no --lora), LoraLoaderModelOnly the run's
   pytorch_lora_weights_comfyui.safetensors at 1.0, EmptyHunyuanLatentVideo, KSampler and SaveWEBM run as shipped, at
   a tiny size and 2 steps. A T5-XXL and the full CogVideoX VAE do not fit a tiny check, so two stand-in nodes replace
   the text encoder (the tiny model's T5 through diffusers) and the VAE (its tiny VAE). The sample must equal the one
   the merged file (`tools/merge_lora.py --lora RUN --comfyui`, no LoRA node) gives, and differ from the base's.

    python scripts/check_comfyui_workflow.py --comfyui ~/ComfyUI --pythonpath ~/comfy-deps
    python scripts/check_comfyui_workflow.py --comfyui ~/ComfyUI --model MODEL --lora_dir RUN
Exit status 0 when every check holds.
"""

import argparse
import asyncio
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

WORKFLOW = ROOT / "assets" / "comfyui" / "cogvideox_lora_t2v.json"
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FILE_WIDGETS = {"unet_name", "lora_name", "clip_name", "vae_name"}
MODEL_FOLDERS = {"UNETLoader": ("unet_name", "diffusion_models"), "LoraLoaderModelOnly": ("lora_name", "loras"),
                 "CLIPLoader": ("clip_name", "text_encoders"), "VAELoader": ("vae_name", "vae")}


def input_specs(node_class):
    """[(name, type, options)] of a node's required and optional inputs, in ComfyUI's order."""
    types = node_class.INPUT_TYPES()
    specs = []
    for section in ("required", "optional"):
        for name, spec in types.get(section, {}).items():
            kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
            specs.append((name, kind, options or {}))
    return specs


def widget_names(node_class, linked):
    """The names widgets_values holds, in order: widget inputs not fed by a link (and the seed's control)."""
    names = []
    for name, kind, options in input_specs(node_class):
        if name in linked or not (isinstance(kind, list) or str(kind) in WIDGET_TYPES):
            continue
        names.append(name)
        if options.get("control_after_generate"):
            names.append("control_after_generate")
    return names


def fixed_choices(kind, options):
    """The allowed values of a choice from a fixed list (None for free values and file lists)."""
    if isinstance(kind, list):
        return kind or None
    if str(kind) == "COMBO" and options.get("options"):
        return options["options"]
    return None


def check_nodes(workflow, mappings):
    """Step 1: a list of problems (empty when the workflow fits this ComfyUI)."""
    problems = []
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}
    for node in workflow["nodes"]:
        node_class = mappings.get(node["type"])
        if node_class is None:
            problems.append(f"node {node['id']}: {node['type']} is not in NODE_CLASS_MAPPINGS")
            continue
        specs = {name: (kind, options) for name, kind, options in input_specs(node_class)}
        linked = {i["name"] for i in node["inputs"] if i.get("link") is not None}
        for item in node["inputs"]:
            if item["name"] not in specs:
                problems.append(f"node {node['id']} {node['type']}: no input {item['name']!r}")
                continue
            if item.get("link") is None:
                continue
            _, origin, slot, target, _, carried = links[item["link"]]
            origin_type = mappings[nodes[origin]["type"]].RETURN_TYPES[slot]
            if target != node["id"] or str(specs[item["name"]][0]) != str(origin_type) or carried != str(origin_type):
                problems.append(f"node {node['id']} {node['type']}.{item['name']} takes {specs[item['name']][0]}, "
                                f"the link carries {carried} from {nodes[origin]['type']} ({origin_type})")
        names = widget_names(node_class, linked)
        values = node.get("widgets_values", [])
        if len(values) != len(names):
            problems.append(f"node {node['id']} {node['type']}: {len(values)} widget values for {names}")
            continue
        for name, value in zip(names, values):
            if name in specs and name not in FILE_WIDGETS:  # file lists: step 2 checks them with placeholders
                choices = fixed_choices(*specs[name])
                if choices is not None and value not in choices:
                    problems.append(f"node {node['id']} {node['type']}.{name} = {value!r}, not one of {choices}")
        missing = [name for name, (kind, options) in specs.items() if name in dict(node_class.INPUT_TYPES()["required"])
                   and name not in linked and name not in names]
        problems += [f"node {node['id']} {node['type']}: required input {name!r} has no link" for name in missing]
    return problems


def api_prompt(workflow, mappings):
    """The prompt the frontend queues for this workflow: {node id: {class_type, inputs}}."""
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        linked = {i["name"]: i["link"] for i in node["inputs"] if i.get("link") is not None}
        inputs = {name: [str(links[link][1]), links[link][2]] for name, link in linked.items()}
        names = widget_names(mappings[node["type"]], linked)
        inputs.update({n: v for n, v in zip(names, node.get("widgets_values", [])) if n != "control_after_generate"})
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs, "_meta": {"title": node.get("title")}}
    return prompt


def model_files(prompt):
    """{(folder, file name)} the prompt's loaders pick."""
    return {(folder, node["inputs"][widget]) for node in prompt.values()
            for cls, (widget, folder) in MODEL_FOLDERS.items() if node["class_type"] == cls}


class Server:
    """What ComfyUI's executor calls on its server: nothing is listening."""
    client_id = None
    last_node_id = None

    def send_sync(self, *args, **kwargs):
        pass

    def queue_updated(self):
        pass


def register_stand_ins(nodes, pipe, captured):
    """Two nodes for the tiny check only: the tiny T5 (diffusers) for CLIPLoader + CLIPTextEncode, the tiny VAE for
    VAELoader + VAEDecode. The sample the decode node receives is kept in `captured`."""
    import torch

    class CheckTinyTextEncode:
        RETURN_TYPES = ("CONDITIONING",)
        FUNCTION = "encode"
        CATEGORY = "check"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"text": ("STRING", {})}}

        def encode(self, text):
            with torch.no_grad():
                embeds, _ = pipe.encode_prompt(text, do_classifier_free_guidance=False, max_sequence_length=16,
                                               device=torch.device("cpu"))
            return ([[embeds, {}]],)

    class CheckTinyVAEDecode:
        RETURN_TYPES = ("IMAGE",)
        FUNCTION = "decode"
        CATEGORY = "check"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"samples": ("LATENT",)}}

        def decode(self, samples):
            captured.append(samples["samples"].clone())
            with torch.no_grad():
                video = pipe.vae.decode(samples["samples"].float()).sample  # B, C, F, H, W in -1..1
            return (((video[0].permute(1, 2, 3, 0) + 1) / 2).clamp(0, 1),)

    nodes.NODE_CLASS_MAPPINGS.update(CheckTinyTextEncode=CheckTinyTextEncode, CheckTinyVAEDecode=CheckTinyVAEDecode)


def tiny_prompt(prompt, unet_name, strength):
    """The shipped prompt at a tiny size, the text and VAE nodes replaced by the stand-ins."""
    prompt = copy.deepcopy(prompt)
    for node_id, node in list(prompt.items()):
        cls, inputs = node["class_type"], node["inputs"]
        if cls in ("CLIPLoader", "VAELoader"):
            del prompt[node_id]
        elif cls == "CLIPTextEncode":
            prompt[node_id] = {"class_type": "CheckTinyTextEncode", "inputs": {"text": inputs["text"]}}
        elif cls == "VAEDecode":
            prompt[node_id] = {"class_type": "CheckTinyVAEDecode", "inputs": {"samples": inputs["samples"]}}
        elif cls == "EmptyHunyuanLatentVideo":
            inputs.update(width=32, height=32, length=9)
        elif cls == "KSampler":
            inputs.update(steps=2)
        elif cls == "UNETLoader":
            inputs.update(unet_name=unet_name)
        elif cls == "LoraLoaderModelOnly":
            inputs.update(strength_model=strength)
    return prompt


def run_tiny(prompt, model, run, folders, output):
    """Step 3: (ok, lines)."""
    import av
    import execution
    import nodes
    import torch
    from diffusers import CogVideoXPipeline

    from tools.merge_lora import COMFYUI_MODEL_NAME
    from tools.merge_lora import main as merge_main

    unet_name = next(n["inputs"]["unet_name"] for n in prompt.values() if n["class_type"] == "UNETLoader")
    lora_name = next(n["inputs"]["lora_name"] for n in prompt.values() if n["class_type"] == "LoraLoaderModelOnly")
    with tempfile.TemporaryDirectory() as scratch:
        for loras, name in (([], unet_name), (["--lora", str(run)], "merged.safetensors")):  # the base, merged
            merge_main(["--base", str(model), *loras, "--output", scratch, "--comfyui"])
            shutil.move(Path(scratch) / COMFYUI_MODEL_NAME, folders["diffusion_models"] / name)
    shutil.copy(Path(run) / "pytorch_lora_weights_comfyui.safetensors", folders["loras"] / lora_name)
    pipe = CogVideoXPipeline.from_pretrained(str(model))
    captured = []
    register_stand_ins(nodes, pipe, captured)
    samples = {}
    for label, unet, strength in (("base + LoRA node at 1.0", unet_name, 1.0), ("merged file", "merged.safetensors",
                                                                                0.0), ("base", unet_name, 0.0)):
        tiny = tiny_prompt(prompt, unet, strength)
        valid = asyncio.run(execution.validate_prompt("tiny", tiny, None))
        if not valid[0]:
            return False, [f"tiny prompt ({label}) fails ComfyUI's validation: {valid[1]} {valid[3]}"]
        executor = execution.PromptExecutor(Server(), cache_type=False, cache_args={"lru": 0, "ram": 0,
                                                                                    "ram_inactive": 0})
        executor.execute(tiny, f"tiny-{len(samples)}", {}, valid[2])
        if not executor.success:
            return False, [f"{label}: ComfyUI's executor failed: {executor.status_messages[-1:]}"]
        samples[label] = captured[-1]
    videos = sorted(Path(output).rglob("*.webm"))
    frames = 0
    if videos:
        with av.open(str(videos[0])) as container:
            frames = sum(1 for _ in container.decode(video=0))
    with_lora, merged, base = samples.values()
    lines = [f"executed (ComfyUI's PromptExecutor): {len(samples)} runs, SaveWEBM wrote {len(videos)} video(s), the "
             f"first with {frames} frames",
             f"sample |LoRA node at 1.0 - merged file| max {(with_lora - merged).abs().max():.3g}; "
             f"|LoRA node at 1.0 - base| max {(with_lora - base).abs().max():.3g}"]
    ok = (torch.allclose(with_lora, merged, atol=1e-4, rtol=1e-4) and not torch.allclose(with_lora, base)
          and len(videos) == len(samples) and frames == 9)
    return ok, lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--comfyui", required=True, help="a ComfyUI checkout")
    parser.add_argument("--workflow", default=str(WORKFLOW), help="the workflow (UI format) to check")
    parser.add_argument("--model", help="a tiny base model (diffusers layout) to run the graph with")
    parser.add_argument("--lora_dir", help="a plain LoRA run on --model")
    parser.add_argument("--pythonpath", nargs="*", default=[], help="folders with ComfyUI's dependencies")
    args = parser.parse_args(argv)

    from check_comfyui_lora import import_comfyui

    import training  # noqa: F401  (before ComfyUI: diffusers first, as check_comfyui_lora.py)

    workflow = json.loads(Path(args.workflow).read_text())
    import_comfyui(args.comfyui, args.pythonpath)
    import execution
    import folder_paths
    import nodes

    failed = asyncio.run(nodes.init_builtin_extra_nodes())
    workflow_types = {node["type"] for node in workflow["nodes"]}
    print(f"comfy_extras modules that did not import here: {failed or 'none'} (the workflow's nodes "
          f"{'are all' if workflow_types <= set(nodes.NODE_CLASS_MAPPINGS) else 'are NOT all'} loaded)")
    problems = check_nodes(workflow, nodes.NODE_CLASS_MAPPINGS)
    print(f"1. {len(workflow['nodes'])} nodes ({', '.join(sorted(workflow_types))}), {len(workflow['links'])} links: "
          f"{'; '.join(problems) if problems else 'every class, input name, link type and widget fits'}")
    if problems:
        return 1
    prompt = api_prompt(workflow, nodes.NODE_CLASS_MAPPINGS)
    with tempfile.TemporaryDirectory() as scratch:
        folders = {name: Path(scratch) / "models" / name for name in ("diffusion_models", "loras", "text_encoders", "vae")}
        for name, folder in folders.items():
            folder.mkdir(parents=True)
            folder_paths.add_model_folder_path(name, str(folder), is_default=True)
        for folder, file_name in model_files(prompt):
            (folders[folder] / file_name).touch()
        folder_paths.set_output_directory(str(Path(scratch) / "output"))
        valid, error, outputs, node_errors = asyncio.run(execution.validate_prompt("check", prompt, None))
        print(f"2. ComfyUI's validate_prompt: {'valid' if valid else error}, output nodes {outputs}"
              f"{'' if not node_errors else f', errors {node_errors}'}")
        ok = bool(valid)
        if args.model and args.lora_dir:
            for folder, file_name in model_files(prompt):
                (folders[folder] / file_name).unlink()
            tiny_ok, lines = run_tiny(prompt, args.model, args.lora_dir, folders, Path(scratch) / "output")
            print("3. " + "\n   ".join(lines))
            ok = ok and tiny_ok
    print("OK" if ok else "MISMATCH")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
