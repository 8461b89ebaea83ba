"""TotalSegmentator over many cases with each nnU-Net network loaded once.

TotalSegmentator's Python API (``totalsegmentator()``) builds nnU-Net's ``nnUNetPredictor`` and
loads the checkpoint from disk on every call: its ``nnunet.nnUNet_predict_image`` (reorientation,
cropping, resampling to the model's spacing, the class map, combining the five part models, the
roi_subset crop) hands the resampled image to the module function ``nnunet.nnUNetv2_predict``,
which builds a predictor, calls ``initialize_from_trained_model_folder`` (plans, network,
``torch.load`` of ``checkpoint_final.pth``) and then ``predict_from_files``, which also spawns a
preprocessing process and an export pool for the one image. TotalSegmentator has no seam to hand in
a predictor that already exists, so ``Session`` replaces just that one function while it is active:

* every step of ``totalsegmentator()`` and ``nnUNet_predict_image`` still runs as TotalSegmentator
  wrote it, per case (a session changes nothing in how a case is pre- or postprocessed);
* ``Session.predict`` takes the place of ``nnUNetv2_predict`` with the same signature and replicates
  its steps: the model folder from nnU-Net's ``get_output_folder(task_id, trainer, plans, model)``,
  the device and torch thread count it sets, and the ``nnUNetPredictor`` arguments it passes
  (``tile_step_size`` = TotalSegmentator's step size, ``use_gaussian``, ``use_mirroring`` = tta,
  ``perform_everything_on_device``, ``checkpoint_name="checkpoint_final.pth"``). The predictor of a
  network is built and initialised the first time a case needs it and kept for the session's later
  cases (one per network: the 3 mm model with ``fast``, the five part models without it, plus the
  6 mm crop model when a roi_subset is given);
* the case is then predicted with ``predictor.predict_from_files_sequential`` (nnU-Net's in-process
  variant of ``predict_from_files``: the same ``preprocessor.run_case`` and the same
  ``export_prediction_from_logits`` that TotalSegmentator patches into nnU-Net, without starting
  worker processes per case), into the same temporary folder, so TotalSegmentator reads back the
  same ``s01.nii.gz``. tests/imaging/test_totalseg_real.py checks voxel-for-voxel equality with
  per-case ``totalsegmentator()`` calls on real CTs.

Should an installed TotalSegmentator change ``nnUNetv2_predict``'s parameters, a session logs a
warning and leaves TotalSegmentator alone: every case then loads its networks itself, as before.

``register_trainers`` makes nnU-Net find the trainer classes of the "total" models without its
recursive import of every trainer module (which imports the Primus trainers, timm, and through it
torchvision: not importable beside CPU-only torch).
"""

from __future__ import annotations

import contextlib
import importlib
import inspect
import logging
import shutil
import time
from pathlib import Path

log = logging.getLogger(__name__)

# trainers of TotalSegmentator's CT "total" models (TASK_CONFIGS["total"]) -> the nnU-Net module defining them
TRAINERS = {
    "nnUNetTrainer_4000epochs_NoMirroring":
        "nnunetv2.training.nnUNetTrainer.variants.training_length.nnUNetTrainer_Xepochs_NoMirroring",
    "nnUNetTrainerNoMirroring": "nnunetv2.training.nnUNetTrainer.variants.data_augmentation.nnUNetTrainerNoMirroring",
}
# nnUNetv2_predict's parameters as of TotalSegmentator 2.x (Session.predict mirrors them)
PREDICT_PARAMETERS = ("dir_in", "dir_out", "task_id", "model", "folds", "trainer", "tta",
                      "num_threads_preprocessing", "num_threads_nifti_save", "plans", "device", "quiet",
                      "step_size", "save_probabilities_path", "use_cropped_logits_resampling")
CHECKPOINT = "checkpoint_final.pth"


def register_trainers() -> None:
    """Add the "total" models' trainer classes to TotalSegmentator's own table of trainers
    (``totalsegmentator.nnunet.custom_trainers``, which its patched nnU-Net trainer lookup consults
    before nnU-Net's recursive search). The classes are nnU-Net's own, so the network a checkpoint
    restores is the same; only the search (and its torchvision import) is skipped."""
    import totalsegmentator.nnunet as ts_nnunet

    for name, module in TRAINERS.items():
        if name not in ts_nnunet.custom_trainers:
            ts_nnunet.custom_trainers[name] = getattr(importlib.import_module(module), name)


def _supports(func, keyword: str) -> bool:
    return keyword in inspect.signature(func).parameters


class Session:
    """nnU-Net predictors kept across ``totalsegmentator()`` calls while ``with session.active():``.

    ``loads``: networks built and loaded so far, ``load_seconds``: time spent doing so,
    ``predict_seconds``: time in nnU-Net prediction (preprocessing, network, export).
    """

    def __init__(self):
        self._predictors: dict[tuple, object] = {}
        self.loads = 0
        self.load_seconds = 0.0
        self.predict_seconds = 0.0
        self.patched = False

    @contextlib.contextmanager
    def active(self):
        """While active, TotalSegmentator's nnU-Net calls go through this session's predictors."""
        import totalsegmentator.nnunet as ts_nnunet

        original = ts_nnunet.nnUNetv2_predict
        params = tuple(inspect.signature(original).parameters)
        if params != PREDICT_PARAMETERS:
            log.warning("TotalSegmentator's nnUNetv2_predict has parameters %s, not the %s this session "
                        "replicates: every case loads its networks itself", params, PREDICT_PARAMETERS)
            yield self
            return
        ts_nnunet.nnUNetv2_predict = self.predict
        self.patched = True
        try:
            yield self
        finally:
            ts_nnunet.nnUNetv2_predict = original
            self.patched = False

    def close(self) -> None:
        """Drop the predictors (and their networks' memory)."""
        self._predictors.clear()

    @staticmethod
    def _device(device):
        """nnUNetv2_predict's device handling (and the torch thread count it sets)."""
        import multiprocessing

        import torch

        if device == "cpu":
            torch.set_num_threads(multiprocessing.cpu_count())
            return torch.device("cpu")
        if device == "cuda":
            torch.set_num_threads(1)
            return torch.device("cuda")
        if isinstance(device, torch.device):
            torch.set_num_threads(1)
            return device
        if device == "mps":
            return torch.device("mps")
        raise ValueError(f"device must be cpu, cuda, mps or a torch.device, not {device!r}")

    def predictor(self, model_folder: str, folds, step_size: float, tta: bool, device, quiet: bool):
        """The nnUNetPredictor of a model folder, built and loaded on first use (as nnUNetv2_predict
        builds it)."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        key = (str(model_folder), None if folds is None else tuple(folds), float(step_size), bool(tta), str(device))
        if key not in self._predictors:
            tick = time.perf_counter()
            device_kw = ("perform_everything_on_gpu" if _supports(nnUNetPredictor, "perform_everything_on_gpu")
                         else "perform_everything_on_device")
            predictor = nnUNetPredictor(tile_step_size=step_size, use_gaussian=True, use_mirroring=tta,
                                        device=device, verbose=False, verbose_preprocessing=False,
                                        allow_tqdm=not quiet, **{device_kw: True})
            predictor.initialize_from_trained_model_folder(model_folder, use_folds=folds, checkpoint_name=CHECKPOINT)
            self._predictors[key] = predictor
            self.loads += 1
            seconds = time.perf_counter() - tick
            self.load_seconds += seconds
            log.info("TotalSegmentator network %s loaded in %.2f s (once for this session)",
                     Path(model_folder).parent.name, seconds)
        return self._predictors[key]

    def predict(self, dir_in, dir_out, task_id, model="3d_fullres", folds=None, trainer="nnUNetTrainer", tta=False,
                num_threads_preprocessing=3, num_threads_nifti_save=2, plans="nnUNetPlans", device="cuda",
                quiet=False, step_size=0.5, save_probabilities_path=None, use_cropped_logits_resampling=False):
        """Drop-in for ``totalsegmentator.nnunet.nnUNetv2_predict`` (same parameters and outputs:
        ``dir_out``/s01.nii.gz, the probabilities copied when asked) with the predictor kept.
        The thread counts only sized nnU-Net's worker processes, which this in-process route has none of."""
        from nnunetv2.utilities.file_path_utilities import get_output_folder

        model_folder = get_output_folder(task_id, trainer, plans, model)
        torch_device = self._device(device)
        predictor = self.predictor(model_folder, folds, step_size, tta, torch_device, quiet)
        save_probabilities = save_probabilities_path is not None
        kwargs = {}
        if (use_cropped_logits_resampling and not save_probabilities
                and _supports(predictor.predict_from_files_sequential, "use_cropped_logits_resampling")):
            kwargs["use_cropped_logits_resampling"] = True
        tick = time.perf_counter()
        predictor.predict_from_files_sequential(str(dir_in), str(dir_out), save_probabilities=save_probabilities,
                                                overwrite=True, folder_with_segs_from_prev_stage=None, **kwargs)
        self.predict_seconds += time.perf_counter() - tick
        if save_probabilities:
            shutil.copy(Path(dir_out) / "s01.npz", save_probabilities_path)
            shutil.copy(Path(dir_out) / "s01.pkl", Path(save_probabilities_path).with_suffix(".pkl"))
