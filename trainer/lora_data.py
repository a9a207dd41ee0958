"""The image folder of `trainer lora`: checks, captions, aspect-ratio buckets, held-out split, batches.

A LoRA folder holds 15-200 images of one subject or style, with optional same-named
caption files (`cat.jpg` + `cat.txt`). `prepare_dataset` reads it once and returns a
`LoraDataReport` (schemas/lora.py) that names every file and what became of it:

- Every file that is not a caption or other text file goes through the curation
  pipeline's decode check (`stages.core.decode.decode_image`: decodes completely, EXIF
  rotation, minimum side, aspect ratio, decompression bombs). Files that fail are set
  aside with the stage's `RejectReason` (`not_an_image`, `truncated_image`, `too_small`, ...).
- Exact (SHA-256 of the file bytes) and near (64-bit pHash, the same Hamming threshold)
  duplicates are resolved with the dedup stage's own planner (`stages.core.dedup_plan.plan_dedup`):
  the copy with more pixels (then the smaller file name) is kept, the others are set aside
  as `exact_duplicate` / `near_duplicate` naming the kept file.
- Captions: the `.txt` file when it holds a usable caption (`stages.caption.check_caption`
  with no length floor: empty, file-name and boilerplate captions are not usable); else the
  recaption stage's model when one is configured (its quality gate decides); else the
  trigger word alone, with a warning. The trigger is prefixed to captions that lack it.
- Aspect-ratio buckets (NovelAI's bucketing, as kohya's sd-scripts does it): sizes whose
  area is about `resolution`^2, sides multiples of the VAE factor x the patch size, aspect
  up to `bucket_max_aspect`. Each image goes to the bucket nearest its aspect ratio
  (log scale) and is resized to cover it and center-cropped. No image is dropped for its
  shape: a bucket's last batch is filled by repeating images of that bucket.
- A few images are held out (at most one in five) for the held-out loss.

`BatchPlan` turns the buckets into an endless, seeded stream of batches whose position is
one number (batches consumed), so a resumed run continues exactly where it stopped.
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from schemas import CaptionConfig, DecodeConfig, DedupConfig, RecaptionStatus
from schemas.lora import CaptionSource, LoraBucket, LoraDataReport, LoraImage, LoraSetAside, LoraTrainConfig
from schemas.scoring import RecaptionConfig
from stages.core.caption import check_caption, normalize_caption
from stages.core.dedup_plan import DedupItem, plan_dedup
from stages.core.phash import sha256_hex
from stages.core.decode import decode_image, decode_rgb
from stages.core.verdict import Drop

logger = logging.getLogger(__name__)

# Files never read as images: captions and other sidecar text.
TEXT_SUFFIXES = (".txt", ".caption", ".json", ".jsonl", ".md", ".yaml", ".yml", ".csv", ".toml")
# At most one image in this many is held out.
HOLDOUT_ONE_IN = 5
FEW_IMAGES, MANY_IMAGES = 15, 200

# An image -> (the generated caption, the quality gate's verdict; only `ok` captions are used).
Recaptioner = Callable[[Image.Image], tuple[str, RecaptionStatus]]


# ---- buckets ---------------------------------------------------------------------------------


def make_buckets(resolution: int, multiple: int, max_aspect: float) -> list[tuple[int, int]]:
    """Bucket sizes (width, height): sides are multiples of `multiple`, the area is at most
    `resolution`^2 and as large as that allows, and the aspect ratio is at most `max_aspect`.
    Always contains the square bucket nearest `resolution`."""
    area = resolution * resolution
    side = max(multiple, resolution // multiple * multiple)
    buckets = {(side, side)}
    width = multiple
    while width <= resolution * math.sqrt(max_aspect) + multiple:
        height = area // width // multiple * multiple
        if height >= multiple and max(width / height, height / width) <= max_aspect + 1e-9:
            buckets.add((width, height))
            buckets.add((height, width))
        width += multiple
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is nearest the image's on a log scale (ties: larger area)."""
    aspect = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - aspect), -b[0] * b[1]))


def cover_crop(image: Image.Image, width: int, height: int) -> Image.Image:
    """Resize (bicubic, antialiased) so the image covers width x height, then center-crop."""
    scale = max(width / image.width, height / image.height)
    resized_w = max(width, round(image.width * scale))
    resized_h = max(height, round(image.height * scale))
    image = image.resize((resized_w, resized_h), Image.Resampling.BICUBIC, reducing_gap=None)
    left = (resized_w - width) // 2
    top = (resized_h - height) // 2
    return image.crop((left, top, left + width, top + height))


# ---- captions --------------------------------------------------------------------------------


def has_word(text: str, word: str) -> bool:
    """Whether `word` occurs in `text` as a whole word, ignoring case."""
    return re.search(rf"(?<!\w){re.escape(word)}(?!\w)", text, re.IGNORECASE) is not None


def with_trigger(caption: str, trigger: str | None) -> str:
    """`trigger, caption` unless the caption already names the trigger."""
    if not trigger or has_word(caption, trigger):
        return caption
    return f"{trigger}, {caption}" if caption else trigger


def without_word(caption: str, word: str | None) -> str:
    """`caption` with every whole-word `word` (and a comma right after it) removed."""
    if not word:
        return caption
    text = re.sub(rf"(?<!\w){re.escape(word)}(?!\w)\s*,?", " ", caption, flags=re.IGNORECASE)
    return re.sub(r"\s+", " ", text).strip(" ,")


def read_caption(path: Path) -> tuple[str | None, str | None]:
    """The caption in `path` (None if missing or unusable) and, if unusable, why."""
    if not path.is_file():
        return None, None
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as error:
        return None, f"{path.name} could not be read as UTF-8 text ({error})"
    # Length floors are for web alt text; a LoRA caption can be two words.
    drop = check_caption(text, CaptionConfig(min_chars=0, min_words=0))
    if drop is not None:
        detail = f": {drop.detail}" if drop.detail else ""
        return None, f"{path.name} is not a usable caption ({drop.reason.value}{detail})"
    return normalize_caption(text), None


def load_recaptioner(config: RecaptionConfig) -> Recaptioner:
    """The recaption stage's model as a one-image function: greedy generation, then the
    stage's quality gate (`stages.core.caption_gate.gate_caption`). The model is loaded on the
    first call, so a folder whose images all have captions never loads it."""
    from stages.core.caption_gate import gate_caption
    from stages.models.captioner import Captioner, format_prompt, load_processor

    loaded: dict = {}

    def caption(image: Image.Image) -> tuple[str, RecaptionStatus]:
        if not loaded:
            processor = load_processor(config.model)
            loaded.update(captioner=Captioner.load(config), processor=processor, prompt=format_prompt(processor, config))
        inputs = loaded["processor"](images=image, text=loaded["prompt"], return_tensors="np")
        generation = loaded["captioner"].generate([{key: np.asarray(value) for key, value in inputs.items()}])[0]
        text = generation.text.strip()
        return text, gate_caption(text, prompt=config.prompt, truncated=not generation.finished, config=config)

    return caption


# ---- the folder ------------------------------------------------------------------------------


def decode_config(config: LoraTrainConfig, resolution: int) -> DecodeConfig:
    """The curation decode check with the LoRA run's floors (no resize: buckets do that)."""
    data = config.data
    min_side = resolution // 2 if data.min_side is None else data.min_side
    return DecodeConfig(min_side=min_side, max_aspect_ratio=data.max_aspect_ratio, max_pixels=data.max_pixels, resize_mode="no")


def open_rgb(data: bytes, config: DecodeConfig) -> Image.Image:
    """Decode `data` as the curation stage does (EXIF upright, RGB, alpha on white)."""
    decoded = decode_image(data, config)
    if isinstance(decoded, Drop):
        raise ValueError(f"{decoded.reason.value}: {decoded.detail}")
    return decode_rgb(decoded.data)


def load_pixels(directory: str | Path, image: LoraImage, config: DecodeConfig) -> np.ndarray:
    """An image of the report at its bucket size: uint8 (bucket_height, bucket_width, 3)."""
    data = (Path(directory) / image.file).read_bytes()
    if sha256_hex(data) != image.sha256:
        raise ValueError(f"{Path(directory) / image.file} changed since the data report was made; rerun without --resume")
    rgb = open_rgb(data, config)
    return np.array(cover_crop(rgb, image.bucket_width, image.bucket_height), dtype=np.uint8)


def prepare_dataset(
    directory: str | Path,
    config: LoraTrainConfig,
    *,
    resolution: int,
    multiple: int,
    recaptioner: Recaptioner | None = None,
    known_captions: dict[str, tuple[str, RecaptionStatus]] | None = None,
) -> LoraDataReport:
    """Check, deduplicate, caption, bucket and split the images in `directory` (not recursive).

    Args:
        resolution: bucket area is resolution^2 pixels.
        multiple: bucket sides are multiples of this (VAE factor x patch size).
        recaptioner: captions images without a usable caption file (see `load_recaptioner`).
        known_captions: image SHA-256 -> an earlier (generated caption, status), used instead
            of asking the recaptioner again (a resumed run).

    Raises:
        FileNotFoundError: `directory` is not a folder.
        ValueError: no usable image, or images without a caption and neither a trigger
            word nor a recaption model to caption them.
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"--images {directory}: not a folder")
    data = config.data
    checks = decode_config(config, resolution)
    entries = sorted(os.listdir(directory))
    caption_suffix = data.caption_extension.lower()
    set_aside: list[LoraSetAside] = []
    ignored: list[str] = []
    warnings: list[str] = []
    found: dict[str, dict] = {}
    text_suffixes = set(TEXT_SUFFIXES) | {caption_suffix}
    image_stems = {Path(n).stem for n in entries if Path(n).suffix.lower() not in text_suffixes and not (directory / n).is_dir()}
    for name in entries:
        path = directory / name
        if path.is_dir():
            ignored.append(f"{name}/ (a folder; subfolders are not read)")
            continue
        if path.suffix.lower() in text_suffixes:
            if path.stem not in image_stems:  # a caption beside its image is read with the image
                ignored.append(f"{name} (text file without an image of the same name)")
            continue
        raw = path.read_bytes()
        decoded = decode_image(raw, checks)
        if isinstance(decoded, Drop):
            set_aside.append(LoraSetAside(file=name, reason=decoded.reason.value, detail=decoded.detail))
            continue
        found[name] = {"sha256": sha256_hex(raw), "phash": decoded.phash, "width": decoded.original_width, "height": decoded.original_height}

    # Duplicates, decided by the dedup stage's planner (same rank and threshold rules).
    dedup = DedupConfig(
        exact=data.exact_duplicates,
        near=data.near_duplicates,
        hamming_threshold=DedupConfig().hamming_threshold if data.hamming_threshold is None else data.hamming_threshold,
    )
    items = [DedupItem(name, info["width"] * info["height"], info["sha256"], info["phash"]) for name, info in found.items()]
    for name, decision in sorted(plan_dedup(items, dedup).items()):
        set_aside.append(LoraSetAside(file=name, reason=decision.reason, detail=decision.detail, duplicate_of=decision.survivor))
        del found[name]
    if not found:
        raise ValueError(f"--images {directory}: no usable image ({len(set_aside)} set aside: {_reasons(set_aside)})")

    # Captions.
    trigger = config.trigger
    images: list[dict] = []
    uncaptioned: list[str] = []
    for name, info in found.items():
        text, note = read_caption(directory / (Path(name).stem + data.caption_extension))
        status = generated = None
        source = CaptionSource.TXT
        known = (known_captions or {}).get(info["sha256"])
        if text is None and (known is not None or recaptioner is not None):
            generated, status = known if known is not None else recaptioner(open_rgb((directory / name).read_bytes(), checks))
            source = CaptionSource.RECAPTION
            if status is RecaptionStatus.OK:
                text = generated
            else:
                note = (note + "; " if note else "") + f"recaption fell back ({status.value})"
        if text is None:
            source = CaptionSource.TRIGGER
            uncaptioned.append(name)
            text = ""
        caption = with_trigger(text, trigger) if data.prepend_trigger or not text else text
        images.append({**info, "file": name, "caption": caption, "caption_source": source, "recaption_status": status, "generated_caption": generated, "note": note})
    if uncaptioned:
        if not trigger:
            raise ValueError(
                f"{len(uncaptioned)} image(s) in {directory} have no usable caption ({', '.join(uncaptioned[:5])}"
                f"{', ...' if len(uncaptioned) > 5 else ''}): add IMAGE{data.caption_extension} files, pass --trigger WORD, "
                "or configure a recaption model (--recaption-model)"
            )
        warnings.append(
            f"{len(uncaptioned)} image(s) have no usable caption and are captioned with the trigger word "
            f"{trigger!r} alone: {', '.join(uncaptioned[:10])}{', ...' if len(uncaptioned) > 10 else ''}"
        )

    # Held-out split: at most one image in HOLDOUT_ONE_IN.
    wanted = config.holdout.images
    allowed = len(images) // HOLDOUT_ONE_IN
    holdout_count = min(wanted, allowed)
    if wanted and holdout_count < wanted:
        warnings.append(
            f"holding out {holdout_count} image(s) instead of {wanted} (at most one in {HOLDOUT_ONE_IN} of the "
            f"{len(images)} usable images)" + ("; the held-out loss and the overfitting check are off" if holdout_count == 0 else "")
        )
    rng = np.random.default_rng(config.seed)
    held = set(rng.choice(len(images), size=holdout_count, replace=False).tolist()) if holdout_count else set()

    # Buckets.
    buckets = make_buckets(resolution, multiple, data.bucket_max_aspect)
    records = []
    for i, image in enumerate(images):
        width, height = nearest_bucket(image["width"], image["height"], buckets)
        records.append(LoraImage(bucket_width=width, bucket_height=height, role="holdout" if i in held else "train", **image))
    usage: dict[tuple[int, int], list[int]] = {}
    for record in records:
        counts = usage.setdefault((record.bucket_width, record.bucket_height), [0, 0])
        counts[0 if record.role == "train" else 1] += 1
    batch = config.optim.batch_size
    bucket_rows = [
        LoraBucket(width=w, height=h, train_images=t, holdout_images=o, padding_per_epoch=(-t) % batch if t else 0)
        for (w, h), (t, o) in sorted(usage.items())
    ]

    usable = len(records)
    if usable < FEW_IMAGES:
        warnings.append(f"only {usable} usable image(s); 15-200 is the intended range, expect overfitting to come early")
    elif usable > MANY_IMAGES:
        warnings.append(f"{usable} usable images; above 200 a full fine-tune may serve better than a LoRA")
    if not any(record.role == "train" for record in records):
        raise ValueError(f"--images {directory}: no image left to train on")
    for message in warnings:
        logger.warning(message)
    return LoraDataReport(
        directory=str(directory),
        resolution=resolution,
        batch_size=batch,
        files_found=len(entries),
        images=records,
        set_aside=sorted(set_aside, key=lambda s: s.file),
        ignored=ignored,
        buckets=bucket_rows,
        warnings=warnings,
    )


def _reasons(rows: list[LoraSetAside]) -> str:
    counts: dict[str, int] = {}
    for row in rows:
        counts[row.reason] = counts.get(row.reason, 0) + 1
    return ", ".join(f"{count} {reason}" for reason, count in sorted(counts.items())) or "none"


# ---- batches ---------------------------------------------------------------------------------


class BatchPlan:
    """An endless, seeded stream of same-bucket batches over the training images.

    Epoch e: each bucket's images are shuffled (generator seeded by (seed, e)) and cut into
    batches of `batch_size`; a bucket's last short batch is filled with the first images of
    its shuffled order (repeats); then the batch order is shuffled. Every training image is
    in every epoch, and the stream is a pure function of (seed, buckets, batch_size), so
    its position is just the number of batches consumed.

    Args:
        buckets: bucket -> indices of its training images.
    """

    def __init__(self, buckets: dict[tuple[int, int], list[int]], batch_size: int, seed: int):
        self.buckets = {key: sorted(value) for key, value in sorted(buckets.items()) if value}
        self.batch_size = batch_size
        self.seed = seed
        self.batches_per_epoch = sum(math.ceil(len(v) / batch_size) for v in self.buckets.values())
        if not self.batches_per_epoch:
            raise ValueError("no training images to batch")

    def epoch(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        batches: list[list[int]] = []
        for members in self.buckets.values():
            order = [members[i] for i in rng.permutation(len(members))]
            for start in range(0, len(order), self.batch_size):
                chunk = order[start : start + self.batch_size]
                while len(chunk) < self.batch_size:  # fill by repeating, cycling the bucket
                    chunk.append(order[(len(chunk) - len(order[start:])) % len(order)])
                batches.append(chunk)
        return [batches[i] for i in rng.permutation(len(batches))]

    def stream(self, start: int = 0) -> Iterator[list[int]]:
        """Batches from position `start` (batches consumed) on, forever."""
        epoch, skip = divmod(start, self.batches_per_epoch)
        while True:
            yield from self.epoch(epoch)[skip:]
            epoch, skip = epoch + 1, 0
