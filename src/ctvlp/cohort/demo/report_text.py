"""Report wording of the demo cohort: "FINDINGS:" / "IMPRESSION:" text that states every positive
finding by its catalog name or one of its synonyms and never states a negative one as present.

``WORDING`` holds one entry per demo disease (keyed like ``lesions.DISEASES``): its positive
sentences (a function of the disease's record, as ``lesions`` painted it) and its negations. The
normal phrasing per anatomy, the order of the anatomies and the assembly are below it
(``make_report``). Every choice comes from the text generator, in a fixed order; the noun phrases
come from ``phrases``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ctvlp import catalog

from .phrases import NUMBER_WORDS, cap, choose, impression_term, noun_phrase, noun_phrase_with, sides_text, terms

# --------------------------------------------------------------------------------------------
# positive sentences, one function per disease: (record, rng) -> (findings sentences, impression
# item); the impression item always holds a verbatim catalog term
# --------------------------------------------------------------------------------------------


def _liver_cyst(record: dict, rng) -> tuple[list[str], str]:
    did = "liver_cyst"
    term = impression_term(rng, did, plural=len(record["lesions"]) > 1)
    lesions = sorted(record["lesions"], key=lambda o: -o["size"])
    big = lesions[0]
    loc = choose(rng, [f"segment {big['segment']} of the liver",
                       f"hepatic segment {big['segment']}"])
    if len(lesions) == 1:
        sentence = choose(rng, [
            f"A {big['size']} mm well-defined hypodense lesion in {loc}, consistent with "
            f"{noun_phrase(rng, did)}.",
            f"There is {noun_phrase(rng, did, exclude_post=True)} in {loc}, measuring "
            f"{big['size']} mm.",
            f"{cap(loc)} contains a {big['size']} mm fluid-attenuation lesion "
            f"({big['hu']} HU), compatible with {noun_phrase(rng, did)}.",
        ])
    else:
        n = NUMBER_WORDS[len(lesions)]
        sentence = choose(rng, [
            f"{cap(n)} hypodense lesions in the liver, the largest {big['size']} mm in {loc}, "
            f"consistent with {noun_phrase(rng, did, plural=True)}.",
            f"Multiple {noun_phrase(rng, did, plural=True, exclude_post=True)} in the liver, up "
            f"to {big['size']} mm ({loc}).",
            f"{cap(n)} fluid-attenuation liver lesions measuring "
            f"{', '.join(str(o['size']) for o in lesions)} mm, compatible with "
            f"{noun_phrase(rng, did, plural=True)}.",
        ])
    return [sentence], f"{cap(term)}" + choose(rng, ["", f", {big['size']} mm",
                                                    f" ({len(lesions)})"])


def _liver_metastasis(record: dict, rng) -> tuple[list[str], str]:
    did = "liver_metastasis"
    term = impression_term(rng, did, plural=True)
    lesions = sorted(record["lesions"], key=lambda o: -o["size"])
    big = lesions[0]
    n = len(lesions)
    phrase = noun_phrase(rng, did, plural=True)
    loc = f"segment {big['segment']}"
    sentence = choose(rng, [
        f"Multiple hypoattenuating liver lesions, the largest {big['size']} mm in {loc}, "
        f"consistent with {phrase}.",
        f"{cap(NUMBER_WORDS[n])} ill-defined hypodense lesions throughout the liver measuring up "
        f"to {big['size']} mm ({loc}), compatible with {phrase}.",
        f"The liver contains {n} solid-appearing lesions up to {big['size']} mm, in keeping "
        f"with {phrase}.",
        f"{cap(noun_phrase(rng, did, plural=True))}: at least {n} lesions scattered throughout "
        f"the liver, the largest in hepatic {loc} ({big['size']} mm).",
    ])
    return [sentence], cap(term) + choose(rng, ["", " (multiple)", f", largest {big['size']} mm"])


def _fatty_liver(record: dict, rng) -> tuple[list[str], str]:
    did = "fatty_liver"
    term = impression_term(rng, did)
    hu = record["hu"]
    sentence = choose(rng, [
        f"The liver is diffusely hypoattenuating (approximately {hu} HU), consistent with "
        f"{choose(rng, [t for t in terms(did) if 'attenuation' not in t])}.",
        f"{cap(noun_phrase(rng, did))} is noted, with liver attenuation of about {hu} HU.",
        f"Diffusely low attenuation of the liver relative to the spleen, compatible with "
        f"{choose(rng, [t for t in terms(did) if 'attenuation' not in t])}.",
    ])
    return [sentence], cap(term)


def _kidney_cyst(record: dict, rng) -> tuple[list[str], str]:
    did = "kidney_cyst"
    term = impression_term(rng, did)
    side, size, pole = record["side"], record["size"], record["pole"]
    phrase = noun_phrase(rng, did)
    sentence = choose(rng, [
        f"A {size} mm fluid-attenuation lesion in the {pole} of the {side} "
        f"kidney, consistent with {phrase}.",
        f"There is {noun_phrase(rng, did, exclude_post=True)} in the {pole} of the "
        f"{side} kidney measuring {size} mm.",
        f"{cap(side)} kidney: {size} mm well-circumscribed water-attenuation "
        f"lesion, compatible with {phrase}.",
    ])
    return [sentence], f"{cap(term)} ({side}, {size} mm)"


def _renal_calculus(record: dict, rng) -> tuple[list[str], str]:
    did = "renal_calculus"
    lesions, side = record["lesions"], record["side"]
    term = impression_term(rng, did, plural=len(lesions) > 1)
    big = max(lesions, key=lambda o: o["size"])
    if len(lesions) == 1:
        sentence = choose(rng, [
            f"A {big['size']} mm dense focus in the {big['pole']} of the {side} kidney, "
            f"consistent with {noun_phrase(rng, did)}.",
            f"{cap(noun_phrase(rng, did, exclude_post=True))} measuring {big['size']} mm in the "
            f"{side} kidney ({big['pole']}).",
        ]) if "nephrolithiasis" not in term else (
            f"{cap(side)} nephrolithiasis: a {big['size']} mm calcific focus in the "
            f"{big['pole']}.")
    else:
        sentence = choose(rng, [
            f"Two dense foci in the {side} kidney, up to {big['size']} mm, consistent "
            f"with {noun_phrase(rng, did, plural=True)}.",
            f"Two {choose(rng, ['renal calculi', 'kidney stones', 'renal stones', 'calculi'])} in "
            f"the {side} kidney, the largest {big['size']} mm in the {big['pole']}.",
        ])
    return [sentence], f"{cap(term)} ({side} kidney, {big['size']} mm)"


def _hydronephrosis(record: dict, rng) -> tuple[list[str], str]:
    did = "hydronephrosis"
    term = impression_term(rng, did)
    side = sides_text(record["sides"])
    grade = record["grade"]
    one_side = len(record["sides"]) == 1
    where = f"{side} renal collecting system" if one_side else "collecting systems of both kidneys"
    sentence = choose(rng, [
        f"{cap(grade)} {side} hydronephrosis.",
        f"The {where} {'is' if one_side else 'are'} dilated, consistent with "
        f"{noun_phrase(rng, did, plural=len(record['sides']) > 1)}.",
        f"{cap(grade)} dilatation of the {where} with fluid-filled calyces, in keeping with "
        f"{noun_phrase(rng, did, plural=len(record['sides']) > 1)}.",
    ])
    if term == "hydronephrosis":
        return [sentence], f"{cap(grade)} {side} {term}"
    return [sentence], f"{cap(term)} ({side}, {grade})"


def _kidney_atrophy(record: dict, rng) -> tuple[list[str], str]:
    did = "kidney_atrophy"
    term = impression_term(rng, did)
    sides = record["sides"]
    if len(sides) == 1:
        side = sides[0]
        cm = record["lengths"][side]
        sentence = choose(rng, [
            f"The {side} kidney is small, measuring {cm} cm in length, with cortical thinning, "
            f"consistent with {noun_phrase(rng, did)}.",
            f"{cap(side)} kidney: reduced size ({cm} cm) and thin cortex, compatible with "
            f"{noun_phrase(rng, did)}.",
        ])
        return [sentence], f"{cap(term)} ({side})"
    lengths = record["lengths"]
    sentence = (f"Both kidneys are small (right {lengths['right']} cm, left "
                f"{lengths['left']} cm) with cortical thinning, consistent with bilateral "
                f"{noun_phrase(rng, did, plural=True)}.")
    return [sentence], f"{cap(term)} (bilateral)"


def _splenomegaly(record: dict, rng) -> tuple[list[str], str]:
    did = "splenomegaly"
    term = impression_term(rng, did)
    cm = record["cm"]
    sentence = choose(rng, [
        f"The spleen is enlarged, measuring {cm} cm in craniocaudal extent, consistent with "
        f"{noun_phrase(rng, did)}.",
        f"{cap(noun_phrase(rng, did))} ({cm} cm craniocaudal).",
        f"There is {noun_phrase(rng, did)} with a craniocaudal span of {cm} cm.",
    ])
    return [sentence], cap(term) + choose(rng, ["", f" ({cm} cm)"])


def _cardiomegaly(record: dict, rng) -> tuple[list[str], str]:
    did = "cardiomegaly"
    term = impression_term(rng, did)
    cm = record["cm"]
    sentence = choose(rng, [
        f"The heart is enlarged, consistent with {noun_phrase(rng, did)}.",
        f"{cap(noun_phrase(rng, did))}, with a transverse cardiac diameter of {cm} cm.",
        f"There is {noun_phrase(rng, did)} without pericardial thickening.",
    ])
    return [sentence], cap(term)


def _pleural_effusion(record: dict, rng) -> tuple[list[str], str]:
    did = "pleural_effusion"
    term = impression_term(rng, did)
    sides = record["sides"]
    side = sides_text(sides)
    plural = len(sides) == 2
    size = record["size"]
    lobes = "lower lobes" if plural else f"{side} lower lobe"
    phrase = noun_phrase_with(rng, did, f"{size} {side}", plural)
    sentence = choose(rng, [
        f"There {'are' if plural else 'is'} {phrase} layering dependently, with adjacent "
        f"compressive atelectasis of the {lobes}.",
        f"{cap(phrase)} posterior to the {lobes}.",
        f"Dependent fluid in the {'pleural spaces' if plural else side + ' pleural space'}, "
        f"consistent with {phrase}.",
    ])
    item_term = term if term != "effusion" else "pleural effusion"
    if plural:
        plural_s = "" if item_term.endswith("fluid") else "s"
        return [sentence], f"Bilateral {item_term}{plural_s}"
    return [sentence], f"{cap(size)} {side} {item_term}"


def _emphysema(record: dict, rng) -> tuple[list[str], str]:
    did = "emphysema"
    term = impression_term(rng, did)
    bullae = record["bullae"]
    phrase = noun_phrase(rng, did)
    sentences = [choose(rng, [
        f"{cap(phrase)} in both lungs, predominantly in the upper lobes.",
        f"Diffuse hyperlucency of the lungs with attenuation of the pulmonary vasculature, "
        f"consistent with {phrase}.",
        f"The lungs show {phrase}, most pronounced in the upper lobes.",
    ])]
    if bullae:
        sentences.append(choose(rng, [
            f"Apical bullae up to {max(bullae)} mm in the upper lobes.",
            f"Subpleural bullae in the upper lobes, the largest {max(bullae)} mm."]))
    return sentences, cap(term)


def _lung_nodule(record: dict, rng) -> tuple[list[str], str]:
    did = "lung_nodule"
    term = impression_term(rng, did, plural=len(record["lesions"]) > 1)
    lesions = sorted(record["lesions"], key=lambda o: -o["size"])
    big = lesions[0]
    if len(lesions) == 1:
        phrase = noun_phrase_with(rng, did, f"{big['size']} mm solid", False)
        sentence = choose(rng, [f"{cap(phrase)} in the {big['lobe']}.",
                                 f"There is {phrase} in the {big['lobe']}.",
                                 f"In the {big['lobe']} there is {phrase}."])
        return [sentence], f"{cap(term)} in the {big['lobe']}, {big['size']} mm"
    where = " and the ".join(sorted({o["lobe"] for o in lesions}))
    phrase = noun_phrase_with(rng, did, "solid", True)
    count = NUMBER_WORDS[len(lesions)]
    sentence = choose(rng, [f"{cap(count)} {phrase} up to {big['size']} mm in the {where}.",
                             f"There are {count} {phrase} in the {where}, the largest "
                             f"{big['size']} mm in the {big['lobe']}."])
    return [sentence], f"{cap(term)} ({len(lesions)}), largest {big['size']} mm"


def _gallstone(record: dict, rng) -> tuple[list[str], str]:
    did = "gallstone"
    lesions = record["lesions"]
    term = impression_term(rng, did, plural=len(lesions) > 1)
    big = max(o["size"] for o in lesions)
    if len(lesions) == 1:
        sentence = choose(rng, [
            f"A {big} mm calcified focus in the dependent gallbladder, consistent with "
            f"{noun_phrase(rng, did)}.",
            f"There is {noun_phrase(rng, did, exclude_post=True)} measuring {big} mm in the "
            f"dependent portion of the gallbladder.",
        ])
    else:
        sentence = choose(rng, [
            f"{cap(NUMBER_WORDS[len(lesions)])} dense foci layering in the gallbladder, the "
            f"largest {big} mm, consistent with {noun_phrase(rng, did, plural=True)}.",
            f"Multiple {noun_phrase(rng, did, plural=True, exclude_post=True)} in the "
            f"gallbladder, up to {big} mm.",
        ])
    return [sentence], cap(term) + choose(rng, ["", f", up to {big} mm"])


def _bladder_stone(record: dict, rng) -> tuple[list[str], str]:
    did = "bladder_stone"
    term = impression_term(rng, did)
    size = record["size"]
    sentence = choose(rng, [
        f"A {size} mm dense focus in the dependent urinary bladder, consistent with "
        f"{noun_phrase(rng, did)}.",
        f"There is {noun_phrase(rng, did, exclude_post=True)} measuring {size} mm in the "
        f"dependent bladder.",
        f"Urinary bladder: {size} mm calcified intraluminal focus, compatible with "
        f"{noun_phrase(rng, did)}.",
    ])
    return [sentence], f"{cap(term)}, {size} mm"


def _adrenal_nodule(record: dict, rng) -> tuple[list[str], str]:
    did = "adrenal_nodule"
    term = impression_term(rng, did)
    side, size, hu = record["side"], record["size"], record["hu"]
    phrase = noun_phrase(rng, did)
    sentence = choose(rng, [
        f"A {size} mm low-attenuation nodule arising from the {side} adrenal gland ({hu} HU), "
        f"consistent with {phrase}.",
        f"{cap(side)} adrenal gland: {size} mm low-attenuation focus, likely {phrase}.",
        f"There is {noun_phrase_with(rng, did, f'{size} mm {side}', False)} measuring {hu} HU.",
    ])
    if term.startswith("adrenal"):
        return [sentence], f"{cap(side)} {term}, {size} mm"
    return [sentence], f"{cap(term)} ({side}, {size} mm)"


def _pancreas_atrophy(record: dict, rng) -> tuple[list[str], str]:
    did = "pancreas_atrophy"
    term = impression_term(rng, did)
    phrase = noun_phrase(rng, did)
    sentence = choose(rng, [
        f"The pancreas is diffusely thinned with fatty replacement, consistent with {phrase}.",
        f"There is {phrase}.",
        f"Diffuse volume loss of the pancreas, compatible with {phrase}.",
    ])
    return [sentence], cap(term)


@dataclass(frozen=True)
class DiseaseWording:
    positive: Callable[[dict, object], tuple[list[str], str]]  # (record, rng) -> (sentences, item)
    negations: tuple[str, ...]


WORDING: dict[str, DiseaseWording] = {
    "liver_cyst": DiseaseWording(_liver_cyst, ("No cystic liver lesion.", "No hepatic cyst.")),
    "liver_metastasis": DiseaseWording(_liver_metastasis, (
        "No suspicious hepatic lesion to suggest metastases.", "No liver metastases.")),
    "fatty_liver": DiseaseWording(_fatty_liver, ("No hepatic steatosis.", "No fatty liver.")),
    "kidney_cyst": DiseaseWording(_kidney_cyst, ("No renal cyst.", "No kidney cyst.")),
    "renal_calculus": DiseaseWording(_renal_calculus, ("No renal calculi.", "No nephrolithiasis.")),
    "hydronephrosis": DiseaseWording(_hydronephrosis, (
        "No hydronephrosis.", "No hydronephrosis on either side.")),
    "kidney_atrophy": DiseaseWording(_kidney_atrophy, ("No renal atrophy.", "No kidney atrophy.")),
    "splenomegaly": DiseaseWording(_splenomegaly, ("No splenomegaly.",)),
    "cardiomegaly": DiseaseWording(_cardiomegaly, ("No cardiomegaly.",)),
    "pleural_effusion": DiseaseWording(_pleural_effusion, (
        "No pleural effusion.", "No pleural effusion on either side.")),
    "emphysema": DiseaseWording(_emphysema, (
        "No emphysema.", "No emphysematous changes in the lungs.")),
    "lung_nodule": DiseaseWording(_lung_nodule, (
        "No suspicious pulmonary nodule.", "No lung nodule.")),
    "gallstone": DiseaseWording(_gallstone, ("No gallstones.", "No radiopaque gallstones.")),
    "bladder_stone": DiseaseWording(_bladder_stone, ("No bladder stone.", "No bladder calculus.")),
    "adrenal_nodule": DiseaseWording(_adrenal_nodule, ("No adrenal nodule.", "No adrenal mass.")),
    "pancreas_atrophy": DiseaseWording(_pancreas_atrophy, ("No pancreatic atrophy.",)),
}

# --------------------------------------------------------------------------------------------
# normal phrasing and the whole report
# --------------------------------------------------------------------------------------------

NORMAL = {
    "lung": ["The lungs are clear.", "The lungs are clear without focal consolidation.",
             "No focal consolidation, nodule or mass in the lungs.",
             "Normal appearance of both lungs.", "The lungs are well expanded and clear.",
             "No pleural effusion or pneumothorax; the lungs are clear."],
    "heart": ["Heart size is normal.", "The heart is normal in size.", "No cardiomegaly.",
              "Normal cardiac size without pericardial thickening."],
    "liver": ["The liver is normal in size and attenuation.", "No focal hepatic lesion.",
              "Unremarkable liver.", "The liver is normal in attenuation without focal lesion.",
              "Liver: normal size and contour, no focal lesion."],
    "gallbladder": ["The gallbladder is unremarkable.", "No gallstones.", "Normal gallbladder.",
                    "Gallbladder: no radiopaque stones or wall thickening."],
    "spleen": ["Unremarkable spleen.", "The spleen is normal in size.",
               "Normal spleen ({spleen_cm} cm).", "No splenomegaly.",
               "The spleen measures {spleen_cm} cm and is unremarkable."],
    "pancreas": ["The pancreas is unremarkable.", "Normal pancreas.",
                 "The pancreas is normal in size and attenuation.",
                 "No pancreatic mass or atrophy."],
    "adrenal_gland": ["The adrenal glands are normal.", "Unremarkable adrenal glands.",
                      "No adrenal nodule.", "Both adrenal glands are normal in thickness."],
    "kidney": ["Kidneys: no hydronephrosis or calculi.", "Both kidneys are normal in size.",
               "The kidneys are unremarkable.", "Normal kidneys without hydronephrosis.",
               "No renal calculi, cysts or hydronephrosis."],
    "urinary_bladder": ["The urinary bladder is unremarkable.", "Normal urinary bladder.",
                        "The bladder is unremarkable without intraluminal stone.",
                        "Urinary bladder: normal."],
}
NORMAL_CONTRAST = {"kidney": ["Both kidneys enhance symmetrically without hydronephrosis."]}
NORMAL_EXTRA = {  # anatomies without demo diseases, mentioned now and then
    "trachea": ["The trachea is patent.", "The trachea and carina are unremarkable."],
    "aorta": ["The aorta is normal in caliber.", "No aortic aneurysm.",
              "Normal caliber of the thoracic aorta and abdominal aorta."],
    "esophagus": ["The esophagus is unremarkable.", "No esophageal wall thickening."],
    "stomach": ["The stomach is unremarkable.",
                "The stomach is partially distended with fluid and gas."],
    "small_intestine": ["Small bowel loops are normal in caliber.", "No small bowel obstruction."],
    "colon": ["The colon is unremarkable.", "No colonic wall thickening."],
    "spine": ["No aggressive osseous lesion of the thoracic spine or lumbar spine.",
              "The thoracic vertebrae and lumbar vertebrae are intact."],
}
ANATOMY_ORDER = ["lung", "trachea", "heart", "aorta", "esophagus", "liver", "gallbladder", "spleen",
                 "pancreas", "adrenal_gland", "kidney", "stomach", "small_intestine", "colon",
                 "urinary_bladder", "spine"]


def make_report(labels: dict[str, int], records: dict[str, dict], rng, spleen_cm: float,
                contrast: bool) -> str:
    """The report of a case: per anatomy (``ANATOMY_ORDER``) its positive findings with a few
    negations, or now and then a normal sentence; then the impression."""
    by_anatomy: dict[str, list[str]] = {}
    for disease in catalog.diseases("demo"):
        by_anatomy.setdefault(disease.anatomy, []).append(disease.id)
    lines: list[str] = []
    impression: list[str] = []
    fmt = {"spleen_cm": spleen_cm}
    for anatomy in ANATOMY_ORDER:
        ids = by_anatomy.get(anatomy, [])
        positives = [d for d in ids if labels[d]]
        sentences: list[str] = []
        if positives:
            for d in positives:
                found, item = WORDING[d].positive(records[d], rng)
                sentences.extend(found)
                impression.append(item)
            for d in ids:
                if not labels[d] and rng.random() < 0.25:
                    sentences.append(choose(rng, WORDING[d].negations))
        elif ids:
            if rng.random() < 0.75:
                pool = list(NORMAL[anatomy])
                if contrast:
                    pool += NORMAL_CONTRAST.get(anatomy, [])
                sentences.append(choose(rng, pool).format(**fmt))
                for d in ids:
                    if rng.random() < 0.15:
                        negation = choose(rng, WORDING[d].negations)
                        if negation not in sentences:
                            sentences.append(negation)
        else:
            if rng.random() < 0.35:
                sentences.append(choose(rng, NORMAL_EXTRA[anatomy]))
        if sentences:
            lines.append(" ".join(sentences))
    if not lines:
        lines.append("No abnormality in the visualized chest, abdomen and pelvis.")
    if rng.random() < 0.3:
        lines.append(choose(rng, ["No free fluid.", "No lymphadenopathy.",
                                   "No free intraperitoneal air."]))
    if not impression:
        impression_text = choose(rng, ["No acute abnormality.", "No acute abnormality.",
                                         "No acute abnormality in the chest, abdomen or pelvis.",
                                         "No acute abnormality. Unremarkable examination."])
    else:
        order = rng.permutation(len(impression)) if rng.random() < 0.3 else range(len(impression))
        items = [impression[i] for i in order]
        if len(items) > 1 and rng.random() < 0.6:
            impression_text = "\n".join(f"{k}. {it}." for k, it in enumerate(items, 1))
        else:
            impression_text = " ".join(f"{it}." for it in items)
    return "FINDINGS:\n" + "\n".join(lines) + "\n\nIMPRESSION:\n" + impression_text
