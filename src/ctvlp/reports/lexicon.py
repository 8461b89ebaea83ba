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


def _split(*chunks: str) -> list[str]:
    """Words of white-space separated lists."""
    return " ".join(chunks).split()


# Abbreviations after which a period does not end a sentence ("no." only before a number).
ABBREVIATIONS = frozenset(
    _split("e.g i.e eg ie approx appr vs dr mr mrs ms prof st fig figs cf resp incl ca no nr nos diam")
)
# Abbreviations that end a sentence when the next word is capitalised.
ABBREVIATIONS_MAY_END = frozenset(_split("etc al"))
# Words (in anatomies.yaml synonyms) too generic to name an anatomy next to a specific word.
WEAK_ANATOMY_WORDS = frozenset(
    _split(
        "segment segments lobe lobes lobar parenchyma parenchymal head face aneurysm interstitial "
        "alveolar fundus spine spinal hip hips shoulder s1 apex apexes apices fissure fissural"
    )
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
    (r"(?:is|are|was|were|has|have|had|could|can|did|does|do|will|be)?\s*(?:not|n't)\s+(?:been\s+|be\s+)?"
     rf"(?:{_PRED_VERBS})"),
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
    (r"no\s+(?:significant\s+|obvious\s+|marked\s+|prominent\s+|interval\s+|remarkable\s+)?"
     r"(?:change|changes|difference|differences|size difference|increase|progression|regression|"
     r"enhancement difference)(?:\s+in\s+(?:size|number|dimensions?|appearance))?"),
    r"not\s+(?:significantly\s+)?(?:changed|change|different|differ|increased in size)",
    r"(?:did|does|do|has|have)\s+not\s+(?:significantly\s+)?(?:change|changed|progress|differ)",
    r"not only", r"not well", r"not optimal(?:ly)?", r"not clearly", r"not be (?:clearly\s+)?distinguished",
    (r"(?:could|can|cannot|can not|could not)\s*(?:not\s+)?be\s+(?:optimally\s+|clearly\s+|adequately\s+)?"
     r"(?:evaluated|assessed|distinguished|differentiated|excluded from)"),
    r"not (?:be\s+)?(?:evaluated|assessed)(?:\s+optimally)?", r"not included", r"not enter(?:ed)?",
    r"(?:without|no|non|not)\s+(?:iv\s+|intravenous\s+)?(?:contrast|contrasted|enhanced)",
    r"no contrast agent", r"not given", r"no\s+(?:prior|previous|old)\s+(?:examination|exam|study|studies|ct)",
    r"no\s+(?:other\s+)?(?:additional\s+)?(?:comparison|clinical)", r"not typical", r"not available",
    r"not in the", r"not possible",
]
# Verbs that bring a new finding after "and" or a comma; they end a negation scope.
_NEW_FINDING = (
    r"(?:contains?|containing|shows?|showing|has|have|had|demonstrates?|demonstrating|reveals?|revealing|"
    r"displays?|displaying|exhibits?|exhibiting|with)"
)
# End a pre-trigger's scope (besides ; : and the next trigger).
_TERMINATORS = [
    r"but", r"however", r"although", r"though", r"whereas", r"while", r"except", r"apart from",
    r"other than", r"aside from", r"besides", r"with the exception of", r"nevertheless", r"yet",
    r"and there (?:is|are|was|were)", r"there (?:is|are|was|were)", r"which", r"where", r"accompanied by",
    r"in addition", r"also", r"on the other hand",
    # "and" before a verb that brings a new finding: "... is not enlarged and contains a cyst" (", with" too)
    rf"and\s+(?:also\s+)?{_NEW_FINDING}",
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
    # finding words that are also anatomy synonyms in anatomies.yaml
    "*lithiasis", "gallstone*", "intussuscept*", "appendicolith*", "diverticul*", "hypertension",
]
# Phrases with a generic word that describe normal anatomy ("stomach distended with fluid and gas").
GENERIC_EXCEPTIONS = [
    "fluid and gas", "gas and fluid", "physiologic* *", "fatty hil*", "fat containing hil*", "air passage*",
]
# Normal statements. A normal cue covers its segment of the sentence (segments end at , ; : ( ) "and",
# "with", contrastive conjunctions and verbs that bring a finding), and the verbless segments joined to it
# by "and" before it ("hilar structures and the mediastinum are normal"): the words there are no finding.
# A negated cue ("not normal", "not within normal limits") is an abnormality.
NORMAL_CUE_WORDS = [
    "normal", "normally", "natural", "naturally", "unremarkable", "usual", "ordinary", "regular", "smooth",
    "homogeneous", "homogeneously", "homogenous", "symmetric", "symmetrical", "symmetrically", "preserved",
    "intact", "patent", "open", "clear", "physiologic", "physiological", "age appropriate",
    "within normal limits", "within normal range", "satisfactory", "in the midline", "well distended",
]
# Words that state no finding (besides anatomy synonyms, normal cues, negated or hedged words and catalog
# or generic finding words, which decide themselves): function words, attributes ("size", "contour"),
# places and sides, body regions that are not anatomies, measurement, technique, comparison and report
# wording, neutral verbs and qualifiers. Any other word in a sentence about an anatomy is an unexplained
# finding and makes the anatomy abnormal. Words of one or two letters and tokens with digits are neutral.
NEUTRAL_WORDS = frozenset(
    # function words
    _split(
        "the this that these those its they them their there here is are was were been being has have had having "
        "does did done will would shall should can could may might must into onto over under above below between "
        "among through across along around about than then and nor but when where which who whose whom what "
        "while also both either each every all any some other another such same own only very too more most less "
        "least much many several for from with within without upon via per whether because since thus therefore "
        "however although though yet still again not none"
    )
    # attributes of an organ
    + _split(
        "size sizes sized dimension dimensions diameter diameters calibre caliber calibration width length "
        "thickness volume contour contours outline outlines margin margins border borders shape configuration "
        "morphology appearance appearances structure structures structural texture density densities attenuation "
        "enhancement staining signal position positions location localization localisation orientation course "
        "lumen lumens capacity wall walls aeration ventilation expansion parenchyma parenchymal tissue tissues fat "
        "plane planes relation relationship ratio index value values level levels pattern distribution "
        "trace traces cone"
    )
    # places, sides, regions that are not anatomies of the catalog
    + _split(
        "right left bilateral bilaterally both side sides unilateral upper lower middle mid anterior posterior "
        "medial lateral superior inferior proximal distal central centrally peripheral peripherally basal apical "
        "dorsal ventral cranial caudal craniocaudal anteroposterior transverse axial coronal sagittal horizontal "
        "vertical internal external deep superficial adjacent near neighboring neighbouring surrounding "
        "region regions regional area areas zone zones part parts portion portions section sections slice slices "
        "image images field fields quadrant quadrants pole poles hilum hilus hila hilar root roots base bases "
        "anteriorly posteriorly inferiorly superiorly laterally medially cranially caudally entire whole "
        "thorax thoracic chest abdomen abdominal pelvis pelvic neck mediastinum mediastinal axilla axillae "
        "axillary supraclavicular infraclavicular paratracheal pretracheal prevascular subcarinal "
        "aorticopulmonary retrocrural paraaortic paracaval inguinal mesentery mesenteric retroperitoneum "
        "retroperitoneal peritoneum peritoneal intraabdominal intrathoracic subcutaneous skin soft vessel "
        "vascular venous arterial artery arteries vein veins lymph node nodes nodal breast breasts diaphragm "
        "diaphragmatic bile duct ducts biliary cortex cortical medulla medullary cavity cavities space spaces "
        "compartment bone bones osseous skeletal vertebra vertebrae vertebral disc discs testicle testicles "
        "seminal vesicle vesicles uterus ovary ovaries adnexa periprostatic paravesical perivesical "
        "gastrointestinal tract loops loop bowel intestinal hepatic portal splenic hemithorax costophrenic "
        "sinus sinuses recess recesses angle angles cardiophrenic system systems organ organs gland glands "
        "lobe lobes lobule segment segments tree airway airways lumens branch branches bifurcation junction "
        "interface confluence origin insertion intra extra intrahepatic extrahepatic main major minor column "
        "corpus corpora height heights alignment alignments surface surfaces periphery posterolateral "
        "anterolateral posteromedial anteromedial inlet outlet parotid submandibular salivary segmental "
        "subsegmental segmentary subsegmentary lobar passages plans forming involved chin joint joints end ends "
        "plate plates site sites crus crura half halves formation formations"
    )
    # measurement
    + _split(
        "measuring measures measured measure measurement measurements approximately approx about around nearly "
        "almost maximum max largest smallest greatest longest shortest total axis millimetric centimetric sized "
        "one two three four five six seven eight nine ten first second third fourth grade"
    )
    # technique, comparison, report wording
    + _split(
        "scan scans scanning scanned examination examinations exam exams study studies series sequence sequences "
        "protocol contrast iv intravenous oral non noncontrast unenhanced phase phases window windows setting "
        "reconstruction reconstructions reformatted reformats mpr mip dose thin technique "
        "compared comparing comparison previous previously prior dated date current currently earlier recent "
        "recently last today unchanged stable midline month months year years day days week weeks ago "
        "interval baseline follow followup "
        "evaluation evaluated evaluate evaluating assessment assessed assess limited limitation limitations partially "
        "partly included include includes including entering entered enter visible view viewed inspiration "
        "expiration artifact artifacts finding findings impression conclusion result results report reported "
        "comment note history indication clinical clinically information patient case male female age old "
        "recommended recommend correlation correlate correlated necessary advised suggested examined imaged "
        "described aforementioned mentioned above respectively known radiological radiologic far cross "
        "sectional limits limit passing suboptimal optimal optimally due lack cannot made acquisition "
        "extraction ima img pain tenderness complaint complaints symptom symptoms anamnesis "
        "consistent compatible favor favour suggestive suggesting suggest likely probably probable thought "
        "interpreted concordant apart except addition besides empty uncontrasted sectioned clinic laboratory "
        "presence"
    )
    # neutral verbs
    + _split(
        "appears appear appeared appearing seems seem seen observed noted detected identified visualized "
        "visualised visualization demonstrated demonstrates revealed reveals shows show showing showed shown "
        "contains contain containing contained present found considered made performed obtained taken acquired "
        "located localized localised situated lies lie lying courses runs continues extends extending remains "
        "remain remained become becomes displayed displays depicted traced monitored followed noticed "
        "distinguished delineated differentiated traced determined measured articulates articulate"
    )
    # qualifiers
    + _split(
        "mild mildly minimal minimally slight slightly moderate moderately marked markedly significant "
        "significantly obvious obviously definite definitely evident apparent remarkable single solitary "
        "numerous multiple few various diffuse diffusely focal focally scattered partial complete completely "
        "totally overall generally grossly otherwise likewise well new both each"
    )
)
# Words of anatomy synonyms ("small intestine", "large bowel") that state a finding on their own.
NOT_NEUTRAL_ANATOMY_WORDS = frozenset({"small", "large"})
# English function words, for telling an English report from a German or Turkish one.
ENGLISH_WORDS = frozenset(
    _split(
        "the a an is are was were be been being of in on at to and or with without no not there this that these "
        "those both which as by from for it its has have had than into within up down over under after before "
        "size left right upper lower middle mild moderate severe small large minimal marked bilateral "
        "seen noted observed detected identified present evident measuring measures measured approximately "
        "evidence finding findings impression appearance examination study compared previous new stable "
        "diffuse focal multiple several few areas area level levels side sides wall walls contour density "
        "thickness limits calibre caliber diameter mm cm"
    )
)
# share of known words (English function words and the parser's lexicon) below which a report with
# at least ENGLISH_MIN_TOKENS words is taken for non-English
ENGLISH_MIN_SHARE = 0.3
ENGLISH_MIN_TOKENS = 6

# ----------------------------------------------------------------------------- helpers

_HYPHENS = re.compile(r"[-\u2010\u2011\u2012\u2013\u2014/_]")

# Lower-case Cyrillic and Greek letters that look like a Latin letter (after ``str.lower``, so upper-case
# look-alikes such as Cyrillic "В", "Н", "М", "Т" and Greek "Α", "Β", "Ε", "Ζ", "Ι", "Κ", "Χ" are covered
# too). An explicit table: TR39's skeletons would also map digits and Latin letter pairs ("rn" -> "m")
# and need ICU; confusable_homoglyphs only detects. NFKC (``schema.clean_text``) already maps full-width
# and mathematical letters.
CONFUSABLES = {
    # Cyrillic
    "а": "a", "в": "b", "с": "c", "ԁ": "d", "е": "e", "ё": "e", "һ": "h", "н": "h", "і": "i", "ї": "i",
    "ј": "j", "к": "k", "ӏ": "l", "м": "m", "о": "o", "р": "p", "ԛ": "q", "г": "r", "ѕ": "s", "т": "t",
    "ѵ": "v", "ԝ": "w", "х": "x", "у": "y", "ү": "y",
    # Greek
    "α": "a", "β": "b", "ε": "e", "ζ": "z", "η": "n", "ι": "i", "κ": "k", "ν": "v", "ο": "o", "ρ": "p",
    "τ": "t", "υ": "u", "χ": "x", "γ": "y", "ω": "w",
}
_CONFUSABLE_TABLE = str.maketrans(CONFUSABLES)
_LATIN = re.compile(r"[a-z]")
_MIXED_WORD = re.compile(r"[^\W\d_]+")


def unconfuse(text: str) -> str:
    """Map the look-alike letters of ``CONFUSABLES`` to Latin in every word that also has a Latin
    letter or consists of look-alikes only ("сyst", "суѕт"); a word of another script ("печень") stays,
    so a Russian or Greek report is still not English. One character for one: positions are kept."""
    def fix(m: re.Match) -> str:
        w = m.group(0)
        if w.isascii():
            return w
        mapped = w.translate(_CONFUSABLE_TABLE)
        return mapped if _LATIN.search(w) or mapped.isascii() else w

    return _MIXED_WORD.sub(fix, text)


def norm(text: str) -> str:
    """Lower case, Cyrillic and Greek look-alikes read as Latin (``unconfuse``); hyphens and slashes
    read as spaces (length preserved for ASCII)."""
    return _HYPHENS.sub(" ", unconfuse(text.lower()))


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
    neutral: frozenset[str]  # NEUTRAL_WORDS and the words of anatomy synonyms that name no finding


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
    neutral = NEUTRAL_WORDS | {
        w for p in by_phrase for w in p.split() if w not in NOT_NEUTRAL_ANATOMY_WORDS and not generic_re.search(w)
    }
    generic_exceptions = re.compile(_alternation(GENERIC_EXCEPTIONS))
    words = {
        w
        for phrase in (*by_phrase, *GENERIC_ABNORMAL, *NORMAL_CUE_WORDS,
                       *(x for d in diseases for x in (d.name, *d.synonyms)))
        for w in re.findall(r"[^\W\d_]+\*?", norm(phrase))
    }
    vocab = frozenset(w for w in words if not w.endswith("*"))
    stems = tuple(sorted(w[:-1] for w in words if w.endswith("*") and len(w) > 4))
    return Lexicon(anatomy_re, phrase_anatomies, phrase_weak, pats, generic_re, generic_exceptions, vocab,
                   stems, frozenset(neutral))


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
    rf"[;:]|,\s*(?:also\s+)?{_NEW_FINDING}(?!\w)|(?<!\w)(?:{'|'.join(_TERMINATORS)})(?!\w)"
    rf"|(?P<pred>(?<!\w){_PREDICATE}(?!\w))"
)
QSTOP = re.compile(r"[,;:(\[]")
NSTOP = re.compile(r"[,;:(\[]|(?<!\w)and(?!\w)")
_NORMAL_CUE_RE = _words_regex(NORMAL_CUE_WORDS)
NORMAL_CUE = re.compile(_NORMAL_CUE_RE)
# a negated normal cue: "not normal", "is not of normal size", "not entirely preserved", "non patent"
NOT_NORMAL = re.compile(
    r"(?<!\w)(?:not|non|no longer)\s+(?:(?:entirely|completely|fully|totally|quite|very|well|so|as|clearly|"
    r"particularly|be|been|seen\s+as|considered)\s+)*(?:of\s+|in\s+|within\s+)?(?:" + _NORMAL_CUE_RE + ")"
)
_SEGMENT_VERB = (
    r"is|are|was|were|be|been|has|have|had|contains?|containing|shows?|showing|seen|observed|noted|detected|"
    r"identified|present|appears?|demonstrat\w*|reveal\w*"
)
# where a normal cue's segment ends; the "and" group tells what joins the segment before
SEGMENT_STOP = re.compile(
    r"[,;:()\[\]]|(?<!\w)(?:(?P<and>and)|with|but|however|although|though|whereas|while|except|apart from|"
    r"other than|aside from|besides|also|which|where|there (?:is|are|was|were)|"
    r"contains?|containing|shows?|showing|has|have|demonstrat\w*|reveal\w*|display\w*|exhibit\w*)(?!\w)"
)
SEGMENT_VERB = re.compile(rf"(?<!\w)(?:{_SEGMENT_VERB})(?!\w)")

ENGLISH_TOKEN = re.compile(r"[^\W\d_]+")


