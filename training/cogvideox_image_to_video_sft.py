"""Image-to-video full fine-tuning of CogVideoX-5b-I2V / 1.5-5B-I2V; writes transformer/.

    accelerate launch --config_file accelerate_configs/deepspeed.yaml training/cogvideox_image_to_video_sft.py --pretrained_model_name_or_path THUDM/CogVideoX-5b-I2V ...
"""

import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: find `training`
from training.core import trainer_main  # noqa: E402


main = trainer_main("image-to-video", "sft")
if __name__ == "__main__":
    main()
