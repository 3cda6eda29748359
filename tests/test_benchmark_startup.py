"""benchmarks/benchmark_startup.py: it stops the clock at the first optimizer step of either trainer, as their step
bars show it, and not before."""

import io
import sys

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
