"""The Data Preprocessor's stage: collected threads → cleaned chat examples → train/validation/test per client.

Writes `data/preprocessed/<run>/examples.jsonl` (every kept example), `image_text_pairs.jsonl` for image posts, and
`data/training/<run>/<client>/{train,validation,test}.jsonl` with the preference pairs of each split beside them
(`{train,validation,test}_pairs.jsonl`, see `preferences.py`). Every dropped comment and every preference pair left
out is counted by reason in the report.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pydantic import BaseModel, Field, ValidationError

from fl_crew_reddit.preprocessing.cleaning import language_drop_reason
from fl_crew_reddit.preprocessing.data_paths import portable_rows
from fl_crew_reddit.preprocessing.examples import render_chat, thread_examples, tokenize_example
from fl_crew_reddit.preprocessing.image_features import ImageFeatureReport, encode_stored_images
from fl_crew_reddit.preprocessing.media import MediaSettings, MediaStore
from fl_crew_reddit.preprocessing.near_duplicates import near_duplicates
from fl_crew_reddit.preprocessing.partition import partition_examples, split_by_thread
from fl_crew_reddit.preprocessing.preferences import PreferenceRules, client_pairs, reply_fits, scores_are_placeholders
from fl_crew_reddit.reddit.schemas import RedditComment, RedditPost

log = logging.getLogger(__name__)


class ClientShard(BaseModel):
    name: str
    subreddits: dict[str, int]
    num_train: int
    num_test: int
    train_path: str
    test_path: str
    train_tokens: int
    num_validation: int = 0
    validation_path: str | None = Field(None, description="whole threads held out for choosing the best round")
    num_examples: int = Field(0, description="examples the partition gave this client, before the per-client cap")
    num_tokens: int = Field(0, description="tokens of those examples (prompt + reply)")
    num_train_pairs: int = Field(0, description="preference pairs in train_pairs.jsonl beside train.jsonl")
    num_validation_pairs: int = 0
    num_test_pairs: int = 0


class PreprocessReport(BaseModel):
    num_comments: int
    num_examples: int
    dropped: dict[str, int] = Field(description="comments or examples left out, by reason")
    scrubbed: dict[str, int] = Field(default_factory=dict,
                                     description="texts changed but kept, by rule: personal data replaced (per kind), "
                                                 "quotes cut, examples truncated; once per distinct post or comment")
    partition: str | None = None
    images_kept: int = 0
    image_features: ImageFeatureReport | None = Field(
        None, description="CLIP features of the kept images (IMAGE_PROCESSOR), or why they were skipped")
    clients: list[ClientShard]
    examples_path: str
    max_train_examples: int | None = Field(None, description="training examples kept per client; None: all")
    preference_pairs: dict = Field(default_factory=dict,
                                   description="preference pairs: kinds, built (per kind), dropped (candidates left "
                                               "out, by reason), scores_placeholder (the source's scores are all the "
                                               "same: no votes pairs), per split")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_jsonl(path: Path) -> list[dict]:
    with Path(path).open(encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


@dataclass(frozen=True)
class QualityRules:
    """Settings of the text-quality rules (defaults = FLCrewRedditConfig's); see `build_examples` for the order."""

    scrub_personal_data: bool = True
    near_duplicate_threshold: float = 0.8
    min_reply_tokens: int = 3
    max_reply_tokens: int = 512
    long_examples: str = "truncate"  # over MAX_SEQ_LENGTH: "truncate" (kept, counted) or "drop" (counted)
    max_text_chars: int = 40_000
    languages: frozenset[str] = frozenset({"en"})
    preferences: PreferenceRules = PreferenceRules()  # the PREF_* settings: which pairs are built beside the splits

    @classmethod
    def from_settings(cls, settings) -> QualityRules:
        """From any object with the FLCrewRedditConfig field names (the config itself)."""
        return cls(scrub_personal_data=settings.scrub_personal_data,
                   near_duplicate_threshold=settings.near_duplicate_threshold,
                   min_reply_tokens=settings.min_reply_tokens, max_reply_tokens=settings.max_reply_tokens,
                   long_examples=settings.long_examples, max_text_chars=settings.max_text_chars,
                   languages=frozenset(settings.languages),
                   preferences=PreferenceRules.from_settings(settings))


class BuiltExamples(NamedTuple):
    examples: list[dict]
    dropped: Counter  # comments or examples left out, by reason
    num_comments: int
    scrubbed: Counter  # texts changed but kept, by rule


def build_examples(collected: list[dict], tokenizer, max_seq_length: int,
                   rules: QualityRules | None = None) -> BuiltExamples:
    """All threads of all subreddits → examples with rendered prompt/reply and token counts.

    Rules, in order; a comment is counted under the first rule that drops it:
    0. a post or comment record of the wrong shape (a field missing or of the wrong type) is counted and left out;
    1. per thread (`thread_examples`): comments in parent cycles, removed, huge, bot / moderator, empty, orphaned
       and exact-duplicate replies go; control and invisible characters and quotes are cut; personal data is
       replaced by placeholders;
    2. near-duplicate replies (MinHash LSH, Jaccard of word 3-grams >= NEAR_DUPLICATE_THRESHOLD);
    3. reply length in tokens outside [MIN_REPLY_TOKENS, MAX_REPLY_TOKENS];
    4. language: replies of 10+ words that langdetect places outside LANGUAGES;
    5. examples longer than MAX_SEQ_LENGTH are truncated or dropped (LONG_EXAMPLES).
    """
    rules = rules or QualityRules()
    dropped: Counter = Counter()
    scrubbed: Counter = Counter()
    seen_replies: set[str] = set()
    examples: list[dict] = []
    num_comments = 0
    for bundle in collected:
        comments_by_post: dict[str, list[RedditComment]] = {}
        for raw in bundle["comments"]:
            num_comments += 1
            comment = readable(RedditComment, raw, dropped, "invalid_comment_record")
            if comment is not None:
                comments_by_post.setdefault(comment.link_id.removeprefix("t3_"), []).append(comment)
        for raw in bundle["posts"]:
            post = readable(RedditPost, raw, dropped, "invalid_post_record")
            if post is None:
                continue  # its comments are counted below, as post_not_collected
            thread = thread_examples(post, comments_by_post.pop(post.id, []), seen_replies,
                                     max_chars=rules.max_text_chars, scrub_personal=rules.scrub_personal_data)
            dropped.update(thread.dropped)
            scrubbed.update(thread.scrubbed)
            examples.extend(thread.examples)
        for orphans in comments_by_post.values():
            dropped["post_not_collected"] += len(orphans)

    replies = [example["messages"][-1]["content"] for example in examples]
    near = near_duplicates(replies, rules.near_duplicate_threshold)
    dropped["near_duplicate_reply"] += len(near)
    examples = [example for index, example in enumerate(examples) if index not in near]

    kept = []
    reply_lengths = [len(ids) for ids in tokenizer([e["messages"][-1]["content"] for e in examples],
                                                   add_special_tokens=False)["input_ids"]] if examples else []
    for example, reply_tokens in zip(examples, reply_lengths):
        if reply_tokens < rules.min_reply_tokens:
            dropped["reply_under_min_tokens"] += 1
            continue
        if reply_tokens > rules.max_reply_tokens:
            dropped["reply_over_max_tokens"] += 1
            continue
        language = language_drop_reason(example["messages"][-1]["content"], rules.languages)
        if language:
            dropped[language] += 1
            continue
        tokens = tokenize_example(tokenizer, example["messages"], max_seq_length)
        if tokens is None:
            dropped["no_reply_tokens"] += 1
            continue
        if tokens["truncated"]:
            if rules.long_examples == "drop":
                dropped["over_max_seq_length"] += 1
                continue
            scrubbed["truncated_to_max_seq_length"] += 1
        example["prompt"], example["reply"] = render_chat(tokenizer, example["messages"])
        example["num_tokens"] = len(tokens["input_ids"])
        kept.append(example)
    return BuiltExamples(kept, +dropped, num_comments, scrubbed)


def readable(model, raw, dropped: Counter, reason: str):
    """`raw` as a `model` record, or None, counted in `dropped` under `reason`, when it is not one."""
    try:
        return model.model_validate(raw)
    except ValidationError as error:
        dropped[reason] += 1
        log.warning("A collected record is left out (%s): %s", reason, error.errors()[0]["msg"])
        return None


def attach_images(examples: list[dict], posts: dict[str, RedditPost], store: MediaStore) -> list[dict]:
    """Replies to a post with media get the post's stored images (a picture, a gallery's items, a video's keyframes
    or preview; each post's media resolved once); returns one image–text pair per post that kept images."""
    pairs: dict[str, dict] = {}
    for example in examples:
        post = posts.get(example.get("post_id"))
        if not example.get("reply_to_post", bool(example.get("image_paths"))):
            example["image_paths"] = []  # a reply to a comment answers the comment, not the picture
            continue
        if post is None:
            images = store.post_images(example.get("image_paths", []))
        else:
            images = store.post_images(post.image_paths, post.image_urls, post.video_url)
        example["image_paths"] = [str(image.path) for image in images]
        if images:
            pair = pairs.setdefault(example["post_id"], {
                "post_id": example["post_id"], "subreddit": example["subreddit"],
                "image_paths": example["image_paths"], "image_sha256": [image.sha256 for image in images],
                "text": example["messages"][0]["content"], "example_ids": []})
            pair["example_ids"].append(example["id"])
    return list(pairs.values())


def preprocess(collected: list[dict], tokenizer, *, run_id: str, data_dir: Path, num_clients: int, partition: str,
               max_examples_per_client: int | None, max_seq_length: int, test_fraction: float, seed: int,
               support_multimodal: bool = True, max_image_size: int = 224,
               validation_fraction: float = 0.0, quality: QualityRules | None = None,
               dirichlet_alpha: float = 0.5, media: MediaSettings | None = None,
               image_processor: str | None = None) -> PreprocessReport:
    examples, dropped, num_comments, scrubbed = build_examples(collected, tokenizer, max_seq_length, quality)
    preprocessed_dir = data_dir / "preprocessed" / run_id
    image_pairs, image_features = [], None
    if support_multimodal:
        posts = {post.id: post for post in (readable(RedditPost, raw, Counter(), "invalid_post_record")
                                            for bundle in collected for raw in bundle["posts"]) if post is not None}
        store = MediaStore(preprocessed_dir / "images", media or MediaSettings(max_image_size=max_image_size),
                           dropped)
        image_pairs = attach_images(examples, posts, store)
        if image_processor:
            image_features = encode_stored_images(
                image_processor, [Path(path) for pair in image_pairs for path in pair["image_paths"]])
        # written relative to the run's preprocessed folder: a moved run folder finds its images (`data_paths`)
        examples = portable_rows(examples, preprocessed_dir)
        image_pairs = portable_rows(image_pairs, preprocessed_dir)
    else:
        for example in examples:
            example["image_paths"] = []
    write_jsonl(preprocessed_dir / "examples.jsonl", examples)
    write_jsonl(preprocessed_dir / "image_text_pairs.jsonl", image_pairs)

    preference = (quality or QualityRules()).preferences
    placeholder = scores_are_placeholders(examples)
    if placeholder and "votes" in preference.kinds:
        log.warning("Every reply of this run has the same score (%s): the source's scores are placeholders, so no "
                    "votes preference pairs are built", examples[0].get("score"))
    fits = reply_fits(tokenizer, max_seq_length)
    pairs_dropped: Counter = Counter()
    pairs_built: Counter = Counter()
    pairs_per_split: Counter = Counter()
    shards = []
    for index, client_examples in enumerate(partition_examples(examples, num_clients, partition, seed,
                                                               dirichlet_alpha=dirichlet_alpha)):
        train, validation, test = split_by_thread(client_examples, test_fraction, max_examples_per_client,
                                                  seed + index, validation_fraction)
        over_cap = len(client_examples) - len(train) - len(validation) - len(test)
        if over_cap:
            dropped["over_max_examples_per_client"] += over_cap
        name = f"client-{index}"
        client_dir = data_dir / "training" / run_id / name
        write_jsonl(client_dir / "train.jsonl", train)
        write_jsonl(client_dir / "test.jsonl", test)
        if validation_fraction > 0:
            write_jsonl(client_dir / "validation.jsonl", validation)
        pairs = client_pairs({"train": train, "validation": validation, "test": test}, preference, seed,
                             scores_placeholder=placeholder, fits=fits, dropped=pairs_dropped, built=pairs_built)
        for split, rows in pairs.items():
            write_jsonl(client_dir / f"{split}_pairs.jsonl", rows)
            pairs_per_split[split] += len(rows)
        shards.append(ClientShard(
            name=name, subreddits=dict(Counter(e["subreddit"] for e in client_examples).most_common()),
            num_train=len(train), num_test=len(test), train_path=str(client_dir / "train.jsonl"),
            test_path=str(client_dir / "test.jsonl"), train_tokens=sum(e["num_tokens"] for e in train),
            num_validation=len(validation),
            validation_path=str(client_dir / "validation.jsonl") if validation_fraction > 0 else None,
            num_examples=len(client_examples), num_tokens=sum(e["num_tokens"] for e in client_examples),
            num_train_pairs=len(pairs["train"]), num_validation_pairs=len(pairs["validation"]),
            num_test_pairs=len(pairs["test"])))
        if not train or not test or (validation_fraction > 0 and not validation):
            raise ValueError(f"{name} has {len(train)} training, {len(validation)} validation and {len(test)} test "
                             "examples: too little data; collect more posts (POSTS_PER_SUBREDDIT) or use fewer "
                             "trainers")
    report = PreprocessReport(num_comments=num_comments, num_examples=len(examples), dropped=dict(dropped),
                              scrubbed=dict(scrubbed), partition=partition,
                              images_kept=len({p for pair in image_pairs for p in pair["image_paths"]}),
                              image_features=image_features,
                              clients=shards, examples_path=str(preprocessed_dir / "examples.jsonl"),
                              max_train_examples=max_examples_per_client,
                              preference_pairs={"kinds": list(preference.kinds),
                                                "built": {kind: pairs_built[kind] for kind in preference.kinds},
                                                "dropped": dict(sorted(pairs_dropped.items())),
                                                "scores_placeholder": placeholder,
                                                "splits": {split: pairs_per_split[split] for split in
                                                           ("train", "validation", "test")}})
    log.info("Preprocessed %d comments into %d examples; dropped: %s; changed: %s", num_comments, len(examples),
             dict(dropped) or "nothing", dict(scrubbed) or "nothing")
    log.info("Preference pairs: %s built; left out: %s%s", dict(pairs_built) or "none",
             dict(sorted(pairs_dropped.items())) or "nothing",
             " (scores are placeholders: no votes pairs)" if placeholder else "")
    return report
