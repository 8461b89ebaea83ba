"""Zero-shot prompts: each disease's negative prompts negate the finding, a known-answer check of
the scoring direction, and the prompt style chosen on the validation split only."""

import numpy as np
import polars as pl
import pytest
import torch

from ctvlp import catalog
from ctvlp.evaluation.metrics import choose_prompt_style
from ctvlp.model.config import ModelConfig
from ctvlp.model.network import CTVLP
from ctvlp.model.zeroshot import disease_scores, prompt_embedding, zero_shot_scores


@pytest.mark.parametrize("name", catalog.DISEASE_CATALOGS)
def test_every_prompt_names_its_disease_and_no_negative_is_just_unremarkable(name):
    for d in catalog.diseases(name):
        assert set(d.prompt_styles) >= {"presence", "report", "ensemble"}
        for style in d.prompt_styles:
            positive, negative = d.prompts_of(style)
            assert positive and negative
            assert not any("unremarkable" in p for p in negative), (d.id, style)
            assert all(any(w in p.lower() for w in (d.name.lower(), *(s.lower() for s in d.synonyms)))
                       for p in positive + negative), (d.id, style, positive, negative)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, text_max_length=32,
                                           vq_codes=0)).eval()


@pytest.mark.parametrize("style", ["presence", "report", "ensemble"])
def test_known_answer_an_embedding_equal_to_a_prompt_scores_on_its_side(model, style):
    """An anatomy embedding equal to a disease's positive prompt embedding scores > 0.5, one equal
    to its negative prompt embedding < 0.5, for every demo disease; swapped, the check fails."""
    diseases = [d for d in catalog.diseases("demo") if d.zero_shot]
    # rows 2k and 2k+1: disease k's anatomy embedding equal to its positive / its negative prompt
    emb = torch.zeros(2 * len(diseases), len(catalog.anatomies()), 16)
    with torch.no_grad():
        for k, d in enumerate(diseases):
            j = catalog.anatomy_by_name(d.anatomy).index - 1
            positive, negative = d.prompts_of(style)
            emb[2 * k, j], emb[2 * k + 1, j] = prompt_embedding(model, positive, j), prompt_embedding(model, negative, j)
    scores = {d.id: s for d, s in disease_scores(model, emb, "demo", style)}
    for swapped in (False, True):
        wrong = 0
        for k, d in enumerate(diseases):
            on_positive, on_negative = scores[d.id][2 * k], scores[d.id][2 * k + 1]
            if swapped:  # the two prompt columns exchanged: every answer flips
                on_positive, on_negative = 1 - on_positive, 1 - on_negative
            wrong += not (on_positive > 0.5 > on_negative)
        assert (wrong == 0) if not swapped else (wrong == len(diseases)), (style, swapped, wrong)


def test_the_scores_side_is_the_positive_column():
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    pos, neg = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    s = zero_shot_scores(img, pos, neg, torch.tensor(2.0))
    assert s[0] > 0.5 > s[1]
    assert torch.allclose(zero_shot_scores(img, neg, pos, torch.tensor(2.0)), 1 - s, atol=1e-6)


def _predictions(style_quality: dict[str, float], seed=0) -> dict[str, pl.DataFrame]:
    """Per style: val and test rows of 3 diseases whose scores follow the labels with the given
    strength on val, and the reverse order of strength on test."""
    rng = np.random.default_rng(seed)
    out = {}
    ranked = list(style_quality)
    for style, q in style_quality.items():
        rows = []
        test_q = style_quality[ranked[len(ranked) - 1 - ranked.index(style)]]
        for split, quality in (("val", q), ("test", test_q)):
            for d in ("a", "b", "c"):
                for i in range(60):
                    y = int(i % 3 == 0)
                    rows.append({"case_id": f"{split}{i}", "split": split, "disease_id": d, "evaluable": True,
                                 "label": y, "score": float(quality * y + rng.random())})
        out[style] = pl.DataFrame(rows)
    return out


def test_the_style_is_chosen_on_validation_and_test_labels_never_move_it():
    preds = _predictions({"presence": 0.2, "report": 1.0, "ensemble": 0.5})
    style, table = choose_prompt_style(preds)
    assert style == "report" and table.filter(pl.col("chosen"))["style"].to_list() == ["report"]
    assert table["val_mean_auc"].arg_max() == 1
    # flip every test label: the choice does not move
    flipped = {s: p.with_columns(pl.when(pl.col("split") == "test").then(1 - pl.col("label")).otherwise("label")
                                 .alias("label")) for s, p in preds.items()}
    assert choose_prompt_style(flipped)[0] == "report"
    assert choose_prompt_style(preds, "presence")[0] == "presence"  # a fixed style when asked
    with pytest.raises(ValueError, match="not a style"):
        choose_prompt_style(preds, "poetry")
