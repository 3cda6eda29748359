"""What a run shows its user besides the weights: the loss plot, validation contact sheets and animated previews,
and the model card (README.md in Hugging Face's form) that --push_to_hub uploads with the LoRA.

Pictures are drawn with matplotlib's object API on its Agg canvas (no display, no pyplot: nothing global, so a
picture can be drawn in a thread while training goes on) and written by the main process only.
"""

import json
import logging
import math
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

from .ema import record as ema_record
from .lora_formats import COMFYUI_WEIGHT_NAME, FUN_WEIGHT_NAME
from .modes import LORA_WEIGHT_NAME, PEFT_FOLDER, init_lora_shape


logger = logging.getLogger("cogvideox_factory")

LOSS_PLOT = "loss.png"
MODEL_CARD = "README.md"


@dataclass
class LossHistory:
    """Per-step training loss and learning rate, held-out loss per evaluation; saved in each checkpoint, so the plot
    of a resumed run covers it from step 1."""

    train: list = field(default_factory=list)  # [step, loss, lr]
    held_out: list = field(default_factory=list)  # [step, loss]

    def to_json(self):
        return {"train": self.train, "held_out": self.held_out}

    @classmethod
    def from_json(cls, saved):
        return cls([list(row) for row in saved.get("train", [])], [list(row) for row in saved.get("held_out", [])])


def _figure(**kwargs):
    """A matplotlib Figure on its own Agg canvas: files only, and no pyplot (its global state is not thread-safe, and
    importing it costs half a second)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(**kwargs)
    FigureCanvasAgg(figure)
    return figure


def smoothed(values, weight=0.9):
    """Exponential moving average with bias correction (as TensorBoard's smoothing): the first points are not
    pulled towards zero."""
    average, result = 0.0, []
    for count, value in enumerate(values, start=1):
        average = weight * average + (1 - weight) * value
        result.append(average / (1 - weight**count))
    return result


# One picture at a time: matplotlib's text and font caches are shared between figures.
_DRAWING = threading.Lock()


class LossPlotInBackground:
    """loss.png redrawn at each checkpoint in a thread, off the training step's path: drawing and saving it takes
    about a second on a CPU core, which the step would otherwise wait for. `draw` plots a copy of the history as it
    is then; `wait` returns once the last plot is written (before the final one, and before the process ends)."""

    def __init__(self):
        self.thread = None

    def draw(self, history, path):
        self.wait()
        snapshot = LossHistory.from_json(history.to_json())
        self.thread = threading.Thread(target=self._draw, args=(snapshot, path), name="loss-plot", daemon=True)
        self.thread.start()

    @staticmethod
    def _draw(history, path):
        path = Path(path)
        temporary = path.with_name(f".{path.stem}.drawing{path.suffix}")  # a run stopped meanwhile keeps the last plot
        try:
            if plot_losses(history, temporary) is not None:
                os.replace(temporary, path)
        except Exception as error:  # a picture never stops training
            logger.warning("loss plot %s not drawn: %s", path, error)

    def wait(self):
        if self.thread is not None:
            self.thread.join()
            self.thread = None


def plot_losses(history, path):
    """Training loss (raw, faint; smoothed), held-out loss (markers) and the learning rate (right axis)."""
    if not history.train:
        return None
    with _DRAWING:
        return _plot_losses(history, path)


def _plot_losses(history, path):
    steps, losses, rates = zip(*history.train)
    figure = _figure(figsize=(8, 4.5), dpi=100)
    loss_axis = figure.subplots()
    loss_axis.plot(steps, losses, color="tab:blue", alpha=0.25, linewidth=1, label="training loss")
    loss_axis.plot(steps, smoothed(losses), color="tab:blue", linewidth=2, label="training loss, smoothed")
    if history.held_out:
        eval_steps, eval_losses = zip(*history.held_out)
        loss_axis.plot(eval_steps, eval_losses, "o-", color="tab:orange", label="held-out loss")
    from matplotlib.ticker import MaxNLocator

    loss_axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.grid(alpha=0.3)
    rate_axis = loss_axis.twinx()
    rate_axis.plot(steps, rates, "--", color="tab:gray", linewidth=1, label="learning rate")
    rate_axis.set_ylabel("learning rate")
    rate_axis.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    lines = loss_axis.get_legend_handles_labels()[0] + rate_axis.get_legend_handles_labels()[0]
    loss_axis.legend(lines, [line.get_label() for line in lines], loc="upper right", fontsize="small")
    loss_axis.set_title(f"step {steps[-1]}: loss {losses[-1]:.4f}")
    figure.tight_layout()
    figure.savefig(path)
    return Path(path)


# A contact sheet's layout, in inches: tiles of this area (their shape the video's), the gap between them, and the
# prompt's strip above each row (a line of it per this many characters, at most two lines).
TILE_AREA, GAP, PROMPT_LINE, CHARACTERS_PER_INCH = 2.4 * 1.6, 0.06, 0.2, 11


def sheet_figure(videos, prompts, images=None, frames_per_video=4):
    """The matplotlib figure of a contact sheet: one row per video, its prompt in a strip of its own above the row,
    then the conditioning image (image-to-video: `images`, one per video) and evenly spaced frames, each tile the
    video's shape and the tiles filling the sheet. Tiles carry gid "image" or "frame", prompts gid "prompt"."""
    import textwrap

    import numpy as np

    videos = [np.asarray(frames) for frames in videos]
    height, width = videos[0].shape[1:3]
    tile_width = (TILE_AREA * width / height) ** 0.5
    tile_height = tile_width * height / width
    columns = frames_per_video + (1 if images else 0)
    figure_width = columns * tile_width + (columns + 1) * GAP
    wrap = max(int((figure_width - 2 * GAP) * CHARACTERS_PER_INCH), 20)
    texts = [textwrap.wrap(prompt, wrap, max_lines=2, placeholder=" ...") or [""] for prompt in prompts]
    rows = [(len(lines) * PROMPT_LINE + GAP, tile_height + GAP) for lines in texts]
    figure_height = sum(strip + tiles for strip, tiles in rows) + GAP
    dpi = min(200, max(100, width / tile_width))  # a tile about as many pixels wide as a frame
    figure = _figure(figsize=(figure_width, figure_height), dpi=dpi)
    top = figure_height - GAP
    for row, (frames, lines, (strip, tiles)) in enumerate(zip(videos, texts, rows)):
        figure.text(GAP / figure_width, (top - strip / 2) / figure_height, "\n".join(lines), fontsize=9,
                    fontweight="bold", ha="left", va="center", linespacing=1.1, gid="prompt")
        top -= strip + tile_height
        picks = np.linspace(0, len(frames) - 1, num=min(frames_per_video, len(frames))).round().astype(int)
        shown = [("image", "image", np.asarray(images[row]))] if images else []
        shown += [("frame", f"frame {index}", frames[index]) for index in picks]
        for column, (kind, label, picture) in enumerate(shown):
            left = GAP + column * (tile_width + GAP)
            axis = figure.add_axes((left / figure_width, top / figure_height, tile_width / figure_width,
                                    tile_height / figure_height), gid=kind)
            axis.imshow(_fitted(picture, height, width), aspect="auto", interpolation="antialiased")
            axis.set_axis_off()
            axis.text(0.02, 0.03, label, transform=axis.transAxes, fontsize=6, color="white", ha="left", va="bottom",
                      bbox={"facecolor": "black", "alpha": 0.5, "pad": 1.5, "linewidth": 0})
        top -= GAP
    return figure


def _fitted(picture, height, width):
    """A frame, or a conditioning image (PIL, or an array in [0, 1] or 0-255), as a height x width RGB array in
    [0, 1]: the image as the pipeline takes it, resized to the video's size."""
    import numpy as np
    from PIL import Image

    array = np.asarray(picture)
    if array.dtype == np.uint8 or array.max() > 1.0:
        array = array / 255.0
    array = array[..., :3].clip(0, 1)
    if array.shape[:2] != (height, width):
        image = Image.fromarray((array * 255).round().astype("uint8")).resize((width, height), Image.BICUBIC)
        array = np.asarray(image) / 255.0
    return array


def contact_sheet(videos, prompts, path, frames_per_video=4, images=None):
    """The validation videos on one PNG (`sheet_figure`); image-to-video: `images` first in each row."""
    with _DRAWING:
        figure = sheet_figure(videos, prompts, images, frames_per_video)
        figure.savefig(path, dpi=figure.dpi)
    return Path(path)


def animated_preview(frames, path, fps):
    """A looping GIF of the video: plays inline in a browser, a model page or a chat."""
    import numpy as np
    from PIL import Image

    images = [Image.fromarray((np.asarray(frame).clip(0, 1) * 255).round().astype("uint8")) for frame in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=max(1, round(1000 / fps)), loop=0)
    return Path(path)


def picture_files(videos, prompts, output_dir, tag, fps, images=None):
    """The contact sheet of a validation (image-to-video: with each video's conditioning image, `images`) and a GIF
    beside each mp4. Returns (sheet path, [gif paths])."""
    sheet = contact_sheet([frames for _, frames in videos], prompts, Path(output_dir) / f"{tag}_sheet.png",
                          images=images)
    gifs = [animated_preview(frames, Path(path).with_suffix(".gif"), fps) for path, frames in videos]
    return sheet, gifs


# ----------------------------------------------------------------------------------------------
# The model card
# ----------------------------------------------------------------------------------------------

# Licences of the published CogVideoX models (their model cards), by repository name.
_COGVIDEOX_LICENSE = {"license": "other", "license_name": "cogvideox-license",
                      "license_link": "https://huggingface.co/THUDM/CogVideoX-5b/blob/main/LICENSE"}
KNOWN_LICENSES = {
    "cogvideox-2b": {"license": "apache-2.0"},
    "cogvideox-5b": _COGVIDEOX_LICENSE,
    "cogvideox-5b-i2v": _COGVIDEOX_LICENSE,
    "cogvideox1.5-5b": _COGVIDEOX_LICENSE,
    "cogvideox1.5-5b-i2v": _COGVIDEOX_LICENSE,
}


def base_model_license(model):
    """The base model's licence fields: from its own model card when it is a local folder, else by its name."""
    card = Path(model) / "README.md"
    if card.is_file():
        fields = _front_matter(card.read_text(errors="replace"))
        found = {k: fields[k] for k in ("license", "license_name", "license_link") if fields.get(k)}
        if found:
            return found
    return KNOWN_LICENSES.get(Path(str(model).rstrip("/")).name.lower(), {"license": "other"})


def _front_matter(text):
    if not text.startswith("---"):
        return {}
    fields = {}
    for line in text.split("\n---", 1)[0].splitlines()[1:]:
        key, _, value = line.partition(":")
        if value.strip():
            fields[key.strip()] = value.strip().strip("'\"")
    return fields


def _yaml_value(value):
    return json.dumps(value, ensure_ascii=False)  # JSON scalars and lists are valid YAML


def model_card(facts):
    """README.md text for a run. `facts`: base_model, conditioning, mode, id_token, prompts, videos (relative paths:
    mp4, gif), sheet, plot, settings (name -> value), samples, final_loss, held_out_loss, lora_file, comfyui_file,
    license (fields)."""
    lora = facts["mode"] == "lora"
    tags = [facts.get("tag", facts["conditioning"]), "cogvideox", "diffusers", "lora" if lora else "full-fine-tune",
            "template:sd-lora"]
    header = {"base_model": facts["base_model"], "library_name": "diffusers", **facts["license"], "tags": tags}
    if facts.get("id_token"):
        header["instance_prompt"] = facts["id_token"]
    lines = ["---", *(f"{key}: {_yaml_value(value)}" for key, value in header.items())]
    if facts["videos"]:
        lines.append("widget:")
        for prompt, (_, gif) in zip(facts["prompts"], facts["videos"]):
            lines += [f"- text: {_yaml_value(prompt)}", "  output:", f"    url: {_yaml_value(gif)}"]
    lines += ["---", "", f"# {facts['title']}", ""]
    kind = "LoRA" if lora else "fine-tune"
    lines.append(f"A {facts['conditioning']} {kind} of [{facts['base_model']}]({_model_link(facts['base_model'])}), "
                 "trained with CogVideoX Factory.")
    lines.append("")
    if facts.get("id_token"):
        lines += ["## Trigger word", "", f"Start prompts with `{facts['id_token']}`: every training caption did.", ""]
    if facts["videos"]:
        lines += ["## Validation", "", "The saved weights, loaded back as below, at the same seed:", ""]
        for prompt, (mp4, gif) in zip(facts["prompts"], facts["videos"]):
            lines += [f"**{prompt}**", "", f"![{_alt(prompt)}]({gif}) ([mp4]({mp4}))", ""]
        if facts.get("sheet"):
            lines += [f"![frames of each video]({facts['sheet']})", ""]
    lines += ["## Training", "", "| setting | value |", "|---|---|"]
    lines += [f"| {name} | {value} |" for name, value in facts["settings"].items()]
    lines += ["", f"Data: {facts['samples']} training samples.", ""]
    if facts.get("final_loss") is not None:
        lines.append(f"Final training loss: {facts['final_loss']:.4f}.")
    if facts.get("held_out_loss") is not None:
        lines.append(f"Held-out loss (last evaluation): {facts['held_out_loss']:.4f}.")
    if facts.get("plot"):
        lines += ["", f"![training loss]({facts['plot']})"]
    lines += ["", "## Use it", "", "### diffusers", "", "```python", *_diffusers_code(facts), "```", ""]
    if lora and facts.get("fun_file"):
        lines += ["### ComfyUI and VideoX-Fun", "",
                  "ComfyUI's native CogVideoX nodes know no CogVideoX-Fun InP or Control model (they would take a "
                  "Control model's 32 channels for image-to-video); VideoX-Fun's own ComfyUI nodes and scripts run "
                  "them, and merge LoRAs with Fun's `merge_lora`: give them "
                  f"`{facts['fun_file']}` (Fun's `lora_unet__` form, alpha included) at strength 1.0, the trained "
                  "strength. In ComfyUI, copy it into `ComfyUI/models/loras/` and pick it in Fun's "
                  "**LoadCogVideoXFunLora** node.", ""]
    elif lora:
        lines += ["### ComfyUI", "",
                  f"Copy `{facts['comfyui_file']}` into `ComfyUI/models/loras/`. Load the base model's native "
                  "CogVideoX checkpoint (**Load Diffusion Model**), then add a **LoraLoaderModelOnly** node (or "
                  "**Load LoRA**) between the model and the sampler, pick the file, and leave **strength_model at "
                  "1.0**: that is the trained "
                  f"strength, the same as weight 1.0 in diffusers. (`{_other_form(facts)}` is the "
                  f"{'peft' if facts.get('adapter_type') in ('loha', 'lokr') else 'diffusers'} form; ComfyUI's native "
                  "loader does not read it.)", ""]
    return "\n".join(lines)


def _other_form(facts):
    """The run's non-ComfyUI artifact: the diffusers file, or a LoHa/LoKr run's peft folder."""
    return f"{PEFT_FOLDER}/" if facts.get("adapter_type") in ("loha", "lokr") else facts["lora_file"]


def _alt(text):
    return text.replace("[", "(").replace("]", ")")


def _model_link(model):
    return f"https://huggingface.co/{model}" if not Path(model).exists() and model.count("/") == 1 else model


def _diffusers_code(facts):
    default = (("diffusers", "CogVideoXImageToVideoPipeline", ', image=load_image("first_frame.png")')
               if facts["conditioning"] == "image-to-video" else ("diffusers", "CogVideoXPipeline", ""))
    module, pipeline, inputs = facts.get("pipeline") or default
    prompt = facts["prompts"][0] if facts["prompts"] else f"{facts.get('id_token') or ''} a cat walks on the grass".strip()
    code = ["import torch", f"from {module} import {pipeline}", "from diffusers.utils import export_to_video", ""]
    if module != "diffusers":
        code.insert(1, f"# {module}: CogVideoX Factory's (run from its folder)")
    if facts["mode"] == "lora" and facts.get("adapter_type") in ("loha", "lokr"):  # a peft folder: not diffusers'
        code.insert(2, "from training.modes import load_peft_folder  # CogVideoX Factory; or peft's "
                       "inject_adapter_in_model")
        code += [f"pipe = {pipeline}.from_pretrained({json.dumps(facts['base_model'])}, torch_dtype=torch.bfloat16).to(\"cuda\")",
                 f"load_peft_folder(pipe.transformer, \"path/to/this/folder/{PEFT_FOLDER}\", \"lora\")"]
    elif facts["mode"] == "lora":
        code += [f"pipe = {pipeline}.from_pretrained({json.dumps(facts['base_model'])}, torch_dtype=torch.bfloat16).to(\"cuda\")",
                 f"pipe.load_lora_weights(\"path/to/this/folder\", weight_name={json.dumps(facts['lora_file'])}, "
                 "adapter_name=\"lora\")",
                 "pipe.set_adapters([\"lora\"], [1.0])  # 1.0: the trained strength"]
    else:
        code += ["from diffusers import CogVideoXTransformer3DModel", "",
                 "transformer = CogVideoXTransformer3DModel.from_pretrained(\"path/to/this/folder\", "
                 "subfolder=\"transformer\", torch_dtype=torch.bfloat16)",
                 f"pipe = {pipeline}.from_pretrained({json.dumps(facts['base_model'])}, transformer=transformer, "
                 "torch_dtype=torch.bfloat16).to(\"cuda\")"]
    for loader in ("load_image", "load_video"):
        if f"{loader}(" in inputs:
            code.insert(code.index("from diffusers.utils import export_to_video"), f"from diffusers.utils import {loader}")
    if facts.get("scheduler"):  # the sampler validation used, where it is not the pipeline's own
        code.insert(code.index(""), f"from diffusers import {facts['scheduler']}")
        code.append(f"pipe.scheduler = {facts['scheduler']}.from_config(pipe.scheduler.config)")
    code += [f"video = pipe(prompt={json.dumps(prompt)}{inputs}, guidance_scale=6.0, num_inference_steps=50).frames[0]",
             "export_to_video(video, \"output.mp4\", fps=8)"]
    return code


def write_model_card(job):
    """README.md in --output_dir: what the run is, its validation videos, settings and losses, how to load it (from
    the run's flag sections, `job.flags`)."""
    flags = job.flags
    model, hub, output_dir = flags.model, flags.logging, Path(flags.training.output_dir)
    prompts, videos, sheet, gifs = job.validation.pictures or ([], [], None, [])
    held_out = [loss for _, loss in job.history.held_out]
    facts = {
        "title": hub.hub_model_id.split("/")[-1] if hub.hub_model_id else output_dir.name,
        "base_model": model.pretrained_model_name_or_path,
        "license": base_model_license(model.pretrained_model_name_or_path),
        "conditioning": job.conditioning.card_label,
        "tag": job.conditioning.card_tag,
        "pipeline": job.conditioning.card_pipeline,
        "scheduler": job.conditioning.validation_scheduler if job.conditioning.fun else None,
        "fun_file": FUN_WEIGHT_NAME if job.conditioning.fun and flags.lora.lora_type == "lora" else None,
        "mode": job.mode.name,
        "id_token": flags.data.id_token,
        "prompts": prompts,
        "videos": [(Path(mp4).name, gif.name) for (mp4, _), gif in zip(videos, gifs)],
        "sheet": sheet.name if sheet else None,
        "plot": LOSS_PLOT if (output_dir / LOSS_PLOT).is_file() else None,
        "settings": run_settings(flags.buckets, flags.training, flags.optimizer, flags.lora, job.conditioning,
                                 job.mode, job.backend.num_processes, job.schedule.max_train_steps,
                                 job.data.describe_batch_size()),
        "samples": len(job.data.dataset),
        "final_loss": finite(job.last_loss),
        "held_out_loss": finite(held_out[-1]) if held_out else None,
        "lora_file": LORA_WEIGHT_NAME,
        "comfyui_file": COMFYUI_WEIGHT_NAME,
        "adapter_type": flags.lora.lora_type,
    }
    if flags.data.load_tensors:  # the prepared data decide the buckets, whatever the bucket flags say
        for row in ("resolution buckets (H x W)", "frame buckets", "bucket config"):
            facts["settings"].pop(row, None)
        facts["settings"][PREPARED_BUCKETS] = ", ".join("x".join(map(str, b)) for b in sorted(job.data.sampler.batch_sizes))
    facts["settings"].update(caption_record(flags.data))
    facts["settings"].update(ema_record(flags.training))  # --ema_decay
    (output_dir / MODEL_CARD).write_text(model_card(facts))


PREPARED_BUCKETS = "buckets (F x H x W, from the prepared data)"


def run_settings(buckets, training, optimizer, lora, conditioning, mode, num_processes, steps, batch_size):
    """The model card's settings table, from the [buckets], [training], [optimizer] and [lora] sections."""
    from .timesteps import recipe

    bucket_rows = {"bucket config": Path(buckets.bucket_config).name} if buckets.bucket_config else {
        "resolution buckets (H x W)": f"{_join(buckets.height_buckets)} x {_join(buckets.width_buckets)}",
        "frame buckets": _join(buckets.frame_buckets)}
    settings = {
        "trainer": f"{conditioning.name} {'LoRA' if mode.name == 'lora' else 'full fine-tune'}",
        "steps": steps,
        "batch size": f"{batch_size} x {num_processes} process(es) x {training.gradient_accumulation_steps} "
                      "accumulation",
        "learning rate": f"{training.learning_rate:g} ({training.lr_scheduler})",
        "optimizer": optimizer.optimizer,
        "mixed precision": training.mixed_precision or "no",
        **bucket_rows,
        "seed": training.seed,
        **recipe(training),  # timestep sampling, loss weighting
        "every setting": "config.toml (train the same run again with --config config.toml)",
    }
    if mode.name == "lora":
        settings.update(adapter_record(lora))
    return {k: v for k, v in settings.items() if v is not None}


def sat_out_record(data, last_epoch):
    """summary.json's count, per epoch up to `last_epoch`, of the training samples that sat the epoch out (every
    bucket draw of a bucket config's keep_prob passed them on: not unusable, they train in other epochs); nothing where
    buckets are not drawn again every epoch. `data`: a `data_source.TrainingData`."""
    if not getattr(data.dataset, "redraws", False):
        return {}
    return {"samples_sat_out": {str(epoch): data.sampler.sitting_out(epoch) for epoch in range(last_epoch + 1)}}


def adapter_record(lora):
    """The model card's and summary.json's record of the adapter ([lora] section): its shape (--init_lora's file's
    when given, not the flags'), where it started, LoRA+."""
    rank, alpha, targets = lora.rank, lora.lora_alpha, lora.lora_target_modules
    if lora.init_lora:
        shape = init_lora_shape(lora.init_lora)
        rank, alpha, targets = shape["r"], shape["lora_alpha"], f"{len(shape['target_modules'])} modules"
    record = {"adapter": lora.lora_type, "rank": rank, "alpha": alpha, "target modules": targets, "started from": lora.init_lora,
              "LoRA+ learning-rate ratio (B)": lora.loraplus_lr_ratio}
    return {k: v for k, v in record.items() if v is not None}


def caption_record(data):
    """The model card's and summary.json's record of how training varied the captions ([data] section)."""
    shuffle = f"tags after the first {data.keep_tokens}" if data.caption_shuffle else "off"
    return {"caption dropout": data.caption_dropout_rate, "caption shuffle": shuffle}


def _join(values):
    return ", ".join(str(v) for v in values) if isinstance(values, (list, tuple)) else str(values)


def finite(value):
    return value if value is not None and math.isfinite(value) else None
