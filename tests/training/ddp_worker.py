"""One process of the data-parallel equivalence test (tests/training/test_training_loop.py), run by
the training launcher (``ctvlp.training.launch.command(2, module="ddp_worker")``: torchrun, as the
workflow's training rule runs ``ctvlp train``). It joins the process group the way training does
(``setup_distributed``: torchrun's environment, gloo on the CPU), takes its half of a fixed global
batch, and saves the loss and gradients that DDP with gathered negatives gives it. Imported by the
test for the one-process reference."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from ctvlp.model.config import ModelConfig
from ctvlp.model.losses import AlignmentLoss
from ctvlp.model.network import CTVLP
from ctvlp.model.vision import N_ANATOMIES
from ctvlp.training.data import AnatomyTexts, TextBank
from ctvlp.training.distributed import dist_info, setup_distributed, wrap_step
from ctvlp.training.phases import batch_loss

CPU = torch.device("cpu")
TEXTS = ["The liver is unremarkable.", "Hepatic cyst.", "Renal stone.", "The spleen is enlarged."]


def ddp_case(empty_half: bool):
    """A tiny model (eval: BatchNorm uses running statistics, identical however the batch is split)
    and a fixed global batch of 4 whose text ids repeat across the halves. empty_half: the second
    half has no valid anatomy and no text (that process pools one dummy text row with weight 0, so
its text head is in the graph like the other's)."""
    torch.manual_seed(0)
    model = CTVLP(ModelConfig.from_settings(widths=(4, 8, 8, 16), embed_dim=16, heads=2, text_max_length=32,
                                            vq_codes=0)).eval()
    g = torch.Generator().manual_seed(1)
    valid = torch.rand(4, N_ANATOMIES, generator=g) < 0.7
    valid[2:] &= not empty_half
    tidx = torch.randint(0, len(TEXTS), (4, N_ANATOMIES), generator=g).masked_fill(~valid, -1)
    batch = {"image": torch.rand(4, 1, 32, 32, 32, generator=g),
             "anatomy": torch.randint(0, N_ANATOMIES + 1, (4, 32, 32, 32), generator=g, dtype=torch.uint8),
             "valid": valid, "normal": torch.rand(4, N_ANATOMIES, generator=g) < 0.5, "text_idx": tidx,
             "group": tidx}  # calibration groups: here the texts themselves
    texts = AnatomyTexts(TEXTS, tidx.numpy(), batch["normal"].numpy(), tidx.numpy())
    return model, TextBank(model, texts, CPU), batch


def loss_and_grads(model, bank, batch):
    step = wrap_step(model, lambda b: (*batch_loss(model, bank, b, CPU, AlignmentLoss(True), gather=True), {}), CPU,
                     static_graph=bank.static)  # DDP without the unused-parameter search, as training runs it
    loss, pairs, _ = step(batch)
    loss.backward()
    return {"loss": loss.detach().reshape(1), "pairs": torch.tensor([pairs]),
            **{f"grad.{n}": p.grad for n, p in model.named_parameters() if p.grad is not None}}


def vq_case(rank: int):
    """A small VQ-VAE (identical on every process) and this process's rows: anatomies 0 and 1 on
    both processes, anatomy 2 on rank 1 only, from different data."""
    from ctvlp.model.normality import NormalityVQVAE

    torch.manual_seed(0)
    vq = NormalityVQVAE(8, n_anatomies=3, codes=4, code_dim=8, depth=1, heads=2).train()
    g = torch.Generator().manual_seed(10 + rank)
    anatomy = torch.tensor([0, 1, 0, 1] + ([2, 2] if rank == 1 else []))
    rows = torch.randn(len(anatomy), 6, 8, generator=g) + 3.0 * (rank + 1)
    pad = torch.arange(6) < torch.randint(2, 7, (len(anatomy), 1), generator=g)
    return vq, rows, pad, anatomy


def vq_step(vq, rows, pad, anatomy):
    from ctvlp.training.phases import sync_codebooks

    before = vq.initialised.clone()
    vq(rows, pad, anatomy)
    if dist_info()[1] > 1:
        sync_codebooks(vq, before)
    return {k: getattr(vq, k).clone().float() for k in ("codebook", "ema_count", "ema_sum", "initialised",
                                                         "token_mean", "token_scale")}


def main(out: Path):
    torch.set_num_threads(1)
    device, own_group = setup_distributed("cpu")
    try:
        rank, world = dist_info()
        assert world == 2 and device.type == "cpu", (world, device)
        for empty_half in (False, True):
            model, bank, batch = ddp_case(empty_half)
            half = len(batch["image"]) // world
            local = {k: v[rank * half:(rank + 1) * half] for k, v in batch.items()}
            save_file(loss_and_grads(model, bank, local), str(out / f"{empty_half}.rank{rank}.safetensors"))
        save_file(vq_step(*vq_case(rank)), str(out / f"vq.rank{rank}.safetensors"))
    finally:
        if own_group:
            dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
