"""Text-to-video LoRA fine-tuning of CogVideoX.

    accelerate launch --config_file accelerate_configs/uncompiled_1.yaml \
        training/cogvideox_text_to_video_lora.py --pretrained_model_name_or_path THUDM/CogVideoX-5b ...

Writes `pytorch_lora_weights.safetensors` (diffusers format) to --output_dir.
"""

import sys
from pathlib import Path


if __package__ in (None, ""):  # run as a script: make `training` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training.args import exit_on_usage_error  # noqa: E402
from training.conditioning import TextToVideo  # noqa: E402
from training.core import run  # noqa: E402
from training.modes import LoRA  # noqa: E402


@exit_on_usage_error
def main(argv=None):
    return run(argv, conditioning=TextToVideo(), mode=LoRA())


if __name__ == "__main__":
    main()
