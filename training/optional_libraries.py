"""bitsandbytes stays out of a run that does not ask for it.

diffusers imports bitsandbytes whenever it is installed, and peft and transformers look for it. Importing it is
not free: bitsandbytes 0.50 with the `kernels` package (a dependency of transformers 5.25) asks the Hugging Face
Hub for a CPU 4-bit kernel at import, a network request online and a "Skipping publisher trust check" line offline,
on every launch. Only --use_8bit (bitsandbytes' optimizers) and --quantize_base nf4 use it, so `import training`
hides it (`hide_bitsandbytes`) and those options call `use_bitsandbytes` before they need it.

Hidden means a None entry in sys.modules: `importlib.util.find_spec` then answers None, which is how diffusers,
peft and transformers decide that a package is absent, and `import bitsandbytes` fails. A script that imported
bitsandbytes, diffusers, peft or transformers before `training` keeps it.
"""

import importlib
import importlib.metadata
import importlib.util
import sys


NAME = "bitsandbytes"
_hidden_installed = set()  # what hide_bitsandbytes hid that is installed (an absent package stays absent)


def hide_bitsandbytes():
    if NAME in sys.modules or any(seen in sys.modules for seen in ("diffusers", "peft", "transformers")):
        return  # imported already, or a library that looks for it has looked: too late to keep it out
    if importlib.util.find_spec(NAME) is not None:
        _hidden_installed.add(NAME)
    sys.modules[NAME] = None


def bitsandbytes_missing():
    """True when bitsandbytes is not installed (or hidden by someone else than hide_bitsandbytes)."""
    if NAME in _hidden_installed and sys.modules.get(NAME, 0) is None:
        return False
    return importlib.util.find_spec(NAME) is None


def use_bitsandbytes():
    """Import bitsandbytes and tell the libraries that looked for it while it was hidden. Its CPU 4-bit kernel
    from the Hub is left out (4-bit layers run on CUDA only here): no network request, no line about it."""
    if NAME in _hidden_installed and sys.modules.get(NAME, 0) is None:
        del sys.modules[NAME]
        _hidden_installed.discard(NAME)
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
    for module, names in (("peft.import_utils", ("is_bnb_available", "is_bnb_4bit_available")),
                          ("transformers.utils.import_utils", ("is_bitsandbytes_available",))):
        for name in names:
            cache_clear = getattr(getattr(sys.modules.get(module), name, None), "cache_clear", None)
            if cache_clear is not None:
                cache_clear()
