"""Image and video posts: Pillow normalisation by content hash, galleries, PyAV keyframes, web images through
media_fetch, CLIP features (a tiny random CLIP saved as a local folder), the CLIP score and its report line."""
from __future__ import annotations

import io
import logging
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from fl_crew_reddit.evaluation.clip_score import clip_scores, image_text_alignment
from fl_crew_reddit.evaluation.report import clip_blocks, render_markdown
from fl_crew_reddit.preprocessing.image_features import (
    FEATURE_SUFFIX,
    clip_encoder,
    encode_stored_images,
    forget_loaded_clip,
    read_features,
)
from fl_crew_reddit.preprocessing.images import (
    SKIP_IMAGE_TOO_LARGE,
    ImageRejected,
    normalise_image,
    store_image_bytes,
)
from fl_crew_reddit.preprocessing.media import SKIP_REMOTE_NOT_FETCHED, MediaSettings, MediaStore
from fl_crew_reddit.preprocessing.pipeline import attach_images
from fl_crew_reddit.preprocessing.video import video_keyframes
from fl_crew_reddit.reddit.schemas import RedditPost

COLOURS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255)]


def _png(colour=(200, 30, 30), size=(40, 30), mode="RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _close(pixel, colour, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(pixel, colour))


@pytest.fixture(autouse=True)
def _fresh_clip_cache():
    forget_loaded_clip()
    yield
    forget_loaded_clip()


def _write_video(path: Path, colours=COLOURS, frames_per_colour=4, rate=4, container_format="mp4") -> Path:
    """An MP4 (MPEG-4 part 2) with a keyframe at the start of each solid colour; `m4v` writes the bare stream,
    which has no index and no duration."""
    import av
    import numpy as np

    with av.open(str(path), "w", format=container_format) as container:
        stream = container.add_stream("mpeg4", rate=rate)
        stream.width, stream.height, stream.pix_fmt = 64, 48, "yuv420p"
        stream.codec_context.gop_size = frames_per_colour
        for colour in colours:
            pixels = np.zeros((48, 64, 3), np.uint8)
            pixels[:] = colour
            for _ in range(frames_per_colour):
                for packet in stream.encode(av.VideoFrame.from_ndarray(pixels, format="rgb24")):
                    container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


# --- images ---------------------------------------------------------------------------------------------------------
def test_normalise_image_makes_rgb_applies_exif_and_resizes(tmp_path):
    transparent = normalise_image(_png((0, 0, 0, 0), (300, 100), "RGBA"), max_size=64)
    with Image.open(io.BytesIO(transparent)) as image:
        assert (image.mode, image.size) == ("RGB", (64, 21))
        assert image.getpixel((10, 10)) == (255, 255, 255)  # transparency on white, not black

    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    buffer = io.BytesIO()
    Image.new("RGB", (40, 20), (10, 120, 10)).save(buffer, format="JPEG", exif=exif)
    with Image.open(io.BytesIO(normalise_image(buffer.getvalue(), max_size=64))) as image:
        assert image.size == (20, 40)

    first = store_image_bytes(_png(), tmp_path, 64)
    again = store_image_bytes(_png(), tmp_path, 64)
    assert first == again and first.path.name == f"{first.sha256}.png" and len(list(tmp_path.iterdir())) == 1


def test_decompression_bomb_guard_rejects_before_decoding():
    with pytest.raises(ImageRejected) as rejected:
        normalise_image(_png(size=(400, 300)), max_size=64, max_pixels=100_000)
    assert rejected.value.reason == SKIP_IMAGE_TOO_LARGE


def test_broken_truncated_empty_missing_and_non_image_files_are_counted(tmp_path):
    good = _png(size=(120, 90))
    files = {"good.png": good, "truncated.png": good[: len(good) // 2], "text.jpg": b"<html>not an image</html>",
             "empty.png": b""}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    dropped = Counter()
    store = MediaStore(tmp_path / "images", MediaSettings(max_image_size=64), dropped, fetch=lambda url: b"")
    references = [str(tmp_path / name) for name in [*files, "missing.png"]]
    images = store.post_images(references)
    assert len(images) == 1 and images[0].path.is_file()
    assert dropped == Counter(image_broken_or_truncated=1, image_not_an_image=1, image_empty=1, image_missing=1)


# --- galleries and web images ---------------------------------------------------------------------------------------
def _example(eid, post_id, top_level=True):
    return {"id": eid, "post_id": post_id, "subreddit": "pics", "reply_to_post": top_level,
            "messages": [{"role": "user", "content": f"r/pics: post {post_id}"},
                         {"role": "assistant", "content": f"reply {eid}"}], "image_paths": []}


def test_a_gallery_post_pairs_every_image_with_its_replies(tmp_path):
    paths = []
    for index, colour in enumerate(COLOURS[:3]):
        paths.append(tmp_path / f"item{index}.png")
        paths[-1].write_bytes(_png(colour))
    post = RedditPost(id="g1", subreddit="pics", title="three photos", image_paths=[str(p) for p in paths])
    examples = [_example("c1", "g1"), _example("c2", "g1"), _example("c3", "g1", top_level=False)]
    dropped = Counter()
    pairs = attach_images(examples, {"g1": post}, MediaStore(tmp_path / "images", MediaSettings(), dropped))
    assert len(examples[0]["image_paths"]) == 3 and examples[1]["image_paths"] == examples[0]["image_paths"]
    assert examples[2]["image_paths"] == []  # a reply to a comment
    colours = [Image.open(p).getpixel((0, 0)) for p in examples[0]["image_paths"]]
    assert colours == COLOURS[:3]  # gallery order kept
    assert len(pairs) == 1 and pairs[0]["example_ids"] == ["c1", "c2"] and len(pairs[0]["image_sha256"]) == 3
    assert not dropped


def test_web_images_go_through_media_fetch_with_counted_failures(tmp_path):
    import responses

    post = RedditPost(id="w1", subreddit="pics", title="live gallery",
                      image_urls=["https://i.redd.it/a.png", "https://i.redd.it/page.jpg", "https://i.redd.it/b.png"])
    dropped = Counter()
    store = MediaStore(tmp_path / "images", MediaSettings(fetch_max_bytes=100_000, fetch_timeout_s=5), dropped)
    with responses.RequestsMock() as http:
        http.get("https://i.redd.it/a.png", body=_png(COLOURS[0]), content_type="image/png")
        http.get("https://i.redd.it/page.jpg", body=b"<html>removed</html>", content_type="text/html")
        http.get("https://i.redd.it/b.png", body=_png(COLOURS[1]), content_type="image/png")
        images = store.post_images(post.image_paths, post.image_urls, post.video_url)
    assert [Image.open(i.path).getpixel((0, 0)) for i in images] == COLOURS[:2]
    assert dropped == Counter(image_fetch_not_an_image=1)


def test_without_media_fetch_web_images_are_counted_not_fetched(tmp_path, monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "fl_crew_reddit.reddit.media_fetch", None)  # import fails
    dropped = Counter()
    store = MediaStore(tmp_path / "images", MediaSettings(), dropped)
    with caplog.at_level(logging.WARNING):
        assert store.post_images([], ["https://i.redd.it/a.png", "https://i.redd.it/b.png"]) == []
    assert dropped == Counter({SKIP_REMOTE_NOT_FETCHED: 2})
    assert sum("not fetched" in r.getMessage() for r in caplog.records) == 1


# --- videos ---------------------------------------------------------------------------------------------------------
def test_a_video_gives_k_distinct_keyframes_in_time_order(tmp_path):
    video = _write_video(tmp_path / "clip.mp4")
    frames = video_keyframes(video, 4)
    assert len(frames) == 4 and all(frame.mode == "RGB" for frame in frames)
    seen = [next(i for i, c in enumerate(COLOURS) if _close(f.getpixel((5, 5)), c)) for f in frames]
    assert seen == sorted(seen) and len(set(seen)) == 4 and seen[0] == 0
    assert len(video_keyframes(video, 10)) == 6  # only 6 keyframes exist: none repeated
    bare = video_keyframes(_write_video(tmp_path / "bare.m4v", container_format="m4v"), 4)  # no duration: walked
    assert [f.getpixel((5, 5)) for f in bare] == [f.getpixel((5, 5)) for f in frames]

    dropped = Counter()
    store = MediaStore(tmp_path / "images", MediaSettings(video_keyframes=3, max_image_size=32), dropped)
    images = store.post_images([str(video)])
    assert len(images) == 3 and all(Image.open(i.path).size == (32, 24) for i in images) and not dropped


def test_an_unreadable_video_falls_back_to_its_preview(tmp_path):
    broken = tmp_path / "broken.mp4"
    broken.write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"\x00" * 64)
    dropped = Counter()
    previews = {"https://preview.redd.it/still.jpg": _png(COLOURS[2])}
    store = MediaStore(tmp_path / "images", MediaSettings(), dropped, fetch=previews.__getitem__)
    images = store.post_images([], list(previews), video_url=str(broken))
    assert len(images) == 1 and _close(Image.open(images[0].path).getpixel((0, 0)), COLOURS[2])
    assert sum(dropped.values()) == 1 and next(iter(dropped)).startswith("video_")


# --- CLIP features and score ----------------------------------------------------------------------------------------
def test_features_are_computed_once_and_stored_per_image_hash(tmp_path, tiny_clip_dir):
    stored = [store_image_bytes(_png(colour), tmp_path, 64) for colour in COLOURS[:3]]
    report = encode_stored_images(str(tiny_clip_dir), [s.path for s in stored] + [stored[0].path])
    assert (report.computed, report.reused, report.skipped_reason) == (3, 0, None)
    encoder, _ = clip_encoder(str(tiny_clip_dir))
    for item in stored:
        assert (tmp_path / f"{item.sha256}{FEATURE_SUFFIX}").is_file()
        direct = encoder.image_embeddings([Image.open(item.path)])[0]
        assert torch.allclose(read_features(item.path, encoder.source), direct, atol=1e-5)
    assert encode_stored_images(str(tiny_clip_dir), [s.path for s in stored]).reused == 3


def test_clip_score_is_100_max_cos_0():
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [2.0, 2.0]])
    text = torch.tensor([[3.0, 0.0], [-1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(clip_scores(image, text), torch.tensor([100.0, 0.0, 100 / 2 ** 0.5]))


def test_image_text_alignment_with_a_tiny_clip(tmp_path, tiny_clip_dir):
    encoder, reason = clip_encoder(str(tiny_clip_dir))
    assert reason is None
    red, blue = (store_image_bytes(_png(c), tmp_path, 64).path for c in (COLOURS[0], COLOURS[2]))
    examples = [{"id": "a", "image_paths": [str(red), str(blue)],
                 "messages": [{"role": "user", "content": "r/pics: red and blue"},
                              {"role": "assistant", "content": "nice colours"}]},
                {"id": "b", "image_paths": [str(blue)],
                 "messages": [{"role": "user", "content": "r/pics: blue"}, {"role": "assistant", "content": "ok"}]}]
    scores = image_text_alignment(encoder, examples, ["a red square", "something blue"])
    assert scores["clip_examples"] == 2
    for key in ("clip_score", "clip_score_reply", "clip_score_post"):
        assert 0.0 <= scores[key] <= 100.0
    images = encoder.image_embeddings([Image.open(red), Image.open(blue)])
    texts = encoder.text_embeddings(["a red square", "something blue"])
    expected = (clip_scores(images, texts[[0, 0]]).mean() + clip_scores(images[1:], texts[1:]).mean()) / 2
    assert scores["clip_score"] == pytest.approx(float(expected), abs=1e-4) and scores["clip_score"] > 0


def test_unreachable_clip_is_announced_once_and_images_are_kept(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    stored = store_image_bytes(_png(), tmp_path, 64)
    with caplog.at_level(logging.WARNING):
        first = encode_stored_images("clip-vit-base-patch32", [stored.path])
        second = encode_stored_images("clip-vit-base-patch32", [stored.path])
    assert first.skipped_reason == second.skipped_reason
    assert "openai/clip-vit-base-patch32" in first.skipped_reason and "cannot be reached" in first.skipped_reason
    assert sum("Image features are skipped" in r.getMessage() for r in caplog.records) == 1
    assert stored.path.is_file() and not list(tmp_path.glob(f"*{FEATURE_SUFFIX}"))


def test_round_clip_score_with_the_evaluator_and_its_report_lines(tmp_path, tiny_model, tiny_clip_dir):
    from fl_crew_reddit.evaluation.evaluator import image_text_scores

    model, tokenizer = tiny_model
    image = store_image_bytes(_png(COLOURS[1]), tmp_path, 64).path
    example = {"id": "c1", "image_paths": [str(image)], "prompt": "r/gardening: my squash leaves\n",
               "messages": [{"role": "user", "content": "r/gardening: my squash leaves"},
                            {"role": "assistant", "content": "powdery mildew"}]}
    scores = image_text_scores(model, tokenizer, [example], torch.device("cpu"), str(tiny_clip_dir))
    assert 0.0 <= scores["clip_score"] <= 100.0 and scores["clip_examples"] == 1 and "clip_note" not in scores
    off = image_text_scores(model, tokenizer, [example], torch.device("cpu"), None)
    assert off == {"clip_note": "image posts are off (SUPPORT_MULTIMODAL=false)"}

    from fl_crew_reddit.history import EvalMetrics, RoundRecord, RunHistory

    def history_with(clip: dict) -> RunHistory:
        metrics = EvalMetrics(perplexity=30.0, bleu=0.0, rouge_l=0.0, num_tokens=8, **clip)
        return RunHistory(run_id="r", base=metrics, rounds=[RoundRecord(round=1, global_=metrics)])

    shown = render_markdown(clip_blocks(history_with(scores)))
    assert "| 1 | " in shown and "Generated replies" in shown
    note = "no CLIP weights for IMAGE_PROCESSOR=clip-vit-base-patch32"
    missing = render_markdown(clip_blocks(history_with({"clip_note": note})))
    assert missing.strip() == f"CLIP score: not computed — {note}."


def test_a_dump_folder_video_reaches_preprocessing_as_keyframes(tmp_path):
    import json

    from fl_crew_reddit.reddit.backends import DumpBackend

    folder = tmp_path / "dump" / "clips"
    (folder / "videos").mkdir(parents=True)
    _write_video(folder / "videos" / "garden.mp4")
    post = {"id": "v1", "subreddit": "clips", "title": "my garden", "created_utc": 1, "url": "videos/garden.mp4",
            "is_video": True}
    (folder / "submissions.jsonl").write_text(json.dumps(post) + "\n")
    (folder / "comments.jsonl").write_text(json.dumps({"id": "c1", "link_id": "t3_v1", "parent_id": "t3_v1",
                                                       "subreddit": "clips", "body": "lovely"}) + "\n")
    [served] = DumpBackend(tmp_path / "dump").subreddit_posts("clips").posts
    assert served.image_paths == [str((folder / "videos" / "garden.mp4").resolve())]
    dropped = Counter()
    images = MediaStore(tmp_path / "images", MediaSettings(video_keyframes=2), dropped).post_images(served.image_paths)
    assert len(images) == 2 and not dropped
