"""VQA accuracy, matching the official VQA evaluation (GT-Vision-Lab/VQA,
``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, current Python 3 version).

What the official script does for one question, reproduced here step by step:

* the **prediction** always gets ``\\n``/``\\t`` -> space, ``strip()``, then
  ``processPunctuation`` and ``processDigitArticle`` (lower case, number words
  -> digits, articles dropped, contraction map);
* the **human answers** get ``processPunctuation`` only, and only when they
  hold more than one distinct string.  They are never lower-cased, digit-mapped,
  stripped or article-stripped.  The official annotations are already
  normalised, so this rarely matters there, but for hand-made answers
  ``["two"] * 10`` a prediction "two" (-> "2") scores 0; pass answers through
  :func:`normalize_vqa_answer` first if yours are not normalised;
* score = mean over "leave one human out" subsets of ``min(1, matches / 3)``.
  One item is removed per subset (the script compares answer dicts, which carry
  unique ``answer_id``s), so duplicates count separately.  This works for any
  number of answers; with exactly one answer the script always gives 0, so
  :func:`vqa_accuracy` treats a single answer as normalised exact match instead
  (the one place where it departs from the script).

Quirks kept on purpose: ``periodStrip.sub("", text, re.UNICODE)`` passes
``re.UNICODE`` (32) as the *count*, so at most 32 periods are stripped; the
contraction keys "Im", "Ive", "Id've" are capitalised and never match the
lower-cased words.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

# Tables copied as data from the official script (kept in the same order).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've",
    "hes": "he's", "howd": "how'd", "howll": "how'll", "hows": "how's",
    "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at",
    "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've",
    "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're",
    "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're",
    "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd",
    "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll", "whos": "who's",
    "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll",
    "youre": "you're", "youve": "you've",
}  # fmt: skip
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4",
    "five": "5", "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-",
          ">", "<", "@", "`", ",", "?", "!"]  # fmt: skip
# "(?!<=\d)" is a typo for a look-behind in the original; as written it is a
# look-ahead that never fires before ".", so the regex means "a period not
# followed by a digit".  Kept verbatim.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
_MAX_PERIODS_STRIPPED = re.UNICODE.value  # the script passes re.UNICODE as count


def process_punctuation(text: str) -> str:
    """The official ``processPunctuation``."""
    out = text
    # Both tests look at the *input* text, not the progressively edited one.
    glue = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if glue or p + " " in text or " " + p in text:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_MAX_PERIODS_STRIPPED)


def process_digit_article(text: str) -> str:
    """The official ``processDigitArticle``."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in _ARTICLES]
    return " ".join(_CONTRACTIONS.get(w, w) for w in words)


def normalize_vqa_answer(text: str) -> str:
    """Everything the official script does to a prediction."""
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return process_digit_article(process_punctuation(text))


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Official VQA accuracy (0..1) of one prediction against the human answers.

    ``answers`` is the list of human answers (usually 10); a bare string counts
    as a single answer, which is scored by normalised exact match.
    """
    if isinstance(answers, str):
        answers = [answers]
    if not answers:
        raise ValueError("vqa_accuracy needs at least one reference answer")
    pred = normalize_vqa_answer(prediction)
    if len(answers) == 1:
        # Official leave-one-out leaves nothing to match (always 0); use exact match.
        return float(pred == normalize_vqa_answer(answers[0]))
    gts = list(answers)
    if len(set(gts)) > 1:
        gts = [process_punctuation(a) for a in gts]
    matches = sum(a == pred for a in gts)
    # Leaving out answer i removes one match exactly when answer i matches.
    total = sum(min(1.0, float(matches - (a == pred)) / 3) for a in gts)
    return total / len(gts)


def vqa_accuracy_by_type(
    predictions: Sequence[str],
    answers_list: Sequence[Sequence[str]],
    question_types: Sequence[str] | None = None,
    answer_types: Sequence[str] | None = None,
) -> dict:
    """Mean accuracy overall and per question / answer type, as fractions (0..1).

    Returns ``{"overall": float, "per_question_type": {...}, "per_answer_type": {...}}``
    (the per-type dicts only when types are given).  The official script reports
    the same means as percentages rounded to two decimals.
    """
    if len(predictions) != len(answers_list):
        raise ValueError("predictions and answers_list differ in length")
    if not predictions:
        raise ValueError("no predictions to score")
    scores = [vqa_accuracy(p, a) for p, a in zip(predictions, answers_list)]
    result: dict = {"overall": sum(scores) / len(scores)}
    for key, types in (
        ("per_question_type", question_types),
        ("per_answer_type", answer_types),
    ):
        if types is None:
            continue
        if len(types) != len(scores):
            raise ValueError(f"{key}: {len(types)} types for {len(scores)} predictions")
        groups: dict[str, list[float]] = {}
        for t, s in zip(types, scores):
            groups.setdefault(t, []).append(s)
        result[key] = {t: sum(v) / len(v) for t, v in groups.items()}
    return result
