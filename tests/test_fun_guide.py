"""CogVideoX-Fun's LoRA training guide, run as written against our trainers (docs/image-to-video.md).

The guide (scripts/cogvideox_fun/README_TRAIN_LORA.md of aigc-apps/VideoX-Fun) trains CogVideoX-Fun-2b-InP with
`accelerate launch scripts/cogvideox_fun/train_lora.py ...`; its full fine-tune (scripts/cogvideox_fun/train.sh) runs
train.py with nearly the same flags. Each Fun flag must mean here what it means in Fun's code (commit 804a425):
--train_data_dir the folder --train_data_meta's paths are relative to (videox_fun/data/dataset_image_video.py),
--adam_weight_decay / --adam_epsilon its torch.optim.AdamW's settings, --network_alpha peft's lora_alpha and
--target_name peft's target_modules (train_lora.py: `LoraConfig(r=args.rank, lora_alpha=args.network_alpha,
target_modules=args.target_name.split(","))`), --vae_mini_batch the clips its VAE encodes at once, --low_vram its
encoders kept on the CPU between uses, --train_mode inpaint its inpaint latents (tests/test_inpaint.py).
"""

import json
import shlex
import shutil

import pytest
import torch
from conftest import (
    ASSETS,
    lora_argv,
    lora_weights,
    prepare_argv,
    run_prepare,
    run_trainer,
    stopped_run_stderr,
    trainer_main,
)


# The guide's command, as it is printed there (only the environment's paths differ).
GUIDE_COMMAND = """
accelerate launch --mixed_precision="bf16" scripts/cogvideox_fun/train_lora.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$DATASET_NAME \\
  --train_data_meta=$DATASET_META_NAME \\
  --image_sample_size=512 \\
  --video_sample_size=512 \\
  --token_sample_size=512 \\
  --video_sample_stride=3 \\
  --video_sample_n_frames=49 \\
  --train_batch_size=1 \\
  --video_repeat=1 \\
  --gradient_accumulation_steps=1 \\
  --dataloader_num_workers=8 \\
  --num_train_epochs=100 \\
  --checkpointing_steps=50 \\
  --learning_rate=1e-04 \\
  --seed=42 \\
  --output_dir="output_dir" \\
  --gradient_checkpointing \\
  --mixed_precision="bf16" \\
  --adam_weight_decay=3e-2 \\
  --adam_epsilon=1e-10 \\
  --vae_mini_batch=1 \\
  --max_grad_norm=0.05 \\
  --random_hw_adapt \\
  --training_with_video_token_length \\
  --enable_bucket \\
  --rank=64 \\
  --network_alpha=32 \\
  --target_name="to_q,to_k,to_v,ff.0,ff.2" \\
  --use_peft_lora \\
  --low_vram \\
  --train_mode="inpaint"
"""

# scripts/cogvideox_fun/train.sh: the full fine-tune's command.
TRAIN_SH_COMMAND = """
accelerate launch --mixed_precision="bf16" scripts/cogvideox_fun/train.py \\
  --pretrained_model_name_or_path=$MODEL_NAME \\
  --train_data_dir=$DATASET_NAME \\
  --train_data_meta=$DATASET_META_NAME \\
  --image_sample_size=512 \\
  --video_sample_size=512 \\
  --token_sample_size=512 \\
  --video_sample_stride=3 \\
  --video_sample_n_frames=49 \\
  --train_batch_size=1 \\
  --video_repeat=1 \\
  --gradient_accumulation_steps=1 \\
  --dataloader_num_workers=8 \\
  --num_train_epochs=100 \\
  --checkpointing_steps=50 \\
  --learning_rate=2e-05 \\
  --lr_scheduler="constant_with_warmup" \\
  --lr_warmup_steps=100 \\
  --seed=42 \\
  --output_dir="output_dir_cogvideox_fun" \\
  --gradient_checkpointing \\
  --mixed_precision="bf16" \\
  --adam_weight_decay=3e-2 \\
  --adam_epsilon=1e-10 \\
  --vae_mini_batch=1 \\
  --max_grad_norm=0.05 \\
  --random_hw_adapt \\
  --training_with_video_token_length \\
  --enable_bucket \\
  --train_mode="inpaint" \\
  --trainable_modules "."
"""


def command_argv(command, model="MODEL", data="DATA", meta="DATA/metadata.json", output=None):
    """The script's flags of a shell command, with the guide's variables set (and --output_dir moved to `output`)."""
    text = (command.replace("$MODEL_NAME", str(model)).replace("$DATASET_NAME", str(data))
            .replace("$DATASET_META_NAME", str(meta)))
    words = shlex.split(text.replace("\\\n", " "))  # the shell's line continuations
    argv = words[next(i for i, w in enumerate(words) if w.startswith("scripts/")) + 1:]
    if output is not None:
        argv = [f"--output_dir={output}" if w.startswith("--output_dir=") else w for w in argv]
    return argv


@pytest.fixture(scope="module")
def fun_dataset(tmp_path_factory):
    """Fun's layout: a folder (--train_data_dir) with metadata.json listing its clips by relative path."""
    folder = tmp_path_factory.mktemp("internal_datasets")
    shutil.copytree(ASSETS / "videos", folder / "videos")
    captions = (ASSETS / "prompts.txt").read_text().splitlines()
    videos = (ASSETS / "videos.txt").read_text().splitlines()
    entries = [{"file_path": video, "text": caption, "type": "video"} for caption, video in zip(captions, videos)]
    (folder / "metadata.json").write_text(json.dumps(entries))
    return folder


def test_the_guides_flags_land_in_their_sections():
    """Parsed only: every flag of the guide is known, and each lands in the section value of its meaning."""
    from training.args import parse_args
    from training.sections import run_flags

    flags = run_flags(parse_args(command_argv(GUIDE_COMMAND), conditioning="text-to-video", mode="lora"))
    assert (flags.data.data_root, flags.data.train_data_meta) == ("DATA", "DATA/metadata.json")
    assert (flags.optimizer.optimizer, flags.optimizer.weight_decay, flags.optimizer.epsilon) == ("adamw", 3e-2, 1e-10)
    assert (flags.lora.rank, flags.lora.lora_alpha, flags.lora.lora_target_modules) == (64, 32, "to_q,to_k,to_v,ff.0,ff.2")
    assert flags.lora.use_peft_lora
    assert (flags.memory.vae_mini_batch, flags.memory.low_vram, flags.memory.gradient_checkpointing) == (1, True, True)
    assert flags.training.train_mode == "inpaint"
    assert (flags.optimizer.max_grad_norm, flags.training.mixed_precision, flags.training.seed) == (0.05, "bf16", 42)
    assert (flags.buckets.enable_bucket, flags.buckets.video_sample_n_frames, flags.buckets.video_repeat) == (True, 49, 1)


@pytest.mark.parametrize("argv, optimizer", [
    (["--adam_weight_decay", "0.1"], "adamw"),  # Fun's names are its AdamW's settings
    (["--adam_epsilon=1e-10"], "adamw"),
    (["--adam_weight_decay", "0.1", "--optimizer", "adam"], "adam"),  # an --optimizer given is kept
    (["--weight_decay", "0.1"], "adam"),  # our own names leave our default
])
def test_funs_optimizer_names_choose_adamw_unless_an_optimizer_is_given(argv, optimizer):
    from training.args import parse_args

    args = parse_args(["--pretrained_model_name_or_path", "M", *argv])
    assert (args.optimizer, args.weight_decay == 0.1 or args.epsilon == 1e-10) == (optimizer, True)


@pytest.mark.parametrize("train_mode, conditioning", [("normal", "TextToVideo"), ("inpaint", "FunInpaint"),
                                                     ("i2v", "FunInpaint")])  # Fun: every mode but normal inpaints
def test_the_train_mode_chooses_the_conditioning(train_mode, conditioning):
    from training.args import parse_args
    from training.conditioning import TextToVideo
    from training.sections import run_flags

    flags = run_flags(parse_args(["--pretrained_model_name_or_path", "M", "--train_mode", train_mode]))
    assert type(TextToVideo().for_flags(flags.training, flags.data)).__name__ == conditioning


@pytest.mark.parametrize("run", ["inp", "control"])
def test_funs_validation_lists_pair_each_prompt_with_its_input(tmp_path, run):
    """Fun's --validation_prompts and --validation_paths (nargs="+"; README_TRAIN_LORA.md: `--validation_prompts
    "prompt1" "prompt2"`): validation i is prompt i with path i, which Fun's log_validation opens as the first frame
    of an InP run (train_lora.py: `Image.open(args.validation_paths[i])`) and reads as the control video of a Control
    run (train_control.py: `get_video_to_video_latent(args.validation_paths[i], ...)`)."""
    import imageio.v3 as iio
    import numpy as np

    from training.args import parse_args
    from training.conditioning import TextToVideo
    from training.sections import run_flags

    clips = [ASSETS / "videos" / "square.mp4", ASSETS / "videos" / "ball.mp4"]
    if run == "inp":
        paths = [tmp_path / "square.png", tmp_path / "ball.png"]
        for clip, path in zip(clips, paths):
            iio.imwrite(path, iio.imread(clip)[0])
        extra = ["--train_mode", "inpaint"]
    else:
        paths, extra = clips, ["--control_column", "controls.txt"]
    args = parse_args(["--pretrained_model_name_or_path", "M", *extra, "--validation_prompts", "a cat walks",
                       "a ball rolls", "--validation_paths", *map(str, paths)])
    assert (args.validation_prompts, args.validation_paths) == (None, None)  # the run's saved config: ours only
    flags = run_flags(args)
    conditioning = TextToVideo().for_flags(flags.training, flags.data)
    conditioning.validation_num_frames = 9  # (check_args sets it from the run's frames)
    cases = conditioning.validation_cases(flags.validation)
    assert [case["prompt"] for case in cases] == ["a cat walks", "a ball rolls"]
    for case, clip in zip(cases, clips):
        given = np.asarray(case["image"] if run == "inp" else case["control_video"][0])
        assert np.array_equal(given, iio.imread(clip)[0])


def test_funs_validation_lists_give_way_to_the_command_line_and_print_joined(tmp_path, capsys):
    """A --config file's form of the prompts gives way to the command line's other form (rerunning a run's saved
    config with other prompts, in either form); the image-to-video trainers read --validation_paths as first frames;
    --print_config shows the joined flag the run saves."""
    from training.args import parse_args

    saved = tmp_path / "saved.toml"
    saved.write_text('[validation]\nvalidation_prompt = "a:::b"\n', encoding="utf-8")
    fun = tmp_path / "fun.toml"
    fun.write_text('[validation]\nvalidation_prompts = ["a", "b"]\n', encoding="utf-8")
    model = ["--pretrained_model_name_or_path", "M"]
    saved, fun = str(saved), str(fun)
    assert parse_args([*model, "--config", saved, "--validation_prompts", "c", "d"]).validation_prompt == "c:::d"
    assert parse_args([*model, "--config", fun, "--validation_prompt", "e"]).validation_prompt == "e"
    assert parse_args([*model, "--config", fun]).validation_prompt == "a:::b"
    i2v = parse_args([*model, "--validation_prompts", "a", "--validation_paths", "a.png"], conditioning="image-to-video")
    assert (i2v.validation_images, i2v.validation_control_videos) == ("a.png", None)
    with pytest.raises(SystemExit):
        parse_args([*model, "--validation_prompts", "a", "b", "--print_config"])
    printed = capsys.readouterr().out
    assert 'validation_prompt = "a:::b"' in printed and "validation_prompts" not in printed


@pytest.mark.parametrize("argv, error", [
    (["--validation_paths", "a.mp4"], "--validation_control_videos (or CogVideoX-Fun's --validation_paths without "
     "--train_mode inpaint) is for CogVideoX-Fun Control runs: the data gives no control videos (--control_column, or "
     "control_file_path in --train_data_meta)"),
    (["--validation_prompts", "a", "--validation_prompt", "b"],
     "--validation_prompts (CogVideoX-Fun's) and --validation_prompt give the same thing: use one"),
    (["--validation_prompts", "a:::b", "c"], "--validation_prompts: an entry contains the separator ':::'; choose "
     "another with --validation_prompt_separator"),
], ids=["neither-inp-nor-control", "both-forms", "separator-inside"])
def test_funs_validation_lists_that_cannot_be_read_are_one_line(capsys, tiny_model_2b, tmp_path, argv, error):
    lines = stopped_run_stderr(capsys, lora_argv(tiny_model_2b, ASSETS, tmp_path / "out", *argv))
    assert lines == [f"error: {error}"]


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # the guide's --dataloader_num_workers=8
def test_the_guides_command_dry_runs_on_a_fun_inp_model(tiny_fun_inp, fun_dataset, tmp_path):
    """The guide's command as written: the plan holds Fun's adapter (rank 64, alpha 32) on the modules its peft
    matches: to_q, to_k and to_v; "ff.0" and "ff.2" name no module of a CogVideoX transformer (its feed-forward
    layers are ff.net.0.proj and ff.net.2), in Fun's code as here."""
    argv = command_argv(GUIDE_COMMAND, tiny_fun_inp, f"{fun_dataset}/", fun_dataset / "metadata.json", tmp_path / "out")
    plan = run_trainer([*argv, "--dry_run"])["dry_run"]
    assert plan["samples_for_training"] == 6
    assert (plan["recipe"]["rank"], plan["recipe"]["alpha"]) == (64, 32)
    width = 2 * 8  # the tiny transformer's heads x head dim; one block
    assert plan["trainable_parameters"] == 3 * (64 * width + width * 64)


def test_the_guides_command_trains_a_fun_inp_model(monkeypatch, tiny_fun_inp, fun_dataset, tmp_path):
    """The guide's command trains: the encoders wait on the CPU between uses (--low_vram), the VAE encodes one clip
    at a time (--vae_mini_batch 1), the transformer takes the noisy latents with the inpaint latents (--train_mode
    inpaint), and the LoRA is written. Two steps at the guide's sizes (Fun upscales the tiny clips to 512)."""
    import training.conditioning as conditioning
    import training.core as core
    import training.models as models

    seen = {"inputs": [], "slicing": [], "offloaded": []}
    load_vae, offload = models.load_vae, models.offload_between_uses
    monkeypatch.setattr(core, "load_vae", lambda *args: seen["slicing"].append(args[2]) or load_vae(*args))
    monkeypatch.setattr(models, "offload_between_uses",
                        lambda encoders, device: seen["offloaded"].append(sorted(encoders)) or offload(encoders, device))
    original = conditioning.FunInpaint.model_input

    def recording(self, noisy_latents, batch, context):
        model_input = original(self, noisy_latents, batch, context)
        seen["inputs"].append((tuple(noisy_latents.shape), tuple(model_input.shape)))
        assert torch.equal(model_input[:, :, :noisy_latents.shape[2]], noisy_latents)  # the noisy latents first
        return model_input

    monkeypatch.setattr(conditioning.FunInpaint, "model_input", recording)
    argv = command_argv(GUIDE_COMMAND, tiny_fun_inp, f"{fun_dataset}/", fun_dataset / "metadata.json", tmp_path / "out")
    summary = run_trainer([*argv, "--max_train_steps", "2", "--dataloader_num_workers", "0"])
    assert summary["global_step"] == 2 and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert seen["slicing"] == [True] and seen["offloaded"] == [["text_encoder", "tokenizer", "vae"]]
    assert len(seen["inputs"]) == 2
    for noisy, model_input in seen["inputs"]:
        assert model_input[2] == 2 * noisy[2] + 1 == 9 and model_input[:2] + model_input[3:] == noisy[:2] + noisy[3:]


@pytest.mark.parametrize("model, changes, expected", [
    ("fun", ["--vae_mini_batch", "2", "--train_batch_size", "4"],
     "--vae_mini_batch 2: the VAE here encodes one clip at a time (1) or the whole batch at once"),
    ("fun", ["--vae_mini_batch", "0"], "--vae_mini_batch must be at least 1 (got 0)"),
    ("fun", ["--train_mode", "normal"], "is a CogVideoX-Fun InP model (9 input channels"),
    ("fun", ["--validation_prompt", "a cat"], "1 validation prompts but 0 --validation_images: an InP model"),
    ("2b", [], "--train_mode inpaint trains a CogVideoX-Fun InP model (9 input channels"),
], ids=["vae-mini-batch-within-the-batch", "vae-mini-batch-zero", "normal-mode-on-an-inp-model",
        "validation-of-an-inp-model", "inpaint-mode-on-a-text-to-video-model"])
def test_what_cannot_be_followed_is_one_line(capsys, tiny_fun_inp, tiny_model_2b, fun_dataset, tmp_path, model,
                                             changes, expected):
    model = tiny_fun_inp if model == "fun" else tiny_model_2b
    argv = command_argv(GUIDE_COMMAND, model, fun_dataset, fun_dataset / "metadata.json", tmp_path / "out")
    lines = stopped_run_stderr(capsys, [*argv, *changes, "--dry_run"])  # were a check missing: no 100 epochs
    assert any(expected in line for line in lines), lines


def test_the_image_to_video_trainers_refuse_funs_train_mode(capsys, tiny_fun_inp, fun_dataset, tmp_path):
    argv = command_argv(GUIDE_COMMAND, tiny_fun_inp, fun_dataset, fun_dataset / "metadata.json", tmp_path / "out")
    lines = stopped_run_stderr(capsys, [*argv, "--dry_run"], trainer_main("cogvideox_image_to_video_lora"))
    assert any("--train_mode inpaint is CogVideoX-Fun's" in line and "text_to_video" in line for line in lines), lines


def test_the_full_fine_tune_takes_train_sh_s_flags(capsys, tiny_fun_inp, fun_dataset, tmp_path):
    """train.sh's flags pass the full fine-tuning trainer's checks (its dry run's memory estimate is left out: it is
    the LoRA's above, for all weights): --trainable_modules "." (every weight's name has a dot: all train, as here)
    is accepted; a list that would leave weights frozen is one line, since everything trains here."""
    from training.args import parse_args
    from training.conditioning import TextToVideo
    from training.modes import Full
    from training.sections import run_flags
    from training.settings import validate_training_args

    argv = command_argv(TRAIN_SH_COMMAND, tiny_fun_inp, fun_dataset, fun_dataset / "metadata.json", tmp_path / "out")
    flags = run_flags(parse_args(argv, conditioning="text-to-video", mode="sft"))
    assert (flags.training.trainable_modules, flags.training.lr_scheduler, flags.optimizer.optimizer) == (
        (".",), "constant_with_warmup", "adamw")
    settings = validate_training_args(flags, TextToVideo().for_flags(flags.training, flags.data), Full())
    assert settings.transformer_config["in_channels"] == 9
    lines = stopped_run_stderr(capsys, [*argv[:-1], "attn1", "--dry_run"], trainer_main("cogvideox_text_to_video_sft"))
    assert any("--trainable_modules attn1 would leave" in line and "frozen" in line for line in lines), lines


def test_low_vram_keeps_encoders_on_the_cpu_between_uses():
    """--low_vram: each encoder moves to the accelerator for its call (with its inputs) and back afterwards."""
    from cuda_semantics import fake_cuda

    from training.models import offload_between_uses

    class Vae(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Linear(4, 4)

        def encode(self, x):
            return (self.conv.weight.device, x.device)

        def decode(self, x):
            return (self.conv.weight.device, x.device)

    class TextEncoder(torch.nn.Linear):
        def forward(self, x):
            return (self.weight.device, x.device)

    with fake_cuda(None, loading=True):
        vae, text_encoder = Vae().to("cuda"), TextEncoder(4, 4).to("cuda")
        offload_between_uses({"vae": vae, "text_encoder": text_encoder, "tokenizer": object()}, "cuda")
        assert (vae.conv.weight.device.type, text_encoder.weight.device.type) == ("cpu", "cpu")
        for during in (vae.encode(torch.zeros(4)), vae.decode(torch.zeros(4)), text_encoder(torch.zeros(4))):
            assert [d.type for d in during] == ["cuda", "cuda"]
        assert (vae.conv.weight.device.type, text_encoder.weight.device.type) == ("cpu", "cpu")


def test_a_fun_inp_model_trains_from_prepared_latents(monkeypatch, tiny_fun_inp, tmp_path):
    """--load_tensors: the clips' latents come prepared; the masked clip is made from the stored first frame (kept)
    and -1 for the frames after it (Fun's image_start_only mask) and encoded every step."""
    import training.conditioning as conditioning

    run_prepare(prepare_argv(tiny_fun_inp, ASSETS, tmp_path / "prepared", "--save_image_latents"))
    encoded = []
    original = conditioning.inpaint_latents

    def recording(vae, video, mask, *args):
        encoded.append((video.clone(), mask.clone()))
        return original(vae, video, mask, *args)

    monkeypatch.setattr(conditioning, "inpaint_latents", recording)
    argv = lora_argv(tiny_fun_inp, tmp_path / "prepared", tmp_path / "out", "--load_tensors", "--train_mode", "inpaint",
                     "--max_train_steps", "2")
    summary = run_trainer([a for a in argv if a not in ("--caption_column", "prompts.txt", "--video_column",
                                                        "videos.txt")])
    assert summary["global_step"] == 2 and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    assert len(encoded) == 2
    for video, mask in encoded:
        frames = video.shape[1]
        assert frames in (5, 9) and mask.shape == (video.shape[0], frames, 1, *video.shape[3:])
        assert mask[:, 0].sum() == 0 and bool((mask[:, 1:] == 1).all())  # the first frame kept, the rest generated
        assert bool((video[:, 1:] == -1).all()) and video[:, 0].abs().sum() > 0


def test_an_inpaint_run_resumes_exactly(tiny_fun_inp, fun_dataset, tmp_path):
    """Fun's random masks, their full-mask draws, the masked clips' noise and latents all come from generators a
    checkpoint keeps: four steps, and two resumed from the second step's checkpoint, end on the same LoRA."""
    def argv(output, *extra):
        return ["--pretrained_model_name_or_path", tiny_fun_inp, "--train_data_dir", fun_dataset, "--train_data_meta",
                fun_dataset / "metadata.json", "--height_buckets", "32", "--width_buckets", "32", "--frame_buckets", "9",
                "--max_num_frames", "9", "--train_batch_size", "2", "--rank", "4", "--network_alpha", "4",
                "--learning_rate", "1e-2", "--lr_warmup_steps", "0", "--seed", "7", "--train_mode", "inpaint",
                "--max_train_steps", "4", "--checkpointing_steps", "2", "--output_dir", output, *extra]

    run_trainer(argv(tmp_path / "whole"))
    run_trainer(argv(tmp_path / "resumed", "--resume_from_checkpoint", tmp_path / "whole" / "checkpoint-2"))
    whole, resumed = lora_weights(tmp_path / "whole"), lora_weights(tmp_path / "resumed")
    assert whole.keys() == resumed.keys() and all(torch.equal(whole[k], resumed[k]) for k in whole)


def test_the_dry_run_counts_low_vram_encoders_only_while_they_encode(tiny_fun_inp, fun_dataset, tmp_path):
    """--low_vram keeps T5 and the VAE in CPU memory between uses: the training estimate counts their weights only
    while they run, so it is lower than without the flag (the transformer's step, not an encode, is the peak here),
    by no more than the encoders' weights."""
    from safetensors import safe_open

    argv = command_argv(GUIDE_COMMAND, tiny_fun_inp, f"{fun_dataset}/", fun_dataset / "metadata.json", tmp_path / "a")
    with_flag = run_trainer([*argv, "--dry_run"])["dry_run"]["peak_memory_bytes"]["training"]
    without = [word for word in argv if word != "--low_vram"]
    without[without.index(f"--output_dir={tmp_path / 'a'}")] = f"--output_dir={tmp_path / 'b'}"
    without_flag = run_trainer([*without, "--dry_run"])["dry_run"]["peak_memory_bytes"]["training"]
    encoder_bytes = 0
    for part in ("text_encoder", "vae"):
        for weights in (tiny_fun_inp / part).glob("*.safetensors"):
            with safe_open(str(weights), "pt") as f:
                encoder_bytes += sum(f.get_tensor(k).numel() * 2 for k in f.keys())  # bf16 in the run
    assert with_flag < without_flag <= with_flag + encoder_bytes + 2 * 2**20  # weights, allocation granularity


def test_low_vram_encoders_count_in_the_estimate_only_while_they_run():
    """The estimate's view of --low_vram: an encoder's weights are on the accelerator during its call (the encode's
    activations come on top), and off before and after."""
    from training.memory import AllocationTracker
    from training.memory_estimate import _on_device_while_running

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1024, 256))  # 1 MiB

        def encode(self, x):
            seen.append(tracker.current)
            return x @ self.weight

    seen, tracker = [], AllocationTracker()
    encoder = Encoder()
    _on_device_while_running(tracker, encoder, ("encode",))
    assert tracker.current == 0
    x = torch.zeros(4, 1024)  # made before counting starts
    with tracker:
        encoder.encode(x)
    assert seen == [2**20] and tracker.current == 0 and tracker.peak >= 2**20
