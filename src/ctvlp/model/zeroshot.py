"""Zero-shot diagnosis with a trained model: prompt ensembles embedded per anatomy, and each
anatomy embedding scored against a disease's positive and negative prompts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import catalog

if TYPE_CHECKING:
    from .network import CTVLP


def zero_shot_scores(img: torch.Tensor, pos: torch.Tensor, neg: torch.Tensor, logit_scale) -> torch.Tensor:
    """img (N, D) anatomy embeddings; pos, neg (D,) prompt embeddings -> P(positive) per row."""
    logits = logit_scale.exp() * torch.stack([img @ neg, img @ pos], dim=-1)
    return torch.softmax(logits, dim=-1)[:, 1]


def prompt_embedding(model: CTVLP, prompts, anatomy_index: int) -> torch.Tensor:
    """Ensemble: mean of the normalised prompt embeddings, renormalised."""
    idx = torch.full((len(prompts),), anatomy_index, dtype=torch.long)
    return F.normalize(model.encode_texts(list(prompts), idx).mean(0), dim=-1)


def prompt_styles(disease_catalog: str) -> tuple[str, ...]:
    """The prompt styles of a catalog (every disease has the same), catalog order."""
    return catalog.diseases(disease_catalog)[0].prompt_styles


@torch.no_grad()
def disease_scores(model, emb: torch.Tensor, diseases, style: str | None = None):
    """Yield (disease, P(positive) per row) for every zero-shot disease; emb (N, M, D). ``diseases``:
    a catalog name, or catalog entries (e.g. a model bundle's recorded ones). The prompts are the
    disease's ensemble of ``style`` (default: the catalog's first style)."""
    for d in catalog.diseases(diseases) if isinstance(diseases, str) else diseases:
        if not d.zero_shot:
            continue
        j = catalog.anatomy_by_name(d.anatomy).index - 1
        positive, negative = d.prompts_of(style)
        if model.vis_global is not None:
            pos = F.normalize(model.encode_report_global(list(positive)).mean(0), dim=-1)
            neg = F.normalize(model.encode_report_global(list(negative)).mean(0), dim=-1)
        else:
            pos = prompt_embedding(model, positive, j)
            neg = prompt_embedding(model, negative, j)
        yield d, zero_shot_scores(emb[:, j], pos, neg, model.logit_scale).float().cpu().numpy()
