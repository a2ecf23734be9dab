"""Examples that make sense (issue 14, item 4): no comment that is its own parent or sits in a parent cycle becomes
an example, and control / invisible characters are removed from training text and counted."""
from __future__ import annotations

import pytest

from fl_crew_reddit.preprocessing import cleaning
from fl_crew_reddit.preprocessing.cleaning import clean_text, drop_reason
from fl_crew_reddit.preprocessing.examples import thread_examples
from fl_crew_reddit.preprocessing.pipeline import build_examples
from fl_crew_reddit.reddit.schemas import RedditComment, RedditPost

POST = RedditPost(id="p1", subreddit="books", title="Which novel should I read next?")


def _c(cid: str, body: str, parent: str = "t3_p1") -> RedditComment:
    return RedditComment(id=cid, link_id="t3_p1", parent_id=parent, subreddit="books", body=body,
                         author=f"user_{cid}")


# ---------------------------------------------------------------------------------------------- parent cycles
def test_a_comment_that_is_its_own_parent_is_no_example():
    out = thread_examples(POST, [_c("c1", "I answer myself, apparently.", parent="t1_c1")], set())
    assert out.examples == [] and out.dropped == {"own_parent": 1}


def test_comments_in_a_parent_cycle_and_below_it_are_no_examples():
    comments = [
        _c("a", "First in the loop of replies.", parent="t1_b"),
        _c("b", "Second in the loop of replies.", parent="t1_c"),
        _c("c", "Third in the loop of replies.", parent="t1_a"),
        _c("d", "A reply hanging under the loop.", parent="t1_a"),
        _c("e", "A sound top-level answer: try Dune."),
        _c("f", "A sound reply to that answer.", parent="t1_e"),
    ]
    out = thread_examples(POST, comments, set())
    assert [e["id"] for e in out.examples] == ["e", "f"]
    assert out.dropped == {"parent_cycle": 3, "ancestor_cycle": 1}


# ---------------------------------------------------------------------------------------------- invisible characters
@pytest.mark.parametrize("text, clean, kinds", [
    ("nul\x00byte and bell\x07 here", "nulbyte and bell here", {"control": 2}),
    ("evil \u202egnp.exe\u202c and \u2066isolate\u2069", "evil gnp.exe and isolate", {"bidi": 4}),
    ("zero\u200bwidth\u2060joined\u200c", "zerowidthjoined", {"zero_width": 3}),
    ("\ufeffstarts with a BOM, and\ufeff one inside", "starts with a BOM, and one inside", {"bom": 2}),
    ("left\u200emark right\u200fmark", "leftmark rightmark", {"bidi": 2}),
    ("windows\r\nline\rends", "windows\nline\nends", {}),
])
def test_invisible_characters_are_removed_and_counted_by_kind(text, clean, kinds):
    stripped, counts = cleaning.strip_invisible(text)
    assert stripped == clean and dict(counts) == kinds
    assert clean_text(text) == clean_text(clean)


def test_emoji_sequences_keep_their_joiner():
    family = "our family \U0001F468\u200d\U0001F469\u200d\U0001F467 says hi"
    assert cleaning.strip_invisible(family) == (family, {})


def test_a_body_of_invisible_characters_only_is_empty():
    assert drop_reason("someone", "\u200b\u200b\ufeff\x00") == "empty_after_cleaning"


def test_training_text_has_no_invisible_characters_and_they_are_counted():
    post = RedditPost(id="p1", subreddit="books", title="Best\u200b book\x00 of 2015?", selftext="\ufeffAny tips?")
    comments = [_c("c1", "Read \u202eDune\u202c, it is great.\x07"),
                _c("c2", "Agreed\u200b, Dune is a classic.", parent="t1_c1")]
    out = thread_examples(post, comments, set())
    texts = [m["content"] for e in out.examples for m in e["messages"]]
    assert len(out.examples) == 2
    assert not any(ch in text for text in texts for ch in "\x00\x07\u200b\u202e\u202c\ufeff")
    assert out.examples[0]["messages"][0]["content"] == "r/books: Best book of 2015?\n\nAny tips?"
    assert out.examples[0]["messages"][1]["content"] == "Read Dune, it is great."
    assert out.scrubbed == {"invisible_zero_width": 2, "invisible_control": 2, "invisible_bom": 1,
                            "invisible_bidi": 2}


class _WordTokenizer:
    """Just enough of a tokenizer for build_examples: one token per word, no chat template."""

    chat_template = None
    eos_token = "</s>"

    def __call__(self, texts, add_special_tokens=False):
        if isinstance(texts, str):
            return {"input_ids": list(range(len(texts.split())))}
        return {"input_ids": [list(range(len(text.split()))) for text in texts]}


def test_the_pipeline_counts_cycles_invisible_characters_and_unreadable_records():
    post = {**POST.model_dump(), "title": "Which\u200b novel next?"}
    comments = [_c("c1", "Try Dune by Frank Herbert, a classic.\x00").model_dump(),
                _c("c2", "I loop onto myself forever.", parent="t1_c2").model_dump(),
                {**_c("c3", "A numeric id.").model_dump(), "id": 3},
                {**_c("c4", "A bad score.").model_dump(), "score": "many"}]
    built = build_examples([{"posts": [post, {**post, "id": 9}], "comments": comments}], _WordTokenizer(), 256)
    assert [e["id"] for e in built.examples] == ["c1"]
    assert "\x00" not in built.examples[0]["reply"] and "\u200b" not in built.examples[0]["prompt"]
    assert built.dropped == {"own_parent": 1, "invalid_comment_record": 2, "invalid_post_record": 1}
    assert built.scrubbed == {"invisible_zero_width": 1, "invisible_control": 1}
