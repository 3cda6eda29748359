"""Load a trained LoRA into a CogVideoX pipeline and write a video; also the pytest checks of it.

    python tests/test_lora_inference.py --prompt "BW_STYLE a panda plays the guitar" \\
        --model_path THUDM/CogVideoX-5b --lora_path outputs/my-lora --output_file out.mp4
"""

import argparse
import sys
from pathlib import Path


def generate_video(prompt, model_path, lora_path=None, lora_name="cogvideox-lora", lora_scale=1.0,
                   output_file="output.mp4", fps=8, num_inference_steps=50, height=None, width=None,
                   num_frames=None, seed=42, dtype="bf16", device=None):
    import torch
    from diffusers import CogVideoXPipeline
    from diffusers.utils import export_to_video

    torch_dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    pipe = CogVideoXPipeline.from_pretrained(model_path, torch_dtype=torch_dtype)
    if lora_path:
        pipe.load_lora_weights(lora_path, weight_name="pytorch_lora_weights.safetensors", adapter_name=lora_name)
        pipe.set_adapters([lora_name], [lora_scale])  # 1.0 = the scale the LoRA was trained and validated at
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe.to(device)
    sizes = {k: v for k, v in dict(height=height, width=width, num_frames=num_frames).items() if v is not None}
    frames = pipe(
        prompt,
        num_inference_steps=num_inference_steps,
        max_sequence_length=pipe.transformer.config.max_text_seq_length,
        generator=torch.Generator().manual_seed(seed),
        **sizes,
    ).frames[0]
    export_to_video(frames, output_file, fps=fps)
    return output_file


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--model_path", default="THUDM/CogVideoX-5b")
    parser.add_argument("--lora_path", default=None, help="Folder with pytorch_lora_weights.safetensors, or a Hub id.")
    parser.add_argument("--lora_name", default="cogvideox-lora")
    parser.add_argument("--lora_scale", type=float, default=1.0)
    parser.add_argument("--output_file", default="output.mp4")
    parser.add_argument("--fps", type=int, default=8)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num_frames", type=int, default=None)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="bf16")
    args = parser.parse_args(argv)
    path = generate_video(**{k: v for k, v in vars(args).items()})  # every argument, model_path included
    print(f"video written to {path}")


# ---------------------------------------------------------------------------------------------- pytest


def test_cli_writes_a_video_with_the_lora(trained_lora, tmp_path):
    import imageio.v3 as iio
    import numpy as np

    common = ["--prompt", "a cat walks on the grass", "--model_path", trained_lora["model"], "--num_inference_steps",
              "2", "--height", "32", "--width", "32", "--num_frames", "9", "--dtype", "fp32"]
    main([*common, "--lora_path", str(trained_lora["output"]), "--output_file", str(tmp_path / "lora.mp4")])
    main([*common, "--output_file", str(tmp_path / "base.mp4")])
    with_lora, base = iio.imread(tmp_path / "lora.mp4"), iio.imread(tmp_path / "base.mp4")
    assert with_lora.shape == base.shape == (9, 32, 32, 3)
    assert not np.array_equal(with_lora, base)


def test_cli_requires_a_prompt(capsys):
    import pytest

    with pytest.raises(SystemExit):
        main(["--model_path", "x"])
    assert "--prompt" in capsys.readouterr().err


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    import training  # noqa: F401  before diffusers: quiets optional kernels' import-time notices (training/__init__.py)

    main()
