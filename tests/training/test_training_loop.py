"""The phase runner: exact resume (in process and after SIGKILL), non-finite losses, settings
mismatches, and DDP gradients with gathered negatives equal to one process on the global batch."""

import copy
import csv
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ctvlp import config
from ctvlp.model.io import model_state
from ctvlp.training import launch
from ctvlp.training.checkpoint import CHECKPOINT, CheckpointWriter, checkpoint_payload, checkpoint_state
from ctvlp.training.loop import (
    RUNNING_METRICS,
    LoopSettings,
    PhaseTask,
    autocast_dtype,
    loader_workers,
    make_optimizer,
    run_phase,
    warmup_cosine,
)
from ctvlp.training.phases import run

CPU = torch.device("cpu")
TOY = {"epochs": 3, "batch_size": 4, "lr": 0.05, "min_lr": 1e-3, "warmup_epochs": 1, "weight_decay": 0.01,
       "grad_clip": 1.0, "checkpoint_every": 1}


class Interrupted(Exception):
    pass


class Toy(torch.utils.data.Dataset):
    """13 samples: with batch 4 and drop_last, 3 steps per epoch; the data shift with the epoch."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(13, 3, generator=g)
        self.y = self.x @ torch.tensor([1.0, -2.0, 0.5]) + 0.1 * torch.randn(13, generator=g)
        self.epoch = 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"x": self.x[i] + 0.1 * self.epoch, "y": self.y[i]}


class ToyTask(PhaseTask):
    """A small MLP with BatchNorm; the step draws noise from the global RNG, and a momentum copy
    (checkpointed as an extra module) follows the model after each step."""

    name, metrics = "toy", ("noise",)

    def __init__(self, dataset, stop_at=None, nan_at=None):
        torch.manual_seed(0)
        super().__init__(torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(),
                                             torch.nn.Linear(8, 1)))
        self.momentum = copy.deepcopy(self.model).requires_grad_(False)
        self.extra_modules = {"momentum": self.momentum}
        self.dataset, self.calls, self.stop_at, self.nan_at, self.saved = dataset, itertools.count(), stop_at, nan_at, {}

    @torch.no_grad()
    def after_step(self, step, total):
        for p_m, p in zip(self.momentum.parameters(), self.model.parameters()):
            p_m.mul_(0.9).add_(p, alpha=0.1)

    def step(self, batch):
        k = next(self.calls)
        if k == self.stop_at:
            raise Interrupted
        noise = 0.1 * torch.randn_like(batch["x"])
        loss = F.mse_loss(self.model(batch["x"] + noise).squeeze(-1), batch["y"])
        return loss * float("nan") if k == self.nan_at else loss, len(batch["x"]), {"noise": noise.abs().mean()}

    def validate(self):
        return F.mse_loss(self.model(self.dataset.x).squeeze(-1), self.dataset.y)

    def save(self, summary):
        self.saved.update(**model_state(self.model),
                          **{f"momentum.{k}": v for k, v in model_state(self.momentum).items()})


class KeyedToy(Toy):
    """Toy taking (epoch, index) keys, as CropDataset: loader workers that persist across epochs
    get the epoch with each key."""

    keyed_by_epoch = True

    def __getitem__(self, key):
        epoch, i = key
        return {"x": self.x[i] + 0.1 * epoch, "y": self.y[i]}


def toy_run(out, cfg=TOY, stop_at=None, nan_at=None, data=Toy):
    """run_phase on ``ToyTask``; -> (the saved weights, the summary)."""
    task = ToyTask(data(), stop_at, nan_at)
    summary = run_phase(task, task.dataset, LoopSettings.from_dict(cfg), out, seed=3, device=CPU,
                        fingerprint={"toy": 1})
    return task.saved, summary


def rows(path, drop=("samples_per_s",)):
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if k not in drop} for r in csv.DictReader(fh)]


def assert_same_state(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


def test_interrupted_phase_resumes_exactly(tmp_path):
    ref, ref_summary = toy_run(tmp_path / "ref")
    assert ref_summary["resumed_from_step"] is None and ref_summary["steps"] == 9
    assert not (tmp_path / "ref" / CHECKPOINT).exists()  # removed once the final weights are written
    every2 = {**TOY, "checkpoint_every": 2}
    with pytest.raises(Interrupted):  # checkpoints after steps 2, 3 (epoch end), 4; step 5 is logged, then stop
        toy_run(tmp_path / "b", cfg=every2, stop_at=5)
    state = checkpoint_state(tmp_path / "b" / CHECKPOINT)
    assert (state["step"], state["epoch"], state["pos"]) == (4, 1, 1)  # mid-epoch
    got, summary = toy_run(tmp_path / "b", cfg=every2)
    assert summary["resumed_from_step"] == 4
    assert_same_state(ref, got)
    assert [h["loss"] for h in summary["history"]] == [h["loss"] for h in ref_summary["history"]]
    assert rows(tmp_path / "b" / "metrics.csv") == rows(tmp_path / "ref" / "metrics.csv")
    train_rows = [r for r in rows(tmp_path / "ref" / "metrics.csv") if r["split"] == "train"]
    assert [float(r["lr"]) for r in train_rows] == pytest.approx(
        [TOY["lr"] * warmup_cosine(s, 9, 3, TOY["lr"], TOY["min_lr"]) for s in range(9)], rel=1e-3)
    assert all(float(r["noise"]) > 0 for r in train_rows)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    ref, _ = toy_run(tmp_path / "ref")
    with pytest.raises(FloatingPointError, match="non-finite loss.*step 4.*is kept"):
        toy_run(tmp_path / "b", nan_at=4)
    ckpt = tmp_path / "b" / CHECKPOINT
    assert checkpoint_state(ckpt)["step"] == 4
    assert all(torch.isfinite(v).all() for v in load_file(ckpt).values() if v.is_floating_point())
    got, summary = toy_run(tmp_path / "b")  # the checkpoint is good: resuming gives the uninterrupted result
    assert summary["resumed_from_step"] == 4
    assert_same_state(ref, got)


def test_deferred_syncs_stop_at_the_next_check_and_keep_only_checked_checkpoints(tmp_path):
    """sync_every > 1 (the CUDA default): a non-finite loss is found when the values reach the host,
    no checkpoint is written after it, and the last one resumes to the uninterrupted result."""
    ref, _ = toy_run(tmp_path / "ref")
    deferred = {**TOY, "checkpoint_every": 0, "checkpoint_minutes": 0, "sync_every": 50}
    with pytest.raises(FloatingPointError, match="non-finite loss.*step 4.*found at the sync.*is kept"):
        toy_run(tmp_path / "b", cfg=deferred, nan_at=4)  # step 4 is in epoch 1; the check comes at its end
    ckpt = tmp_path / "b" / CHECKPOINT
    assert checkpoint_state(ckpt)["step"] == 3  # epoch 0's: written after its check
    assert all(torch.isfinite(v).all() for v in load_file(ckpt).values() if v.is_floating_point())
    got, summary = toy_run(tmp_path / "b", cfg=deferred)
    assert summary["resumed_from_step"] == 3
    assert_same_state(ref, got)


def test_sync_every_changes_when_values_reach_the_host_not_what_is_computed(tmp_path):
    ref, _ = toy_run(tmp_path / "ref")
    got, _ = toy_run(tmp_path / "b", cfg={**TOY, "sync_every": 2})
    assert_same_state(ref, got)
    assert rows(tmp_path / "b" / "metrics.csv") == rows(tmp_path / "ref" / "metrics.csv")


@pytest.mark.parametrize("minutes, step", [(1e-9, 5), (0, 3)])
def test_checkpoints_by_time(tmp_path, minutes, step):
    """checkpoint_minutes: mid-epoch checkpoints when that much time has passed (here: always);
    0 leaves only the epoch ends. Either resumes to the uninterrupted result."""
    ref, _ = toy_run(tmp_path / "ref")
    cfg = {**TOY, "checkpoint_every": 0, "checkpoint_minutes": minutes}
    with pytest.raises(Interrupted):
        toy_run(tmp_path / "b", cfg=cfg, stop_at=5)
    assert checkpoint_state(tmp_path / "b" / CHECKPOINT)["step"] == step
    got, summary = toy_run(tmp_path / "b", cfg=cfg)
    assert summary["resumed_from_step"] == step
    assert_same_state(ref, got)


def test_a_checkpoint_is_a_snapshot_written_off_the_training_thread(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    payload = checkpoint_payload({"model": model}, opt, {"step": 1})
    with torch.no_grad():
        model.weight.add_(1.0)  # training goes on while the file is written
    writer = CheckpointWriter()
    writer.submit(tmp_path / "c.safetensors", payload)
    writer.wait()
    saved = load_file(tmp_path / "c.safetensors")
    assert torch.equal(saved["model.weight"], before["weight"]) and not torch.equal(saved["model.weight"], model.weight)
    assert checkpoint_state(tmp_path / "c.safetensors")["step"] == 1
    writer.submit(tmp_path / "missing" / "c.safetensors", payload)  # a failed write surfaces on the next wait
    with pytest.raises(Exception, match="No such file"):
        writer.wait()


def test_persistent_loader_workers_follow_the_epoch(tmp_path):
    """Two workers that live across epochs give the same training as the main process: the epoch
    travels with each key."""
    ref, _ = toy_run(tmp_path / "ref", data=KeyedToy)
    got, _ = toy_run(tmp_path / "w", cfg={**TOY, "workers": 2}, data=KeyedToy)
    assert_same_state(ref, got)
    assert rows(tmp_path / "w" / "metrics.csv") == rows(tmp_path / "ref" / "metrics.csv")
    plain, _ = toy_run(tmp_path / "plain")  # set_epoch instead of keys: the same numbers
    assert_same_state(ref, plain)


def test_loader_workers_auto_is_none_on_the_cpu():
    assert loader_workers("auto", CPU) == 0 and loader_workers(3, CPU) == 3
    assert 1 <= loader_workers("auto", torch.device("cuda")) <= 8


def test_other_settings_refuse_the_checkpoint_unless_resume_is_off(tmp_path):
    with pytest.raises(Interrupted):
        toy_run(tmp_path, stop_at=3)
    other = {**TOY, "lr": 0.01}
    with pytest.raises(RuntimeError, match=f"{tmp_path}.*train.lr"):
        toy_run(tmp_path, cfg=other)
    assert checkpoint_state(tmp_path / CHECKPOINT)["step"] == 3
    ref, _ = toy_run(tmp_path / "ref", cfg=other)
    got, summary = toy_run(tmp_path, cfg={**other, "resume": False})
    assert summary["resumed_from_step"] is None
    assert_same_state(ref, got)
    # runtime-only settings (threads, checkpoint frequency, ...) do not block a resume
    with pytest.raises(Interrupted):
        toy_run(tmp_path / "c", stop_at=3)
    _, summary = toy_run(tmp_path / "c", cfg={**TOY, "checkpoint_every": 5, "threads": 7})
    assert summary["resumed_from_step"] == 3


def test_precision_is_bf16_only_on_cuda():
    assert autocast_dtype("auto", CPU) is None and autocast_dtype("bf16", CPU) is None
    assert autocast_dtype("bf16", torch.device("cuda")) is torch.bfloat16
    assert autocast_dtype("fp32", torch.device("cuda")) is None
    with pytest.raises(ValueError, match="precision"):
        autocast_dtype("fp16", CPU)


# ---- the real phase 2 in a subprocess, killed with SIGKILL -----------------------------------

SCRIPT = "import json, sys; from ctvlp.training.phases import run; a = json.loads(sys.argv[1]); " \
         "run('align', a['cases'], a['reports'], a['out'], a['model'], a['train'], 1)"


def test_sigkilled_training_resumes_to_identical_weights(tiny_cohort, tmp_path, caplog):
    cfg_model = {"widths": [4, 8, 8, 16], "embed_dim": 16, "heads": 2, "text_max_length": 32, "token_stage": 3}
    cfg_train = config.validate({"train": {"epochs": 2, "batch_size": 2, "crop_size": [32, 32, 48], "lr": 1e-3,
                                           "threads": 1, "device": "cpu"}})["train"]
    cfg_train["checkpoint_every"] = 1
    args = {"cases": str(tiny_cohort["cases"]), "reports": str(tiny_cohort["reports"]), "model": cfg_model, "train": cfg_train,
            "out": str(tmp_path / "run")}
    proc = subprocess.Popen([sys.executable, "-c", SCRIPT, json.dumps(args)], env=dict(os.environ, OMP_NUM_THREADS="1"),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt = tmp_path / "run" / CHECKPOINT

    def kill_at_first_checkpoint():
        deadline = time.time() + 300
        while not ckpt.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.01)
        proc.send_signal(signal.SIGKILL)

    killer = threading.Thread(target=kill_at_first_checkpoint, daemon=True)
    killer.start()
    paths = [tiny_cohort["cases"], tiny_cohort["reports"]]
    run("align", *paths, tmp_path / "ref", cfg_model, cfg_train, 1)  # the uninterrupted reference, meanwhile
    killer.join()
    out = proc.communicate()[0]
    assert proc.returncode == -signal.SIGKILL, out[-3000:]
    assert not (tmp_path / "run" / "model.safetensors").exists()
    # the rows so far live outside the declared output metrics.csv, which Snakemake deletes before a rerun
    assert (tmp_path / "run" / RUNNING_METRICS).stat().st_size > 0 and not (tmp_path / "run" / "metrics.csv").exists()
    assert 1 <= checkpoint_state(ckpt)["step"] < 6  # 6 training cases / batch 2 * 2 epochs
    with caplog.at_level(logging.INFO, logger="ctvlp.training"):
        summary = run("align", *paths, tmp_path / "run", cfg_model, cfg_train, 1)
    assert "resuming from" in caplog.text and not ckpt.exists() and not (tmp_path / "run" / RUNNING_METRICS).exists()
    ref, got = (load_file(tmp_path / d / "model.safetensors") for d in ("ref", "run"))
    assert_same_state(ref, got)
    assert rows(tmp_path / "run" / "metrics.csv") == rows(tmp_path / "ref" / "metrics.csv")
    assert len([r for r in rows(tmp_path / "run" / "metrics.csv") if r["split"] == "val"]) == 2
    info = json.loads((tmp_path / "run" / "config.json").read_text(encoding="utf-8"))
    assert info["resumed_from_step"] == summary["resumed_from_step"] >= 1
    assert info["trainable"]["align"] and not any(n.startswith("text_encoder.") for n in info["trainable"]["align"])
    assert "trainable tensors" in caplog.text


# ---- DDP: 2 gloo processes against one process on the global batch ---------------------------

def test_ddp_with_gathered_negatives_matches_one_process(tmp_path):
    """Two gloo processes started by the training launcher (torchrun, as the workflow's training
    rule starts `ctvlp train` with train.gpus 2) give the loss and gradients of one process on the
    whole batch."""
    from ddp_worker import ddp_case, loss_and_grads

    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run([*launch.command(2, module="ddp_worker"), str(tmp_path)], env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    torch.set_num_threads(1)
    for empty_half in (False, True):
        single = loss_and_grads(*ddp_case(empty_half))
        assert single["pairs"].item() > 8 and any(k.startswith("grad.txt_pool") for k in single)
        for rank in range(2):
            got = load_file(tmp_path / f"{empty_half}.rank{rank}.safetensors")
            assert got.keys() == single.keys()
            assert got["pairs"].item() == single["pairs"].item()  # the loss saw the global batch
            assert torch.allclose(got["loss"], single["loss"], atol=1e-6)
            for k, v in single.items():
                assert torch.allclose(got[k], v, rtol=1e-4, atol=1e-7), (empty_half, rank, k)


def test_ddp_phase3_codebooks_come_from_the_rank_that_initialised_them(tmp_path):
    """Phase 3 under 2 processes: each initialises its codebooks from its own rows; afterwards
    both hold the same state, every codebook set up by the lowest rank that saw its anatomy (the
    one-process result on that rank's rows, then the EMA state averaged), token statistics from
    rank 0. Runs in the same 2 processes as the test above."""
    from ddp_worker import vq_case, vq_step

    if not (tmp_path / "vq.rank0.safetensors").exists():
        test_ddp_with_gathered_negatives_matches_one_process(tmp_path)
    got = [load_file(tmp_path / f"vq.rank{r}.safetensors") for r in range(2)]
    for k in got[0]:
        assert torch.equal(got[0][k], got[1][k]), k  # identical on both processes
    alone = [vq_step(*vq_case(r)) for r in range(2)]  # each rank's own step, one process
    assert torch.equal(got[0]["token_mean"], alone[0]["token_mean"])
    assert not torch.allclose(alone[0]["codebook"][0], alone[1]["codebook"][0])  # the ranks' inits differ
    for j, owner in ((0, 0), (1, 0), (2, 1)):  # anatomy 2 only on rank 1
        assert torch.allclose(got[0]["codebook"][j], alone[owner]["codebook"][j], atol=1e-6), j
    assert got[0]["initialised"].all()


def test_the_launcher_is_one_process_or_torchrun():
    assert launch.command(1) == ["ctvlp"]
    cmd = launch.command(4)
    assert cmd[1:] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "-m", "ctvlp.cli"]
    assert launch.shell_prefix(2).startswith("python -m torch.distributed.run --standalone --nproc_per_node=2")
    with pytest.raises(ValueError):
        launch.command(0)


def test_best_val_selection_keeps_the_lowest_validation_epoch(tmp_path):
    """select best_val: the final weights are those after the epoch with the lowest validation
    loss; with last, those after the last epoch."""
    torch.manual_seed(0)
    after_epoch, val_losses, saved = {}, iter([3.0, 1.0, 2.0]), {}

    class Scripted(PhaseTask):
        name = "toy"

        def step(self, batch):
            return F.mse_loss(self.model(batch["x"]).squeeze(-1), batch["y"]), len(batch["x"]), {}

        def validate(self):  # scripted losses; remember the weights each epoch ends with
            after_epoch[len(after_epoch)] = {k: v.clone() for k, v in self.model.state_dict().items()}
            return next(val_losses)

        def save(self, summary):
            saved.update(model_state(self.model))

    summary = run_phase(Scripted(torch.nn.Linear(3, 1)), Toy(), LoopSettings.from_dict({**TOY, "select": "best_val"}),
                        tmp_path, seed=0, device=CPU)
    assert summary["selected_epoch"] == 1
    assert_same_state(saved, after_epoch[1])
    assert not (tmp_path / "best.safetensors").exists() and not (tmp_path / CHECKPOINT).exists()
    assert not all(torch.equal(saved[k], after_epoch[2][k]) for k in saved)  # not the last epoch's


def test_optimizer_adam_is_the_papers_and_adamw_decouples_the_decay(tmp_path):
    """train.optimizer, hand-computed on one scalar's first step (Adam's first update is lr times
    the sign of its gradient): p = 1, loss gradient 0.5, lr 0.1, weight decay 0.1. Adam adds the
    decay to the gradient (0.6, same sign): p = 1 - 0.1 = 0.9. AdamW decays p first (1 - 0.1 * 0.1)
    and then takes the step: 0.89. The loop uses the configured one, and a checkpoint written under
    the other refuses to resume."""
    for name, expected in (("adam", 0.9), ("adamw", 0.89)):
        p = torch.nn.Parameter(torch.tensor([1.0]))
        opt = make_optimizer(name, [p], lr=0.1, weight_decay=0.1)
        (0.5 * p).sum().backward()
        opt.step()
        assert p.item() == pytest.approx(expected, abs=1e-6), name
    with pytest.raises(ValueError, match="optimizer"):
        make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], 0.1, 0.0)
    adam, _ = toy_run(tmp_path / "adam", cfg={**TOY, "optimizer": "adam"})
    adamw, _ = toy_run(tmp_path / "adamw", cfg={**TOY, "optimizer": "adamw"})
    default, _ = toy_run(tmp_path / "default")
    assert_same_state(adamw, default)  # AdamW is the default
    assert any(not torch.equal(adam[k], adamw[k]) for k in adam)
    assert LoopSettings.from_dict({**TOY, "optimizer": "adam"}).numbers()["optimizer"] == "adam"
