"""Build a tiny, randomly initialised CogVideoX pipeline on disk, offline.

The demo and the tests use it in place of `THUDM/CogVideoX-*`: it has the same
component layout (tokenizer, text_encoder, vae, transformer, scheduler) and the
same scheduler settings as the real models, only with very small widths. The
training code never special-cases it; it is just another model path.

    python tools/build_tiny_model.py --output_dir tiny-cogvideox [--variant 2b|5b|5b-i2v|1.5|1.5-i2v]
"""

import argparse
import io
import os
import sys

import torch


# A handful of sentences is enough for a sentencepiece vocabulary of ~60 pieces.
CORPUS = [
    "a cat walks on the grass",
    "a dog runs in the park",
    "the camera pans slowly over a city at night",
    "a red car drives along the coast road",
    "waves crash on the beach under a cloudy sky",
    "a person rides a bicycle through the forest",
    "birds fly above the mountains at sunset",
    "a blue square moves across a black background",
    "BW_STYLE a black and white cartoon of a mouse",
]

# Real CogVideoX-2b/5b scheduler configuration (only the widths of the models are tiny).
SCHEDULER_CONFIG = dict(
    prediction_type="v_prediction",
    timestep_spacing="trailing",
    rescale_betas_zero_snr=True,
    clip_sample=False,
    set_alpha_to_one=True,
    snr_shift_scale=3.0,
    beta_schedule="scaled_linear",
    beta_start=0.00085,
    beta_end=0.012,
    num_train_timesteps=1000,
)

# Per-variant differences, mirroring the real models' configs (only widths are tiny):
#   2b      sincos positions                          (THUDM/CogVideoX-2b)
#   5b      rotary embeddings                         (THUDM/CogVideoX-5b)
#   5b-i2v  rotary + learned positions, image channels (THUDM/CogVideoX-5b-I2V)
#   1.5     temporal patches, "slice" rotary grid      (THUDM/CogVideoX1.5-5B)
#   1.5-i2v the same + image channels + ofs embedding  (THUDM/CogVideoX1.5-5B-I2V)
# Rotary needs head dim 16 at least (the 3D split of the real 64). 1.5's "slice" rotary grid caps
# the size at sample_height/width (300 latent px in the real models), so its tiny copy gets 32.
_ROTARY = dict(attention_head_dim=16, use_rotary_positional_embeddings=True)
_V15 = dict(_ROTARY, patch_size_t=2, patch_bias=False, sample_height=32, sample_width=32)
VARIANTS = {
    "2b": dict(transformer=dict(attention_head_dim=8, use_rotary_positional_embeddings=False)),
    "5b": dict(transformer=_ROTARY),
    "5b-i2v": dict(transformer=dict(_ROTARY, in_channels=8, use_learned_positional_embeddings=True), i2v=True),
    "1.5": dict(transformer=_V15, vae=dict(invert_scale_latents=True)),
    "1.5-i2v": dict(
        transformer=dict(_V15, in_channels=8, ofs_embed_dim=4),
        vae=dict(invert_scale_latents=True),
        i2v=True,
    ),
}


def build_tokenizer(directory):
    import sentencepiece as spm
    from transformers import T5Tokenizer

    os.makedirs(directory, exist_ok=True)
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS * 20),
        model_writer=buffer,
        vocab_size=64,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    with open(os.path.join(directory, "spiece.model"), "wb") as f:
        f.write(buffer.getvalue())
    # transformers 5 ignores T5Tokenizer(vocab_file=...); from_pretrained reads spiece.model.
    return T5Tokenizer.from_pretrained(directory, extra_ids=0)


def build_pipeline(variant="2b", seed=0, max_text_seq_length=16, sample_size=8, scratch_dir=None, transformer=None):
    """`transformer`: arguments that replace the variant's (e.g. wider layers, for a memory measurement)."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXImageToVideoPipeline,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    spec = VARIANTS[variant]
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    if scratch_dir is None:
        import tempfile

        scratch_dir = tempfile.mkdtemp(prefix="tiny-tokenizer-")
    tokenizer = build_tokenizer(scratch_dir)
    text_encoder = T5EncoderModel(
        T5Config(
            d_model=32,
            num_layers=1,
            num_heads=2,
            d_ff=37,
            d_kv=8,
            vocab_size=1000,
            relative_attention_num_buckets=8,
            feed_forward_proj="gated-gelu",
        )
    )
    # Spatial /8 and temporal /4 like the real VAE; 9 frames -> 3 latent frames.
    vae = AutoencoderKLCogVideoX(
        in_channels=3,
        out_channels=3,
        down_block_types=("CogVideoXDownBlock3D",) * 4,
        up_block_types=("CogVideoXUpBlock3D",) * 4,
        block_out_channels=(8, 8, 8, 8),
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=2,
        temporal_compression_ratio=4,
        **spec.get("vae", {}),
    )
    transformer_config = dict(
        num_attention_heads=2,
        in_channels=4,
        out_channels=4,
        time_embed_dim=4,
        text_embed_dim=32,
        num_layers=1,
        sample_width=sample_size,
        sample_height=sample_size,
        sample_frames=9,
        patch_size=2,
        temporal_compression_ratio=4,
        max_text_seq_length=max_text_seq_length,
        use_learned_positional_embeddings=False,
    )
    transformer = CogVideoXTransformer3DModel(**{**transformer_config, **spec["transformer"], **(transformer or {})})
    scheduler = CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)
    pipeline_class = CogVideoXImageToVideoPipeline if spec.get("i2v") else CogVideoXPipeline
    return pipeline_class(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer, scheduler=scheduler
    )


def save_tiny_model(output_dir, variant="2b", seed=0, transformer=None):
    import tempfile

    with tempfile.TemporaryDirectory(prefix="tiny-tokenizer-") as scratch:
        pipe = build_pipeline(variant=variant, seed=seed, scratch_dir=scratch, transformer=transformer)
        pipe.save_pretrained(output_dir)
    return output_dir


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="2b")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    save_tiny_model(args.output_dir, variant=args.variant, seed=args.seed)
    print(f"tiny CogVideoX-{args.variant}-style pipeline written to {args.output_dir}")


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import training  # noqa: F401  before diffusers: quiets optional kernels' import-time notices (training/__init__.py)

    sys.exit(main())
