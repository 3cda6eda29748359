"""Where a training step's time goes, measured the same way in any trainer that steps a torch optimizer.

`install(path)` wraps a few library entry points that every CogVideoX trainer goes through (ours and the original
alike), so the same clock runs in both without touching either trainer's code:

- data: the DataLoader iterator's `__next__` (loading and collating a batch);
- forward: diffusers' `CogVideoXTransformer3DModel.forward`;
- backward: `torch.autograd.backward` (what `loss.backward()` and accelerate's `backward` end in);
- clip: `torch.nn.utils.clip_grad_norm_`;
- optimizer: from the optimizer's step pre-hook to its post-hook (torch's global optimizer hooks);
- other: the rest of the step (noise, timesteps, loss, the schedule, logging, the progress bar).

A step ends at the optimizer's step post-hook. At exit the steps are written to `path` as JSON: one object per step
with its wall time and the seconds of each phase. Overhead: two `perf_counter` calls per wrapped call.
"""

import atexit
import functools
import json
import time


PHASES = ("data", "forward", "backward", "clip", "optimizer")


class StepClock:
    def __init__(self):
        self.steps = []
        self.current = dict.fromkeys(PHASES, 0.0)
        self.step_started = time.perf_counter()
        self.optimizer_started = None

    def timed(self, phase, function):
        @functools.wraps(function)
        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.current[phase] += time.perf_counter() - started

        return wrapper

    def optimizer_pre(self, optimizer, args, kwargs):
        self.optimizer_started = time.perf_counter()

    def optimizer_post(self, optimizer, args, kwargs):
        now = time.perf_counter()
        if self.optimizer_started is not None:
            self.current["optimizer"] += now - self.optimizer_started
        wall = now - self.step_started
        step = {"wall": wall, **self.current}
        step["other"] = wall - sum(self.current.values())
        self.steps.append(step)
        self.current = dict.fromkeys(PHASES, 0.0)
        self.step_started = now
        self.optimizer_started = None

    def dump(self, path):
        with open(path, "w") as f:
            json.dump({"steps": self.steps}, f)


def install(path):
    """Start the clock; the steps are written to `path` when the process exits."""
    import torch
    import torch.utils.data.dataloader as dataloader
    from diffusers import CogVideoXTransformer3DModel
    from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

    clock = StepClock()
    iterator = dataloader._BaseDataLoaderIter
    iterator.__next__ = clock.timed("data", iterator.__next__)
    CogVideoXTransformer3DModel.forward = clock.timed("forward", CogVideoXTransformer3DModel.forward)
    torch.autograd.backward = clock.timed("backward", torch.autograd.backward)
    torch.nn.utils.clip_grad_norm_ = clock.timed("clip", torch.nn.utils.clip_grad_norm_)
    register_optimizer_step_pre_hook(clock.optimizer_pre)
    register_optimizer_step_post_hook(clock.optimizer_post)
    atexit.register(clock.dump, path)
    return clock


def summary(steps, skip=2):
    """Median seconds per phase over the steps after the first `skip` (warm-up), and the number of steps used."""
    import statistics

    steady = steps[skip:] or steps
    keys = ("wall", *PHASES, "other")
    return {key: statistics.median(step[key] for step in steady) for key in keys}, len(steady)
