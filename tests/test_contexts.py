"""Context keys and the two halves of the labelled train replies (`pipeline/contexts.py`): near-duplicate
contexts share a key by hand-checked cases, a context's half does not depend on order or on other rows,
the judge gets about `share` of the contexts, and the two halves are complementary."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from pipeline.contexts import Halves, context_key, judge_half, key_fraction, normalized_text


@pytest.mark.parametrize("text, expected", [
    ("Hello, World!", "hello world"),
    ("  hello   world ", "hello world"),
    ("<b>Hello</b> world", "hello world"),
    ("&gt; Hello world", "hello world"),  # a Reddit quote marker, HTML-escaped
    ("Hello [world](https://example.com)", "hello world"),  # a Markdown link keeps its text
    ("hello world https://t.co/xyz", "hello world"),
    ("Hello\\nworld", "hello world"),  # an escaped line break
    ("*Hello* _world_", "hello world"),
    ("Ｈｅｌｌｏ world", "hello world"),  # full-width letters (NFKC)
    ("I'm fine.", "i m fine"),
    ("", ""),
])
def test_normalized_text_by_hand(text, expected):
    assert normalized_text(text) == expected


def test_a_contexts_key_is_its_first_turn_normalized():
    assert context_key(["My roommate is a PIG!", "lol same", "no"]) == "my roommate is a pig"
    assert context_key(["my roommate is a pig"]) == context_key(["My roommate is a pig!!", "other turn"])
    assert context_key([]) == ""


def test_near_duplicates_fall_in_the_same_half_and_the_half_is_fixed_by_the_key():
    variants = [["Can pills cure my cold?"], ["can pills cure my cold"], ["<i>Can pills cure my cold?</i>"],
                ["Can pills cure my cold ?", "a later turn"]]
    for share in (0.1, 0.5, 0.9):
        halves = judge_half(variants, share)
        assert len(set(halves.tolist())) == 1
    contexts = [[f"context number {i}"] for i in range(50)]
    forward, backward = judge_half(contexts, 0.5), judge_half(contexts[::-1], 0.5)[::-1]
    assert np.array_equal(forward, backward)  # not the order of the rows
    assert np.array_equal(judge_half(contexts[:10], 0.5), forward[:10])  # nor the other rows


@pytest.mark.parametrize("share", [0.2, 0.5, 0.8])
def test_the_judge_gets_about_its_share_and_a_larger_share_only_adds_contexts(share):
    contexts = [[f"a context {i} with some words"] for i in range(4000)]
    half = judge_half(contexts, share)
    assert abs(half.mean() - share) < 0.03  # 4000 keys: the sd of the share is below 0.01
    assert not (half & ~judge_half(contexts, min(1.0, share + 0.1))).any()  # nested as the share grows
    assert judge_half(contexts, 1.0).all()
    assert 0 <= key_fraction("anything") < 1


def test_halves_split_only_the_judge_corpora_and_the_two_halves_are_complementary():
    table = pa.table({"context": [[f"context {i}"] for i in range(40)], "response": [f"reply {i}" for i in range(40)]})
    halves = Halves(["diasafety"], 0.5)
    method, judge = halves.of("diasafety", table), halves.of("diasafety", table, judge=True)
    assert 0 < method.num_rows < 40 and method.num_rows + judge.num_rows == 40
    assert not set(method["response"].to_pylist()) & set(judge["response"].to_pylist())
    assert halves.of("daily_dialog", table) is table  # not a judge corpus: kept whole


def test_toxichat_threads_on_one_post_are_one_cluster_and_other_corpora_cluster_by_dialogue():
    from pipeline.contexts import cluster_key

    assert cluster_key("toxichat", "test-3", ["My post!", "a reply"]) == cluster_key("toxichat", "test-9", ["my post"])
    assert cluster_key("toxichat", "test-3", ["My post!"]) != cluster_key("toxichat", "test-3", ["Another post"])
    assert cluster_key("diasafety", "d1", ["same"]) != cluster_key("diasafety", "d2", ["same"])
    assert cluster_key("diasafety", "d1", ["same"]) == "diasafety/d1"
