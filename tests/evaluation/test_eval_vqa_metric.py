"""VQA accuracy against hand-computed results of the official rules (vqaEval.py), quirks included."""

import pytest

from idefics.evaluation.vqa_metric import (
    mean_vqa_accuracy,
    normalize_prediction,
    normalize_punctuation,
    vqa_accuracy,
)

# (prediction, ten human answers, accuracy computed by hand)
CASES = [
    # all agree, number word in the prediction only: "Two" -> "2"; every leave-one-out subset has 9 matches
    ("Two", ["2"] * 10, 1.0),
    # article dropped from the prediction; the humans disagree, so they get punctuation processing only and
    # "the dog" stays: 2 matches -> leaving one of them out gives 1/3 (twice), else 2/3 (8 times) = 0.6
    ("a dog", ["dog"] * 2 + ["the dog"] * 8, 0.6),
    # partial agreement: 3 of 10 -> (3 * 2/3 + 7 * 1) / 10
    ("yes", ["yes"] * 3 + ["no"] * 7, 0.9),
    ("Yes.", ["yes"] * 3 + ["no"] * 7, 0.9),  # trailing period and case
    # the humans agree, so theirs are not normalised: "t-shirt" is compared raw with the prediction's "t shirt"
    ("t-shirt", ["t-shirt"] * 10, 0.0),
    # ... and normalised when they disagree: 9 x "t shirt" match
    ("t-shirt", ["t-shirt"] * 9 + ["shirt"], 1.0),
    # digit-comma-digit: punctuation is deleted, not spaced
    ("1,000", ["1000"] * 10, 1.0),
    # contraction restored in the prediction only; 2 matches -> 0.6
    ("dont know", ["don't know"] * 2 + ["no"] * 8, 0.6),
    # number words in the human answers are not converted
    ("two", ["two"] * 10, 0.0),
    ("two", ["2"] * 5 + ["two"] * 5, 1.0),
    # a period before a digit stays
    ("3.5", ["3.5"] * 10, 1.0),
    # whitespace: newlines and tabs to spaces, ends stripped
    (" \nred\t", ["red"] * 10, 1.0),
    # agreeing humans keep their article; the prediction loses it
    ("the beach", ["the beach"] * 10, 0.0),
    # one match: 1/3 when another answer is left out (9 times), 0 when it is (once) -> 0.3
    ("blue", ["blue"] + ["navy"] * 9, 0.3),
    # human answers differing only by surrounding whitespace count as the same (no normalisation)
    ("cat", ["cat "] * 5 + [" cat"] * 5, 1.0),
    # "?" next to a space is deleted; "!" not next to one becomes a space
    ("what ?", ["what"] * 10, 1.0),
    ("wow!great", ["wow great"] * 10, 1.0),
]


@pytest.mark.parametrize(("prediction", "answers", "expected"), CASES)
def test_vqa_accuracy_matches_hand_computed(prediction, answers, expected):
    assert vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_mean_is_in_percent():
    predictions = [p for p, _, _ in CASES]
    answers = [a for _, a, _ in CASES]
    expected = 100 * sum(e for _, _, e in CASES) / len(CASES)
    assert mean_vqa_accuracy(predictions, answers) == pytest.approx(expected)


def test_normalisation_rules():
    assert normalize_prediction("The Two dogs.") == "2 dogs"
    assert normalize_prediction("Isnt it") == "isn't it"
    assert normalize_prediction("an apple; a pear") == "apple pear"  # ";" touches a space: deleted
    assert normalize_punctuation("a/b") == "a b"  # no mark touches a space: spaced
    assert normalize_punctuation("1,5 a/b") == "15 ab"  # a digit-comma-digit anywhere: every mark deleted
    assert normalize_punctuation("." * 40) == "." * 8  # at most 32 periods go (the official count quirk)


def test_bad_inputs():
    with pytest.raises(ValueError, match="at least one human answer"):
        vqa_accuracy("red", [])
    with pytest.raises(ValueError, match="2 predictions for 1 questions"):
        mean_vqa_accuracy(["a", "b"], [["a"]])
