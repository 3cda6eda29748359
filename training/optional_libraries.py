"""bitsandbytes and torchao stay out of a run that does not ask for them.

diffusers imports bitsandbytes and torchao whenever they are installed, and peft and transformers look for them.
Importing them is not free. bitsandbytes 0.50 with the `kernels` package (a dependency of transformers 5.25) asks the
Hugging Face Hub for a CPU 4-bit kernel at import, a network request online and a "Skipping publisher trust check"
line offline, on every launch. torchao, which transformers imports through peft, costs 1.5 to 2 seconds before the
first step (2 CPU cores; its float8 and kernel modules import torch's compiler stack). Only --use_8bit (bitsandbytes'
optimizers), --quantize_base nf4 (bitsandbytes), --use_torchao, --fp8_training and --offload_optimizer (torchao) use
them, so `import training` hides both (`hide_optional_libraries`) and those options call `use_bitsandbytes` /
`use_torchao` before they need them.

Hidden means a None entry in sys.modules: `importlib.util.find_spec` then answers None, which is how diffusers,
peft and transformers decide that a package is absent, and `import bitsandbytes` fails. A script that imported the
library, diffusers, peft or transformers before `training` keeps it.
"""

import importlib
import importlib.metadata
import importlib.util
import sys


NAME = "bitsandbytes"
HIDDEN = (NAME, "torchao")
_hidden_installed = set()  # what hide_optional_libraries hid that is installed (an absent package stays absent)


def hide_optional_libraries():
    if any(seen in sys.modules for seen in ("diffusers", "peft", "transformers")):
        return  # a library that looks for them has looked: too late to keep them out
    for name in HIDDEN:
        if name in sys.modules:
            continue  # imported already
        if importlib.util.find_spec(name) is not None:
            _hidden_installed.add(name)
        sys.modules[name] = None


def missing(name):
    """True when `name` is not installed (or hidden by someone else than hide_optional_libraries)."""
    if name in _hidden_installed and sys.modules.get(name, 0) is None:
        return False
    return importlib.util.find_spec(name) is None


def _unhide(name):
    if name in _hidden_installed and sys.modules.get(name, 0) is None:
        del sys.modules[name]
        _hidden_installed.discard(name)


def use_torchao():
    """Import torchao and tell the libraries that looked for it while it was hidden."""
    _unhide("torchao")
    import torchao

    diffusers_flags = sys.modules.get("diffusers.utils.import_utils")
    if diffusers_flags is not None and not diffusers_flags.is_torchao_available():
        diffusers_flags._torchao_available = True
        diffusers_flags._torchao_version = importlib.metadata.version("torchao")
    _clear_caches((("peft.import_utils", ("is_torchao_available",)),
                   ("transformers.utils.import_utils", ("is_torchao_available",))))
    return torchao


def use_bitsandbytes():
    """Import bitsandbytes and tell the libraries that looked for it while it was hidden. Its CPU 4-bit kernel
    from the Hub is left out (4-bit layers run on CUDA only here): no network request, no line about it."""
    _unhide(NAME)
    kernels = sys.modules.get("kernels", 0)
    sys.modules["kernels"] = None  # bitsandbytes falls back (it catches the ImportError) and logs at a quiet logger
    try:
        import bitsandbytes as bnb
    finally:
        if kernels == 0:
            del sys.modules["kernels"]
        else:
            sys.modules["kernels"] = kernels
    _tell_libraries(bnb)
    return bnb


def _tell_libraries(bnb):
    """diffusers, peft and transformers record at import (or cache on first call) whether bitsandbytes exists."""
    diffusers_flags = sys.modules.get("diffusers.utils.import_utils")
    if diffusers_flags is not None and not diffusers_flags.is_bitsandbytes_available():
        diffusers_flags._bitsandbytes_available = True
        diffusers_flags._bitsandbytes_version = importlib.metadata.version(NAME)
    diffusers_bnb_utils = sys.modules.get("diffusers.quantizers.bitsandbytes.utils")
    if diffusers_bnb_utils is not None and not hasattr(diffusers_bnb_utils, "bnb"):
        diffusers_bnb_utils.bnb = bnb  # bound at its import only if bitsandbytes was found then
    _clear_caches((("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
                   ("transformers.utils.import_utils", ("is_bitsandbytes_available",))))


def _clear_caches(functions):
    """peft and transformers cache their availability answers: forget them ((module, (function names)) pairs)."""
    for module, names in functions:
        for name in names:
            cache_clear = getattr(getattr(sys.modules.get(module), name, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
