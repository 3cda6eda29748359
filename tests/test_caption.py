"""tools/caption_videos.py on a tiny random vision-language model built offline (a LLaVA: a 1-layer CLIP vision
tower and a 1-layer Llama, a word-level tokenizer with a chat template). Its captions are random words, but every
stage of a real run happens: decoding, the chat template, the processor, batched generation, the files written."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import ASSETS, ROOT


CORPUS = [
    "a cat walks on the grass", "a dog runs in the park", "the camera pans slowly over a city at night",
    "waves crash on the beach under a cloudy sky", "a red ball bounces", "describe this video in one paragraph",
]
SPECIAL = ["[UNK]", "<pad>", "<|im_start|>", "<|im_end|>", "<image>"]
# The shape of the Qwen and LLaVA-OneVision templates: a user turn of images and text, then the assistant's turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<image>{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """The tiny model's matrices are too small to share out: one thread is faster, most of all on a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_vlm(tmp_path_factory):
    """A folder that AutoProcessor and AutoModelForImageTextToText load: a tiny random LLaVA (CLIP 32x32 images,
    16 tokens each), whose special tokens can never be generated, so every caption is max_new_tokens words."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
        PreTrainedTokenizerFast,
    )
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    folder = tmp_path_factory.mktemp("tiny-vlm")
    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(CORPUS, trainers.WordLevelTrainer(special_tokens=SPECIAL, show_progress=False))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="[UNK]", pad_token="<pad>",
                                        bos_token="<|im_start|>", eos_token="<|im_end|>")
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in SPECIAL}
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=8, chat_template=CHAT_TEMPLATE,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1).save_pretrained(folder)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                       num_attention_heads=2, image_size=32, patch_size=8, projection_dim=32),
        text_config=LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                                bos_token_id=ids["<|im_start|>"], eos_token_id=ids["<|im_end|>"],
                                pad_token_id=ids["<pad>"]),
        image_token_id=ids["<image>"], vision_feature_select_strategy="default", vision_feature_layer=-1,
    )
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():  # zero logits for the special tokens: some random word always scores higher
        model.lm_head.weight[list(ids.values())] = 0
    model.save_pretrained(folder)
    return str(folder)


def clip_folder(root, broken=True):
    """3 clips (one in a sub-folder), a still, a hidden clip and, with `broken`, a corrupt .mp4."""
    import imageio.v3 as iio
    from PIL import Image

    root.mkdir()
    (root / "sub").mkdir()
    shutil.copy(ASSETS / "videos" / "square.mp4", root / "a.mp4")
    shutil.copy(ASSETS / "videos" / "wide.mp4", root / "c.mp4")
    shutil.copy(ASSETS / "videos" / "ball.mp4", root / "sub" / "b.mp4")
    shutil.copy(ASSETS / "videos" / "ball.mp4", root / ".hidden.mp4")
    Image.fromarray(iio.imread(ASSETS / "videos" / "sunset.mp4")[3]).save(root / "still.png")
    if broken:
        (root / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 this is not a video" * 20)
    return root


GOOD = ["a.mp4", "c.mp4", "still.png", "sub/b.mp4"]  # the folder's order (sorted), the broken and hidden left out


def caption(model, folder, *extra):
    from tools.caption_videos import main

    argv = ["--input_dir", folder, "--model_name_or_path", model, "--num_frames", "4", "--batch_size", "2",
            "--max_new_tokens", "6", "--device", "cpu", "--use_vllm", "no", *extra]
    return main([str(a) for a in argv])


def lines(path):
    return path.read_text(encoding="utf-8").splitlines()


def test_lists_mode_captions_every_readable_clip_in_order_and_reports_the_broken_one(tiny_vlm, tmp_path, capsys):
    folder = clip_folder(tmp_path / "clips")
    summary = caption(tiny_vlm, folder, "--id_token", "TOK")
    err = capsys.readouterr().err
    assert summary["captioned"] == 4 and summary["skipped"] == [str(folder / "broken.mp4")]
    assert lines(folder / "videos.txt") == GOOD
    prompts = lines(folder / "prompts.txt")
    assert len(prompts) == 4 and all(p.startswith("TOK ") and len(p.split()) >= 2 for p in prompts)
    assert [line for line in err.splitlines() if "broken.mp4" in line and line.startswith("error:")]
    assert "1 clip skipped: broken.mp4" in err
    records = [json.loads(line) for line in lines(folder / "captions.jsonl")]
    assert [r["video"] for r in records] == ["a.mp4", "c.mp4", "still.png", "sub/b.mp4"]
    assert [f"TOK {r['caption']}" for r in records] == prompts  # the id token goes to the lists, not the progress

    # The trainer reads what was written: lists, in the same order, the id token once.
    from training.dataset import load_samples

    samples = load_samples(folder, None, "prompts.txt", "videos.txt")
    assert [s.video_path for s in samples] == [folder / name for name in GOOD]


def test_same_seed_same_captions_when_sampling(tiny_vlm, tmp_path):
    folder = clip_folder(tmp_path / "clips", broken=False)
    runs = {}
    for name, seed in (("first", 3), ("again", 3), ("other", 4)):
        out = tmp_path / name
        caption(tiny_vlm, folder, "--output_dir", out, "--temperature", "1.0", "--seed", seed)
        runs[name] = lines(out / "prompts.txt")
        assert lines(out / "videos.txt") == [f"../clips/{clip}" for clip in GOOD]  # relative to the lists
    assert runs["first"] == runs["again"]
    assert runs["first"] != runs["other"]


def test_lists_mode_resumes_where_a_stopped_run_left_off(tiny_vlm, tmp_path, capsys):
    folder = clip_folder(tmp_path / "clips", broken=False)
    first = caption(tiny_vlm, folder, "--max_clips", "2")  # one batch of two, then stop
    assert first["captioned"] == 2
    before = lines(folder / "captions.jsonl")
    assert len(before) == 2 and lines(folder / "videos.txt") == GOOD[:2]
    with open(folder / "captions.jsonl", "a", encoding="utf-8") as f:
        f.write('{"video": "still.png", "capt')  # a line cut short by a kill

    second = caption(tiny_vlm, folder)
    assert (second["captioned"], second["already"]) == (2, 2)  # the first two are not generated again
    assert "captioned 2, skipped 2 (already captioned)" in capsys.readouterr().out
    after = lines(folder / "captions.jsonl")
    assert after[:2] == before and len(after) == 4
    assert lines(folder / "videos.txt") == GOOD and len(lines(folder / "prompts.txt")) == 4

    retoken = caption(tiny_vlm, folder, "--id_token", "NEW")  # nothing to caption: the lists get the new token
    assert retoken["captioned"] == 0 and all(p.startswith("NEW ") for p in lines(folder / "prompts.txt"))
    assert lines(folder / "captions.jsonl") == after

    with pytest.raises(SystemExit):  # a model that does not load: the progress file is left as it was
        caption(tmp_path / "no-such-model", folder, "--overwrite")
    assert lines(folder / "captions.jsonl") == after

    third = caption(tiny_vlm, folder, "--overwrite")
    assert (third["captioned"], third["already"]) == (4, 0) and len(lines(folder / "captions.jsonl")) == 4


def test_beside_mode_writes_a_caption_next_to_each_clip_and_keeps_existing_ones(tiny_vlm, tmp_path):
    folder = clip_folder(tmp_path / "clips", broken=False)
    (folder / "c.txt").write_text("my own caption\n")
    summary = caption(tiny_vlm, folder, "--output", "beside", "--id_token", "TOK")
    assert (summary["captioned"], summary["already"]) == (3, 1)
    assert (folder / "c.txt").read_text() == "my own caption\n"
    for name in ("a.txt", "still.txt", "sub/b.txt"):
        text = (folder / name).read_text()
        assert text.startswith("TOK ") and text.endswith("\n") and len(lines(folder / name)) == 1
    assert not (folder / ".hidden.txt").exists() and not (folder / "prompts.txt").exists()

    again = caption(tiny_vlm, folder, "--output", "beside", "--overwrite")
    assert again["captioned"] == 4 and (folder / "c.txt").read_text() != "my own caption\n"

    # The trainer's "captions beside files" layout reads them.
    from training.layouts import read_folder

    assert all(s.caption for s in read_folder(folder))


@pytest.mark.parametrize("case", ["missing folder", "empty folder", "lists not ours", "caption extension"])
def test_bad_input_is_one_line_and_a_non_zero_exit(tmp_path, capsys, case):
    folder = tmp_path / "clips"
    extra = []
    if case != "missing folder":
        folder.mkdir()
        (folder / "notes.txt").write_text("not a clip")
    if case == "lists not ours":
        shutil.copy(ASSETS / "videos" / "square.mp4", folder / "a.mp4")
        (folder / "prompts.txt").write_text("a caption written by hand\n")
    if case == "caption extension":
        extra = ["--output", "beside", "--caption_extension", "mp4"]
    with pytest.raises(SystemExit) as stop:
        caption("no-model-needed", folder, *extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and err[0].startswith("error: ")
    expected = {"missing folder": "no such folder", "empty folder": "no videos", "lists not ours": "--overwrite",
                "caption extension": "media extension"}[case]
    assert expected in err[0]


def test_use_vllm_yes_without_vllm_is_one_clear_line(tmp_path, capsys):
    import importlib.util

    if importlib.util.find_spec("vllm") is not None:
        pytest.skip("vLLM is installed here")
    folder = clip_folder(tmp_path / "clips", broken=False)
    with pytest.raises(SystemExit) as stop:
        caption("no-model-needed", folder, "--use_vllm", "yes")
    err = capsys.readouterr().err.strip().splitlines()
    assert stop.value.code == 2 and len(err) == 1 and "--use_vllm yes" in err[0] and "pip install vllm" in err[0]


def test_help_is_fast_it_imports_neither_torch_nor_transformers():
    code = ("import sys; import tools.caption_videos as c; c.build_parser().format_help(); "
            "heavy = {'torch', 'transformers', 'av'} & set(sys.modules); assert not heavy, heavy")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_one_line_keeps_every_caption_on_one_line_of_prompts_txt():
    from tools.caption_videos import frame_indices, one_line

    assert one_line("  A cat\n\nwalks\tslowly.\u2028 The\x85end\x18 ") == "A cat walks slowly. The end"
    assert frame_indices(100, 4) == [12, 37, 62, 87]
    assert frame_indices(3, 8) == [0, 1, 2]


def test_the_clips_found_are_those_the_trainer_reads(tmp_path):
    from tools import caption_videos
    from training import layouts

    folder = clip_folder(tmp_path / "clips")
    assert caption_videos.VIDEO_SUFFIXES == layouts.VIDEO_SUFFIXES
    assert caption_videos.find_media(folder) == layouts.media_files(folder)
    found = [p.relative_to(folder).as_posix() for p in caption_videos.find_media(folder)]
    assert found == sorted(GOOD + ["broken.mp4"])
