"""Text-to-video LoRA fine-tuning of CogVideoX; writes pytorch_lora_weights.safetensors (diffusers format).

    accelerate launch --config_file accelerate_configs/uncompiled_1.yaml training/cogvideox_text_to_video_lora.py --pretrained_model_name_or_path THUDM/CogVideoX-5b ...
"""

import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: find `training`
from training.core import trainer_main  # noqa: E402


main = trainer_main("text-to-video", "lora")
if __name__ == "__main__":
    main()
