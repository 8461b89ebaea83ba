# ViSD-Boost's four phases, one rule each, every phase starting from the previous one's model:
#   results/train/visual_cl -> align -> normality -> boost   (the full method)
# and the ablation's other chains (Table 5), built by the `ablation` target:
#   results/ablation/fvlm/align                     fVLM: phase 2 only
#   results/ablation/fvlm_icl/visual_cl -> align    instance-level visual CL, then phase 2
#   results/ablation/clip/global                    CLIP-style global alignment


wildcard_constraints:
    chain="train|ablation/fvlm|ablation/fvlm_icl|ablation/clip",


rule train_visual_cl:
    input:
        unpack(phase_inputs()),
    output:
        weights=R("{chain}/visual_cl/model.safetensors"),
        config=R("{chain}/visual_cl/config.json"),
        metrics=R("{chain}/visual_cl/metrics.csv"),
    params:
        **phase_rule_params("visual_cl"),
    log:
        R("logs/{chain}/train_visual_cl.log"),
    benchmark:
        R("benchmarks/{chain}/train_visual_cl.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        TRAIN_SHELL


rule train_align:
    input:
        unpack(phase_inputs("visual_cl")),
    output:
        weights=R("{chain}/align/model.safetensors"),
        config=R("{chain}/align/config.json"),
        metrics=report(R("{chain}/align/metrics.csv"), caption="../report/train_metrics.rst", category="Training"),
    params:
        **phase_rule_params("align"),
    log:
        R("logs/{chain}/train_align.log"),
    benchmark:
        R("benchmarks/{chain}/train_align.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        TRAIN_SHELL


rule train_normality:
    input:
        unpack(phase_inputs("align")),
    output:
        weights=R("{chain}/normality/model.safetensors"),
        config=R("{chain}/normality/config.json"),
        metrics=R("{chain}/normality/metrics.csv"),
    params:
        **phase_rule_params("normality"),
    log:
        R("logs/{chain}/train_normality.log"),
    benchmark:
        R("benchmarks/{chain}/train_normality.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        TRAIN_SHELL


rule train_boost:
    input:
        unpack(phase_inputs("normality")),
    output:
        weights=R("{chain}/boost/model.safetensors"),
        config=R("{chain}/boost/config.json"),
        metrics=R("{chain}/boost/metrics.csv"),
    params:
        **phase_rule_params("boost"),
    log:
        R("logs/{chain}/train_boost.log"),
    benchmark:
        R("benchmarks/{chain}/train_boost.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        TRAIN_SHELL


rule train_global:
    input:
        unpack(phase_inputs()),
    output:
        weights=R("{chain}/global/model.safetensors"),
        config=R("{chain}/global/config.json"),
        metrics=R("{chain}/global/metrics.csv"),
    params:
        **phase_rule_params("global"),
    log:
        R("logs/{chain}/train_global.log"),
    benchmark:
        R("benchmarks/{chain}/train_global.tsv")
    threads: config["train"]["threads"]
    resources:
        mem_mb=8000,
        gpu=TRAIN_GPU,
    conda:
        "../../envs/train.yaml"
    shell:
        TRAIN_SHELL
