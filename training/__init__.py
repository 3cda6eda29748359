"""CogVideoX fine-tuning: see README.md. The entry points are the cogvideox_*.py files next to this one."""

import logging
import warnings

from .optional_libraries import hide_optional_libraries


hide_optional_libraries()  # bitsandbytes and torchao, before anything imports diffusers: see optional_libraries.py


# diffusers 0.42 renamed from_pretrained's torch_dtype to dtype; the old name keeps older diffusers working.
warnings.filterwarnings("ignore", message=".*torch_dtype.*is deprecated", category=FutureWarning)
# diffusers still passes huggingface_hub's retired local_dir_use_symlinks on every Hub download: a deprecation note
# that, printed first, became the headline of a failed launch (accelerate quotes the first line of stderr).
warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*deprecated", category=UserWarning)


# Optional kernels that cannot load on this machine are announced at import (torchao's CUDA libraries, a
# bitsandbytes CPU kernel, diffusers' torchao checkpoint types) along with a torch deprecation note: noise. No torchao
# release is quiet with a CPU torch: PyPI's Linux wheels carry CUDA kernels only ("Failed to load ...so"; older ones
# say "Skipping import of cpp extensions"), and diffusers and transformers import any torchao >= 0.15 at import time. Each line is a logging warning from these
# loggers, so raising their level before diffusers is imported silences them (tests/test_install.py checks that); a
# script that imports diffusers without importing `training` first still shows them.
for _name in ("torchao", "torch.utils._pytree", "bitsandbytes.backends.cpu.ops",
              "diffusers.quantizers.torchao.torchao_quantizer"):
    logging.getLogger(_name).setLevel(logging.ERROR)


def _keep_deepspeed_record(record):
    """DeepSpeed announces "Setting accelerator to CPU. If you have GPU or other accelerator, we were unable to detect
    it." when it is imported (transformers imports it). With a torch built without GPU support there is none to
    detect: dropped. With a CUDA or ROCm torch it is a real warning and stays."""
    if "Setting accelerator to CPU" not in record.getMessage():
        return True
    import torch

    return bool(torch.version.cuda or getattr(torch.version, "hip", None))


# A filter, not a level: DeepSpeed sets its logger's level itself when it creates it.
logging.getLogger("DeepSpeed").addFilter(_keep_deepspeed_record)
