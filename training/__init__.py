"""CogVideoX fine-tuning: see README.md. The entry points are the cogvideox_*.py files next to this one."""

import logging


# Optional kernels that cannot load on this machine are announced at import (torchao's CUDA libraries, a
# bitsandbytes CPU kernel, diffusers' torchao checkpoint types) along with a torch deprecation note: noise.
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops",
              "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)
