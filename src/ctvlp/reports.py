"""Radiology report parsing: per-anatomy text and normal/abnormal status (backend "rules").

Every report becomes one row per anatomy for all 36 anatomies of ``catalog.anatomies()``
(``REPORT_SCHEMA``): the report sentences about that anatomy, its status and the catalog diseases
the report mentions for it. Following the paper, only an anatomy described as completely healthy is
"normal"; anything present or uncertain makes it "abnormal"; an anatomy the report does not name is
"not_mentioned". "unparsed" is reserved for backends that can fail on one case (an LLM backend).

The rules backend is deterministic, offline and pure Python:

1. Sentences. CT-RATE appends the impression to the findings after a literal quote (``"`` in the
   text, ``""`` in the raw CSV); quotes that open or close a section, line breaks and bullets split;
   ``.``/``!``/``?`` split when followed by white space, except after abbreviations ("approx.",
   "e.g.", "No. 4", "etc." before a lower-case word), so decimals ("2.5 cm") and dates
   ("03.02.2020") survive; a sentence that does not name an anatomy and opens with a pronoun ("It
   is wider than normal.") is filed under the anatomies of the sentence before it.
2. Clauses: commas, semicolons, colons, parentheses and contrastive conjunctions ("but", "however",
   "although", "whereas", "while", "except", "apart from").
3. Anatomies: the anatomy synonyms of anatomies.yaml, longest phrase first, case-insensitive, on
   word boundaries, hyphens read as spaces. A *weak* synonym (a generic word such as "segment",
   "lobe", "parenchyma", a "... segment" name, or a phrase shared by several anatomies such as
   "bone structures") names its anatomy only in a clause that names no anatomy with a strong one.
   A sentence belongs to every anatomy it names and to the anatomy of every catalog disease it
   mentions ("hepatic steatosis" puts a sentence under the liver).
4. Diseases: name and synonyms of each catalog disease, with the small pattern language documented
   in diseases_ctrate.yaml (``word*`` stems, ``a ... b`` short gaps, ``phrase [context]``,
   ``phrase [!context]``, ``!exclusion``); the last word of a plain phrase also matches its regular
   plural (effusions, opacities, metastases, calculi). A disease whose ``organ`` is its anatomy (or
   one of its synonyms) is *located*: a mention whose clause (or, if that clause names no anatomy,
   the nearest clause of the sentence that does) names other anatomies but not its own is about
   another organ and is dropped ("nodule" in the adrenal gland is no lung nodule); a mention with a
   required ``[context]`` names its site itself. Diseases whose organ is not an anatomy (CT-RATE's
   medical material and lymph nodes) count wherever they are mentioned.
5. Negation (NegEx-style). Pre-triggers ("no", "not", "without", "negative for", "free of",
   "absence of", "no evidence of", "no sign(s) of", "neither/nor", ...) open a scope (the trigger
   included: "no pathological ...") that runs to the end of the sentence, a terminator ("but",
   "however", "although", "though", "whereas", "while", "except", "apart from", "there is", ";",
   ":") or the end of a predicate ("No nodule was detected, ..." stops after "detected").
   Post-triggers ("was not observed", "were not detected", "is absent", "ruled out", "resolved",
   "no longer seen", ...) reach back to the previous terminator or positive predicate ("... are
   seen,"). "X is normal" / "within normal limits" denies what precedes it back to the previous
   comma or "and". Pseudo-triggers that look negative but deny no finding ("no significant
   change", "no size difference", "not included", "could not be evaluated", "without contrast")
   are masked first.
6. Uncertainty. Pre-triggers "possible", "possibly", "suspicious for/of", "suspected", "suspicion
   of", "questionable", "equivocal", "doubtful", "indeterminate", "may/might/could be",
   "may/could represent", "differential diagnosis", "rule out", "versus"; post-triggers "cannot be
   excluded", "cannot be ruled out", "is suspected", "is questionable" and a question mark (which
   reaches back only to the previous comma or parenthesis: "(cyst?)"). Decision: "likely",
   "probably", "probable", "most likely", "consistent with", "compatible with", "in favor of" and
   "suggestive of" are a radiologist's commitment and stay *present*. Negation wins over
   uncertainty ("no suspicious nodule" is absent).
7. Findings per anatomy: every catalog disease of that anatomy the report mentions, with presence
   "present" > "uncertain" > "absent" aggregated over sentences (a finding mentioned in the findings
   and denied in a comparison sentence is present).
8. Status: "abnormal" when a finding of the anatomy is present or uncertain, or when a clause
   locating the anatomy has a generic abnormality term that is not negated (lesion, mass, nodule,
   enlarged, dilated, thickening, calcification, opacity, effusion, fluid, cyst, stone, hernia,
   fracture, degenerative, atrophy, operated, ...); "normal" when it is mentioned and nothing is
   abnormal (the normal cues "normal", "unremarkable", "natural", "within normal limits", "clear",
   "preserved", "patent", "open" add nothing to that rule and are listed in ``NORMAL_CUES`` for
   reference); "not_mentioned" otherwise.

Errors (the ``error`` column; all anatomies are then "not_mentioned"): "empty report", "report does
not look like English" (too few English words; a German or Turkish report is not silently turned
into "normal" because "Aorta" or "normal" happen to match) and "no anatomy mentioned".
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import polars as pl

from . import catalog as _cat
from .catalog import Disease

BACKEND = "rules"
MODEL = "rules"
PARSER_VERSION = "rules-1"

STATUSES = ("normal", "abnormal", "not_mentioned", "unparsed")
PRESENCES = ("present", "uncertain", "absent")  # strongest first

FINDING_DTYPE = pl.Struct({"disease_id": pl.Utf8, "presence": pl.Utf8})
REPORT_SCHEMA: dict[str, pl.DataType] = {
    "case_id": pl.Utf8,
    "anatomy": pl.Utf8,
    "text": pl.Utf8,
    "status": pl.Utf8,  # STATUSES
    "findings": pl.List(FINDING_DTYPE),  # presence in PRESENCES
    "backend": pl.Utf8,
    "model": pl.Utf8,
    "prompt_version": pl.Utf8,
    "error": pl.Utf8,  # null when the report was parsed
}

ERR_EMPTY = "empty report"
ERR_NOT_ENGLISH = "report does not look like English"
ERR_NO_ANATOMY = "no anatomy mentioned"

# ----------------------------------------------------------------------------- lexicon

# Abbreviations after which a period does not end a sentence ("no." only before a number).
ABBREVIATIONS = frozenset(
    "e.g i.e eg ie approx appr vs dr mr mrs ms prof st fig figs cf resp incl ca no nr nos diam".split()
)
# Abbreviations that end a sentence when the next word is capitalised.
ABBREVIATIONS_MAY_END = frozenset("etc al".split())
# Words (in anatomies.yaml synonyms) too generic to name an anatomy next to a specific word.
WEAK_ANATOMY_WORDS = frozenset(
    "segment segments lobe lobes lobar parenchyma parenchymal head face aneurysm interstitial "
    "alveolar fundus spine spinal hip hips shoulder s1 apex apexes apices fissure fissural".split()
)

_NEG_PRE = [
    "no", "not", "without", "negative for", "free of", "absence of", "no evidence of",
    "no evidence for", "no sign of", "no signs of", "no finding of", "no findings of", "neither", "nor",
    "none", "never", "lack of", "no obvious", "no significant", "no definite", "no pathological",
    "rather than", "instead of",
]
_PRED_VERBS = (
    r"observed|seen|noted|detected|present|identified|found|evident|visuali[sz]ed|demonstrated|determined|"
    r"appreciated|depicted|encountered|monitored|shown|revealed|recorded|noticed|visible|apparent|"
    r"delineated|distinguished|followed|viewed|described|measured"
)
_NEG_POST = [
    r"(?:is|are|was|were|has|have|had|could|can|did|does|do|will|be)?\s*(?:not|n't)\s+(?:been\s+|be\s+)?"
    rf"(?:{_PRED_VERBS})",
    r"(?:is|are|was|were)\s+absent", r"not present", r"disappeared", r"has disappeared",
    r"(?:has|have|had)?\s*resolved", r"(?:completely|totally)\s+regressed", r"regressed\s+completely",
    r"(?:was|were|is|are|has been|have been)\s+(?:excluded|ruled out)", r"ruled out",
    r"no longer\s+(?:seen|observed|detected|visible|present|evident|visualized|identified)",
]
# "X is normal": denies what precedes it in the same comma clause (generic terms and findings).
_NORMAL_POST = [
    r"(?:is|are|was|were)\s+(?:within normal limits|within normal range|normal|natural|unremarkable|preserved)",
    r"(?:within|in)\s+normal\s+(?:limits|range|size|sizes|dimensions|calibration|thickness)",
]
_UNC_PRE = [
    "possible", "possibly", "suspicious for", "suspicious of", "suspicious", "suspected", "suspicion of",
    "suspicion for", "questionable", "equivocal", "doubtful", "indeterminate", "may represent", "may be",
    "might be", "might represent", "could be", "could represent", "may reflect", "may correspond",
    "may indicate", "differential diagnosis", "differential diagnoses", "ddx", "rule out", "r o", "versus",
    "vs", "cannot exclude", "can not exclude", "not exclude", "to be excluded", "in terms of",
]
_UNC_POST = [
    r"(?:can|could|cannot|can not|could not|should|must|may)\s*(?:not\s+)?be\s+(?:excluded|ruled out)",
    r"cannot be excluded", r"not (?:be\s+)?(?:excluded|ruled out)", r"(?:is|are|was|were)\s+suspected",
    r"(?:is|are|was|were)\s+questionable", r"(?:is|are|was|were)\s+considered",
]
# Phrases that contain a negation word but deny no finding (masked before negation detection).
_PSEUDO = [
    r"no\s+(?:significant\s+|obvious\s+|marked\s+|prominent\s+|interval\s+|remarkable\s+)?"
    r"(?:change|changes|difference|differences|size difference|increase|progression|regression|"
    r"enhancement difference)(?:\s+in\s+(?:size|number|dimensions?|appearance))?",
    r"not\s+(?:significantly\s+)?(?:changed|change|different|differ|increased in size)",
    r"(?:did|does|do|has|have)\s+not\s+(?:significantly\s+)?(?:change|changed|progress|differ)",
    r"not only", r"not well", r"not optimal(?:ly)?", r"not clearly", r"not be (?:clearly\s+)?distinguished",
    r"(?:could|can|cannot|can not|could not)\s*(?:not\s+)?be\s+(?:optimally\s+|clearly\s+|adequately\s+)?"
    r"(?:evaluated|assessed|distinguished|differentiated|excluded from)",
    r"not (?:be\s+)?(?:evaluated|assessed)(?:\s+optimally)?", r"not included", r"not enter(?:ed)?",
    r"(?:without|no|non|not)\s+(?:iv\s+|intravenous\s+)?(?:contrast|contrasted|enhanced)",
    r"no contrast agent", r"not given", r"no\s+(?:prior|previous|old)\s+(?:examination|exam|study|studies|ct)",
    r"no\s+(?:other\s+)?(?:additional\s+)?(?:comparison|clinical)", r"not typical", r"not available",
    r"not in the", r"not possible",
]
# End a pre-trigger's scope (besides ; : and the next trigger).
_TERMINATORS = [
    r"but", r"however", r"although", r"though", r"whereas", r"while", r"except", r"apart from",
    r"other than", r"aside from", r"besides", r"with the exception of", r"nevertheless", r"yet",
    r"and there (?:is|are|was|were)", r"there (?:is|are|was|were)", r"which", r"where", r"accompanied by",
    r"in addition", r"also", r"on the other hand",
]
# A positive predicate ends a pre-trigger's scope (inclusive) and stops a post-trigger's reach back.
_PREDICATE = (
    rf"(?:is|are|was|were|has been|have been|had been|be)\s+(?:(?!not\b)\w+\s+)?(?:{_PRED_VERBS})"
)
# Generic abnormality terms (stems; see module doc).
GENERIC_ABNORMAL = [
    "lesion*", "mass", "masses", "nodul*", "nodule*", "micronodul*", "enlarg*", "dilat*", "ectasia", "ectatic",
    "aneurysm*", "thicken*", "calcif*", "calcific", "opacit*", "density increase*", "increased density",
    "ground glass*", "infiltrat*", "consolidat*", "effusion*", "fluid", "collection*", "cyst*", "cystic",
    "stone*", "calcul*", "lithiasis", "hernia*", "herniat*", "fractur*", "degenerat*", "osteophyt*",
    "spondylo*", "scoliosis", "kyphosis", "sclerotic", "lytic", "destructi*", "hypodens*", "hyperdens*",
    "hypoattenuat*", "hyperattenuat*", "heterogen*", "atelecta*", "emphysem*", "bulla*", "bronchiecta*",
    "fibro*", "sequel*", "scar*", "stenos*", "stenotic", "occlu*", "thromb*", "embol*", "atheroscl*",
    "atherom*", "plaque*", "hypertroph*", "atroph*", "steatosis", "hepatosteatosis", "metasta*",
    "tumor*", "tumour*", "malignan*", "neoplas*", "carcinoma*", "cancer*", "abscess*", "inflammat*",
    "edema", "oedema", "pneumothorax", "pneumonia", "pneumonic", "mosaic", "air trapping", "deform*",
    "collapse*", "compress*", "displace*", "deviat*", "postoperative", "post operative", "operated",
    "operation", "surg*", "resect*", "*ectomy", "*ectomized", "*ostomy", "stent*", "catheter*",
    "pacemaker*", "prosthe*", "implant*", "clip*", "wire*", "sutur*", "cerclage*", "sternotomy",
    "graft*", "material", "materials", "fatty liver", "fatty infiltration", "fatty appearance",
    "fatty change*", "increase*", "increased", "decrease*", "widen*", "narrow*",
    "irregular*", "tortuous", "hydronephros*", "megaly", "*megaly", "*itis", "varic*", "hematoma*",
    "haematoma*", "hemorrhag*", "abnormal*", "anomal*",
    "wall thickness increase*", "air cyst*", "cavitat*", "cavitary", "bronchogram*", "honeycomb*",
    "reticul*", "nodular", "granulom*", "lymphadeno*", "adenopath*", "secretion*", "mucus", "mucous plug*",
    "osteopeni*", "osteopor*", "accessory", "asymmetr*", "prominent", "lobulat*", "hypoplas*", "agenes*",
    "contracted", "elevat*", "than normal", "above normal", "below normal", "beyond normal", "eventration",
    "sludge", "thinning", "thinned",
]
# Phrases with a generic word that describe normal anatomy ("stomach distended with fluid and gas").
GENERIC_EXCEPTIONS = ["fluid and gas", "gas and fluid", "physiologic* *", "fatty hil*", "fat containing hil*"]
# Normal cues: listed for documentation (status "normal" = mentioned with nothing abnormal).
NORMAL_CUES = (
    "normal", "unremarkable", "natural", "within normal limits", "clear", "preserved", "patent", "open",
    "intact", "regular", "homogeneous", "symmetrical", "no pathology",
)
# English function words, for telling an English report from a German or Turkish one.
_ENGLISH_WORDS = frozenset(
    "the a an is are was were be been being of in on at to and or with without no not there this that these "
    "those both which as by from for it its has have had than into within up down over under after before "
    "size left right upper lower middle mild moderate severe small large minimal marked bilateral "
    "seen noted observed detected identified present evident measuring measures measured approximately "
    "evidence finding findings impression appearance examination study compared previous new stable "
    "diffuse focal multiple several few areas area level levels side sides wall walls contour density "
    "thickness limits calibre caliber diameter mm cm".split()
)
# share of known words (English function words and the parser's lexicon) below which a report with
# at least _ENGLISH_MIN_TOKENS words is taken for non-English
_ENGLISH_MIN_SHARE = 0.3
_ENGLISH_MIN_TOKENS = 6

# ----------------------------------------------------------------------------- helpers

_HYPHENS = re.compile(r"[-\u2010\u2011\u2012\u2013\u2014/_]")


def _norm(text: str) -> str:
    """Lower case; hyphens and slashes read as spaces (length preserved for ASCII)."""
    return _HYPHENS.sub(" ", text.lower())


def _plural(word: str) -> str:
    """Regex for a word and its regular English/Latin plural (effusion(s), opacity/opacities,
    metastasis/metastases, calculus/calculi, bulla/bullae)."""
    w = re.escape(word)
    if len(word) < 3 or not word.isalpha():
        return w
    if word.endswith("y") and word[-2] not in "aeiou":
        return rf"{re.escape(word[:-1])}(?:y|ies)"
    if word.endswith("is"):
        return rf"{re.escape(word[:-2])}(?:is|es)"
    if word.endswith("us"):
        return rf"{re.escape(word[:-2])}(?:us|i|uses)"
    if word.endswith("a"):
        return rf"{w}(?:e|s)?"
    return rf"{w}(?:s|es)?"


def _singulars(key: str) -> list[str]:
    """Candidate lexicon keys for a matched phrase whose last word may be a plural."""
    head, _, last = key.rpartition(" ")
    pre = f"{head} " if head else ""
    out = []
    for suf, rep in (("ies", "y"), ("es", "is"), ("uses", "us"), ("i", "us"), ("ae", "a"), ("es", ""), ("s", "")):
        if last.endswith(suf):
            out.append(pre + last[: len(last) - len(suf)] + rep)
    return out


def _word(tok: str, last: bool = False) -> str:
    if tok == "*":
        return r"\w+"
    if tok.startswith("*") and tok.endswith("*") and len(tok) > 2:
        return rf"\w*{re.escape(tok[1:-1])}\w*"
    if tok.startswith("*"):
        return rf"\w*{re.escape(tok[1:])}"
    if tok.endswith("*"):
        return rf"{re.escape(tok[:-1])}\w*"
    return _plural(tok) if last else re.escape(tok)


_GAP = r"(?:\s+[^\s;:.]+){0,4}\s+"


def _phrase_tokens(phrase: str) -> tuple[str, ...]:
    """Regex pieces of one lexicon phrase: words/stems, separated by white space or ``...`` gaps."""
    seq: list[str] = []
    for part in _norm(phrase).strip().split("..."):
        toks = part.split()
        if not toks:
            continue
        if seq:
            seq.append(_GAP)
        for j, t in enumerate(toks):
            if j:
                seq.append(r"\s+")
            seq.append(_word(t, last=j == len(toks) - 1))
    return tuple(seq)


def _alternation(phrases: Iterable[str]) -> str:
    """One regex for many phrases, as a trie (shared prefixes factored out; fast), on word boundaries.

    Where one phrase extends another the longer one is tried first."""
    trie: dict = {}
    for p in phrases:
        seq = _phrase_tokens(p)
        if not seq:
            continue
        node = trie
        for tok in seq:
            node = node.setdefault(tok, {})
        node[""] = {}

    def depth(node: dict) -> int:
        return max((1 + depth(c) for k, c in node.items() if k), default=0)

    def emit(node: dict) -> str:
        edges = sorted((k for k in node if k), key=lambda k: (-depth(node[k]), k))
        if not edges:
            return ""
        alts = [k + emit(node[k]) for k in edges]
        body = alts[0] if len(alts) == 1 else "(?:" + "|".join(alts) + ")"
        return f"(?:{body})?" if "" in node else body

    if not trie:
        return r"(?!x)x"
    return rf"(?<!\w)(?:{emit(trie)})(?!\w)"


def _words_regex(words: Iterable[str]) -> str:
    space = r"\s+"
    return "|".join(rf"(?<!\w){w.replace(' ', space)}(?!\w)" for w in sorted(set(words), key=len, reverse=True))


# ----------------------------------------------------------------------------- sentences

_QUOTE = re.compile(r'\s*"+\s*')
_SENT_END = re.compile(r"(?<=[.!?])\s+|\s*[\n\r\u2022\u25aa\u25cf\u00b7]+\s*")
_LETTER = re.compile(r"[^\W\d_]")


def split_sentences(text: str) -> list[str]:
    """Split a report into sentences (see module doc); strips quotes, keeps decimals and dates."""
    # quotes: a boundary where a section opens or closes, otherwise a space
    def quote(m: re.Match) -> str:
        before = text[: m.start()].rstrip()
        after = text[m.end():]
        if not before or not after or before[-1] in ".!?:;)" or after[0].isupper() or after[0].isdigit():
            return "\n"
        return " "

    text = _QUOTE.sub(quote, text)
    out: list[str] = []
    buf = ""
    pos = 0
    for m in _SENT_END.finditer(text):
        piece = text[pos: m.start()]
        pos = m.end()
        buf = f"{buf} {piece}" if buf else piece
        if "\n" not in m.group(0) and not any(c in m.group(0) for c in "\r\u2022\u25aa\u25cf\u00b7"):
            words = buf.rstrip(".!?").split()
            last = words[-1].lower().lstrip("([{'") if words else ""
            nxt = text[pos: pos + 1]
            if last in ABBREVIATIONS and not (last == "no" and not nxt.isdigit()):
                continue  # abbreviation: keep going
            if last in ABBREVIATIONS_MAY_END and nxt.islower():
                continue
            if len(last) == 1 and last.isalpha() and nxt.islower():
                continue  # initial
        out.append(buf.strip())
        buf = ""
    rest = text[pos:]
    buf = f"{buf} {rest}" if buf else rest
    out.append(buf.strip())
    return [s for s in out if _LETTER.search(s)]


_CLAUSE_SPLIT = re.compile(
    r"[,;:()\[\]]|(?<!\w)(?:but|however|although|though|whereas|while|except|apart from)(?!\w)"
)


def _clauses(sent: str) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for m in _CLAUSE_SPLIT.finditer(sent):
        if m.start() > pos:
            spans.append((pos, m.start()))
        pos = m.end()
    if pos < len(sent):
        spans.append((pos, len(sent)))
    return spans or [(0, len(sent))]


# ----------------------------------------------------------------------------- compiled lexicon


@dataclass
class _DiseasePatterns:
    disease: Disease
    plain: re.Pattern | None
    context: list[tuple[re.Pattern, re.Pattern, bool]]  # head, context, context required (else forbidden)
    exclude: re.Pattern | None
    located: bool


@dataclass
class _Lexicon:
    anatomy_re: re.Pattern  # literal phrases; the matched text (spaces collapsed) is the key below
    phrase_anatomies: dict[str, frozenset[str]]
    phrase_weak: dict[str, bool]
    diseases: list[_DiseasePatterns]
    generic_re: re.Pattern
    generic_exceptions: re.Pattern
    vocab: frozenset[str]  # lexicon words, for the English check
    stems: tuple[str, ...]


_CTX = re.compile(r"^(.*?)\s*\[([^\]]*)\]\s*$")


def _synonym_anatomy_map() -> dict[str, set[str]]:
    """Normalised anatomy synonym -> the anatomies it names (several for "bone structures")."""
    by_phrase: dict[str, set[str]] = {}
    for a in _cat.anatomies():
        for s in (*a.synonyms, a.label):
            by_phrase.setdefault(" ".join(_norm(s).split()), set()).add(a.name)
    return by_phrase


def _is_weak(phrase: str, owners: set[str]) -> bool:
    words = phrase.split()
    return (
        len(owners) > 1
        or all(w in WEAK_ANATOMY_WORDS for w in words)
        or words[-1] in ("segment", "segments")
    )


@lru_cache(maxsize=32)
def _lexicon(diseases: tuple[Disease, ...]) -> _Lexicon:
    by_phrase = _synonym_anatomy_map()
    anatomy_re = re.compile(_alternation(by_phrase))
    phrase_anatomies = {p: frozenset(o) for p, o in by_phrase.items()}
    phrase_weak = {p: _is_weak(p, o) for p, o in by_phrase.items()}

    pats = []
    for d in diseases:
        plain, ctx, excl = [d.name], [], []
        for s in d.synonyms:
            s = s.strip()
            if s.startswith("!"):
                excl.append(s[1:])
            elif (m := _CTX.match(s)) is not None:
                body = m.group(2).strip()
                required = not body.startswith("!")
                words = [c.strip() for c in body.lstrip("!").split("|") if c.strip()]
                ctx.append((m.group(1), words, required))
            else:
                plain.append(s)
        organ = " ".join(_norm(d.organ).split())
        anat = _cat.anatomy_by_name(d.anatomy)
        located = organ in {" ".join(_norm(x).split()) for x in (d.anatomy, anat.label, *anat.synonyms)}
        pats.append(
            _DiseasePatterns(
                disease=d,
                plain=re.compile(_alternation(plain)),
                context=[(re.compile(_alternation([h])), re.compile(_alternation(c)), r) for h, c, r in ctx],
                exclude=re.compile(_alternation(excl)) if excl else None,
                located=located,
            )
        )
    generic_re = re.compile(_alternation(GENERIC_ABNORMAL))
    generic_exceptions = re.compile(_alternation(GENERIC_EXCEPTIONS))
    words = {
        w
        for phrase in (*by_phrase, *GENERIC_ABNORMAL, *NORMAL_CUES,
                       *(x for d in diseases for x in (d.name, *d.synonyms)))
        for w in re.findall(r"[^\W\d_]+\*?", _norm(phrase))
    }
    vocab = frozenset(w for w in words if not w.endswith("*"))
    stems = tuple(sorted(w[:-1] for w in words if w.endswith("*") and len(w) > 4))
    return _Lexicon(anatomy_re, phrase_anatomies, phrase_weak, pats, generic_re, generic_exceptions, vocab,
                    stems)


_NEG_PRE_RE = _words_regex(_NEG_PRE)
_UNC_PRE_RE = _words_regex(_UNC_PRE)
_TRIGGERS = re.compile(
    r"(?<!\w)(?:"
    + "|".join(
        [
            rf"(?P<pseudo>(?:{'|'.join(_PSEUDO)}))",
            rf"(?P<unc_post>(?:{'|'.join(_UNC_POST)}))",
            rf"(?P<neg_post>(?:{'|'.join(_NEG_POST)}))",
            rf"(?P<unc_pre>{_UNC_PRE_RE})",
            rf"(?P<neg_pre>{_NEG_PRE_RE})",
            rf"(?P<normal_post>(?:{'|'.join(_NORMAL_POST)}))",
        ]
    )
    + r")(?!\w)|(?P<qmark>\?)"
)
_STOPS = re.compile(
    rf"[;:]|(?<!\w)(?:{'|'.join(_TERMINATORS)})(?!\w)|(?P<pred>(?<!\w){_PREDICATE}(?!\w))"
)
_QSTOP = re.compile(r"[,;:(\[]")
_NSTOP = re.compile(r"[,;:(\[]|(?<!\w)and(?!\w)")
_ENGLISH_TOKEN = re.compile(r"[^\W\d_]+")


# ----------------------------------------------------------------------------- sentence analysis


def _scopes(s: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Negated and uncertain character ranges of a normalised sentence."""
    trig = [(m.lastgroup, m.start(), m.end()) for m in _TRIGGERS.finditer(s)]
    stops = [(m.start(), m.end(), m.group("pred") is not None) for m in _STOPS.finditer(s)]
    neg: list[tuple[int, int]] = []
    unc: list[tuple[int, int]] = []
    for i, (kind, a, b) in enumerate(trig):
        if kind == "pseudo":
            continue
        if kind in ("neg_pre", "unc_pre"):
            end = len(s)
            for sa, sb, pred in stops:
                if sa >= b:
                    end = sb if pred else sa
                    break
            if kind == "unc_pre":
                for k2, a2, _ in trig[i + 1:]:
                    if k2 in ("neg_pre", "neg_post") and a2 < end:
                        end = a2
                        break
            (neg if kind == "neg_pre" else unc).append((a, end))  # the trigger too: "no pathological"
        elif kind in ("neg_post", "unc_post"):
            start = 0
            for sa, sb, pred in stops:
                if sb <= a:
                    start = sb
            for k2, a2, b2 in trig[:i]:
                if k2 in ("neg_post", "unc_post") and b2 <= a:
                    start = max(start, b2)
            (neg if kind == "neg_post" else unc).append((start, a))
        elif kind in ("qmark", "normal_post"):
            start = 0
            for m in (_QSTOP if kind == "qmark" else _NSTOP).finditer(s, 0, a):
                start = m.end()
            (unc if kind == "qmark" else neg).append((start, a))
    return neg, unc


def _overlaps(spans: list[tuple[int, int]], a: int, b: int) -> bool:
    return any(a < e and b > s for s, e in spans)


@dataclass
class _Sentence:
    text: str
    anatomies: set[str] = field(default_factory=set)  # named + via diseases
    findings: dict[str, str] = field(default_factory=dict)  # disease_id -> presence
    abnormal: set[str] = field(default_factory=set)  # anatomies with a generic abnormal term
    named: set[str] = field(default_factory=set)  # anatomies named by anatomy synonyms


def _presence(neg, unc, a: int, b: int) -> str:
    if _overlaps(neg, a, b):
        return "absent"
    if _overlaps(unc, a, b):
        return "uncertain"
    return "present"


_ANAPHORA = re.compile(
    r"^\W*(?:it|its|this|these|they|their|the (?:lesion|finding|appearance|described|defined))\b"
)


def _analyse(sentence: str, lex: _Lexicon, previous: set[str] | frozenset[str] = frozenset()) -> _Sentence:
    """Analyse one sentence; ``previous`` (the anatomies the previous sentence named) stands in for
    a sentence that names none and opens with a pronoun ("It is wider than normal.")."""
    s = _norm(sentence)
    clauses = _clauses(s)
    strong: list[set[str]] = [set() for _ in clauses]
    weak: list[set[str]] = [set() for _ in clauses]

    def clause_of(pos: int) -> int:
        for i, (a, b) in enumerate(clauses):
            if pos < b:
                return i
        return len(clauses) - 1

    for m in lex.anatomy_re.finditer(s):
        key = " ".join(m.group(0).split())
        if key not in lex.phrase_anatomies:
            key = next((k for k in _singulars(key) if k in lex.phrase_anatomies), "")
        if not key:  # cannot happen with literal synonyms; be safe
            continue
        (weak if lex.phrase_weak[key] else strong)[clause_of(m.start())].update(lex.phrase_anatomies[key])
    named = [st if st else wk for st, wk in zip(strong, weak)]
    if previous and not any(named) and _ANAPHORA.match(s):
        named[0] = set(previous)

    def locate(pos: int) -> set[str]:
        """Anatomies a finding at ``pos`` is about: its clause's, else the nearest clause's
        (a clause with a strong synonym first; the previous clause wins a tie: "(cyst?)")."""
        i = clause_of(pos)
        if named[i]:
            return named[i]
        order = sorted((j for j in range(len(clauses)) if j != i and named[j]),
                       key=lambda j: (not strong[j], abs(j - i), j > i))
        return named[order[0]] if order else set()

    out = _Sentence(sentence, set().union(*named), named=set().union(*named))
    neg, unc = _scopes(s)
    rank = {p: i for i, p in enumerate(PRESENCES)}
    mentions: list[tuple[int, int, str]] = []  # spans of located disease mentions
    for dp in lex.diseases:
        d = dp.disease
        # (start, end, sited): a mention with a required context names its own site
        spans = [(m.start(), m.end(), False) for m in dp.plain.finditer(s)] if dp.plain else []
        for head, ctx, required in dp.context:
            if (ctx.search(s) is not None) == required:
                spans.extend((m.start(), m.end(), required) for m in head.finditer(s))
        if not spans:
            continue
        if dp.exclude is not None:
            ex = [(m.start(), m.end()) for m in dp.exclude.finditer(s)]
            spans = [t for t in spans if not any(ea <= t[0] and t[1] <= eb for ea, eb in ex)]
        if dp.located:
            spans = [t for t in spans if t[2] or not (loc := locate(t[0])) or d.anatomy in loc]
        for a, b, _ in spans:
            if dp.located:
                mentions.append((a, b, d.anatomy))
            p = _presence(neg, unc, a, b)
            if d.id not in out.findings or rank[p] < rank[out.findings[d.id]]:
                out.findings[d.id] = p
        if d.id in out.findings:
            out.anatomies.add(d.anatomy)
    disease_anatomies = {
        dp.disease.anatomy for dp in lex.diseases if dp.disease.id in out.findings
    }
    normal_spans = [(m.start(), m.end()) for m in lex.generic_exceptions.finditer(s)]
    for m in lex.generic_re.finditer(s):
        if _overlaps(neg, m.start(), m.end()) or _overlaps(normal_spans, m.start(), m.end()):
            continue
        # a generic word inside a disease mention ("fatty infiltration") belongs to that disease
        own = {an for a, b, an in mentions if a < m.end() and m.start() < b}
        out.abnormal.update(own or locate(m.start()) or disease_anatomies)
    return out


def _is_english(text: str, lex: _Lexicon) -> bool:
    toks = _ENGLISH_TOKEN.findall(text.lower())
    if len(toks) < _ENGLISH_MIN_TOKENS:
        return True
    known = sum(t in _ENGLISH_WORDS or t in lex.vocab or t.startswith(lex.stems) for t in toks)
    return known / len(toks) >= _ENGLISH_MIN_SHARE


# ----------------------------------------------------------------------------- public API


def _rows(texts: dict[str, str], status: dict[str, str], findings: dict[str, list[dict]], error: str | None):
    return [
        {
            "anatomy": a.name,
            "text": texts.get(a.name, ""),
            "status": status.get(a.name, "not_mentioned"),
            "findings": findings.get(a.name, []),
            "backend": BACKEND,
            "model": MODEL,
            "prompt_version": PARSER_VERSION,
            "error": error,
        }
        for a in _cat.anatomies()
    ]


_LINE_BREAKS = re.compile("[\r\u2028\u2029\u0085]")


def clean_text(text: str | None) -> str | None:
    """Report text as both backends read it: Unicode NFKC (full-width letters, ligatures and
    compatibility forms become plain ones), line/paragraph separators as line breaks, and control
    and invisible format characters (zero-width space, soft hyphen, BOM, ...) removed, so that
    "cy\u00adst" or "cy\u200bst" still reads "cyst". Tabs and line breaks stay."""
    if text is None:
        return None
    text = _LINE_BREAKS.sub("\n", unicodedata.normalize("NFKC", text))
    return "".join(c for c in text if c in "\t\n" or unicodedata.category(c) not in ("Cc", "Cf"))


def parse_report(text: str | None, diseases: Sequence[Disease]) -> list[dict]:
    """Parse one report: one dict per anatomy (all 36, catalog order), REPORT_SCHEMA minus case_id.
    The text is read through ``clean_text`` first."""
    text = clean_text(text)
    if text is None or not text.strip():
        return _rows({}, {}, {}, ERR_EMPTY)
    lex = _lexicon(tuple(diseases))
    if not _is_english(text, lex):
        return _rows({}, {}, {}, ERR_NOT_ENGLISH)
    sentences: list[_Sentence] = []
    for sent in split_sentences(text):
        sentences.append(_analyse(sent, lex, sentences[-1].named if sentences else frozenset()))
    by_anatomy: dict[str, list[str]] = {}
    seen: dict[str, set[str]] = {}
    abnormal: set[str] = set()
    best: dict[str, str] = {}
    rank = {p: i for i, p in enumerate(PRESENCES)}
    for sent in sentences:
        for a in sent.anatomies:
            key = " ".join(sent.text.lower().split())
            if key not in seen.setdefault(a, set()):
                seen[a].add(key)
                by_anatomy.setdefault(a, []).append(sent.text)
        abnormal |= sent.abnormal
        for did, p in sent.findings.items():
            if did not in best or rank[p] < rank[best[did]]:
                best[did] = p
    if not by_anatomy:
        return _rows({}, {}, {}, ERR_NO_ANATOMY)
    findings: dict[str, list[dict]] = {}
    for d in diseases:
        if d.id in best:
            findings.setdefault(d.anatomy, []).append({"disease_id": d.id, "presence": best[d.id]})
    status = {}
    for a, sents in by_anatomy.items():
        bad = a in abnormal or any(f["presence"] != "absent" for f in findings.get(a, []))
        status[a] = "abnormal" if bad else "normal"
    texts = {a: " ".join(s) for a, s in by_anatomy.items()}
    return _rows(texts, status, findings, None)


def parse_reports(cases: pl.DataFrame, catalog: str = "demo", *, progress: bool = False) -> pl.DataFrame:
    """Parse ``cases`` (columns case_id, report_text) into a REPORT_SCHEMA frame (36 rows per case)."""
    missing = {"case_id", "report_text"} - set(cases.columns)
    if missing:
        raise ValueError(f"cases lack column(s) {sorted(missing)}")
    diseases = _cat.diseases(catalog)
    rows: list[dict] = []
    it = cases.select("case_id", "report_text").iter_rows()
    if progress:
        from tqdm import tqdm

        it = tqdm(it, total=cases.height, desc="reports", unit="report")
    for case_id, text in it:
        for r in parse_report(text, diseases):
            r["case_id"] = str(case_id)
            rows.append(r)
    return pl.DataFrame(rows, schema=REPORT_SCHEMA)


def write_reports(manifest_path: str | Path, out_path: str | Path, catalog: str = "demo") -> pl.DataFrame:
    """Read a manifest Parquet (case_id, report_text, ...), parse its reports, write REPORT_SCHEMA Parquet."""
    manifest = pl.read_parquet(manifest_path)
    df = parse_reports(manifest, catalog, progress=True)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    df.write_parquet(out)
    return df
