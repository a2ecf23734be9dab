"""Issue 14 item 2: image paths in a run's data files are relative to the run, so a moved run folder finds its
images, and a path leading out of the run is left out and counted, never opened."""
from __future__ import annotations

import io
import json
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from fl_crew_reddit.preprocessing.data_paths import SKIP_IMAGE_PATH_OUTSIDE_RUN, data_anchor, resolve_rows
from fl_crew_reddit.site.data import ImageRowSettings, SiteData

WORDS = ["apple", "river", "stone", "cloud", "maple", "tiger", "piano", "lemon", "ocean", "candle", "forest",
         "garden", "silver", "rocket", "meadow", "violin"]


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _png(colour: tuple[int, int, int]) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (24, 16), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _collected(source: Path) -> list[dict]:
    """Eight image posts (each its own picture in `source`), two distinct replies each."""
    source.mkdir(parents=True)
    posts, comments = [], []
    for n in range(8):
        picture = source / f"p{n}.png"
        picture.write_bytes(_png((30 * n, 200 - 20 * n, 90)))
        posts.append({"id": f"p{n}", "subreddit": "pics", "title": f"my {WORDS[n]} photo number {n}",
                      "image_paths": [str(picture)]})
        for k in range(2):
            a, b = WORDS[(n + k) % len(WORDS)], WORDS[(3 * n + 5 * k + 1) % len(WORDS)]
            comments.append({"id": f"c{n}{k}", "link_id": f"t3_p{n}", "parent_id": f"t3_p{n}", "subreddit": "pics",
                             "body": f"reply {n}-{k}: the {a} beside the {b} looks great today"})
    return [{"subreddit": "pics", "posts": posts, "comments": comments}]


def _preprocess(collected, tokenizer, data_dir: Path):
    from fl_crew_reddit.preprocessing.pipeline import QualityRules, preprocess

    return preprocess(collected, tokenizer, run_id="run", data_dir=data_dir, num_clients=1, partition="subreddit",
                      max_examples_per_client=None, max_seq_length=128, test_fraction=0.3, seed=3,
                      support_multimodal=True, quality=QualityRules(languages=frozenset()))


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


class Features:
    """`features_of` that records every image it opens; an image's embedding is its first pixels' bytes."""

    def __init__(self):
        self.opened: list[Path] = []

    def __call__(self, path: Path) -> torch.Tensor:
        self.opened.append(Path(path))
        pixels = Image.open(path).convert("RGB").getpixel((0, 0))
        return torch.tensor(pixels, dtype=torch.float32)


def _site(folder: Path, tokenizer, features: Features) -> SiteData:
    return SiteData(folder, tokenizer, 128, images=ImageRowSettings(features, tokens_per_image=1, max_images=2))


def test_preprocessed_multimodal_files_hold_no_absolute_path(tokenizer, tmp_path):
    report = _preprocess(_collected(tmp_path / "source"), tokenizer, tmp_path / "data")
    assert report.images_kept == 8
    files = [Path(report.examples_path), Path(report.examples_path).parent / "image_text_pairs.jsonl",
             *Path(report.clients[0].train_path).parent.glob("*.jsonl")]
    paths = [p for f in files for row in _read(f) for p in row.get("image_paths", [])]
    assert paths and not [p for p in paths if Path(p).is_absolute() or ".." in Path(p).parts]
    assert all(p.startswith("images/") for p in paths)


def test_a_moved_run_folder_reads_its_images_at_the_new_place(tokenizer, tmp_path):
    report = _preprocess(_collected(tmp_path / "source"), tokenizer, tmp_path / "old" / "data")
    shard = Path(report.clients[0].train_path).parent
    before = Features()
    rows_before = {split: _site(shard, tokenizer, before).rows(split) for split in ("train", "test")}
    assert sum(1 for rows in rows_before.values() for row in rows if row["image_slots"]) > 0

    shutil.copytree(tmp_path / "old", tmp_path / "new")  # the old place stays: it must not be read
    moved = tmp_path / "new" / shard.relative_to(tmp_path / "old")
    after = Features()
    site = _site(moved, tokenizer, after)
    rows_after = {split: site.rows(split) for split in ("train", "test")}
    assert after.opened and all((tmp_path / "new").resolve() in p.resolve().parents for p in after.opened)
    assert len(after.opened) == len(before.opened)
    for split in rows_before:
        assert [r["input_ids"] for r in rows_after[split]] == [r["input_ids"] for r in rows_before[split]]
        assert [r.get("image_embeds") for r in rows_after[split]].__len__() == len(rows_before[split])
        for a, b in zip(rows_after[split], rows_before[split], strict=True):
            assert ("image_embeds" in a) == ("image_embeds" in b)
            if "image_embeds" in a:
                assert torch.equal(a["image_embeds"], b["image_embeds"])
        assert not site.images_left_out[split][SKIP_IMAGE_PATH_OUTSIDE_RUN]


def test_image_paths_leading_out_of_the_run_are_counted_and_never_opened(tokenizer, tmp_path):
    data = tmp_path / "data"
    images = data / "preprocessed" / "run" / "images"
    images.mkdir(parents=True)
    (images / "inside.png").write_bytes(_png((10, 20, 30)))
    outside = tmp_path / "elsewhere.png"
    outside.write_bytes(_png((250, 0, 0)))
    (images / "link.png").symlink_to(outside)
    shard = data / "training" / "run" / "client-0"
    shard.mkdir(parents=True)
    messages = [{"role": "user", "content": "r/pics: what is this?"},
                {"role": "assistant", "content": "a red square on a white wall"}]
    refused = [str(outside), "../../../elsewhere.png", "images/../../../../elsewhere.png", "images/link.png"]
    lines = [{"id": "e1", "messages": messages, "image_paths": refused},
             # a run made before relative paths: an absolute path inside the current run folder still works
             {"id": "e2", "messages": messages, "image_paths": [str(images / "inside.png")]}]
    (shard / "train.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")

    features = Features()
    site = _site(shard, tokenizer, features)
    rows = site.rows("train")
    assert features.opened == [(images / "inside.png").resolve()]
    assert site.images_left_out["train"][SKIP_IMAGE_PATH_OUTSIDE_RUN] == len(refused)
    assert len(rows) == 2 and "image_embeds" not in rows[0] and rows[1]["image_slots"]


def test_the_anchor_of_each_data_file(tmp_path):
    data = tmp_path / "data"
    shard = data / "training" / "r1" / "client-3"
    assert data_anchor(shard / "test.jsonl") == shard  # no preprocessed folder of r1 here: the folder itself
    (data / "preprocessed" / "r1").mkdir(parents=True)
    assert data_anchor(shard / "test.jsonl") == data / "preprocessed" / "r1"
    assert data_anchor(data / "preprocessed" / "r1" / "examples.jsonl") == data / "preprocessed" / "r1"
    assert data_anchor(tmp_path / "site" / "train.jsonl") == tmp_path / "site"  # a site's own folder
    left_out = Counter()
    anchor = data / "preprocessed" / "r1"
    [row] = resolve_rows([{"id": "x", "image_paths": ["images/a.png", "/etc/passwd"]}], anchor, left_out)
    assert row["image_paths"] == [str((anchor / "images" / "a.png").resolve())]
    assert left_out == Counter({SKIP_IMAGE_PATH_OUTSIDE_RUN: 1})


@pytest.mark.e2e
def test_a_prepared_site_folder_is_its_own_anchor(tiny_config, tokenizer, tmp_path):
    """prepare-site writes the splits into the site folder with image paths relative to it (its images lie in its
    work/ folder): the site reads them there, and after the site folder moves."""
    from fl_crew_reddit.main import prepare_site_command

    config = tiny_config.model_copy(update={"support_multimodal": True, "max_examples_per_client": 400})
    assert prepare_site_command(tmp_path / "site", config, ["cooking", "gardening", "learnpython"], 40) == 0
    paths = [p for split in ("train", "validation", "test") for row in _read(tmp_path / "site" / f"{split}.jsonl")
             for p in row.get("image_paths", [])]
    assert paths and all(p.startswith("work/data/preprocessed/site/images/") for p in paths)
    shutil.move(tmp_path / "site", tmp_path / "moved-site")
    features = Features()
    site = _site(tmp_path / "moved-site", tokenizer, features)
    assert sum(len(site.rows(split)) for split in ("train", "test")) > 0 and features.opened
    assert all((tmp_path / "moved-site").resolve() in p.parents for p in features.opened)
    assert not site.images_left_out["train"][SKIP_IMAGE_PATH_OUTSIDE_RUN]
