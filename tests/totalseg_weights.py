"""TotalSegmentator model folders with random weights, in TotalSegmentator's own weights layout.

``write_model(home, task_id, arch)`` writes, under a TotalSegmentator home folder (what
TOTALSEG_HOME_DIR points at),

    <home>/nnunet/results/<Dataset folder of task_id>/<trainer>__nnUNetPlans__3d_fullres/
        dataset.json  plans.json  fold_0/checkpoint_final.pth

the folder name and trainer taken from TotalSegmentator's own task tables (``TASK_ID_WEIGHTS_CONFIGS``,
``TASK_CONFIGS``), the labels from its class map (task "total", v2: 117 classes), the network built
by nnU-Net's own code from the plans (``nnUNetTrainer.build_network_architecture``, the function
``nnUNetPredictor.initialize_from_trained_model_folder`` restores it with) and the checkpoint saved
with the keys ``nnUNetTrainer.save_checkpoint`` writes. The weights are random (seeded): enough to
run TotalSegmentator's whole code path offline, not to segment anything meaningful.

``SMALL`` is a 3-stage network with 4-16 features (a few thousand parameters, seconds on a CPU) for
the tests; ``FAST_3MM`` is the architecture of TotalSegmentator's published 3 mm "fast" model
(nnU-Net v2's default 3d_fullres PlainConvUNet for an isotropic 3 mm dataset: 6 stages, 32-320
features, 128^3 patch), for timings with real load times.

Used by tests/imaging/test_totalseg_real.py and benchmarks/segment_shard.py (via sys.path).
"""

from __future__ import annotations

import json
from pathlib import Path

PLANS = "nnUNetPlans"
CONFIGURATION = "3d_fullres"

SMALL = {"n_stages": 3, "features": [4, 8, 16], "patch_size": [128, 112, 128]}
FAST_3MM = {"n_stages": 6, "features": [32, 64, 128, 256, 320, 320], "patch_size": [128, 128, 128]}
# Foreground CT intensities nnU-Net's CTNormalization clips and standardises with (the planner's
# statistics over all training foreground voxels; values typical of TotalSegmentator's dataset).
CT_INTENSITIES = {"max": 3071.0, "mean": 68.0, "median": 40.0, "min": -1024.0, "percentile_00_5": -985.0,
                  "percentile_99_5": 1350.0, "std": 288.0}


def task_folder(task_id: int) -> str:
    from totalsegmentator.map_tasks_config import TASK_ID_WEIGHTS_CONFIGS

    return TASK_ID_WEIGHTS_CONFIGS[task_id]["foldername"]


def task_trainer(task_id: int) -> str:
    """The nnU-Net trainer TotalSegmentator names for a "total" task id (its TASK_CONFIGS)."""
    from totalsegmentator.map_tasks_config import TASK_CONFIGS

    for mode in TASK_CONFIGS["total"]["sub_modes"].values():
        ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
        if task_id in ids:
            return mode["trainer"]
    raise KeyError(f"task id {task_id} is not one of TotalSegmentator's 'total' models")


def task_labels(task_id: int) -> dict[str, int]:
    """{class name: label} the model outputs: the "total" class map for the 3 mm / 6 mm models, a
    part's own class map (labels 1..n) for the 1.5 mm part models."""
    from totalsegmentator.map_to_binary import class_map, class_map_5_parts, map_taskid_to_partname_ct

    classes = class_map_5_parts[map_taskid_to_partname_ct[task_id]] if task_id in map_taskid_to_partname_ct \
        else class_map["total"]
    return {"background": 0, **{name: int(i) for i, name in sorted(classes.items())}}


def task_spacing(task_id: int) -> float:
    from totalsegmentator.map_tasks_config import TASK_CONFIGS

    for mode in TASK_CONFIGS["total"]["sub_modes"].values():
        ids = mode["task_id"] if isinstance(mode["task_id"], list) else [mode["task_id"]]
        if task_id in ids:
            return float(mode["resample"])
    raise KeyError(task_id)


def plans_for(task_id: int, arch: dict) -> dict:
    """An nnU-Net v2 plans.json for the task: 3d_fullres, CT normalisation, the task's isotropic
    spacing, a PlainConvUNet of ``arch`` (n_stages, features, patch_size)."""
    n, spacing = arch["n_stages"], task_spacing(task_id)
    return {
        "dataset_name": task_folder(task_id),
        "plans_name": PLANS,
        "original_median_spacing_after_transp": [spacing] * 3,
        "original_median_shape_after_transp": [160, 160, 160],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": [0, 1, 2],
        "transpose_backward": [0, 1, 2],
        "configurations": {CONFIGURATION: {
            "data_identifier": f"{PLANS}_{CONFIGURATION}",
            "preprocessor_name": "DefaultPreprocessor",
            "batch_size": 2,
            "patch_size": list(arch["patch_size"]),
            "median_image_size_in_voxels": [160, 160, 160],
            "spacing": [spacing] * 3,
            "normalization_schemes": ["CTNormalization"],
            "use_mask_for_norm": [False],
            "resampling_fn_data": "resample_data_or_seg_to_shape",
            "resampling_fn_seg": "resample_data_or_seg_to_shape",
            "resampling_fn_data_kwargs": {"is_seg": False, "order": 3, "order_z": 0, "force_separate_z": None},
            "resampling_fn_seg_kwargs": {"is_seg": True, "order": 1, "order_z": 0, "force_separate_z": None},
            "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
            "resampling_fn_probabilities_kwargs": {"is_seg": False, "order": 1, "order_z": 0,
                                                   "force_separate_z": None},
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": n,
                    "features_per_stage": list(arch["features"]),
                    "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * n,
                    "strides": [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
                    "n_conv_per_stage": [2] * n,
                    "n_conv_per_stage_decoder": [2] * (n - 1),
                    "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                    "dropout_op": None,
                    "dropout_op_kwargs": None,
                    "nonlin": "torch.nn.LeakyReLU",
                    "nonlin_kwargs": {"inplace": True},
                },
                "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
            },
            "batch_dice": False,
        }},
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {"0": dict(CT_INTENSITIES)},
    }


def write_model(home, task_id: int, arch: dict = SMALL, seed: int = 0, optimizer_state: bool = False) -> Path:
    """Write the task's model folder under TotalSegmentator home ``home`` with random weights
    (seeded); returns the folder. ``optimizer_state``: also save SGD momentum buffers the size of the
    network, as a trained nnU-Net checkpoint carries them (so file size and load time are real)."""
    import torch
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    trainer = task_trainer(task_id)
    folder = Path(home) / "nnunet" / "results" / task_folder(task_id) / f"{trainer}__{PLANS}__{CONFIGURATION}"
    (folder / "fold_0").mkdir(parents=True, exist_ok=True)
    labels = task_labels(task_id)
    dataset = {"channel_names": {"0": "CT"}, "labels": labels, "numTraining": 1559, "file_ending": ".nii.gz",
               "name": task_folder(task_id)}
    plans = plans_for(task_id, arch)
    (folder / "dataset.json").write_text(json.dumps(dataset, indent=2))
    (folder / "plans.json").write_text(json.dumps(plans, indent=2))

    pm = PlansManager(plans)
    cm = pm.get_configuration(CONFIGURATION)
    torch.manual_seed(seed)
    network = nnUNetTrainer.build_network_architecture(
        pm, cm, determine_num_input_channels(pm, cm, dataset), pm.get_label_manager(dataset).num_segmentation_heads,
        enable_deep_supervision=True)
    weights = network.state_dict()
    optimizer = {"state": {}, "param_groups": []}
    if optimizer_state:
        params = list(network.parameters())
        optimizer = {"state": {i: {"momentum_buffer": torch.randn_like(p) * 1e-3} for i, p in enumerate(params)},
                     "param_groups": [{"lr": 1e-5, "momentum": 0.99, "dampening": 0, "weight_decay": 3e-5,
                                       "nesterov": True, "params": list(range(len(params)))}]}
    checkpoint = {
        "network_weights": weights,
        "optimizer_state": optimizer,
        "grad_scaler_state": None,
        "logging": {},
        "_best_ema": None,
        "current_epoch": 4000,
        "init_args": {"plans": plans, "configuration": CONFIGURATION, "fold": 0, "dataset_json": dataset,
                      "device": torch.device("cpu")},
        "trainer_name": trainer,
        "inference_allowed_mirroring_axes": None,  # the NoMirroring trainers
    }
    torch.save(checkpoint, folder / "fold_0" / "checkpoint_final.pth")
    return folder
