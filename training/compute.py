"""How the transformer's blocks compute, beyond the precision flags: FP8 matmuls and regional compilation.

- `--fp8_training`: the linear layers of the transformer blocks become torchao's `Float8Linear`: each matmul
  (forward, and both of the backward pass) runs in FP8 with dynamic per-tensor scales, while the weights stay in
  their own dtype (so checkpoints, the LoRA file and the saved transformer are as without it). Under LoRA the frozen
  base layers compute in FP8 (their backward only the input's gradient) and the adapters, which peft wraps around
  them, in their own precision. Layers whose
  sides are not multiples of 16 (FP8 kernels need them) and everything outside the blocks (embeddings, the output
  projection) keep their precision. On a GPU it needs FP8 tensor cores (compute capability 8.9: Ada, Hopper or newer).
- `--regional_compile`: `torch.compile` of each transformer block instead of the whole model, as diffusers'
  `compile_repeated_blocks` does for models that name their repeated block: the blocks share one compiled graph, so
  compiling costs one block's time, not the model's.
"""

import logging

import torch

from .optional_libraries import use_torchao


logger = logging.getLogger("cogvideox_factory")


FP8_MULTIPLE = 16  # torch._scaled_mm needs both sides of a matrix to be multiples of 16


def fp8_layer(module, name):
    """torchao's module filter: the linear layers inside the transformer blocks with sides FP8 kernels take."""
    return (name.startswith("transformer_blocks.") and isinstance(module, torch.nn.Linear)
            and module.in_features % FP8_MULTIPLE == 0 and module.out_features % FP8_MULTIPLE == 0)


def use_fp8_matmuls(transformer, weights_train):
    """Swap the chosen linear layers for torchao's Float8Linear, in place (before LoRA layers wrap them).

    `weights_train` (full fine-tuning): a weight's gradient is a matmul over the batch's tokens, and FP8 kernels take
    only inner sides that are multiples of 16, which the token count need not be (CogVideoX-5b at 49x480x480: 226 +
    13 x 30 x 30 = 11,926 per sample). torchao zero-pads inner sides where its config says so (pad_inner_dim), for
    every matmul of a layer alike, copying both operands even where nothing needs padding; only the weight gradient's
    matmul is told to pad here. Frozen layers (LoRA) never multiply over tokens."""
    use_torchao()  # hidden until an option needs it
    from torchao.float8 import convert_to_float8_training

    convert_to_float8_training(transformer, module_filter_fn=fp8_layer)
    if weights_train:
        for layer in transformer.modules():
            if type(layer).__name__ == "Float8Linear":
                gemms = layer.linear_mm_config
                layer.linear_mm_config = gemms._replace(grad_weight=gemms.grad_weight._replace(pad_inner_dim=True))
    _skip_frozen_weight_gradients()
    logger.info("FP8 matmuls in %d linear layers of the transformer blocks",
                sum(type(m).__name__ == "Float8Linear" for m in transformer.modules()))
    return transformer


def _skip_frozen_weight_gradients():
    """Float8Linear's matmul, made to compute only the input's gradient where the weight is frozen (LoRA's base
    layers): torchao's backward always computes the weight's too, a second matmul per layer for nothing. Installed
    where Float8Linear looks its matmul up, once; where the weight trains, torchao's own backward runs."""
    use_torchao()  # hidden until an option needs it
    import torchao.float8.float8_linear as float8_linear

    matmul = float8_linear.matmul_with_hp_or_float8_args
    if getattr(matmul, "skips_frozen_weights", False):
        return

    class Float8MatmulSkippingFrozenWeights(matmul):
        skips_frozen_weights = True

        @staticmethod
        def backward(ctx, grad_output):
            if ctx.needs_input_grad[1]:
                return matmul.backward(ctx, grad_output)
            return _fp8_input_gradient(matmul, ctx, grad_output), None, None, None

    float8_linear.matmul_with_hp_or_float8_args = Float8MatmulSkippingFrozenWeights


def _fp8_input_gradient(matmul, ctx, grad_output):
    """grad_output @ weight as torchao's backward computes it (grad_output and weight cast by the config's
    grad_input settings, the grad_input GEMM config), through torchao's own forward matmul with those settings."""
    import dataclasses
    use_torchao()  # hidden until an option needs it
    from torchao.float8.float8_training_tensor import LinearMMConfig

    _, weight_t = ctx.saved_tensors
    config, gemms = ctx.config, ctx.linear_mm_config
    # (the config checks that each operand is cast alike wherever it is used: the grad_weight half is not run)
    as_forward = dataclasses.replace(
        config, cast_config_input=config.cast_config_grad_output,
        cast_config_input_for_grad_weight=config.cast_config_grad_output,
        cast_config_weight=config.cast_config_weight_for_grad_input)
    unsaved = type("Unsaved", (), {"save_for_backward": lambda self, *tensors: None})()
    return matmul.forward(unsaved, grad_output, weight_t.t(), LinearMMConfig(gemms.grad_input, *gemms[1:]), as_forward)


def compile_blocks(transformer, mode=None):
    """Compile each transformer block in place (nn.Module.compile): later calls run the compiled block."""
    for block in transformer.transformer_blocks:
        block.compile(mode=mode)
    logger.info("compiling each of the %d transformer blocks on first use (torch.compile, mode %s)",
                len(transformer.transformer_blocks), mode or "default")
    return transformer


def compute_problems(memory, parallelism):
    """--fp8_training and --regional_compile ([parallelism]) against the other flags (--quantize_base, [memory]) and
    this machine, one line each."""
    problems = []
    if parallelism.compile_mode is not None and not parallelism.regional_compile:
        problems.append("--compile_mode goes with --regional_compile")
    if not parallelism.fp8_training:
        return problems
    if memory.quantize_base != "none":
        problems.append(f"--fp8_training with --quantize_base {memory.quantize_base}: the base weights would be "
                        "stored quantized and computed in FP8 again; use one of them")
    try:
        use_torchao()  # hidden until an option needs it
        import torchao.float8  # noqa: F401
    except ImportError as error:
        problems.append(f"--fp8_training needs torchao's float8 training ({error}): pip install -r requirements.txt")
    if torch.cuda.is_available() and torch.cuda.get_device_capability() < (8, 9):
        major, minor = torch.cuda.get_device_capability()
        problems.append(f"--fp8_training needs FP8 tensor cores (compute capability 8.9: Ada, Hopper or newer); this "
                        f"GPU has {major}.{minor}")
    return problems
