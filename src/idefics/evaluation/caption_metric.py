"""CIDEr-D of generated captions against reference captions, through `pycocoevalcap` (the `eval` extra).

The captions are tokenised by pycocoevalcap's PTBTokenizer (Stanford CoreNLP's, which runs on Java) and scored by
its `Cider` (the CIDEr-D variant of the COCO caption evaluation: clipped n-gram counts, a Gaussian length
penalty, document frequencies from the references of the scored images). The score is reported times 100, as
the IDEFICS and Flamingo papers do.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence


def check_java() -> None:
    """RuntimeError naming what is missing when the tokenizer cannot run."""
    if shutil.which("java") is None:
        raise RuntimeError("CIDEr needs Java for pycocoevalcap's PTB tokenizer: install a JRE (e.g. openjdk-17-jre)")
    try:
        import pycocoevalcap  # noqa: F401
    except ImportError:
        raise RuntimeError("CIDEr needs pycocoevalcap: pip install 'idefics[eval]'") from None


def cider(predictions: Mapping[object, str], references: Mapping[object, Sequence[str]]) -> float:
    """CIDEr-D × 100 of one prediction per image id against that image's references."""
    missing = [key for key in predictions if key not in references]
    if missing:
        raise ValueError(f"image id {missing[0]!r} has a prediction but no reference captions")
    if not predictions:
        raise ValueError("no predictions to score")
    check_java()
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    keys = list(predictions)
    tokenizer = PTBTokenizer()
    gts = tokenizer.tokenize({i: [{"caption": c} for c in references[key]] for i, key in enumerate(keys)})
    res = tokenizer.tokenize({i: [{"caption": predictions[key]}] for i, key in enumerate(keys)})
    score, _ = Cider().compute_score(gts, res)
    return 100.0 * float(score)
