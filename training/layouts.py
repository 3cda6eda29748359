"""The ways a data set can be laid out, read into one list of samples (`read_samples`).

- The original's lists: --data_root with a caption file and a video file, one entry per line (--caption_column,
  --video_column).
- A CSV: --dataset_file with a caption column and a video column.
- A folder of media with a caption file beside each (clip.mp4 + clip.txt; --caption_extension): used when --data_root
  has no caption/video lists.
- CogVideoX-Fun's metadata: --train_data_meta, a JSON list of {"file_path", "text", "type": "video"|"image"} (or a
  .csv with those columns), with "control_file_path" for its Control models.
- Several of these mixed: --dataset_config datasets.toml, one [[datasets]] table each, with num_repeats and an id token
  of its own (see assets/dataset.md).

Media are videos or still images (.jpg/.jpeg/.png/.webp). Paths in lists are relative to the list's folder (or
--data_root). A sample listed in a source with num_repeats N trains N times per epoch.
"""

import csv
import json
from dataclasses import replace
from pathlib import Path

from .args import UsageError
from .video_io import IMAGE_SUFFIXES


VIDEO_SUFFIXES = (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v")
DATASET_KEYS = {"folder", "data_root", "dataset_file", "meta", "caption_column", "video_column", "caption_extension",
                "num_repeats", "id_token"}


def read_samples(data, video_repeat=0):
    """Every training sample the user gave, in order, with its repeats; UsageError for a layout that cannot be read.

    `data`: the [data] section, or prepare's section (which has its fields); `video_repeat`: --video_repeat."""
    from .dataset import load_samples

    if data.dataset_config:
        samples = read_dataset_config(data.dataset_config, data.id_token)
    elif data.train_data_meta:
        samples = read_meta(data.train_data_meta, data.data_root, data.id_token)
    elif data.dataset_file is None and is_captioned_folder(data):
        samples = read_folder(data.data_root, data.caption_extension, data.id_token)
    else:
        samples = load_samples(data.data_root, data.dataset_file, data.caption_column, data.video_column, data.id_token,
                               control_column=data.control_column)
    if video_repeat > 0:  # CogVideoX-Fun's --video_repeat: videos N times, images once
        samples = [s if s.video_path.suffix.lower() in IMAGE_SUFFIXES else replace(s, repeats=s.repeats * video_repeat)
                   for s in samples]
    return samples


def has_control_clips(data):
    """Whether the data gives control videos (CogVideoX-Fun Control): --control_column, or --train_data_meta entries
    with "control_file_path" (a file that cannot be read has none here; check_data_source reports it)."""
    if data.control_column is not None:
        return True
    if data.train_data_meta is None or data.dataset_config:
        return False
    try:
        return any(entry.get("control_file_path") for entry in _meta_entries(data.train_data_meta)
                   if isinstance(entry, dict))
    except (OSError, ValueError):
        return False


def check_data_source(data, problems, require_videos=True):
    """Data files and columns exist (`data`: the [data] section, or prepare's). Per-sample problems are the
    dataset's business."""
    if data.control_column is not None and (data.dataset_config or data.train_data_meta or (
            data.dataset_file is None and data.data_root is not None and is_captioned_folder(data))):
        problems.append(f"--control_column {data.control_column} names a list beside --caption_column/--video_column "
                        "(or a column of --dataset_file); with --train_data_meta give each entry a "
                        '"control_file_path", and --dataset_config and captioned folders take no control videos')
        return
    for flag, value in (("dataset_config", data.dataset_config), ("train_data_meta", data.train_data_meta)):
        if value is not None:
            if not Path(value).is_file():
                problems.append(f"--{flag} {value}: no such file")
            return
    if data.dataset_file is None:
        if data.data_root is None:
            problems.append("give --data_root (with --caption_column/--video_column files) or --dataset_file (a CSV)")
            return
        root = Path(data.data_root)
        if not root.is_dir():
            problems.append(f"--data_root {root}: no such folder")
            return
        if is_captioned_folder(data) and media_files(root):
            lists = unused_lists(root, data.caption_extension)
            if lists:  # e.g. prompts.txt + videos.txt, and no --caption_column/--video_column naming them
                problems.append(f"--data_root {root} has {' and '.join(lists)} (lists, one entry per line), but "
                                f"--caption_column {data.caption_column} and --video_column {data.video_column} name "
                                f"no file there and no clip has a caption file beside it: pass {_list_flags(lists)}")
            return  # a folder of media with their captions beside them
        for flag, name in (("--caption_column", data.caption_column), ("--video_column", data.video_column),
                           ("--control_column", data.control_column)):
            if name is not None and not (root / name).is_file():
                hint = " (or put media files there with a caption .txt beside each)"
                if (root / "prompts.txt").is_file() and (root / "videos.txt").is_file():
                    hint = " (this folder has prompts.txt and videos.txt: pass --caption_column prompts.txt --video_column videos.txt)"
                problems.append(f"{flag} {name}: no file {root / name} with one entry per line{hint}")
    else:
        csv_path = Path(data.dataset_file)
        if not csv_path.is_file():
            problems.append(f"--dataset_file {csv_path}: no such file")
            return
        if data.data_root is not None and not Path(data.data_root).is_dir():
            problems.append(f"--data_root {data.data_root}: no such folder")
        import pandas as pd

        try:
            columns = list(pd.read_csv(csv_path, nrows=0).columns)
        except Exception as error:
            problems.append(f"--dataset_file {csv_path}: not a readable CSV ({error})")
            return
        for flag, name in (("--caption_column", data.caption_column), ("--video_column", data.video_column),
                           ("--control_column", data.control_column)):
            if name is not None and name not in columns:
                problems.append(f"{flag} {name}: the CSV has no such column (columns: {', '.join(columns)})")


def is_captioned_folder(data):
    """--data_root without the caption/video lists: a folder of media with captions beside them (`data`: the [data]
    section, or prepare's)."""
    root = Path(data.data_root) if data.data_root else None
    return (root is not None and root.is_dir() and not (root / data.caption_column).is_file()
            and not (root / data.video_column).is_file())


# Names the original's and the common data sets' lists go by (Disney: prompt.txt, videos.txt).
CAPTION_LISTS = ("prompts.txt", "prompt.txt", "captions.txt", "caption.txt", "texts.txt", "text.txt")
VIDEO_LISTS = ("videos.txt", "video.txt")


def unused_lists(root, caption_extension=".txt"):
    """The caption/video list files in `root` ([] when a clip there has its caption beside it: a folder of media with
    captions, whatever else lies in it)."""
    media = media_files(root)
    if any(path.with_suffix(caption_extension).is_file() for path in media):
        return []
    stems = {path.with_suffix("") for path in media}
    return [name for name in CAPTION_LISTS + VIDEO_LISTS
            if (root / name).is_file() and (root / name).with_suffix("") not in stems]


def _list_flags(lists):
    captions = [name for name in lists if name in CAPTION_LISTS]
    videos = [name for name in lists if name in VIDEO_LISTS]
    return " ".join(([f"--caption_column {captions[0]}"] if captions else []) +
                    ([f"--video_column {videos[0]}"] if videos else []))


def media_files(folder):
    suffixes = VIDEO_SUFFIXES + IMAGE_SUFFIXES
    return sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def read_folder(folder, caption_extension=".txt", id_token=None, start=0, repeats=1):
    """One sample per media file under `folder` (sorted, sub-folders included), captioned by the file of the same
    name with `caption_extension` beside it. A missing or empty caption file leaves the caption empty: the scan
    reports that sample (it does not train)."""
    from .dataset import Sample, with_id_token

    files = media_files(folder)
    if not files:
        raise UsageError(f"{folder}: no videos ({', '.join(VIDEO_SUFFIXES)}) or images ({', '.join(IMAGE_SUFFIXES)}) "
                         "in this folder, and no caption/video lists; see assets/dataset.md for the layouts")
    samples = []
    for position, path in enumerate(files):
        caption_file = path.with_suffix(caption_extension)
        try:
            caption = " ".join(caption_file.read_text(encoding="utf-8").split())
        except FileNotFoundError:
            caption = ""
        except UnicodeDecodeError as error:
            raise UsageError(f"{caption_file}: not UTF-8 text (byte {error.start}); save it as UTF-8") from error
        samples.append(Sample(index=start + position, caption=with_id_token(caption, id_token) if caption else "",
                              video_path=path, repeats=repeats, caption_file=caption_file, id_token=id_token))
    return samples


def read_meta(path, data_root=None, id_token=None, start=0, repeats=1):
    """CogVideoX-Fun's metadata: a JSON list [{"file_path": ..., "text": ..., "type": "video" | "image"}, ...], or, for
    a file ending in .csv, a CSV with those columns (Fun's dataset reads both: csv.DictReader or json.load by the
    name's ending). Relative paths are taken from `data_root` (its --train_data_dir) or else the file's own folder."""
    from .dataset import Sample, check_files_exist, with_id_token

    try:
        entries = _meta_entries(path)
    except OSError as error:
        raise UsageError(f"--train_data_meta {path}: cannot read it ({error.strerror})") from error
    except ValueError as error:
        raise UsageError(f"--train_data_meta {path}: not valid JSON ({error})") from error
    if not isinstance(entries, list) or not entries:
        raise UsageError(f'--train_data_meta {path}: expected a JSON list of {{"file_path", "text", "type"}} entries, '
                         'or a CSV with those columns')
    root = Path(data_root) if data_root else Path(path).parent
    samples = []
    for position, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file_path"), str) or "text" not in entry:
            raise UsageError(f'--train_data_meta {path}: entry {position + 1} needs "file_path" and "text"')
        kind = entry.get("type", "video")
        if kind not in ("video", "image"):
            raise UsageError(f'--train_data_meta {path}: entry {position + 1}: "type" is {kind!r}, not video or image')
        caption = str(entry["text"]).strip()
        control = entry.get("control_file_path") or None
        samples.append(Sample(index=start + position, caption=with_id_token(caption, id_token) if caption else "",
                              video_path=root / entry["file_path"], repeats=repeats, id_token=id_token,
                              control_path=root / control if control else None))
    without = [s.index - start + 1 for s in samples if s.control_path is None]
    if len(without) < len(samples) and without:  # Fun's control dataset reads one for every entry
        raise UsageError(f'--train_data_meta {path}: entries {", ".join(map(str, without[:10]))} have no '
                         '"control_file_path" while others have one: give every entry its control video')
    check_files_exist(samples)
    return samples


def _meta_entries(path):
    """The entries of a Fun metadata file: csv.DictReader rows for a name ending in .csv, else the JSON list."""
    if str(path).endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as rows:
            return list(csv.DictReader(rows))
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_dataset_config(path, default_id_token=None):
    """Several sources from a TOML file, in order, each with its num_repeats and id token."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the same parser as a package
        import tomli as tomllib

    from .dataset import load_samples

    path = Path(path)
    try:
        config = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as error:
        raise UsageError(f"--dataset_config {path}: cannot read it ({error.strerror})") from error
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"--dataset_config {path}: not valid TOML ({error})") from error
    tables = config.get("datasets")
    if not isinstance(tables, list) or not tables:
        raise UsageError(f'--dataset_config {path}: no [[datasets]] tables; each names a "folder", "data_root" (with '
                         'caption_column/video_column), "dataset_file" or "meta"')
    samples = []
    for number, table in enumerate(tables, 1):
        where = f"--dataset_config {path}: [[datasets]] #{number}"
        unknown = sorted(set(table) - DATASET_KEYS)
        if unknown:
            raise UsageError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(DATASET_KEYS))})")
        kinds = [key for key in ("folder", "data_root", "dataset_file", "meta") if key in table]
        if len(kinds) != 1:
            raise UsageError(f'{where}: give exactly one of "folder", "data_root", "dataset_file", "meta"')
        repeats = table.get("num_repeats", 1)
        if not isinstance(repeats, int) or repeats < 1:
            raise UsageError(f"{where}: num_repeats {repeats!r} must be a whole number, 1 or more")
        id_token = table.get("id_token", default_id_token)
        location = path.parent / table[kinds[0]]
        start = len(samples)
        if kinds[0] == "folder":
            part = read_folder(location, table.get("caption_extension", ".txt"), id_token, start, repeats)
        elif kinds[0] == "meta":
            part = read_meta(location, None, id_token, start, repeats)
        else:
            columns = ("caption", "video") if kinds[0] == "dataset_file" else ("prompts.txt", "videos.txt")
            caption_column = table.get("caption_column", columns[0])
            video_column = table.get("video_column", columns[1])
            try:
                if kinds[0] == "dataset_file":
                    listed = load_samples(None, location, caption_column, video_column, id_token)
                else:
                    listed = load_samples(location, None, caption_column, video_column, id_token)
            except UsageError as error:
                raise UsageError([f"{where}: {problem}" for problem in error.problems]) from error
            part = [replace(s, index=start + s.index, repeats=repeats) for s in listed]
        samples.extend(part)
    return samples


def expand_repeats(items):
    """(items, random keys): each item `repeats` times in a row. A repeat's random key differs from its first
    showing's, so its crop and flip are drawn afresh; the first showing keeps the sample's index as its key."""
    expanded, keys = [], []
    for item in items:
        sample = item.sample
        for repeat in range(sample.repeats):
            expanded.append(item)
            keys.append(sample.index if repeat == 0 else (sample.index, repeat))
    return expanded, keys
