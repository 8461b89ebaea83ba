"""Catalog terms of the demo diseases as noun phrases for report sentences: singular and plural
forms, articles before adjectives, number words. Every choice comes from the caller's generator.
"""

from __future__ import annotations

from ctvlp import catalog

NOUN_PHRASES: dict[str, tuple[str | None, str | None]] = {
    "liver cyst": ("a liver cyst", "liver cysts"),
    "hepatic cyst": ("a hepatic cyst", "hepatic cysts"),
    "cyst in the liver": ("a cyst in the liver", "cysts in the liver"),
    "simple cyst": ("a simple cyst", "simple cysts"),
    "cystic lesion": ("a cystic lesion", "cystic lesions"),
    "liver metastases": (None, "liver metastases"),
    "hepatic metastases": (None, "hepatic metastases"),
    "metastatic lesions": (None, "metastatic lesions"),
    "metastases": (None, "metastases"),
    "metastasis": (None, "metastasis"),
    "secondary deposits": (None, "secondary deposits"),
    "kidney cyst": ("a kidney cyst", None),
    "renal cyst": ("a renal cyst", None),
    "cortical cyst": ("a cortical cyst", None),
    "cyst in the kidney": ("a cyst in the kidney", None),
    "renal calculus": ("a renal calculus", "renal calculi"),
    "kidney stone": ("a kidney stone", "kidney stones"),
    "nephrolithiasis": ("nephrolithiasis", "nephrolithiasis"),
    "renal stone": ("a renal stone", "renal stones"),
    "calculus": ("a calculus", None),
    "calculi": (None, "calculi"),
    "dilated collecting system": ("a dilated collecting system", "dilated collecting systems"),
    "atrophic kidney": ("an atrophic kidney", "atrophic kidneys"),
    "small kidney": ("a small kidney", "small kidneys"),
    "shrunken kidney": ("a shrunken kidney", "shrunken kidneys"),
    "enlarged spleen": ("an enlarged spleen", None),
    "enlarged heart": ("an enlarged heart", None),
    "pleural effusion": ("a pleural effusion", "pleural effusions"),
    "pleural fluid": ("a pleural fluid collection", "pleural fluid collections"),
    "effusion": ("an effusion", "effusions"),
    "lung nodule": ("a lung nodule", "lung nodules"),
    "pulmonary nodule": ("a pulmonary nodule", "pulmonary nodules"),
    "nodule": ("a nodule", "nodules"),
    "nodular opacity": ("a nodular opacity", "nodular opacities"),
    "gallstones": (None, "gallstones"),
    "gallstone": ("a gallstone", None),
    "calculus in the gallbladder": ("a calculus in the gallbladder", "calculi in the gallbladder"),
    "bladder stone": ("a bladder stone", None),
    "bladder calculus": ("a bladder calculus", None),
    "vesical calculus": ("a vesical calculus", None),
    "stone in the bladder": ("a stone in the bladder", None),
    "adrenal nodule": ("an adrenal nodule", None),
    "adrenal mass": ("an adrenal mass", None),
    "adrenal adenoma": ("an adrenal adenoma", None),
    "adrenal lesion": ("an adrenal lesion", None),
    "atrophic pancreas": ("an atrophic pancreas", None),
    "bullae": (None, "bullae"),
}
NUMBER_WORDS = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven",
                8: "eight"}


def terms(disease_id: str) -> list[str]:
    disease = {x.id: x for x in catalog.diseases("demo")}[disease_id]
    return [disease.name, *disease.synonyms]


def noun_phrase_of(term: str, plural: bool) -> str | None:
    if term in NOUN_PHRASES:
        return NOUN_PHRASES[term][1 if plural else 0]
    return term  # mass noun: "hydronephrosis", "hepatic steatosis", ...


def choose(rng, options) -> str:
    return str(rng.choice(options))


def cap(text: str) -> str:
    return text[:1].upper() + text[1:]


def sides_text(sides: list[str]) -> str:
    return "bilateral" if len(sides) == 2 else sides[0]


def impression_term(rng, disease_id: str, plural: bool = False) -> str:
    """A verbatim catalog term (name or synonym) that has a noun phrase in that number."""
    return choose(rng, [t for t in terms(disease_id) if noun_phrase_of(t, plural) is not None])


def noun_phrase(rng, disease_id: str, plural: bool = False, exclude_post: bool = False) -> str:
    """A noun phrase for the disease from its catalog name/synonyms; ``exclude_post`` drops the
    terms with a trailing "in the"/"of the" part."""
    options = []
    for term in terms(disease_id):
        phrase = noun_phrase_of(term, plural)
        if phrase is None or (exclude_post and (" in the " in term or " of the " in term)):
            continue
        options.append(phrase)
    return choose(rng, options)


def noun_phrase_with(rng, disease_id: str, adjectives: str, plural: bool) -> str:
    """Noun phrase with adjectives between article and term, e.g. 'a 6 mm solid lung nodule'."""
    options = []
    for term in terms(disease_id):
        if " in the " in term or " of the " in term:
            continue
        form = noun_phrase_of(term, plural)
        if form is None:
            continue
        if form.startswith(("a ", "an ")):
            head = form.split(" ", 1)[1]
            phrase = f"{adjectives} {head}"
            article = "an" if phrase[0] in "aeiou8" or phrase.startswith(("11", "18")) else "a"
            options.append(f"{article} {phrase}")
        else:
            options.append(f"{adjectives} {form}")
    return choose(rng, options)
