"""Image-to-video LoRA fine-tuning of CogVideoX-5b-I2V / 1.5-5B-I2V; writes pytorch_lora_weights.safetensors.

    accelerate launch --config_file accelerate_configs/uncompiled_1.yaml training/cogvideox_image_to_video_lora.py --pretrained_model_name_or_path THUDM/CogVideoX-5b-I2V ...
"""

import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: find `training`
from training.core import trainer_main  # noqa: E402


main = trainer_main("image-to-video", "lora")
if __name__ == "__main__":
    main()
