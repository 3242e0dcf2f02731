"""PTB tokenisation as done by coco-caption before BLEU/METEOR/ROUGE-L/CIDEr.

coco-caption runs Stanford CoreNLP 3.4.1's ``PTBTokenizer -preserveLines -lowerCase`` (Java) over
every caption and then drops the tokens in :data:`PUNCTUATIONS`. :func:`tokenize_captions` does the
same: with Java it calls the jar shipped in pycocoevalcap; without Java (or with ``MICL_NO_JAVA=1``,
or ``use_java=False``) it uses :func:`python_ptb_tokenize`, a pure-Python lexer written to reproduce
the jar's behaviour on caption-like English text (``tests/test_tokenizer_fallback.py`` checks that
they agree).

Quirks of the reference kept on purpose, because scores must match coco-caption:
brackets become ``-lrb-``/``-rrb-``/... and, as the punctuation list is upper case, they are *not*
removed; ``!!``, ``?!``, ``*``, ``&``, ``%``, ``$`` ... are kept; "1 1/2" is one token joined by a
no-break space.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "PUNCTUATIONS",
    "java_available",
    "java_ptb_tokenize",
    "python_ptb_tokenize",
    "python_ptb_tokenize_line",
    "remove_punctuation",
    "tokenize_captions",
    "tokenize_captions_with_backend",
]

#: Tokens coco-caption removes after tokenisation (note the upper-case bracket names: after
#: ``-lowerCase`` they never match, exactly as in coco-caption).
PUNCTUATIONS = frozenset(
    ["''", "'", "``", "`", "-LRB-", "-RRB-", "-LCB-", "-RCB-",
     ".", "?", "!", ",", ":", "-", "--", "...", ";"]
)

_PTB_CLASS = "edu.stanford.nlp.process.PTBTokenizer"
# Characters Java (and the lexer) treat as line breaks; a caption must stay on one line.
_LINE_BREAKS = re.compile("[\r\n\u000b\u000c\u0085\u2028\u2029]")


# --------------------------------------------------------------------------------------------
# Backend selection
# --------------------------------------------------------------------------------------------

def _env_no_java() -> bool:
    return os.environ.get("MICL_NO_JAVA", "").strip().lower() not in ("", "0", "false", "no")


def java_available(use_java: bool | None = None) -> bool:
    """True when Java tools should be used: ``use_java`` if given, else Java on PATH and
    ``MICL_NO_JAVA`` unset. ``use_java=True`` without Java raises RuntimeError."""
    found = shutil.which("java") is not None
    if use_java is True:
        if not found:
            raise RuntimeError("use_java=True but no 'java' executable on PATH")
        return True
    if use_java is False:
        return False
    return found and not _env_no_java()


def _corenlp_jar() -> Path:
    from pycocoevalcap.tokenizer import ptbtokenizer  # namespace package: locate via a module

    return Path(ptbtokenizer.__file__).resolve().parent / ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR


def _one_line(text: str) -> str:
    return _LINE_BREAKS.sub(" ", text)


# --------------------------------------------------------------------------------------------
# Java backend
# --------------------------------------------------------------------------------------------

def java_ptb_tokenize(captions: Sequence[str], timeout: float | None = 600) -> list[list[str]]:
    """Raw PTB tokens (lower-cased, punctuation kept) of each caption, from the CoreNLP jar.

    Same command line as pycocoevalcap's PTBTokenizer, but the input file goes to the system
    temp dir (not site-packages) and every line-break character is replaced by a space first so
    that output lines stay aligned with captions.
    """
    captions = [_one_line(str(c)) for c in captions]
    if not captions:
        return []
    fd, tmp = tempfile.mkstemp(prefix="micl_ptb_", suffix=".txt")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write("\n".join(captions))
            f.write("\n")
        cmd = ["java", "-cp", str(_corenlp_jar()), _PTB_CLASS, "-preserveLines", "-lowerCase", tmp]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
    finally:
        try:
            os.remove(tmp)
        except OSError:
            pass
    if proc.returncode != 0:
        raise RuntimeError(
            f"PTBTokenizer failed (exit {proc.returncode}): {proc.stderr.decode('utf-8', 'replace')[-500:]}"
        )
    lines = proc.stdout.decode("utf-8", "replace").split("\n")
    if len(lines) > len(captions) and all(not l.strip() for l in lines[len(captions):]):
        lines = lines[: len(captions)]
    if len(lines) < len(captions) and all(not c.strip() for c in captions[len(lines):]):
        lines += [""] * (len(captions) - len(lines))  # trailing empty captions
    if len(lines) != len(captions):
        raise RuntimeError(f"PTBTokenizer returned {len(lines)} lines for {len(captions)} captions")
    return [l.rstrip().split(" ") if l.strip() else [] for l in lines]


# --------------------------------------------------------------------------------------------
# Pure-Python backend
# --------------------------------------------------------------------------------------------

# Abbreviations that keep their period (checked against CoreNLP 3.4.1 output).
_ABBREV = frozenset("""
mr mrs ms messrs dr st mt ft jr sr esq prof rev hon pres sen rep gov gen col lt maj sgt capt cmdr
adm brig msgr supt mlle mme ste wm ave blvd rd vs etc inc co corp ltd bros dept est univ assn
bldg mfg natl intl sq ph cf al
jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri
calif fla ariz ala colo conn ga ind kan ky md mich minn mo mont neb nev okla tenn va wis wyo
""".split())
_ABBREV_NOT_UPPER = frozenset(["mfg"])  # "Mfg." but not "MFG."
# ... and these end a word even before a lower-case letter ("etc.s" -> "etc." "s", but "dr.s").
_ABBREV_BEFORE_LOWER = frozenset("""
al ala apr ariz assn aug bldg blvd bros calif co colo conn corp dec esq est etc feb fla fri ga
inc ind intl jan jr jul jun kan ky ltd mar md mich minn mo mon mont neb nev nov oct okla rd sep
sept sq sr tenn thu tue univ va wed wis wyo
""".split())
# These keep their period only when a number follows ("No. 5", "fig. 3").
_ABBREV_BEFORE_NUMBER = frozenset("no fig op pp ca".split())
# State names that are also words keep it only when capitalised ("Mass." but "mass.").
_ABBREV_CAPITALISED = frozenset("mass tex del ill la miss ore pa wash".split())
# A single letter keeps its period unless one of these words follows ("A. The" -> "a" "."); an
# acronym gets an extra "." token before them ("U.S. The" -> "u.s." ".").
_SENTENCE_STARTS = frozenset("""
A About After An As At But He Her Here However If In It Many Now Once One Other Our She Since So
Some Such That The Their Then There These They This We What When While Yet You
""".split())
_CAPITAL_NEXT = re.compile(r"\s+[A-Z]")
_NEXT_WORD = re.compile(r"\s+([A-Z][a-z]*)(?![^\W_]|')")
# Whole words PTB splits in two.
_SPLIT_WORDS = {"cannot": 3, "gonna": 3, "gotta": 3, "wanna": 3, "lemme": 3, "gimme": 3}

_L = r"[^\W\d_]"        # a letter
_A = r"[^\W_]"          # a letter or digit
_NOT_A = r"(?![^\W_])"  # not followed by a letter or digit

# FIRST: an alphanumeric run; digits may be joined by . or , ("2.5m", "1,000").
_PART = rf"{_A}(?:[^\W_]|_(?=[^\W_])|(?<=\d)[.,](?=\d))*"

_PLAIN_WORD = re.compile(r"[A-Za-z]+(?= |$)")
_CONTRACTION = re.compile(r"'(?:[sSmMdD]|[rR][eE]|[vV][eE]|[lL][lL])" + _NOT_A)

_RULES: list[tuple[str, re.Pattern]] = [
    ("frac_space", re.compile(r"\d{1,4}[ \u00a0]\d{1,4}/\d{1,4}(?![\d/])")),
    ("phone", re.compile(r"\(\d{3}\) ?\d{3}-\d{4}(?!\d)|\d{3} \d{3} \d{4}(?!\d)")),
    ("url", re.compile(r"(?:https?|ftp)://[^\s<>\"]*[^\s<>\".,;:!?'\")\]]"
                       r"|www\.[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+(?:/[^\s<>\"]*[^\s<>\".,;:!?'\")\]])?")),
    ("email", re.compile(r"[\w.+-]+@[\w-]+(?:\.[\w-]+)+")),
    ("handle", re.compile(rf"[@#]{_L}\w*")),
    ("sgml", re.compile(r"<[A-Za-z/!?][^<>\s]*>")),
    ("amp_entity", re.compile(r"&amp;")),
    ("amp_word", re.compile(r"[A-Z]+&[A-Z]+")),
    ("currency_prefix", re.compile(r"[A-Z]{1,2}\$")),
    ("emoticon", re.compile(r"[:;=]-?[()\[\]DdPpO\\|](?!\w)")),
    # apostrophes
    ("contraction", _CONTRACTION),
    ("nt", re.compile(r"[nN]'[tT]")),
    ("apo_special", re.compile(
        r"(?i:'em|ol'|li'l|c'mon|c'est|nor'easter|ev'ry|e'er|'till?|'cause|'\d\ds)" + _NOT_A)),
    ("apo_year", re.compile(r"'\d\d(?=\s|$)")),
    ("apo_n", re.compile(r"'[nN]'|'[nN](?=\s|$)")),
    ("apo_t", re.compile(r"(?i:'t)(?=(?i:is|was)" + _NOT_A + ")")),
    ("apo_letter", re.compile(rf"(?:[A-HJ-XZ]|[dlno])'{_L}{{2,}}")),
    ("apo_vowel", re.compile(rf"{_L}+[aeiouyAEIOUY]'[aeiouAEIOU]{_L}*")),
    ("apo_prefix", re.compile(r"[dDlLjJyY]'")),
    # abbreviations and words
    ("acronym", re.compile(rf"{_L}(?:\.{_L})+\.")),
    ("letter_dot", re.compile(rf"{_L}\.")),
    ("abbrev", re.compile(rf"({_L}+)\.")),
    ("hthing", re.compile(rf"{_PART}(?:[-/]{_PART})+")),
    ("word", re.compile(rf"{_L}(?:[^\W_]|_(?=[^\W_]))*(?:[.!?]{_L}(?:[^\W_]|_(?=[^\W_]))*)*")),
    ("alnum", re.compile(rf"\d(?:[^\W_]|_(?=[^\W_]))*")),
    ("number", re.compile(r"[+-]?(?:\d+(?:[.,:]\d+)*|\.\d+(?:[.,:]\d+)*)")),
    # punctuation and symbols
    ("dots", re.compile(r"\.+")),
    ("dashes", re.compile(r"-+")),
    ("bangs", re.compile(r"[!?]+")),
    ("stars", re.compile(r"\*+")),
    ("hashes", re.compile(r"#+")),
    ("quotes", re.compile(r"''|``")),
    ("underscores", re.compile(r"_+")),
]

_SINGLE = {
    "(": "-LRB-", ")": "-RRB-", "[": "-LSB-", "]": "-RSB-", "{": "-LCB-", "}": "-RCB-",
    "\u2026": "...", "\u2014": "--", "\u2013": "--", "\u2015": "--",
    "\u00ab": "``", "\u00bb": "''", "\u2039": "`", "\u203a": "'",
    "\u00a2": "cents", "\u20ac": "$", "\u00a3": "#",
}
_KEPT_CURRENCY = {"$", "\u00a5"}
_PRE_MAP = str.maketrans({
    "\u2018": "'", "\u2019": "'", "\u201b": "'",
    "\u201c": '"', "\u201d": '"', "\u201f": '"',
    "\u00a0": " ", "\t": " ",
})
_BRACKET_TEXT = {"(": "-LRB-", ")": "-RRB-"}


def _prenormalise(text: str) -> str:
    text = _one_line(text).translate(_PRE_MAP)
    if text.isascii() and text.isprintable():
        return text
    out = []
    for ch in text:
        if ch == "\u00ad":          # soft hyphen: removed, word stays whole
            continue
        cat = unicodedata.category(ch)
        if ord(ch) > 0xFFFF:        # outside the BMP (emoji, math letters): dropped by the jar
            out.append(" ")
        elif cat in ("Cc", "Cf", "Zl", "Zp", "Zs"):
            out.append(" ")         # zero-width and other spaces separate tokens
        elif cat == "Sc" and ch not in _KEPT_CURRENCY and ch not in _SINGLE:
            out.append(" ")         # other currency signs are untokenisable for the jar
        elif ch == "\u2012":        # figure dash: dropped
            out.append(" ")
        else:
            out.append(ch)
    return "".join(out)


def _quote_token(text: str, pos: int, ch: str) -> str:
    # only the split matters for scores (all quote tokens are removed); the form is a best guess
    opening = pos == 0 or text[pos - 1].isspace() or text[pos - 1] in "([{"
    if ch == '"':
        return "``" if opening else "''"
    nxt = text[pos + 1: pos + 2]
    return "`" if pos > 0 and opening and nxt.isalpha() else "'"


def _word_tokens(tok: str) -> list[str]:
    cut = _SPLIT_WORDS.get(tok.lower())
    if cut is not None:
        return [tok[:cut], tok[cut:]]
    return [tok]


def _match_at(text: str, pos: int, following: str = ""):
    """Longest match among the rules at ``pos`` (earlier rule wins a tie): (end, tokens).

    ``following`` is the text after the line (the jar's look-ahead crosses line breaks)."""
    best_end, best_tokens = -1, None
    for name, rx in _RULES:
        m = rx.match(text, pos)
        if not m or m.end() <= best_end:
            continue
        end, s = m.end(), m.group(0)
        if name == "abbrev":
            stem = m.group(1).lower()
            rest = text[end:end + 8] + following
            if stem in _ABBREV and not (stem in _ABBREV_NOT_UPPER and s.isupper()):
                if stem in _ABBREV_BEFORE_LOWER and rest[:1].islower():
                    return end, [s]  # beats a longer word: "etc.s" -> "etc." "s"
                sentence_end = stem in _ABBREV_BEFORE_LOWER and _CAPITAL_NEXT.match(rest)
                tokens = [s, "."] if sentence_end else [s]
            elif stem in _ABBREV_BEFORE_NUMBER and re.match(r"\s?\d|[,;:]", rest):
                tokens = [s]
            elif stem in _ABBREV_CAPITALISED and s[0].isupper():
                tokens = [s, "."] if _CAPITAL_NEXT.match(rest) else [s]
            else:
                continue
        elif name == "acronym":
            # "u.s. The" -> "u.s." "." (the jar adds a sentence-final period; removed anyway)
            nxt = _NEXT_WORD.match(text[end:end + 16] + following)
            tokens = [s, "."] if nxt and nxt.group(1) in _SENTENCE_STARTS else [s]
        elif name == "letter_dot":
            # "A. The" -> "a" "." but "b. Smith" -> "b."
            nxt = _NEXT_WORD.match(text[end:end + 16] + following)
            tokens = [s[0], "."] if nxt and nxt.group(1) in _SENTENCE_STARTS else [s]
        elif name == "frac_space":
            tokens = [s.replace(" ", "\u00a0")]
        elif name == "phone":
            tokens = [s.replace("(", "-LRB-").replace(")", "-RRB-").replace(" ", "\u00a0")]
        elif name == "amp_entity":
            tokens = ["&"]
        elif name == "emoticon":
            tokens = ["".join(_BRACKET_TEXT.get(c, c) for c in s)]
        elif name in ("word", "hthing", "alnum"):
            # "don't" -> "do" + "n't": give the final n back to the n't rule
            if len(s) > 1 and s[-1] in "nN" and text[end:end + 2].lower() == "'t":
                end -= 1
                s = s[:-1]
            split_ok = name == "word" and not _CONTRACTION.match(text, end)  # "gonna's" stays
            tokens = _word_tokens(s) if split_ok else [s]
        elif name == "dots":
            tokens = ["..."] if len(s) >= 3 else ["."] * len(s)
        elif name == "dashes":
            tokens = ["--"] if len(s) >= 2 else ["-"]
        else:
            tokens = [s]
        best_end, best_tokens = end, tokens
    return best_end, best_tokens


def python_ptb_tokenize_line(text: str, following: str = "") -> list[str]:
    """Pure-Python PTB tokens of one caption (lower-cased, punctuation kept).

    ``following``: the text after this caption in the batch (next captions joined by newlines);
    the jar's look-ahead crosses line breaks, e.g. "no." keeps its period when the next line
    starts with a digit."""
    text = _prenormalise(str(text))
    following = "\n" + _prenormalise(str(following)[:24])
    tokens: list[str] = []
    pos, n = 0, len(text)
    while pos < n:
        ch = text[pos]
        if ch == " ":
            pos += 1
            continue
        m = _PLAIN_WORD.match(text, pos)
        if m and m.group(0).lower() not in _SPLIT_WORDS:  # fast path: no rule can do better
            tokens.append(m.group(0))
            pos = m.end()
            continue
        end, toks = _match_at(text, pos, following)
        if toks is None:
            end = pos + 1
            if ch in _SINGLE:
                toks = [_SINGLE[ch]]
            elif ch in "\"'":
                toks = [_quote_token(text, pos, ch)]
            elif ch == "&":
                toks = ["&"]
            else:
                toks = [ch]
        tokens.extend(toks)
        pos = end
    return [t.lower() for t in tokens]


def python_ptb_tokenize(captions: Iterable[str]) -> list[list[str]]:
    """Pure-Python PTB tokens of each caption (same shape as :func:`java_ptb_tokenize`)."""
    captions = [_one_line(str(c)) for c in captions]
    out = []
    for i, c in enumerate(captions):
        following = "\n".join(captions[i + 1:i + 4])[:24]
        out.append(python_ptb_tokenize_line(c, following))
    return out


# --------------------------------------------------------------------------------------------
# coco-caption front end
# --------------------------------------------------------------------------------------------

def remove_punctuation(tokens: Sequence[str]) -> str:
    """coco-caption's post-processing: drop :data:`PUNCTUATIONS`, join with single spaces."""
    return " ".join(t for t in tokens if t not in PUNCTUATIONS)


def tokenize_captions(captions: Sequence[str], use_java: bool | None = None) -> list[str]:
    """Tokenise captions exactly as coco-caption does (one string of space-separated tokens each).

    ``use_java``: None = Java when available and ``MICL_NO_JAVA`` is unset; False = pure Python;
    True = Java or RuntimeError. If the Java tokenizer fails at run time, a warning is issued and
    the pure-Python tokenizer is used.

    Tokenise one batch the way coco-caption does (all references in one call, all predictions in
    another): the jar's look-ahead crosses line breaks, so a caption's tokens can depend on the
    next caption in the batch (rarely: "No." keeps its period only before a digit).
    """
    return tokenize_captions_with_backend(captions, use_java)[0]


def tokenize_captions_with_backend(captions: Sequence[str], use_java: bool | None = None):
    """:func:`tokenize_captions` plus the backend used: ``"java"`` or ``"python"``."""
    captions = [str(c) for c in captions]
    backend = "python"
    if java_available(use_java):
        try:
            raw = java_ptb_tokenize(captions)
            backend = "java"
        except (RuntimeError, OSError, subprocess.SubprocessError) as e:
            if use_java:
                raise
            warnings.warn(f"Java PTBTokenizer failed ({e}); using the pure-Python tokenizer")
            raw = python_ptb_tokenize(captions)
    else:
        raw = python_ptb_tokenize(captions)
    return [remove_punctuation(toks) for toks in raw], backend
