"""VQA accuracy exactly as the official evaluation of the VQA authors (`vqaEval.py`, GT-Vision-Lab/VQA) computes it.

For one question with ten human answers and a prediction:

1. newlines and tabs become spaces and both ends are stripped, in the prediction and in every human answer;
2. the prediction is normalised: punctuation (`normalize_punctuation`), then number words to digits, articles
   dropped and apostrophe-less contractions restored (`normalize_words`);
3. the human answers get the punctuation step only, and only when they are not all the same string;
4. for each of the ten leave-one-out subsets (nine answers), the score is min(#answers equal to the prediction / 3,
   1); the question's accuracy is the mean of the ten.

Quirks of the official code that change scores are kept: the punctuation rule looks at the *original* text to
decide between deleting a mark and turning it into a space; a period is removed unless a digit follows it, at most
32 of them (the official code passes `re.UNICODE` where `re.sub` takes its count); the contraction table has a few
odd entries (its capitalised keys never match, since words are lowercased first).

Other harnesses differ: OpenFlamingo normalises the human answers fully (digits and articles too) and
lmms-eval normalises both sides the same way; their numbers are not comparable with the official ones.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# The characters removed (or turned into spaces); apostrophes, colons and periods are not among them.
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
MAX_PERIODS = 32  # re.UNICODE, passed as `count` by the official code
NUMBER_WORDS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}  # fmt: skip
ARTICLES = frozenset({"a", "an", "the"})

# The official contraction table as "written-form=restored-form" pairs (written forms are looked up after
# lowercasing, so the capitalised ones are inert, and `somebody'd` really maps to `somebodyd`).
_CONTRACTIONS = """
aint=ain't arent=aren't cant=can't couldve=could've couldnt=couldn't couldn'tve=couldn't've couldnt've=couldn't've
didnt=didn't doesnt=doesn't dont=don't hadnt=hadn't hadnt've=hadn't've hadn'tve=hadn't've hasnt=hasn't
havent=haven't hed=he'd hed've=he'd've he'dve=he'd've hes=he's howd=how'd howll=how'll hows=how's Id've=I'd've
I'dve=I'd've Im=I'm Ive=I've isnt=isn't itd=it'd itd've=it'd've it'dve=it'd've itll=it'll let's=let's maam=ma'am
mightnt=mightn't mightnt've=mightn't've mightn'tve=mightn't've mightve=might've mustnt=mustn't mustve=must've
neednt=needn't notve=not've oclock=o'clock oughtnt=oughtn't ow's'at='ow's'at 'ows'at='ow's'at 'ow'sat='ow's'at
shant=shan't shed've=she'd've she'dve=she'd've she's=she's shouldve=should've shouldnt=shouldn't
shouldnt've=shouldn't've shouldn'tve=shouldn't've somebody'd=somebodyd somebodyd've=somebody'd've
somebody'dve=somebody'd've somebodyll=somebody'll somebodys=somebody's someoned=someone'd
someoned've=someone'd've someone'dve=someone'd've someonell=someone'll someones=someone's somethingd=something'd
somethingd've=something'd've something'dve=something'd've somethingll=something'll thats=that's thered=there'd
thered've=there'd've there'dve=there'd've therere=there're theres=there's theyd=they'd theyd've=they'd've
they'dve=they'd've theyll=they'll theyre=they're theyve=they've twas='twas wasnt=wasn't wed've=we'd've
we'dve=we'd've weve=we've werent=weren't whatll=what'll whatre=what're whats=what's whatve=what've whens=when's
whered=where'd wheres=where's whereve=where've whod=who'd whod've=who'd've who'dve=who'd've wholl=who'll whos=who's
whove=who've whyll=why'll whyre=why're whys=why's wont=won't wouldve=would've wouldnt=wouldn't
wouldnt've=wouldn't've wouldn'tve=wouldn't've yall=y'all yall'll=y'all'll y'allll=y'all'll yall'd've=y'all'd've
y'alld've=y'all'd've y'all'dve=y'all'd've youd=you'd youd've=you'd've you'dve=you'd've youll=you'll youre=you're
youve=you've
"""
CONTRACTIONS = dict(pair.split("=", 1) for pair in _CONTRACTIONS.split())


def clean_whitespace(text: str) -> str:
    """Newlines and tabs to spaces, ends stripped (step 1, applied to both sides)."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_punctuation(text: str) -> str:
    """Delete each punctuation mark when it touches a space in the text (or the text has a digit-comma-digit),
    otherwise turn it into a space; then drop periods not followed by a digit (at most 32)."""
    out = text
    digit_comma = DIGIT_COMMA_DIGIT.search(text) is not None
    for mark in PUNCTUATION:
        if digit_comma or mark + " " in text or " " + mark in text:
            out = out.replace(mark, "")
        else:
            out = out.replace(mark, " ")
    return PERIOD_NOT_BEFORE_DIGIT.sub("", out, count=MAX_PERIODS)


def normalize_words(text: str) -> str:
    """Lowercase, number words to digits, articles dropped, contractions restored; words joined by one space."""
    words = [NUMBER_WORDS.get(word, word) for word in text.lower().split()]
    return " ".join(CONTRACTIONS.get(word, word) for word in words if word not in ARTICLES)


def normalize_prediction(prediction: str) -> str:
    """The prediction as the official evaluation compares it with the human answers."""
    return normalize_words(normalize_punctuation(clean_whitespace(prediction)))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """One question's accuracy in [0, 1]: the mean over leave-one-out subsets of min(#matches / 3, 1)."""
    if not answers:
        raise ValueError("a VQA question needs at least one human answer")
    predicted = normalize_prediction(prediction)
    humans = [clean_whitespace(answer) for answer in answers]
    if len(set(humans)) > 1:
        humans = [normalize_punctuation(answer) for answer in humans]
    matches = sum(answer == predicted for answer in humans)
    # Leaving out answer i leaves `matches - (humans[i] == predicted)` matching answers.
    scores = [min(1.0, (matches - (answer == predicted)) / 3) for answer in humans]
    return sum(scores) / len(scores)


def mean_vqa_accuracy(predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> float:
    """Accuracy over questions, in percent (as VQAv2 results are reported)."""
    if len(predictions) != len(answers):
        raise ValueError(f"{len(predictions)} predictions for {len(answers)} questions")
    if not predictions:
        raise ValueError("no predictions to score")
    return 100.0 * sum(vqa_accuracy(p, a) for p, a in zip(predictions, answers, strict=True)) / len(predictions)
