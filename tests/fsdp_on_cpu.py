"""Run an entry point under accelerate's FSDP on CPU processes (gloo), for the tests only.

accelerate offers FSDP on accelerators only: on CPU it sets up MULTI_CPU and ignores the FSDP plugin. PyTorch's
FSDP2 (fully_shard) itself runs on CPU with gloo, so this turns that state into FSDP, and the trainer's real FSDP
code paths (sharding, gathering for saving, resuming, validation on every rank) run unchanged. FSDP1 cannot be
tested this way: its all-gather crashes with gloo on CPU.

    torchrun --nproc_per_node 2 tests/fsdp_on_cpu.py training/cogvideox_text_to_video_lora.py ARGS \
        [--then training/ENTRY_POINT.py ARGS ...]

with ACCELERATE_USE_CPU=true and the FSDP_* variables that accelerate launch derives from accelerate_configs/fsdp.yaml.
Each `--then` starts another run in the same processes (imports are paid once).
"""

import runpy
import sys

from accelerate.state import AcceleratorState, GradientState, PartialState
from accelerate.utils import DistributedType


_init = AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin
        PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # later states copy it from here


AcceleratorState.__init__ = _init_with_fsdp_on_cpu
# end_training() would end the process group; a later run in these processes reuses it instead.
PartialState.destroy_process_group = lambda self, group=None: None

if __name__ == "__main__":
    runs = [[]]
    for arg in sys.argv[1:]:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    for script, *argv in runs:
        AcceleratorState._reset_state(reset_partial_state=True)  # the process group itself stays
        GradientState._reset_state()
        runpy.run_path(script)["main"](argv)  # not as __main__: nothing runs on import
