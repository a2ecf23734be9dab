"""The Data Preprocessor's stage: collected threads → cleaned chat examples → one train/test shard per client.

Writes `data/preprocessed/<run>/examples.jsonl` (every kept example), `image_text_pairs.jsonl` for image posts, and
`data/training/<run>/<client>/{train,test}.jsonl`. Every dropped comment is counted by reason in the report.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path

from pydantic import BaseModel, Field

from fl_crew_reddit.preprocessing.examples import render_chat, thread_examples, tokenize_example
from fl_crew_reddit.preprocessing.images import store_image
from fl_crew_reddit.preprocessing.partition import partition_examples, split_by_thread
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


class PreprocessReport(BaseModel):
    num_comments: int
    num_examples: int
    dropped: dict[str, int] = Field(description="comments or examples left out, by reason")
    images_kept: int = 0
    clients: list[ClientShard]
    examples_path: str


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


def build_examples(collected: list[dict], tokenizer, max_seq_length: int) -> tuple[list[dict], Counter, int]:
    """All threads of all subreddits → examples with rendered prompt/reply and token counts."""
    dropped: Counter = Counter()
    seen_replies: set[str] = set()
    examples: list[dict] = []
    num_comments = 0
    for bundle in collected:
        comments_by_post: dict[str, list[RedditComment]] = {}
        for raw in bundle["comments"]:
            comment = RedditComment.model_validate(raw)
            comments_by_post.setdefault(comment.link_id.removeprefix("t3_"), []).append(comment)
            num_comments += 1
        for raw in bundle["posts"]:
            post = RedditPost.model_validate(raw)
            thread = thread_examples(post, comments_by_post.pop(post.id, []), seen_replies)
            dropped.update(thread.dropped)
            examples.extend(thread.examples)
        for orphans in comments_by_post.values():
            dropped["post_not_collected"] += len(orphans)
    kept = []
    for example in examples:
        tokens = tokenize_example(tokenizer, example["messages"], max_seq_length)
        if tokens is None:
            dropped["no_reply_tokens"] += 1
            continue
        if tokens["truncated"]:
            dropped["truncated_to_max_seq_length (kept)"] += 1
        example["prompt"], example["reply"] = render_chat(tokenizer, example["messages"])
        example["num_tokens"] = len(tokens["input_ids"])
        kept.append(example)
    return kept, dropped, num_comments


def attach_images(examples: list[dict], image_dir: Path, max_size: int, dropped: Counter) -> list[dict]:
    """Normalise each distinct image once; examples keep the stored paths; returns image–text pairs."""
    stored: dict[str, str | None] = {}
    pairs = []
    for example in examples:
        kept_paths = []
        for source in example.get("image_paths", []):
            if source not in stored:
                path, reason = store_image(Path(source), image_dir, max_size)
                stored[source] = str(path) if path else None
                if reason:
                    dropped[reason] += 1
                    log.warning("Image %s left out: %s", source, reason)
            if stored[source]:
                kept_paths.append(stored[source])
        example["image_paths"] = kept_paths
        if kept_paths:
            pairs.append({"id": example["id"], "subreddit": example["subreddit"], "image_paths": kept_paths,
                          "text": example["messages"][0]["content"]})
    return pairs


def preprocess(collected: list[dict], tokenizer, *, run_id: str, data_dir: Path, num_clients: int, partition: str,
               max_examples_per_client: int, max_seq_length: int, test_fraction: float, seed: int,
               support_multimodal: bool = True, max_image_size: int = 224) -> PreprocessReport:
    examples, dropped, num_comments = build_examples(collected, tokenizer, max_seq_length)
    preprocessed_dir = data_dir / "preprocessed" / run_id
    image_pairs = []
    if support_multimodal:
        image_pairs = attach_images(examples, preprocessed_dir / "images", max_image_size, dropped)
    else:
        for example in examples:
            example["image_paths"] = []
    write_jsonl(preprocessed_dir / "examples.jsonl", examples)
    write_jsonl(preprocessed_dir / "image_text_pairs.jsonl", image_pairs)

    shards = []
    for index, client_examples in enumerate(partition_examples(examples, num_clients, partition, seed)):
        train, test = split_by_thread(client_examples, test_fraction, max_examples_per_client, seed + index)
        over_cap = len(client_examples) - len(train) - len(test)
        if over_cap:
            dropped["over_max_examples_per_client"] += over_cap
        name = f"client-{index}"
        client_dir = data_dir / "training" / run_id / name
        write_jsonl(client_dir / "train.jsonl", train)
        write_jsonl(client_dir / "test.jsonl", test)
        shards.append(ClientShard(
            name=name, subreddits=dict(Counter(e["subreddit"] for e in client_examples).most_common()),
            num_train=len(train), num_test=len(test), train_path=str(client_dir / "train.jsonl"),
            test_path=str(client_dir / "test.jsonl"), train_tokens=sum(e["num_tokens"] for e in train)))
        if not train or not test:
            raise ValueError(f"{name} has {len(train)} training and {len(test)} test examples: too little data; "
                             "collect more posts (POSTS_PER_SUBREDDIT) or use fewer trainers")
    report = PreprocessReport(num_comments=num_comments, num_examples=len(examples), dropped=dict(dropped),
                              images_kept=len({p for pair in image_pairs for p in pair["image_paths"]}),
                              clients=shards, examples_path=str(preprocessed_dir / "examples.jsonl"))
    log.info("Preprocessed %d comments into %d examples; dropped: %s", num_comments, len(examples),
             dict(dropped) or "nothing")
    return report
