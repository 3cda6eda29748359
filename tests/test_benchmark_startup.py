"""benchmarks/benchmark_startup.py: it stops the clock at the first optimizer step of either trainer, as their step
bars show it, and not before."""

import io
import sys
from pathlib import Path

import pytest

from benchmarks.benchmark_startup import FIRST_STEP, time_to_first_step


@pytest.mark.parametrize("desc", ["steps", "Steps"])  # ours, the original's
def test_the_first_step_is_the_step_bars_first_update(desc):
    from tqdm import tqdm

    stream = io.StringIO()
    bar = tqdm(total=1, desc=desc, file=stream, mininterval=0)
    bar.refresh()
    assert not FIRST_STEP.search(stream.getvalue().encode())  # 0/1: not yet
    bar.update(1)
    bar.set_postfix(loss="0.1234")
    bar.close()
    assert FIRST_STEP.search(stream.getvalue().encode())


def test_time_to_first_step_is_taken_when_the_bar_shows_it(tmp_path):
    child = ("import sys, time\nfrom tqdm import tqdm\nbar = tqdm(total=1, desc='steps', mininterval=0)\n"
             "time.sleep(0.3)\nbar.update(1)\nsys.stderr.flush()\ntime.sleep(1.5)\nbar.close()\n")
    first_step, total = time_to_first_step("child", [sys.executable, "-c", child], None, tmp_path / "log")
    assert 0.3 <= first_step and total - first_step >= 1.2
    with pytest.raises(SystemExit, match="never finished a step"):
        time_to_first_step("child", [sys.executable, "-c", "print('no bar')"], None, tmp_path / "log")


STEP_LOOP = '''
import json, sys, time
import torch
sys.path.insert(0, {root!r})
from benchmarks import step_profile
step_profile.install({path!r})
from diffusers import CogVideoXTransformer3DModel

class Slow(torch.utils.data.Dataset):
    def __len__(self):
        return 4
    def __getitem__(self, index):
        time.sleep(0.05)  # loading
        return torch.randn(1, 4, 4, 4)

torch.manual_seed(0)
model = CogVideoXTransformer3DModel(num_attention_heads=1, attention_head_dim=16, in_channels=4, out_channels=4,
                                    time_embed_dim=4, text_embed_dim=8, num_layers=1, sample_width=4,
                                    sample_height=4, sample_frames=1, patch_size=2, max_text_seq_length=2)
optimizer = torch.optim.AdamW(model.parameters())
for latents in torch.utils.data.DataLoader(Slow(), batch_size=1):
    out = model(latents, torch.zeros(1, 2, 8), torch.tensor([1]), return_dict=False)[0]
    time.sleep(0.03)  # the rest of the step: noise, loss, logging
    out.square().mean().backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    optimizer.zero_grad()
'''


def test_the_step_profile_puts_each_second_in_its_phase(tmp_path):
    """benchmarks/step_profile.py, installed in a trainer-like loop: one entry per optimizer step, the loader's
    time under data, the transformer's under forward, the loss's backward under backward, what the loop does itself
    under other, and the phases add up to the step."""
    import json
    import subprocess

    from benchmarks.step_profile import PHASES, summary

    path = tmp_path / "steps.json"
    root = str(Path(__file__).resolve().parent.parent)
    subprocess.run([sys.executable, "-c", STEP_LOOP.format(root=root, path=str(path))], check=True, cwd=root)
    steps = json.loads(path.read_text())["steps"]
    assert len(steps) == 4
    for step in steps[1:]:  # the first also holds the set-up before the loop
        assert step["data"] >= 0.05 and step["other"] >= 0.03
        assert step["forward"] > 0 and step["backward"] > 0 and step["clip"] > 0 and step["optimizer"] > 0
        assert step["other"] < 0.03 + 0.05  # the loader's sleep is not counted twice
        assert sum(step[p] for p in (*PHASES, "other")) == pytest.approx(step["wall"])
    median, used = summary(steps)
    assert used == 2 and median["data"] >= 0.05
