"""Cleaning, thread → example building, chat formatting with reply masks, partitions and thread-level splits."""
from collections import Counter

from fl_crew_reddit.preprocessing.cleaning import clean_text, drop_reason, is_bot
from fl_crew_reddit.preprocessing.examples import thread_examples, tokenize_example
from fl_crew_reddit.preprocessing.partition import partition_examples, split_by_thread
from fl_crew_reddit.reddit.schemas import RedditComment, RedditPost


def _comment(cid, parent, body, author="someone"):
    return RedditComment(id=cid, link_id="t3_p1", parent_id=parent, subreddit="books", body=body, author=author)


def test_clean_text_strips_markdown_urls_and_quotes():
    raw = "> quoted line\n**Bold** and *italic* [the docs](https://example.com/x) see https://foo.bar/baz &amp; more"
    assert clean_text(raw) == "Bold and italic the docs see & more"


def test_drop_reasons():
    assert drop_reason("u1", "[deleted]") == "deleted_or_removed"
    assert drop_reason("u1", "[removed]") == "deleted_or_removed"
    assert drop_reason("AutoModerator", "Your post was removed.") == "bot_or_moderator"
    assert drop_reason("RemindMeBot", "I will be messaging you") == "bot_or_moderator"
    assert drop_reason("u1", "https://only.a/link") == "empty_after_cleaning"
    assert drop_reason("u1", "A real answer.") is None
    assert is_bot("someone", "I am a bot, and this action was performed automatically.")


def test_thread_examples_builds_prompts_and_counts_drops():
    post = RedditPost(id="p1", subreddit="books", title="Best **sci-fi** of 2015?", selftext="Looking for tips.")
    comments = [
        _comment("c1", "t3_p1", "Try *The Martian*."),
        _comment("c2", "t1_c1", "Seconded, loved it."),
        _comment("c3", "t3_p1", "[deleted]"),
        _comment("c4", "t1_c3", "Replying to a deleted comment"),
        _comment("c5", "t3_p1", "try the martian!"),  # duplicate of c1 after normalisation
        _comment("c6", "t3_p1", "Removed", author="AutoModerator"),
    ]
    out = thread_examples(post, comments, seen_replies=set())
    assert [e["id"] for e in out.examples] == ["c1", "c2"]
    assert out.examples[0]["messages"][0]["content"] == "r/books: Best sci-fi of 2015?\n\nLooking for tips."
    assert out.examples[1]["messages"][0]["content"] == "r/books: Best sci-fi of 2015?\n\nTry The Martian."
    assert out.examples[1]["messages"][1]["content"] == "Seconded, loved it."
    assert out.dropped == Counter(deleted_or_removed=1, parent_missing_or_removed=1, duplicate_reply=1,
                                  bot_or_moderator=1)


def test_tokenize_example_masks_only_the_reply(tiny_model):
    _, tokenizer = tiny_model
    messages = [{"role": "user", "content": "What should I plant?"}, {"role": "assistant", "content": "Tomatoes."}]
    row = tokenize_example(tokenizer, messages, max_length=256)
    reply_ids = [t for t, m in zip(row["input_ids"], row["reply_mask"]) if m]
    assert tokenizer.decode(reply_ids) == "Tomatoes.<|im_end|>\n"
    prompt = tokenizer.decode([t for t, m in zip(row["input_ids"], row["reply_mask"]) if not m])
    assert prompt.endswith("<|im_start|>assistant\n") and "What should I plant?" in prompt


def test_tokenize_example_truncates_prompt_first(tiny_model):
    _, tokenizer = tiny_model
    messages = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "short reply"}]
    row = tokenize_example(tokenizer, messages, max_length=64)
    assert len(row["input_ids"]) == 64 and row["truncated"]
    assert tokenizer.decode([t for t, m in zip(row["input_ids"], row["reply_mask"]) if m]).startswith("short reply")


def _examples(n_per_sub, subs=("a", "b", "c")):
    return [{"id": f"{s}{i}", "post_id": f"{s}-post{i // 3}", "subreddit": s} for s in subs for i in range(n_per_sub)]


def test_partition_by_subreddit_gives_one_topic_per_client():
    clients = partition_examples(_examples(9), 3, "subreddit", seed=1)
    assert sorted({e["subreddit"] for e in c}.pop() for c in clients) == ["a", "b", "c"]
    assert all(len({e["subreddit"] for e in c}) == 1 for c in clients)


def test_partition_iid_mixes_and_keeps_everything():
    examples = _examples(9)
    clients = partition_examples(examples, 3, "iid", seed=1)
    assert sorted(e["id"] for c in clients for e in c) == sorted(e["id"] for e in examples)
    assert all(len({e["subreddit"] for e in c}) > 1 for c in clients)


def test_partition_by_subreddit_rejects_too_few_subreddits():
    import pytest

    with pytest.raises(ValueError, match="PARTITION=iid"):
        partition_examples(_examples(9, subs=("a", "b")), 3, "subreddit", seed=1)


def test_split_by_thread_never_shares_a_thread():
    examples = _examples(30, subs=("a",))
    train, validation, test = split_by_thread(examples, test_fraction=0.2, max_train=100, seed=3)
    assert validation == []  # validation_fraction defaults to 0
    assert {e["post_id"] for e in train}.isdisjoint({e["post_id"] for e in test})
    assert len(train) + len(test) == 30 and 5 <= len(test) <= 8


def test_split_by_thread_validation_is_disjoint_by_thread_and_reproducible():
    # Prepare: 40 threads of 3 replies each.
    examples = _examples(120, subs=("a",))

    # Execute
    split = split_by_thread(examples, test_fraction=0.2, max_train=200, seed=5, validation_fraction=0.1)
    again = split_by_thread(examples, test_fraction=0.2, max_train=200, seed=5, validation_fraction=0.1)
    other_seed = split_by_thread(examples, test_fraction=0.2, max_train=200, seed=6, validation_fraction=0.1)
    no_validation = split_by_thread(examples, test_fraction=0.2, max_train=200, seed=5)

    # Assert: three splits, no thread in two of them, nothing lost, same seed → same split (same order too).
    threads = [{e["post_id"] for e in part} for part in split]
    assert all(threads) and not (threads[0] & threads[1] or threads[0] & threads[2] or threads[1] & threads[2])
    assert sorted(e["id"] for part in split for e in part) == sorted(e["id"] for e in examples)
    assert 12 <= len(split.validation) <= 14 and 24 <= len(split.test) <= 26  # whole threads: may overshoot
    assert [[e["id"] for e in part] for part in split] == [[e["id"] for e in part] for part in again]
    assert [e["id"] for e in other_seed.validation] != [e["id"] for e in split.validation]
    # Adding validation leaves the test split as it was: held-out numbers stay comparable.
    assert [e["id"] for e in no_validation.test] == [e["id"] for e in split.test]


def test_split_by_thread_validation_has_a_minimum_count():
    examples = _examples(60, subs=("a",))  # 10% would be 6 examples; the minimum is 8
    split = split_by_thread(examples, test_fraction=0.2, max_train=200, seed=1, validation_fraction=0.1)
    assert 8 <= len(split.validation) <= 10
    assert {e["post_id"] for e in split.validation}.isdisjoint({e["post_id"] for e in split.train})
