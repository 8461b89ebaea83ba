"""The rules report parser's lexicon: word lists (negation, uncertainty, pseudo-triggers,
terminators, generic abnormality terms, English words), the small pattern language of the
catalogs' synonyms compiled to regular expressions, and the per-catalog compiled lexicon."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache

from .. import catalog as _cat
from ..catalog import Disease

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
ENGLISH_WORDS = frozenset(
    "the a an is are was were be been being of in on at to and or with without no not there this that these "
    "those both which as by from for it its has have had than into within up down over under after before "
    "size left right upper lower middle mild moderate severe small large minimal marked bilateral "
    "seen noted observed detected identified present evident measuring measures measured approximately "
    "evidence finding findings impression appearance examination study compared previous new stable "
    "diffuse focal multiple several few areas area level levels side sides wall walls contour density "
    "thickness limits calibre caliber diameter mm cm".split()
)
# share of known words (English function words and the parser's lexicon) below which a report with
# at least ENGLISH_MIN_TOKENS words is taken for non-English
ENGLISH_MIN_SHARE = 0.3
ENGLISH_MIN_TOKENS = 6

# ----------------------------------------------------------------------------- helpers

_HYPHENS = re.compile(r"[-\u2010\u2011\u2012\u2013\u2014/_]")


def norm(text: str) -> str:
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


def singulars(key: str) -> list[str]:
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
    for part in norm(phrase).strip().split("..."):
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


# ----------------------------------------------------------------------------- compiled lexicon


@dataclass
class _DiseasePatterns:
    disease: Disease
    plain: re.Pattern | None
    context: list[tuple[re.Pattern, re.Pattern, bool]]  # head, context, context required (else forbidden)
    exclude: re.Pattern | None
    located: bool


@dataclass
class Lexicon:
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
            by_phrase.setdefault(" ".join(norm(s).split()), set()).add(a.name)
    return by_phrase


def _is_weak(phrase: str, owners: set[str]) -> bool:
    words = phrase.split()
    return (
        len(owners) > 1
        or all(w in WEAK_ANATOMY_WORDS for w in words)
        or words[-1] in ("segment", "segments")
    )


@lru_cache(maxsize=32)
def build_lexicon(diseases: tuple[Disease, ...]) -> Lexicon:
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
        organ = " ".join(norm(d.organ).split())
        anat = _cat.anatomy_by_name(d.anatomy)
        located = organ in {" ".join(norm(x).split()) for x in (d.anatomy, anat.label, *anat.synonyms)}
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
        for w in re.findall(r"[^\W\d_]+\*?", norm(phrase))
    }
    vocab = frozenset(w for w in words if not w.endswith("*"))
    stems = tuple(sorted(w[:-1] for w in words if w.endswith("*") and len(w) > 4))
    return Lexicon(anatomy_re, phrase_anatomies, phrase_weak, pats, generic_re, generic_exceptions, vocab,
                    stems)


_NEG_PRE_RE = _words_regex(_NEG_PRE)
_UNC_PRE_RE = _words_regex(_UNC_PRE)
TRIGGERS = re.compile(
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
STOPS = re.compile(
    rf"[;:]|(?<!\w)(?:{'|'.join(_TERMINATORS)})(?!\w)|(?P<pred>(?<!\w){_PREDICATE}(?!\w))"
)
QSTOP = re.compile(r"[,;:(\[]")
NSTOP = re.compile(r"[,;:(\[]|(?<!\w)and(?!\w)")
ENGLISH_TOKEN = re.compile(r"[^\W\d_]+")


