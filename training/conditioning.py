"""What the transformer is conditioned on: one small class per task.

The training core asks its conditioning for the model input built from the noisy latents,
for extra transformer keyword arguments, for the pipeline class used by validation, and for
the validation cases. Text-to-video needs nothing beyond the prompt embeddings; the
image-to-video conditioning (first-frame latents concatenated on the channel axis) plugs in
through the same methods.
"""


class TextToVideo:
    name = "text-to-video"
    image_to_video = False  # the dataset need not keep the first frame

    @property
    def pipeline_class(self):
        from diffusers import CogVideoXPipeline

        return CogVideoXPipeline

    def check_args(self, args, transformer_config):
        """Problems (one line each) that make this conditioning unusable with these flags/model."""
        problems = []
        if transformer_config["in_channels"] != transformer_config["out_channels"]:
            problems.append(
                f"--pretrained_model_name_or_path {args.pretrained_model_name_or_path} is an image-to-video model "
                f"({transformer_config['in_channels']} input channels); use training/cogvideox_image_to_video_lora.py"
            )
        if args.validation_images:
            problems.append("--validation_images is only for the image-to-video trainers")
        return problems

    def model_input(self, noisy_latents, batch, context):
        return noisy_latents

    def transformer_kwargs(self, batch_size, context):
        return {}

    def validation_cases(self, args):
        """One dict of pipeline keyword arguments per validation prompt."""
        if not args.validation_prompt:
            return []
        prompts = [p.strip() for p in args.validation_prompt.split(args.validation_prompt_separator) if p.strip()]
        return [{"prompt": prompt} for prompt in prompts]
