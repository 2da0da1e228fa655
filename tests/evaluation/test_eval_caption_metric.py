"""CIDEr-D through our wrapper equals pycocoevalcap run directly (PTBTokenizer + Cider) on the same captions."""

import shutil

import pytest

pytest.importorskip("pycocoevalcap", reason="CIDEr needs the `eval` extra (pycocoevalcap)")
if shutil.which("java") is None:
    pytest.skip("pycocoevalcap's PTB tokenizer needs Java, which is not installed", allow_module_level=True)

from pycocoevalcap.cider.cider import Cider  # noqa: E402
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer  # noqa: E402

from idefics.evaluation.caption_metric import cider  # noqa: E402

REFERENCES = {
    42: ["A red circle on a grey background.", "a red circle", "A circle, red."],
    7: ["Two dogs play in the park.", "Dogs playing on grass", "two brown dogs running"],
    "COCO_3": ["A man rides a bike down the street.", "a cyclist on a city road", "Man riding a bicycle."],
}
PREDICTIONS = {42: "A red circle.", 7: "a dog in a park", "COCO_3": ""}


def direct(predictions, references):
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({k: [{"caption": c} for c in v] for k, v in references.items()})
    res = tokenizer.tokenize({k: [{"caption": v}] for k, v in predictions.items()})
    return 100 * Cider().compute_score(gts, res)[0]


def test_cider_equals_pycocoevalcap():
    ours = cider(PREDICTIONS, REFERENCES)
    assert ours == pytest.approx(direct(PREDICTIONS, REFERENCES), abs=1e-9)
    assert ours > 0


def test_cider_rejects_unknown_ids():
    with pytest.raises(ValueError, match="image id 'nope' has a prediction but no reference"):
        cider({"nope": "a cat"}, REFERENCES)
