"""An exponential moving average (EMA) of the trained weights: --ema_decay, --ema_update_every, --ema_on_cpu,
--validate_ema ([training] section).

The plain recurrence with a constant decay d, from ema_0 = the trained weights the run starts from (the LoRA's
initial adapter, or the loaded transformer): after every --ema_update_every-th optimizer step t,

    ema_t = d * ema_{t-1} + (1 - d) * w_t

No warmup (diffusers' EMAModel lets the decay grow as (1 + t) / (10 + t), which the saved file would then depend
on): the average is exactly that sum, and a resumed run continues it bit for bit (the checkpoint keeps it, fp32,
in `ema.safetensors`). The average is kept in fp32 whatever --master_weight_dtype, on the accelerator, or in CPU
memory with --ema_on_cpu. The run saves it beside the weights in the mode's own forms
(`pytorch_lora_weights_ema.safetensors` and its ComfyUI twin, or `transformer_ema/`).

Under sharded weights (FSDP, DeepSpeed ZeRO-3) no rank holds the whole trained weights: EMA is refused there.
"""

import contextlib
import logging
from pathlib import Path

import torch

from .modes import plain_name


logger = logging.getLogger("cogvideox_factory")

EMA_STATE = "ema.safetensors"  # in a checkpoint: the average as it stands, fp32, keyed by parameter name
SUFFIX = "_ema"  # pytorch_lora_weights_ema.safetensors, pytorch_lora_weights_comfyui_ema.safetensors, transformer_ema/


def flag_problems(training, validation):
    """The [training] EMA flags on their own, and --validate_ema with [validation] (one line each)."""
    problems = []
    if training.validate_ema and training.ema_decay is not None and not validation.validation_prompt:
        problems.append("--validate_ema makes validation videos from the EMA weights: pass --validation_prompt too")
    if training.ema_decay is None:
        given = [name for name, on in (("--ema_update_every", training.ema_update_every != 1),
                                       ("--ema_on_cpu", training.ema_on_cpu), ("--validate_ema", training.validate_ema))
                 if on]
        if given:
            problems.append(f"{', '.join(given)}: option(s) of the EMA: pass --ema_decay too (e.g. 0.999), or drop them")
        return problems
    if not 0 < training.ema_decay < 1:
        problems.append(f"--ema_decay must lie between 0 and 1, both excluded (got {training.ema_decay:g}); 0.999 suits "
                        "long runs")
    if training.ema_update_every < 1:
        problems.append(f"--ema_update_every must be at least 1 (got {training.ema_update_every})")
    return problems


def engine_problems(training, backend):
    """EMA needs every rank to hold the whole trained weights."""
    if training.ema_decay is not None and backend.weights_sharded:
        return ["--ema_decay under sharded weights (FSDP, DeepSpeed ZeRO-3) is not supported: no rank holds the whole "
                "trained weights; use DDP or DeepSpeed ZeRO-1/2, or drop --ema_decay"]
    return []


def ema_bytes(training, parameters):
    """Accelerator bytes of the average of `parameters` (the trained ones): fp32, none with --ema_on_cpu."""
    from .memory import ALLOCATION_GRANULARITY

    if training.ema_decay is None or training.ema_on_cpu:
        return 0
    return sum(-(-p.numel() * 4 // ALLOCATION_GRANULARITY) * ALLOCATION_GRANULARITY for p in parameters)


def record(training):
    """The model card's and summary.json's record of the EMA ([training] section)."""
    if training.ema_decay is None:
        return {"EMA": "off"}
    where = "CPU" if training.ema_on_cpu else "accelerator"
    return {"EMA": f"decay {training.ema_decay:g} every {training.ema_update_every} step(s), fp32 on the {where} "
                   f"(saved beside the weights, {SUFFIX} in their names)"}


class EMA:
    """The average of the trained parameters (name -> parameter, the names without wrappers' prefixes)."""

    def __init__(self, named_parameters, decay, update_every, device):
        self.decay, self.update_every = decay, update_every
        self.parameters = dict(named_parameters)
        with torch.no_grad():
            self.average = {name: p.detach().to(device=device, dtype=torch.float32, copy=True)
                            for name, p in self.parameters.items()}

    @classmethod
    def build(cls, training, backend, transformer):
        """The average of the prepared transformer's trained weights, or None without --ema_decay."""
        if training.ema_decay is None:
            return None
        named = [(plain_name(name), p) for name, p in backend.unwrap(transformer).named_parameters() if p.requires_grad]
        return cls(named, training.ema_decay, training.ema_update_every,
                   torch.device("cpu") if training.ema_on_cpu else backend.device)

    @torch.no_grad()
    def update(self, step):
        """After optimizer step `step` (1, 2, ...): ema = d*ema + (1-d)*w on every --ema_update_every-th step."""
        if step % self.update_every:
            return
        for name, parameter in self.parameters.items():
            average = self.average[name]
            average.mul_(self.decay).add_(parameter.detach().to(average.device, torch.float32), alpha=1 - self.decay)

    @contextlib.contextmanager
    def swapped_in(self):
        """Within it the model computes with the average (cast to the weights' dtype); afterwards the trained weights
        are back bit for bit (kept meanwhile in CPU memory)."""
        with torch.no_grad():
            kept = {name: p.detach().to("cpu", copy=True) for name, p in self.parameters.items()}
            for name, parameter in self.parameters.items():
                parameter.copy_(self.average[name])
        try:
            yield
        finally:
            with torch.no_grad():
                for name, parameter in self.parameters.items():
                    parameter.copy_(kept[name])

    def state_dict(self, model):
        """The model's state dict (names without wrappers' prefixes) with the average in place of the trained weights:
        what the mode's writers take as gathered weights."""
        state = {plain_name(name): value for name, value in model.state_dict().items()}
        state.update(self.average)
        return state

    def save_artifact(self, backend, mode, model, directory, pipeline_class, dtype=None):
        """The average in the mode's forms beside its weights (main process): pytorch_lora_weights_ema.safetensors
        (diffusers and ComfyUI), or transformer_ema/. Returns their paths."""
        if backend.is_main_process:
            model = backend.unwrap(model)
            mode.save(model, directory, pipeline_class, dtype=dtype, state_dict=self.state_dict(model), suffix=SUFFIX)
        return mode.artifact_paths(directory, SUFFIX)

    def save(self, folder):
        """Into a checkpoint folder, exactly (fp32)."""
        from safetensors.torch import save_file

        save_file({name: value.contiguous() for name, value in self.average.items()}, str(Path(folder) / EMA_STATE))

    def load(self, folder):
        """From a checkpoint folder; a checkpoint without one (written before --ema_decay was given) starts the
        average from the weights it restored."""
        from safetensors.torch import load_file

        path = Path(folder) / EMA_STATE
        with torch.no_grad():
            if not path.is_file():
                logger.warning("%s holds no EMA: the average starts from its weights", folder)
                for name, parameter in self.parameters.items():
                    self.average[name].copy_(parameter.detach())
                return
            saved = load_file(str(path))
            if set(saved) != set(self.average):
                unknown = sorted(set(saved) ^ set(self.average))
                raise RuntimeError(f"{path}: the EMA does not match the trained weights (e.g. {unknown[:3]})")
            for name, value in saved.items():
                self.average[name].copy_(value)
