"""Preprocessing quality rules (personal data, near-duplicates, moderators, length, language), the Dirichlet and
author partitions, and a collection + preprocessing run over a dump folder seeded with every kind of bad input."""
from __future__ import annotations

import io
import json
import random
from collections import Counter
from pathlib import Path

import pytest

from fl_crew_reddit.preprocessing.cleaning import drop_reason, language_drop_reason, scrub_personal_data
from fl_crew_reddit.preprocessing.examples import thread_examples
from fl_crew_reddit.preprocessing.near_duplicates import choose_bands, jaccard, near_duplicates, shingles
from fl_crew_reddit.preprocessing.partition import MIN_THREADS_PER_CLIENT, partition_examples
from fl_crew_reddit.preprocessing.pipeline import QualityRules, build_examples
from fl_crew_reddit.reddit.schemas import RedditComment, RedditPost

GERMAN = ("Ich habe das Buch letzte Woche gelesen und fand die Geschichte wirklich spannend, "
          "besonders das Ende hat mir sehr gut gefallen.")
ENGLISH = ("I read the book last week and found the story really exciting, especially the ending, "
           "which I liked a lot more than I expected.")


# ---------------------------------------------------------------------------------------------- personal data
@pytest.mark.parametrize("text, scrubbed, kinds", [
    ("ask u/sourdough_sam or /u/Bunny-Hater_88 about it", "ask [user] or [user] about it", {"reddit_handle": 2}),
    ("mail jane.doe+r@example.co.uk or ping @jane_doe", "mail [email] or ping [user]", {"email": 1, "at_handle": 1}),
    ("call (202) 555-0143, 202-555-0143 or 1-800-555-0199", "call [phone], [phone] or [phone]", {"phone": 3}),
    ("London +44 20 7946 0958, Paris +33 1 23 45 67 89", "London [phone], Paris [phone]", {"phone": 2}),
])
def test_personal_data_is_replaced_and_counted_by_kind(text, scrubbed, kinds):
    assert scrub_personal_data(text) == (scrubbed, Counter(kinds))


@pytest.mark.parametrize("text", [
    "In 2015 I paid 1234567890 for it, on 2015-02-14 at 10:30.",
    "ISBN 978-0-553-41802-6, score 12-3, version 1.2.3, pi 3.14159, 100 200 3000",
    "me@home, a@b, @3x retina, the u/ prefix, +12 alone",
])
def test_years_numbers_and_near_misses_are_left_alone(text):
    assert scrub_personal_data(text) == (text, Counter())


# ---------------------------------------------------------------------------------------------- bots, moderators
def test_moderator_and_sticky_comments_are_dropped():
    assert drop_reason("mod_jane", "Please keep it civil.", distinguished="moderator") == "bot_or_moderator"
    assert drop_reason("mod_jane", "Rules of this thread: ...", stickied=True) == "bot_or_moderator"
    assert drop_reason("AutoModerator", "Your post was removed.") == "bot_or_moderator"
    assert drop_reason("jane", "A real answer.", distinguished=None, stickied=False) is None
    assert drop_reason("jane", "x" * 101, max_chars=100) == "over_max_chars"


# ---------------------------------------------------------------------------------------------- near-duplicates
def _sentence(rng: random.Random, words: int = 30) -> str:
    vocabulary = [f"w{i}" for i in range(400)]
    return " ".join(rng.choice(vocabulary) for _ in range(words))


def test_near_duplicates_catch_a_one_word_edit_and_keep_different_texts():
    rng = random.Random(0)
    base = _sentence(rng)
    edited = base.rsplit(" ", 1)[0] + " changed"
    texts = [base, _sentence(rng), edited, _sentence(rng), base.upper() + "!"]
    assert near_duplicates(texts, threshold=0.8) == {2: 0, 4: 0}
    assert near_duplicates(texts, threshold=1.0) == {4: 0}


def test_near_duplicates_agree_with_exact_jaccard_on_every_pair():
    rng = random.Random(3)
    originals = [_sentence(rng, 20) for _ in range(40)]
    texts = []
    for text in originals:  # each original and two edits with 1-4 words replaced
        texts.append(text)
        for _ in range(2):
            words = text.split()
            for _ in range(rng.randint(1, 4)):
                words[rng.randrange(len(words))] = f"x{rng.randrange(10**6)}"
            texts.append(" ".join(words))
    expected, kept = {}, []
    for index, text in enumerate(texts):  # brute force: every text against every kept one
        match = next((k for k in kept if jaccard(shingles(text), shingles(texts[k])) >= 0.7), None)
        expected.update({index: match} if match is not None else {})
        kept += [] if match is not None else [index]
    assert near_duplicates(texts, threshold=0.7) == expected
    assert 20 < len(expected) < 80


def test_bands_catch_pairs_at_the_threshold():
    for threshold in (0.5, 0.8, 0.95):
        bands, rows = choose_bands(threshold, 64)
        assert bands * rows <= 64 and 1 - (1 - threshold ** rows) ** bands >= 0.99


# ---------------------------------------------------------------------------------------------- language
def test_language_check_drops_confident_other_languages_only():
    assert language_drop_reason(GERMAN, {"en"}) == "other_language"
    assert language_drop_reason(GERMAN, {"en", "de"}) is None
    assert language_drop_reason(ENGLISH, {"en"}) is None
    assert language_drop_reason("Das ist gut.", {"en"}) is None, "too short to judge"
    assert language_drop_reason(GERMAN, set()) is None, "LANGUAGES empty: no check"
    assert language_drop_reason("1 2 3 4 5 6 7 8 9 10 11 12", {"en"}) is None, "no letters: not judged"


# ---------------------------------------------------------------------------------------------- the whole chain
@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _c(cid: str, body: str, parent: str = "t3_p1", post: str = "p1", **extra) -> dict:
    return RedditComment(id=cid, link_id=f"t3_{post}", parent_id=parent, subreddit="books", body=body,
                         author=extra.pop("author", f"user_{cid}"), **extra).model_dump()


def test_every_rule_is_counted_under_its_reason(tokenizer):
    recommendation = ("I would recommend The Martian by Andy Weir because it is funny, clever and full of real "
                      "science that anyone who likes problem solving will enjoy from the first page to the last")
    posts = [RedditPost(id="p1", subreddit="books", title="Which novel next?",
                        selftext="Mail me at reader@example.com").model_dump(),
             RedditPost(id="p2", subreddit="books", title="Huge", selftext="x" * 3000).model_dump()]
    comments = [
        _c("c1", recommendation),
        _c("c2", recommendation.replace("last", "final")),             # near-duplicate of c1
        _c("c3", "ok"),                                                # under MIN_REPLY_TOKENS
        _c("c4", " ".join(f"word{i}" for i in range(150))),            # over MAX_REPLY_TOKENS
        _c("c5", GERMAN),                                              # other language
        _c("c6", "Please keep it civil.", distinguished="moderator"),  # moderator
        _c("c7", "Thread rules: be nice.", stickied=True),             # sticky mod note
        _c("c8", "y " * 1500),                                         # over MAX_TEXT_CHARS
        _c("c9", "> you said\nAsk u/book_worm_99 or call +44 20 7946 0958 for the club."),
        _c("c10", "Thanks, I will call them tomorrow.", parent="t1_c9"),
        _c("c11", "never shown", post="p2"), _c("c12", "never shown either", post="p2"),  # thread of a huge post
    ]
    rules = QualityRules(min_reply_tokens=3, max_reply_tokens=200, max_text_chars=2000, languages=frozenset({"en"}))
    built = build_examples([{"posts": posts, "comments": comments}], tokenizer, 512, rules)
    assert [e["id"] for e in built.examples] == ["c1", "c9", "c10"]
    assert built.dropped == Counter(near_duplicate_reply=1, reply_under_min_tokens=1, reply_over_max_tokens=1,
                                    other_language=1, bot_or_moderator=2, over_max_chars=1, post_over_max_chars=2)
    assert built.scrubbed == Counter(personal_data_email=1, personal_data_reddit_handle=1, personal_data_phone=1,
                                     quoted_text=1)
    by_id = {e["id"]: e for e in built.examples}
    assert by_id["c1"]["messages"][0]["content"] == "r/books: Which novel next?\n\nMail me at [email]"
    assert by_id["c9"]["messages"][1]["content"] == "Ask [user] or call [phone] for the club."
    assert "Ask [user] or call [phone]" in by_id["c10"]["messages"][0]["content"], "prompts are scrubbed too"
    assert all("reader@" not in e["prompt"] + e["reply"] for e in built.examples)


def test_long_examples_are_truncated_or_dropped_and_counted(tokenizer):
    posts = [RedditPost(id="p1", subreddit="books", title="word " * 200).model_dump()]
    comments = [_c("c1", "A short reply about the book."), _c("c2", "Another short reply here.")]
    truncate = build_examples([{"posts": posts, "comments": comments}], tokenizer, 64, QualityRules())
    assert len(truncate.examples) == 2 and truncate.scrubbed["truncated_to_max_seq_length"] == 2
    assert all(e["num_tokens"] <= 64 for e in truncate.examples)
    drop = build_examples([{"posts": posts, "comments": comments}], tokenizer, 64,
                          QualityRules(long_examples="drop"))
    assert drop.examples == [] and drop.dropped == Counter(over_max_seq_length=2)


def test_scrubbing_can_be_switched_off():
    post = RedditPost(id="p1", subreddit="books", title="Ask u/someone_here")
    out = thread_examples(post, [RedditComment(**_c("c1", "mail a.b@example.org"))], set(), scrub_personal=False)
    assert out.examples[0]["messages"][1]["content"] == "mail a.b@example.org" and not out.scrubbed


# ---------------------------------------------------------------------------------------------- partitions
def _thread_examples(subreddits: int = 4, threads: int = 10, per_thread: int = 3) -> list[dict]:
    return [{"id": f"s{s}t{t}e{e}", "post_id": f"s{s}t{t}", "subreddit": f"sub{s}", "author": f"a{(s + t + e) % 7}"}
            for s in range(subreddits) for t in range(threads) for e in range(per_thread)]


def _skew(clients: list[list[dict]]) -> float:
    """Mean over clients of the largest subreddit share: 1 = each client one subreddit."""
    return sum(max(Counter(e["subreddit"] for e in c).values()) / len(c) for c in clients) / len(clients)


def _check_partition(examples: list[dict], clients: list[list[dict]], whole_threads: bool = True) -> None:
    assert sorted(e["id"] for c in clients for e in c) == sorted(e["id"] for e in examples), "each example once"
    owner: dict[str, int] = {}
    for index, client in enumerate(clients):
        assert client, f"client {index} is empty"
        for example in client:
            if whole_threads:
                assert owner.setdefault(example["post_id"], index) == index, "a thread split over two clients"


def test_dirichlet_is_seeded_skewed_by_alpha_and_keeps_threads_whole():
    examples = _thread_examples()
    skewed = partition_examples(examples, 4, "dirichlet", seed=5, dirichlet_alpha=0.1)
    mixed = partition_examples(examples, 4, "dirichlet", seed=5, dirichlet_alpha=1000)
    for clients in (skewed, mixed):
        _check_partition(examples, clients)
        assert all(len({e["post_id"] for e in c}) >= MIN_THREADS_PER_CLIENT for c in clients)
    assert partition_examples(examples, 4, "dirichlet", seed=5, dirichlet_alpha=0.1) == skewed
    assert partition_examples(examples, 4, "dirichlet", seed=6, dirichlet_alpha=0.1) != skewed
    assert _skew(skewed) > 0.6 > 0.4 > _skew(mixed)


def test_dirichlet_keeps_every_client_non_empty_when_draws_fall_short():
    examples = _thread_examples(subreddits=2, threads=4, per_thread=1)  # 8 threads for 4 clients: 2 each at most
    for seed in range(5):
        clients = partition_examples(examples, 4, "dirichlet", seed=seed, dirichlet_alpha=0.001)
        _check_partition(examples, clients)
        assert [len({e["post_id"] for e in c}) for c in clients] == [2, 2, 2, 2]
    with pytest.raises(ValueError, match="needs at least 10 threads"):
        partition_examples(examples, 5, "dirichlet", seed=0)


def test_author_partition_keeps_each_author_at_one_client_and_balances():
    examples = _thread_examples()
    examples += [{"id": f"anon{i}", "post_id": "s0t0", "subreddit": "sub0", "author": None} for i in range(5)]
    clients = partition_examples(examples, 3, "author", seed=0)
    _check_partition(examples, clients, whole_threads=False)
    homes = {}
    for index, client in enumerate(clients):
        for example in client:
            if example["author"]:
                assert homes.setdefault(example["author"], index) == index
    sizes = [len(c) for c in clients]
    biggest_author = max(Counter(e["author"] for e in examples if e["author"]).values())
    assert max(sizes) - min(sizes) <= biggest_author


def test_iid_deals_whole_threads_and_balances():
    examples = _thread_examples()
    clients = partition_examples(examples, 4, "iid", seed=2)
    _check_partition(examples, clients)
    assert max(len(c) for c in clients) - min(len(c) for c in clients) <= 3
    assert all(len({e["subreddit"] for e in c}) > 1 for c in clients)


def test_unknown_partition_names_the_choices():
    with pytest.raises(ValueError, match="subreddit, iid, dirichlet, author"):
        partition_examples(_thread_examples(), 2, "random", seed=0)


# ---------------------------------------------------------------------------------------------- bad input run
def _png(size: tuple[int, int] = (40, 30)) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def _lines(path: Path, rows: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        for row in rows:
            handle.write((json.dumps(row) if isinstance(row, dict) else row).encode("utf-8")
                         if not isinstance(row, bytes) else row)
            handle.write(b"\n")


TOPICS = ["tomatoes", "basil", "roses", "compost", "mulch", "seedlings", "pruning", "watering"]


def _bad_dump(root: Path) -> Path:
    """Two subreddits of good threads, seeded with one of each bad input the collector and preprocessor meet."""
    for sub in ("garden", "kitchen"):
        posts, comments = [], []
        for i, topic in enumerate(TOPICS):
            pid = f"{sub[0]}p{i}"
            posts.append({"id": pid, "subreddit": sub, "title": f"Question {i} about {topic} in my {sub}",
                          "selftext": "", "created_utc": 1000 + i, "score": 1, "num_comments": 3})
            for j in range(3):
                comments.append({"id": f"{pid}c{j}", "link_id": f"t3_{pid}", "parent_id": f"t3_{pid}",
                                 "subreddit": sub, "created_utc": 2000 + j, "score": 1, "author": f"u{j}",
                                 "body": f"Reply {j} on {topic}: in my {sub} the {topic} number {i * 3 + j} did "
                                         f"{'well' if j % 2 else 'badly'} after {j + 2} weeks of care."})
        folder = root / sub
        _lines(folder / "submissions.jsonl", posts)
        _lines(folder / "comments.jsonl", comments)
    garden = root / "garden"
    (garden / "images").mkdir()
    (garden / "images" / "fake.png").write_bytes(b"<html>this is not an image</html>")
    (garden / "images" / "cut.png").write_bytes(_png()[:60])
    (garden / "images" / "good.png").write_bytes(_png())
    with (garden / "submissions.jsonl").open("ab") as handle:
        for row in [
            b'{"id": "bad1", "title": "cut off',                                       # corrupt JSON line
            b'{"id": "bad2", "title": "caf\xe9 in latin-1"}',                            # invalid UTF-8
            json.dumps({"subreddit": "garden", "selftext": "no id and no title"}).encode(),  # missing fields
            json.dumps({"id": "gp0", "title": "the same id again"}).encode(),          # duplicate id
            json.dumps({"id": "huge", "title": "A huge post", "selftext": "spam " * 20_000,  # huge post
                        "num_comments": 2, "created_utc": 900}).encode(),
            json.dumps({"id": "img1", "title": "My not-an-image", "url": "images/fake.png",  # non-image bytes
                        "num_comments": 1, "created_utc": 901}).encode(),
            json.dumps({"id": "img2", "title": "My truncated photo", "url": "images/cut.png",  # truncated image
                        "num_comments": 1, "created_utc": 902}).encode(),
            json.dumps({"id": "img3", "title": "My good photo", "url": "images/good.png",
                        "num_comments": 1, "created_utc": 903}).encode(),
            json.dumps({"id": "img4", "title": "My lost photo", "url": "images/gone.png",   # missing media
                        "num_comments": 0, "created_utc": 904}).encode(),
        ]:
            handle.write(row + b"\n")
    with (garden / "comments.jsonl").open("ab") as handle:
        for row in [
            b"{not json at all",
            b'{"id": "x1", "link_id": "t3_gp1", "body": "\xff\xfe broken bytes"}',
            json.dumps({"id": "x2", "link_id": "t3_gp1"}).encode(),                        # no body
            json.dumps({"id": "gp0c0", "link_id": "t3_gp0", "body": "duplicate comment id"}).encode(),
            json.dumps({"id": "h1", "link_id": "t3_huge", "body": "Nice long post, thanks for all of it."}).encode(),
            json.dumps({"id": "h2", "link_id": "t3_huge", "body": "I read every word of this one."}).encode(),
            json.dumps({"id": "h3", "link_id": "t3_gp2", "body": "z" * 50_000}).encode(),   # huge comment
            json.dumps({"id": "i1", "link_id": "t3_img1", "body": "What a lovely picture you took there."}).encode(),
            json.dumps({"id": "i2", "link_id": "t3_img2", "body": "That photo did not load for me."}).encode(),
            json.dumps({"id": "i3", "link_id": "t3_img3", "body": "Great colours on those red flowers."}).encode(),
        ]:
            handle.write(row + b"\n")
    (root / "empty").mkdir()
    (root / "empty" / "submissions.jsonl").write_bytes(b"")                            # empty file
    (root / "empty" / "comments.jsonl").write_bytes(b"")
    return root


@pytest.mark.e2e
def test_a_dump_full_of_bad_input_is_collected_and_preprocessed_with_every_skip_counted(tiny_config, tmp_path):
    from fl_crew_reddit.evaluation.report import markdown_report
    from fl_crew_reddit.runs import RunPaths
    from fl_crew_reddit.workspace import FederatedWorkspace

    dump = _bad_dump(tmp_path / "dump")
    config = tiny_config.model_copy(update={
        "reddit_backend": "dump", "reddit_dump_dir": dump, "num_trainers": 2, "partition": "iid",
        "max_text_chars": 20_000})
    workspace = FederatedWorkspace(config, RunPaths(tmp_path, "run-bad-input").create())
    collection = workspace.collect()
    data = workspace.preprocess()
    history = json.loads(json.dumps(workspace.history()))

    source = Counter()
    for sub in history["collection"]["subreddits"]:
        source.update(sub["skipped"])
    assert source == Counter(invalid_json=2, invalid_utf8=2, missing_fields=2, duplicate_id=2, empty_file=2,
                             media_missing=1)
    assert {s.subreddit for s in collection.subreddits} == {"garden", "kitchen", "empty"}
    dropped = history["data"]["dropped"]
    assert dropped["post_over_max_chars"] == 2 and dropped["over_max_chars"] == 1
    image_reasons = {reason: count for reason, count in dropped.items() if reason.startswith("image_")}
    assert sum(image_reasons.values()) == 2, image_reasons  # the non-image bytes and the truncated PNG
    assert data.images_kept == 1
    assert data.num_examples >= 40 and all(c.num_train and c.num_test for c in data.clients)
    assert [c["name"] for c in history["data"]["clients"]] == ["client-0", "client-1"]
    assert all(c["num_tokens"] > 0 and c["num_examples"] > 0 for c in history["data"]["clients"])

    report = markdown_report(history, png_name=None)
    for reason in list(source) + list(dropped):
        assert reason.replace("_", " ") in report, reason
    assert "garden" in report and "partition: iid" in report
