"""Text-to-video full fine-tuning of CogVideoX; writes transformer/ (diffusers save_pretrained).

    accelerate launch --config_file accelerate_configs/uncompiled_2.yaml training/cogvideox_text_to_video_sft.py --pretrained_model_name_or_path THUDM/CogVideoX-2b ...
"""

import os, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script: find `training`
from training.core import trainer_main  # noqa: E402


main = trainer_main("text-to-video", "sft")
if __name__ == "__main__":
    main()
