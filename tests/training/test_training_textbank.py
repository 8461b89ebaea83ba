"""The text side of Eq. 1 from the cache each trainable setting allows (final embeddings, bf16
token features on the device or the CPU, or live encoding) equals encoding the texts directly."""

import numpy as np
import pytest
import torch

from ctvlp.model.config import ModelConfig
from ctvlp.model.network import CTVLP
from ctvlp.model.vision import N_ANATOMIES
from ctvlp.training.data import AnatomyTexts, TextBank, to_device
from ctvlp.training.trainable import set_trainable

TEXTS = ["The liver is unremarkable.", "A 2 cm hypodense lesion in segment VII of the liver.",
         "Renal stone.", "The spleen is enlarged, 15 cm."]
CPU = torch.device("cpu")


def model_for(mode: str) -> CTVLP:
    torch.manual_seed(0)
    model = CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, text_max_length=32,
                                            vq_codes=0, train_text_head=mode != "final",
                                            train_text_encoder=mode == "live"))
    set_trainable(model, "align")
    return model


def batch_and_texts(valid_rows: bool = True):
    g = torch.Generator().manual_seed(3)
    tidx = torch.randint(0, len(TEXTS), (3, N_ANATOMIES), generator=g)
    tidx[:, ::3] = -1  # anatomies without a text
    valid = (torch.rand(3, N_ANATOMIES, generator=g) < 0.6) & (tidx >= 0) & valid_rows
    batch = {"text_idx": tidx, "valid": valid}
    texts = AnatomyTexts(TEXTS, tidx.numpy(), np.zeros(tidx.shape, bool), tidx.numpy())
    return batch, texts


def direct(model, batch) -> torch.Tensor:
    out = torch.zeros(*batch["valid"].shape, model.txt_proj.weight.shape[-1])
    b, j = torch.nonzero(batch["valid"], as_tuple=True)
    out[b, j] = model.encode_texts([TEXTS[k] for k in batch["text_idx"][b, j].tolist()], j)
    return out


@pytest.mark.parametrize("mode, device_bytes", [("final", 1 << 29), ("hidden", 1 << 29), ("hidden", 0), ("live", 0)])
def test_every_cache_gives_the_directly_encoded_texts(mode, device_bytes):
    model = model_for(mode)
    batch, texts = batch_and_texts()
    bank = TextBank(model, texts, CPU, device_bytes=device_bytes)
    assert bank.mode == mode and bank.static == (mode != "live")
    if mode == "hidden":
        assert (bank.store is None) == (device_bytes == 0)  # padded on the device, or trimmed on the CPU
    got = bank.embed(batch, to_device(batch, CPU))
    ref = direct(model, batch)
    tol = 2e-2 if mode == "hidden" else 1e-5  # token features kept in bf16
    assert torch.allclose(got, ref, atol=tol), (got - ref).abs().max()
    assert (got[~batch["valid"]] == 0).all() and got[batch["valid"]].norm(dim=-1).min() > 0.99


def test_the_trained_head_stays_in_the_graph_without_any_text_row():
    """A batch without texts still runs the text head (one dummy row of weight 0): the step uses
    the same parameters every time, as DDP without the unused-parameter search requires."""
    model = model_for("hidden")
    batch, texts = batch_and_texts()
    bank = TextBank(model, texts, CPU)
    empty = {"text_idx": torch.full_like(batch["text_idx"], -1), "valid": torch.zeros_like(batch["valid"])}
    out = bank.embed(empty, to_device(empty, CPU))
    assert (out == 0).all()
    out.sum().backward()
    assert all(p.grad is not None for p in model.txt_pool.parameters())
