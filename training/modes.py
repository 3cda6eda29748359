"""Which parameters train and how the result is saved: one small class per training mode.

`LoRA` adds peft adapters to the transformer and writes `pytorch_lora_weights.safetensors`
in the diffusers format, with the adapter's rank/alpha/targets in the file's metadata so
`pipe.load_lora_weights(...)` at weight 1.0 reproduces exactly what training validated.
"""

from pathlib import Path




LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
ADAPTER_NAME = "cogvideox-lora"


class LoRA:
    name = "lora"

    def prepare(self, transformer, args):
        """Freeze the base model and add trainable adapters (kept in fp32: small updates survive)."""
        from peft import LoraConfig

        transformer.requires_grad_(False)
        target_modules = [m.strip() for m in args.lora_target_modules.split(",") if m.strip()]
        transformer.add_adapter(
            LoraConfig(r=args.rank, lora_alpha=args.lora_alpha, init_lora_weights=True, target_modules=target_modules)
        )
        for parameter in transformer.parameters():
            if parameter.requires_grad:
                parameter.data = parameter.data.float()

    def check_args(self, args, transformer_config):
        problems = []
        if args.lora_alpha <= 0:
            problems.append(f"--lora_alpha must be positive (got {args.lora_alpha})")
        if not [m for m in args.lora_target_modules.split(",") if m.strip()]:
            problems.append("--lora_target_modules is empty")
        return problems

    def trainable_parameters(self, transformer):
        return [p for p in transformer.parameters() if p.requires_grad]

    def save(self, transformer, directory, pipeline_class, dtype=None):
        """Write the adapter in diffusers format (keys prefixed `transformer.`)."""
        from peft.utils import get_peft_model_state_dict

        state = get_peft_model_state_dict(transformer)
        if dtype is not None:
            state = {k: v.to(dtype) for k, v in state.items()}
        pipeline_class.save_lora_weights(
            directory,
            transformer_lora_layers=state,
            transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        )

    def load(self, transformer, directory, pipeline_class):
        """Load adapter weights saved by `save` into a transformer prepared by `prepare` (resume)."""
        from peft import set_peft_model_state_dict

        state = pipeline_class.lora_state_dict(directory, weight_name=LORA_WEIGHT_NAME)
        if isinstance(state, tuple):  # newer diffusers may return (state_dict, metadata)
            state = state[0]
        prefix = "transformer."
        state = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        result = set_peft_model_state_dict(transformer, state, adapter_name="default")
        unexpected = getattr(result, "unexpected_keys", None)
        if unexpected:
            raise RuntimeError(f"{directory}: LoRA weights do not match the model (unexpected keys {unexpected[:3]})")

    def apply_to_pipeline(self, pipe, directory):
        """Load the saved artifact into a fresh inference pipeline, as a user would."""
        pipe.load_lora_weights(directory, weight_name=LORA_WEIGHT_NAME, adapter_name=ADAPTER_NAME)
        pipe.set_adapters([ADAPTER_NAME], [1.0])
        return pipe

    def artifact_paths(self, output_dir):
        return [Path(output_dir) / LORA_WEIGHT_NAME]


def cast_frozen(transformer, dtype):
    """Frozen weights in the compute dtype; trainable ones stay fp32."""
    for parameter in transformer.parameters():
        if not parameter.requires_grad:
            parameter.data = parameter.data.to(dtype)


def count_parameters(parameters):
    return sum(p.numel() for p in parameters)


