"""Build the tiny models and runs the ComfyUI by-hand checks take (check_comfyui_lora.py, check_comfyui_workflow.py).

ComfyUI's loader detects a CogVideoX network from its weights as the published models have it: attention head dim
64, 16 latent channels, and for 2b the text length (226) and sample size (60x90 latents, 49 frames) its position
table has. The test suite's tiny models are narrower, so this builds random ones of that shape (one block, tiny
VAE with 16 latent channels) and trains each run 3 steps on the bundled clips, on CPU in about a minute each:

    5b       rotary positions: a plain LoRA on every target module, and a DoRA, a LoHa and a LoKr run
    2b       sincos positions with the published 2b's text length and sample size: a plain LoRA
    1.5      temporal patches: a plain LoRA

    python scripts/check_comfyui_runs.py --output_dir comfyui-runs
It prints the check commands for what it built. A model or run already in --output_dir is kept.
"""

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ALL_TARGETS = ("to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2,norm1.linear,norm2.linear,norm_out.linear,proj_out,"
               "proj,text_proj,linear_1,linear_2")
ADAPTER_TARGETS = "to_q,to_k,to_v,to_out.0,ff.net.0.proj,ff.net.2"
PUBLISHED_2B = dict(max_text_seq_length=226, sample_width=90, sample_height=60, sample_frames=49)
RUNS = {"5b": ("lora", "dora", "loha", "lokr"), "2b": ("lora",), "1.5": ("lora",)}


def build_model(folder, variant, heads):
    from diffusers import AutoencoderKLCogVideoX

    from tools.build_tiny_model import VARIANTS, build_pipeline

    with tempfile.TemporaryDirectory() as scratch:
        pipe = build_pipeline(variant=variant, scratch_dir=scratch, transformer=dict(
            num_attention_heads=heads, attention_head_dim=64, in_channels=16, out_channels=16,
            **(PUBLISHED_2B if variant == "2b" else {})))
    pipe.vae = AutoencoderKLCogVideoX(
        in_channels=3, out_channels=3, down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4, block_out_channels=(16, 16, 16, 16), latent_channels=16,
        layers_per_block=1, norm_num_groups=2, temporal_compression_ratio=4, **VARIANTS[variant].get("vae", {}))
    pipe.save_pretrained(folder)


def train(model, run, variant, kind):
    frames = ["5", "13", "--max_num_frames", "13"] if variant == "1.5" else ["5", "9", "--max_num_frames", "9"]
    targets = ["--lora_target_modules", ALL_TARGETS] if kind == "lora" else [
        "--lora_type", kind, "--lora_target_modules", ADAPTER_TARGETS]
    assets = ROOT / "assets" / "tests"
    argv = [sys.executable, str(ROOT / "training" / "cogvideox_text_to_video_lora.py"),
            "--pretrained_model_name_or_path", str(model), "--data_root", str(assets), "--caption_column",
            "prompts.txt", "--video_column", "videos.txt", "--height_buckets", "32", "48", "64", "--width_buckets",
            "32", "64", "96", "--frame_buckets", *frames, "--output_dir", str(run), "--train_batch_size", "2",
            "--rank", "4", "--lora_alpha", "8", "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "7",
            "--max_train_steps", "3", "--mixed_precision", "no", *targets]
    subprocess.run(argv, check=True, env={**os.environ, "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"})


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="where the models and runs go")
    args = parser.parse_args(argv)
    import training  # noqa: F401

    output = Path(args.output_dir)
    commands = []
    for variant, kinds in RUNS.items():
        model = output / f"model-{variant}"
        if not (model / "model_index.json").is_file():
            build_model(model, variant, heads=3 if variant == "2b" else 1)
        for kind in kinds:
            run = output / f"{variant}-{kind}"
            if not (run / "pytorch_lora_weights_comfyui.safetensors").is_file():
                train(model, run, variant, kind)
            merged = " --merged" if kind == "lora" else ""
            commands.append(f"python scripts/check_comfyui_lora.py --comfyui COMFYUI --model {model} --lora_dir {run}"
                            f"{merged}")
    commands.append(f"python scripts/check_comfyui_workflow.py --comfyui COMFYUI --model {output / 'model-5b'} "
                    f"--lora_dir {output / '5b-lora'}")
    print("\n".join(["built; check with (COMFYUI: your ComfyUI checkout; --pythonpath for its packages):", *commands]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
