# ViSD-Boost's four phases and the ablation's other chains (CHAINS in common.smk), one rule:
#   results/train/visual_cl -> align -> normality -> boost   (the full method)
#   results/ablation/fvlm/align                     fVLM: phase 2 only
#   results/ablation/fvlm_icl/visual_cl -> align    instance-level visual CL, then phase 2
#   results/ablation/clip/global                    CLIP-style global alignment
# Training reads the cases and their preprocessed folders only through qc/cases.parquet.


wildcard_constraints:
    chain="|".join(CHAINS),
    phase="visual_cl|align|normality|boost|global",


rule train:
    input:
        unpack(phase_inputs),
    output:
        weights=results_path("{chain}/{phase}/model.safetensors"),
        config=results_path("{chain}/{phase}/config.json"),
        metrics=report(results_path("{chain}/{phase}/metrics.csv"), caption="../report/train_metrics.rst", category="Training",
                       subcategory="{chain}", labels={"phase": "{phase}", "figure": "metrics (CSV)"}),
    params:
        **settings("model", "train", "seed"),
        out_dir=parent_of("weights"),
        init=lambda w, input: f"--init {shlex.quote(str(Path(input.init).parent))}" if "init" in input.keys() else "",
        contrast=lambda w: "instance" if w.chain == "ablation/fvlm_icl" else "disease",
        # one process, or torchrun with train.gpus processes on the node (data-parallel)
        launch=launch.shell_prefix(config["train"]["gpus"]),
    log:
        results_path("logs/{chain}/train_{phase}.log"),
    benchmark:
        results_path("benchmarks/{chain}/train_{phase}.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        gpu=TRAIN_GPU,
        runtime=lambda w, attempt: attempt * 24 * 60,
    conda:
        "../../envs/train.yaml"
    shell:
        "{params.launch} train --phase {wildcards.phase} --config {params.config_file:q} --sections {params.sections}"
        " --threads {threads} --cases {input.cases:q} --reports {input.reports:q} --out-dir {params.out_dir:q}"
        " {params.init} --contrast {params.contrast} --progress-fd 3 3>&2 > {log:q} 2>&1"
