"""Radiology report parsing, backend "rules": per-anatomy text and normal/abnormal status.

Every report becomes one row per anatomy (``schema.REPORT_SCHEMA``) for all 36 anatomies of
``catalog.anatomies()``: the report sentences about that anatomy, its status and the catalog
diseases the report mentions for it.

The rules backend is deterministic, offline and pure Python:

1. Sentences. CT-RATE appends the impression to the findings after a literal quote (``"`` in the
   text, ``""`` in the raw CSV); quotes that open or close a section, line breaks and bullets split;
   ``.``/``!``/``?`` split when followed by white space, except after abbreviations ("approx.",
   "e.g.", "No. 4", "etc." before a lower-case word), so decimals ("2.5 cm") and dates
   ("03.02.2020") survive; a sentence that does not name an anatomy and opens with a pronoun ("It
   is wider than normal.") is filed under the anatomies of the sentence before it.
2. Clauses: commas, semicolons, colons, parentheses, contrastive conjunctions ("but", "however",
   "although", "whereas", "while", "except", "apart from") and an "and" between two parts that each
   have a verb ("the liver contains a cyst | and the spleen is normal"; not "cysts in the liver and
   kidneys are seen").
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
0. Letters. Matching reads the text lower-cased, with Cyrillic and Greek look-alikes of Latin
   letters ("с", "о", "а", "ρ", "ο", ...) read as Latin in any word that also has a Latin letter or
   is made of look-alikes only (``lexicon.unconfuse``, an explicit table; "сyst" is "cyst"), after
   ``clean_text``'s NFKC. Words of another script ("печень") stay, so such a report is not English.
5. Negation (NegEx-style). Pre-triggers ("no", "not", "without", "negative for", "free of",
   "absence of", "no evidence of", "no sign(s) of", "neither/nor", ...) open a scope (the trigger
   included: "no pathological ...") that runs to the end of the sentence, a terminator ("but",
   "however", "although", "though", "whereas", "while", "except", "apart from", "there is", ";",
   ":", a conjunction that starts a new finding: "and" or a comma before "contains", "shows",
   "has", "with", "demonstrates", "reveals", ...: "... is not enlarged and contains a cyst", ", with
   a nodule") or the end of a predicate ("No nodule was detected, ..." stops after "detected").
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
8. Status: abnormal unless stated normal. An anatomy is "abnormal" when
   a. a catalog finding of it is present or uncertain (step 7); or
   b. a clause locating it has a generic abnormality term that is not negated (lesion, mass, nodule,
      enlarged, dilated, thickening, calcification, opacity, effusion, fluid, cyst, stone, hernia,
      fracture, degenerative, atrophy, operated, ...); or
   c. a clause locating it (as in step 4) denies a normal cue ("not normal", "is not within normal
      limits", "not entirely preserved"); or
   d. a clause locating it has a word that is none of: neutral (``lexicon.NEUTRAL_WORDS``: function
      words; attributes such as size, contour, calibre, density; sides, places and body regions
      that are not anatomies; measurements and units; technique, comparison and report wording such
      as "examination", "study area", "evaluated", "as far as", "within the limits of non-contrast
      CT", "compared", "recommended"; neutral verbs such as "observed", "contains", "measures";
      qualifiers such as "mild", "multiple"; words of one or two letters; tokens with digits),
      an anatomy synonym word (other than "small" and "large"), a catalog disease or generic term
      (those decide by a. and b.), a negation/uncertainty trigger or pseudo-trigger, inside a
      negation scope, or covered by a normal statement. A *normal statement* is a normal cue
      (``lexicon.NORMAL_CUE_WORDS``: "normal", "unremarkable", "natural", "usual", "within normal
      limits", "patent", "open", "clear", "preserved", "intact", "homogeneous", "symmetric",
      "smooth", "physiological", "in the midline", "well distended", ...); it covers its segment
      of the sentence (segments end at , ; : ( ), "and", "with", "but", "also", "which", "there
      is" and verbs that bring a finding: "contains", "shows", "has", "demonstrates") and, unless
      "otherwise" precedes it, the verbless segments joined to it by "and" before it ("hilar
      structures and the mediastinum are normal"). Such a word is an unexplained finding: "The
      liver contains a 3 cm hemangioma." is abnormal with no catalog finding, and its sentence is
      the liver's text. A *negated* statement ("No focal lesion.", "A mass was not observed in the
      spleen.", "No pathological finding in the kidneys.") is normal; a *neutral* sentence
      ("The liver was evaluated.", "The study area includes the upper abdomen.", "The spleen
      measures 11 cm.") has only neutral words and leaves the anatomy as its other sentences say.
   "normal" when the anatomy is mentioned and nothing above makes it abnormal (a report that only
   mentions an anatomy in neutral sentences calls it normal, as before); "not_mentioned" otherwise.
   Known limits: a bare measurement ("the pulmonary artery is 35 mm") is neutral, the parser does
   not judge numbers; an unknown word that is not a finding ("a webbed ...", a typo, an anatomy
   word not in the lists) makes the anatomy abnormal, the safe side for normal-only training.

Errors (the ``error`` column; all anatomies are then "not_mentioned"): "empty report", "report does
not look like English" (too few English words; a German or Turkish report is not silently turned
into "normal" because "Aorta" or "normal" happen to match) and "no anatomy mentioned".
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field

import polars as pl

from .. import catalog as _cat
from ..catalog import Disease
from .lexicon import (
    ABBREVIATIONS,
    ABBREVIATIONS_MAY_END,
    ENGLISH_MIN_SHARE,
    ENGLISH_MIN_TOKENS,
    ENGLISH_TOKEN,
    ENGLISH_WORDS,
    NORMAL_CUE,
    NOT_NORMAL,
    NSTOP,
    QSTOP,
    SEGMENT_STOP,
    SEGMENT_VERB,
    STOPS,
    TRIGGERS,
    Lexicon,
    build_lexicon,
    norm,
    singulars,
)
from .schema import (
    ERR_EMPTY,
    ERR_NO_ANATOMY,
    ERR_NOT_ENGLISH,
    PRESENCES,
    REPORT_SCHEMA,
    clean_text,
)

BACKEND = "rules"
MODEL = "rules"
PARSER_VERSION = "rules-2"  # rules-2: abnormal unless stated normal


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


_AND = re.compile(r"(?<!\w)and(?!\w)")


def _split_and(sent: str, a: int, b: int) -> list[tuple[int, int]]:
    """Split ``sent[a:b]`` at an "and" that joins two clauses, each with its own verb ("the liver
    contains a cyst and the spleen is normal"), not at one that joins two nouns ("cysts in the liver
    and kidneys are seen")."""
    cuts = [m for m in _AND.finditer(sent, a, b)]
    out, pos = [], a
    for k, m in enumerate(cuts):
        nxt = cuts[k + 1].start() if k + 1 < len(cuts) else b
        if SEGMENT_VERB.search(sent, pos, m.start()) and SEGMENT_VERB.search(sent, m.end(), nxt):
            out.append((pos, m.start()))
            pos = m.end()
    out.append((pos, b))
    return out


def _clauses(sent: str) -> list[tuple[int, int]]:
    spans, pos = [], 0
    for m in _CLAUSE_SPLIT.finditer(sent):
        if m.start() > pos:
            spans.extend(_split_and(sent, pos, m.start()))
        pos = m.end()
    if pos < len(sent):
        spans.extend(_split_and(sent, pos, len(sent)))
    return spans or [(0, len(sent))]


# ----------------------------------------------------------------------------- sentence analysis


def _scopes(s: str) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Negated and uncertain character ranges of a normalised sentence."""
    trig = [(m.lastgroup, m.start(), m.end()) for m in TRIGGERS.finditer(s)]
    stops = [(m.start(), m.end(), m.group("pred") is not None) for m in STOPS.finditer(s)]
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
            for m in (QSTOP if kind == "qmark" else NSTOP).finditer(s, 0, a):
                start = m.end()
            (unc if kind == "qmark" else neg).append((start, a))
    return neg, unc


def _normal_cover(s: str) -> list[tuple[int, int]]:
    """Character ranges of a normalised sentence that a normal statement covers (module doc, 8)."""
    cues = [m for m in NORMAL_CUE.finditer(s)]
    if not cues:
        return []
    denied = [m.span() for m in NOT_NORMAL.finditer(s)]
    # segments: (start, end, what ends the segment before: "" at the start, "and", "punct" or "word",
    # a conjunction or a verb that brings a finding)
    segs: list[tuple[int, int, str]] = []
    pos, kind = 0, ""
    for m in SEGMENT_STOP.finditer(s):
        segs.append((pos, m.start(), kind))
        pos = m.end()
        kind = "and" if m.group("and") else "word" if m.group(0)[0].isalpha() else "punct"
    segs.append((pos, len(s), kind))
    out: list[tuple[int, int]] = []
    for c in cues:
        if _overlaps(denied, c.start(), c.end()):
            continue
        i = next(k for k, (a, b, _) in enumerate(segs) if c.start() < b or k == len(segs) - 1)
        out.append(segs[i][:2])
        if _OTHERWISE.search(s, segs[i][0], c.start()):
            continue  # "... and otherwise normal": what came before is not normal
        # a subject joined by "and": "hilar structures and the mediastinum are normal", but not the
        # object of a verb: "the liver contains a hemangioma and the spleen is normal"
        while segs[i][2] == "and" and i > 0:
            a, b, before = segs[i - 1]
            if before == "word" or SEGMENT_VERB.search(s, a, b):
                break
            i -= 1
            out.append((a, b))
    return out


_OTHERWISE = re.compile(r"(?<!\w)otherwise(?!\w)")
_WORD = re.compile(r"(?<!\w)[^\W\d_]+(?!\w)")


def _neutral(word: str, neutral: frozenset[str]) -> bool:
    if len(word) <= 2 or word in neutral:
        return True
    return any(word.endswith(suf) and word[: -len(suf)] in neutral for suf in ("s", "es"))


def _overlaps(spans: list[tuple[int, int]], a: int, b: int) -> bool:
    return any(a < e and b > s for s, e in spans)


@dataclass
class _Sentence:
    text: str
    anatomies: set[str] = field(default_factory=set)  # named + via diseases
    findings: dict[str, str] = field(default_factory=dict)  # disease_id -> presence
    abnormal: set[str] = field(default_factory=set)  # anatomies with a generic term or an unexplained word
    named: set[str] = field(default_factory=set)  # anatomies named by anatomy synonyms
    unexplained: list[str] = field(default_factory=list)  # words that are no normal statement (module doc, 8)


def _presence(neg, unc, a: int, b: int) -> str:
    if _overlaps(neg, a, b):
        return "absent"
    if _overlaps(unc, a, b):
        return "uncertain"
    return "present"


_ANAPHORA = re.compile(
    r"^\W*(?:it|its|this|these|they|their|the (?:lesion|finding|appearance|described|defined))\b"
)


def _analyse(sentence: str, lex: Lexicon, previous: set[str] | frozenset[str] = frozenset()) -> _Sentence:
    """Analyse one sentence; ``previous`` (the anatomies the previous sentence named) stands in for
    a sentence that names none and opens with a pronoun ("It is wider than normal.")."""
    s = norm(sentence)
    clauses = _clauses(s)
    strong: list[set[str]] = [set() for _ in clauses]
    weak: list[set[str]] = [set() for _ in clauses]

    def clause_of(pos: int) -> int:
        for i, (a, b) in enumerate(clauses):
            if pos < b:
                return i
        return len(clauses) - 1

    explained: list[tuple[int, int]] = []  # words that say what they mean: anatomy, finding, trigger
    for m in lex.anatomy_re.finditer(s):
        explained.append(m.span())
        key = " ".join(m.group(0).split())
        if key not in lex.phrase_anatomies:
            key = next((k for k in singulars(key) if k in lex.phrase_anatomies), "")
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
        explained.extend(t[:2] for t in spans)
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
    explained.extend(normal_spans)
    for m in lex.generic_re.finditer(s):
        explained.append(m.span())
        if _overlaps(neg, m.start(), m.end()) or _overlaps(normal_spans, m.start(), m.end()):
            continue
        # a generic word inside a disease mention ("fatty infiltration") belongs to that disease
        own = {an for a, b, an in mentions if a < m.end() and m.start() < b}
        out.abnormal.update(own or locate(m.start()) or disease_anatomies)
    # abnormal unless stated normal: a negated normal cue, or a word that is neither neutral, nor
    # covered by a normal statement or a negation, nor explained above
    for m in NOT_NORMAL.finditer(s):
        explained.append(m.span())
        out.abnormal.update(locate(m.start()))
        out.unexplained.append(m.group(0))
    explained.extend(m.span() for m in TRIGGERS.finditer(s))
    explained.extend(neg)
    explained.extend(_normal_cover(s))
    for m in _WORD.finditer(s):
        if _neutral(m.group(0), lex.neutral) or _overlaps(explained, m.start(), m.end()):
            continue
        where = locate(m.start())
        if where:
            out.abnormal.update(where)
            out.unexplained.append(m.group(0))
    return out


def _is_english(text: str, lex: Lexicon) -> bool:
    toks = ENGLISH_TOKEN.findall(norm(text))
    if len(toks) < ENGLISH_MIN_TOKENS:
        return True
    known = sum(t in ENGLISH_WORDS or t in lex.vocab or t.startswith(lex.stems) for t in toks)
    return known / len(toks) >= ENGLISH_MIN_SHARE


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


def parse_report(text: str | None, diseases: Sequence[Disease]) -> list[dict]:
    """Parse one report: one dict per anatomy (all 36, catalog order), REPORT_SCHEMA minus case_id.
    The text is read through ``clean_text`` first."""
    text = clean_text(text)
    if text is None or not text.strip():
        return _rows({}, {}, {}, ERR_EMPTY)
    lex = build_lexicon(tuple(diseases))
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
    for a in by_anatomy:
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
        from ..progress import lines

        it = lines(it, cases.height, "reports", "report")
    for case_id, text in it:
        for r in parse_report(text, diseases):
            r["case_id"] = str(case_id)
            rows.append(r)
    return pl.DataFrame(rows, schema=REPORT_SCHEMA)
