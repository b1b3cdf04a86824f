rule train_base:
    input:
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        model=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/model.pt",
        metrics=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/train.json",
        history=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/train.csv",
    params:
        **RUN,
        # a robust variant also depends on its robust_base settings; the plain base on the recipe alone
        settings=lambda w: {"model": config["model"], "train": config["train"],
                            **({"robust_base": variant_settings(config, f"fp32{w.basetag}")} if w.basetag else {})},
    log:
        f"{LOGS}/train_base/fp32{{basetag}}_sigma{{sigma}}.log",
    threads: config["resources"]["train"]["threads"]
    resources:
        **stage_resources("train"),
    shell:
        "{params.arq} train --config {params.config} --threads {threads} --sigma {wildcards.sigma} "
        "--base fp32{wildcards.basetag} "
        "--data {input.data} --manifest {input.manifest} --out {output.model} "
        "--metrics {output.metrics} --log-csv {output.history}"
        + LOGGED
