"""Run entry points under accelerate on CPU processes (gloo), for the tests only.

    torchrun --nproc_per_node 2 tests/launch_on_cpu.py training/cogvideox_text_to_video_lora.py ARGS \\
        [--then training/ENTRY_POINT.py ARGS ...]

- Each `--then` starts another run in the same processes (imports are paid once). `--env KEY=VALUE` before a run's
  script sets a variable for that run only (e.g. ACCELERATE_USE_FSDP=false: a DDP run after FSDP ones).
- FSDP: accelerate offers FSDP on accelerators only: on CPU it sets up MULTI_CPU and ignores the FSDP plugin.
  PyTorch's FSDP2 (fully_shard) itself runs on CPU with gloo, so this turns that state into FSDP, and the trainer's
  real FSDP code paths (sharding, gathering for saving, resuming, validation on every rank) run unchanged. Set
  ACCELERATE_USE_CPU=true and the FSDP_* variables that accelerate launch derives from accelerate_configs/fsdp.yaml.
  FSDP1 cannot be tested this way: its all-gather crashes with gloo on CPU.
- DeepSpeed: every CPU process of a DeepSpeed job compiles DeepSpeed's shared-memory all-reduce when the job starts
  (about a minute of 2 cores, once per machine; GPU jobs never build it). A one-process job never reduces, so it
  is left out there: `accelerate launch --config_file accelerate_configs/deepspeed_zero3.yaml --num_processes 1
  tests/launch_on_cpu.py training/ENTRY_POINT.py ARGS` runs the shipped config as it is otherwise.
- SLOW_FIRST_VALIDATION=S: the first validation videos take S seconds longer to make (a long validation, without
  the CPU time of one).
"""

import os
import runpy
import sys
import time

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

if os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and os.environ.get("WORLD_SIZE") == "1":
    import importlib

    # import_module, not `import deepspeed.comm.torch`: that name resolves to the torch module deepspeed.comm imports
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

if os.environ.get("SLOW_FIRST_VALIDATION"):
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from training import validation

    _generate_videos = validation.generate_videos

    def _slow_generate_videos(*args, **kwargs):
        if not getattr(_slow_generate_videos, "slowed", False):
            _slow_generate_videos.slowed = True
            time.sleep(float(os.environ["SLOW_FIRST_VALIDATION"]))
        return _generate_videos(*args, **kwargs)

    validation.generate_videos = _slow_generate_videos

if __name__ == "__main__":
    runs = [[]]
    for arg in sys.argv[1:]:
        if arg == "--then":
            runs.append([])
        else:
            runs[-1].append(arg)
    for script, *argv in runs:
        environment = dict(os.environ)
        while script == "--env":  # --env KEY=VALUE before a run's script: set for that run only
            key, _, value = argv.pop(0).partition("=")
            os.environ[key] = value
            script, *argv = argv
        AcceleratorState._reset_state(reset_partial_state=True)  # the process group itself stays
        GradientState._reset_state()
        runpy.run_path(script)["main"](argv)  # not as __main__: nothing runs on import
        os.environ.clear()
        os.environ.update(environment)
