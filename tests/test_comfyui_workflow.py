"""The ComfyUI workflow the repository ships (assets/comfyui/cogvideox_lora_t2v.json), without ComfyUI.

ComfyUI's node inputs are transcribed from its source (nodes.py, comfy_extras/nodes_hunyuan.py and nodes_video.py at
commit 783545f, 2026-08-22: each node's INPUT_TYPES in order; a seed with control_after_generate stores one more
widget value after it). scripts/check_comfyui_workflow.py checks the same file inside a real ComfyUI checkout: the
classes, inputs and link types against its NODE_CLASS_MAPPINGS, its validate_prompt, and a run of the graph.
"""

import json
import re
from pathlib import Path

import pytest


ROOT = Path(__file__).resolve().parent.parent
WORKFLOW = ROOT / "assets" / "comfyui" / "cogvideox_lora_t2v.json"
DOCS = [ROOT / "docs" / "inference.md", ROOT / "docs" / "zh" / "inference.md"]

# node -> (linked inputs {name: type}, widget names in widgets_values order, output types)
COMFYUI_NODES = {
    "UNETLoader": ({}, ["unet_name", "weight_dtype"], ["MODEL"]),
    "LoraLoaderModelOnly": ({"model": "MODEL"}, ["lora_name", "strength_model"], ["MODEL"]),
    "CLIPLoader": ({}, ["clip_name", "type", "device"], ["CLIP"]),
    "CLIPTextEncode": ({"clip": "CLIP"}, ["text"], ["CONDITIONING"]),
    "VAELoader": ({}, ["vae_name"], ["VAE"]),
    "EmptyHunyuanLatentVideo": ({}, ["width", "height", "length", "batch_size"], ["LATENT"]),
    "KSampler": ({"model": "MODEL", "positive": "CONDITIONING", "negative": "CONDITIONING", "latent_image": "LATENT"},
                 ["seed", "control_after_generate", "steps", "cfg", "sampler_name", "scheduler", "denoise"], ["LATENT"]),
    "VAEDecode": ({"samples": "LATENT", "vae": "VAE"}, [], ["IMAGE"]),
    "SaveWEBM": ({"images": "IMAGE"}, ["filename_prefix", "codec", "fps", "crf"], []),
}
# loader -> (its file widget, the folder under ComfyUI/models/ it lists)
MODEL_FOLDERS = {"UNETLoader": ("unet_name", "diffusion_models"), "LoraLoaderModelOnly": ("lora_name", "loras"),
                 "CLIPLoader": ("clip_name", "text_encoders"), "VAELoader": ("vae_name", "vae")}


@pytest.fixture(scope="module")
def workflow():
    return json.loads(WORKFLOW.read_text())


def widgets(node):
    return dict(zip(COMFYUI_NODES[node["type"]][1], node["widgets_values"]))


def test_every_node_is_a_native_one_with_comfyuis_inputs_and_links(workflow):
    nodes = {node["id"]: node for node in workflow["nodes"]}
    assert {node["type"] for node in nodes.values()} == set(COMFYUI_NODES)  # no custom node
    for node in nodes.values():
        linked, widget_names, outputs = COMFYUI_NODES[node["type"]]
        assert {i["name"]: i["type"] for i in node["inputs"]} == linked, node["type"]
        assert len(node["widgets_values"]) == len(widget_names), node["type"]
        assert [o["type"] for o in node["outputs"]] == outputs, node["type"]
    for link_id, origin, slot, target, target_slot, kind in workflow["links"]:
        assert nodes[origin]["outputs"][slot]["type"] == kind and link_id in nodes[origin]["outputs"][slot]["links"]
        assert nodes[target]["inputs"][target_slot]["type"] == kind
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
    linked = [i["link"] for node in nodes.values() for i in node["inputs"]]
    assert sorted(linked) == sorted(link[0] for link in workflow["links"])  # every input linked, every link used


def test_the_lora_sits_between_the_model_and_the_sampler_at_the_trained_strength(workflow):
    nodes = {node["id"]: node for node in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def feeding(node, name):
        return nodes[links[next(i["link"] for i in node["inputs"] if i["name"] == name)][1]]

    (sampler,) = [node for node in nodes.values() if node["type"] == "KSampler"]
    lora = feeding(sampler, "model")
    assert lora["type"] == "LoraLoaderModelOnly" and feeding(lora, "model")["type"] == "UNETLoader"
    assert widgets(lora)["strength_model"] == 1.0
    (clip,) = [node for node in nodes.values() if node["type"] == "CLIPLoader"]
    assert widgets(clip)["type"] == "cogvideox"  # CogVideoX's T5 with its 226-token padding
    (latent,) = [node for node in nodes.values() if node["type"] == "EmptyHunyuanLatentVideo"]
    size = widgets(latent)
    assert (size["width"], size["height"]) == (720, 480) and (size["length"] - 1) % 4 == 0  # 4k+1 frames


@pytest.mark.parametrize("page", DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_the_docs_put_each_file_where_the_workflow_looks_for_it(workflow, page):
    """Each loader's file is named in the docs with the ComfyUI/models/ folder that loader lists, and the docs name
    the workflow and the file the LoRA node takes from a run."""
    text = page.read_text()
    placed = set(re.findall(r"ComfyUI/models/(\w+)/([\w.-]+\.safetensors)", text))
    picked = {(MODEL_FOLDERS[node["type"]][1], widgets(node)[MODEL_FOLDERS[node["type"]][0]])
              for node in workflow["nodes"] if node["type"] in MODEL_FOLDERS}
    assert picked <= placed, picked - placed
    assert "assets/comfyui/cogvideox_lora_t2v.json" in text
    lora = next(name for folder, name in picked if folder == "loras")
    assert re.search(rf"pytorch_lora_weights_comfyui\.safetensors\s+ComfyUI/models/loras/{re.escape(lora)}", text)
