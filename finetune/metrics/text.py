"""Pure-Python stand-in for the COCO caption tokenisation.

The COCO caption evaluation (pycocoevalcap) runs Stanford CoreNLP 3.4.1's
``PTBTokenizer -preserveLines -lowerCase`` (Java) and then drops the tokens
``'' ' `` ` -LRB- -RRB- -LCB- -RCB- . ? ! , : - -- ... ;``.  :func:`coco_tokenize`
reproduces that output for ordinary captions without Java:

* lower case; newlines become spaces; words split on whitespace;
* punctuation split off words and dropped as above, quotes of every kind too;
* clitics split as PTB does: ``dog's`` -> ``dog 's``, ``don't`` -> ``do n't``,
  ``can't`` -> ``ca n't``, ``we're`` -> ``we 're``; ``cannot`` -> ``can not``,
  ``gonna`` -> ``gon na`` (also gotta, wanna, lemme, gimme);
* brackets become ``-lrb- -rrb- -lsb- -rsb- -lcb- -rcb-`` and are **kept**: the
  COCO removal list spells them in upper case but the tokenizer has already
  lower-cased them, so they survive in the official pipeline too;
* kept whole, like PTB: numbers with ``. , : /`` inside (``3.5``, ``1,000``,
  ``10:30``, ``3/4``; ``5 1/2`` becomes one token joined by a no-break space),
  words with inner hyphens, slashes, periods or apostrophes
  (``black-and-white``, ``cat/dog``, ``o'clock``), dotted abbreviations
  (``u.s.``, ``a.m.``, ``ph.d.``), single-letter initials (``f.``), common
  titles/abbreviations ending in a period (``mr.``, ``st.``, ``etc.``,
  ``no.`` before a number), capitalised ``AT&T``-style names, ``'90s``,
  ``'05``, ``'n'``, and runs like ``!!!`` or ``?!`` (which, not being in the
  removal list, stay as tokens just as in the official pipeline);
* ``$ % # & @ * + =`` and other symbols become tokens of their own.

Checked against the Java pipeline (pycocoevalcap 1.2's bundled
stanford-corenlp-3.4.1.jar) on thousands of generated caption-like sentences.
Known differences, all rare in captions: SGML/HTML tags (``<b>`` is one PTB
token, three here); PTB's full abbreviation list and its sentence-boundary
rules (it splits ``a. The`` into ``a . the``, keeps ``a.`` elsewhere, as here);
``y'all`` -> ``y' all``; Unicode normalisation beyond curly quotes, dashes and
the ellipsis character (PTB rewrites ``½`` as ``1/2``) and HTML entities such
as ``&amp;``; URLs, e-mail addresses and emoticons.
"""

from __future__ import annotations

import re

# Tokens pycocoevalcap's PTBTokenizer wrapper removes after tokenisation.
COCO_PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)  # fmt: skip

# Titles and abbreviations that PTB keeps together with their period.
_ABBREVIATIONS = (
    "mr|mrs|ms|dr|prof|gen|sen|rep|gov|capt|lt|col|sgt|st|jr|sr|vs|etc|inc|corp|"
    "ltd|co|bros|mt|ave|ft|jan|feb|mar|apr|aug|sep|sept|oct|nov|dec"
)
_TOKEN = re.compile(
    rf"""
      \d+\ \d{{1,4}}/\d{{1,4}}          # 5 1/2 (PTB joins it with a no-break space)
    | \d+(?:[.,:/]\d+)+               # 3.5  1,000  10:30  3/4
    | \.\d+                           # .5
    | (?:[^\W\d_]{{1,2}}\.){{2,}}     # u.s.  a.m.  ph.d.
    | [^\W\d_]\.(?!\w)               # initials: f.  a.
    | (?i:{_ABBREVIATIONS})\.(?!\w)   # mr.  st.  etc.
    | (?i:no|nos|fig|figs)\.(?=\s*\d)  # no. 5  fig. 3
    | [A-Z]+&[A-Z]+                   # AT&T  R&D
    | '' | ``                         # quotes, before '90s can take one
    | '[2-9]0s\b | '\d\d(?!\S)        # '90s  '05 (as PTB: not '10s, not '05,)
    | 'n' | 't(?=(?:is|was)\b)        # rock 'n' roll  'tis
    | \w+(?:[-/'.]\w+)*               # words, with inner - / ' .
    | \.\.\. | -- | [!?]+             # ellipsis, dash, !!! ?!
    | \S                              # any other character on its own
    """,
    re.VERBOSE,
)
_CLITIC = re.compile(r"^(.+?)(n't|'s|'re|'ve|'ll|'d|'m)$", re.IGNORECASE)
_SPLIT_WORDS = {
    "cannot": ("can", "not"), "gonna": ("gon", "na"), "gotta": ("got", "ta"),
    "wanna": ("wan", "na"), "lemme": ("lem", "me"), "gimme": ("gim", "me"),
}  # fmt: skip
_BRACKETS = {
    "(": "-lrb-",
    ")": "-rrb-",
    "[": "-lsb-",
    "]": "-rsb-",
    "{": "-lcb-",
    "}": "-rcb-",
}
# Characters PTB 3.4.1 rewrites before they reach the removal list.
_CHAR_MAP = str.maketrans({"\u2018": "'", "\u2019": "'", "\u201c": '"', "\u201d": '"',
                           "\u2013": "--", "\u2014": "--", "\u2026": "..."})  # fmt: skip


def ptb_tokens(text: str) -> list[str]:
    """Lower-cased PTB-style tokens of ``text``, before punctuation removal."""
    tokens: list[str] = []
    # Case still matters for AT&T-style names, so lower-case token by token.
    for match in _TOKEN.finditer(text.translate(_CHAR_MAP)):
        token = match.group().lower().replace(" ", "\xa0")
        if token in _BRACKETS:
            tokens.append(_BRACKETS[token])
        elif token in _SPLIT_WORDS:
            tokens.extend(_SPLIT_WORDS[token])
        elif "'" in token and (clitic := _CLITIC.match(token)):
            tokens.extend(clitic.groups())
        elif token == '"':
            tokens.append("''")  # PTB writes `` or ''; both are removed
        else:
            tokens.append(token)
    return tokens


def coco_tokenize(text: str) -> str:
    """What pycocoevalcap's PTBTokenizer produces for one caption (space-joined)."""
    return " ".join(t for t in ptb_tokens(text) if t not in COCO_PUNCTUATIONS)
