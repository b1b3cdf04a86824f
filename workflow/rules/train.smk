rule train_base:
    input:
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        model=f"{RESULTS}/models/fp32_sigma{{sigma}}/model.pt",
        metrics=f"{RESULTS}/models/fp32_sigma{{sigma}}/train.json",
        history=f"{RESULTS}/models/fp32_sigma{{sigma}}/train.csv",
    params:
        **RUN,
        settings={"model": config["model"], "train": config["train"]},
    log:
        f"{LOGS}/train_base/sigma{{sigma}}.log",
    threads: config["resources"]["train"]["threads"]
    resources:
        **stage_resources("train"),
    shell:
        "{params.arq} train --config {params.config} --threads {threads} --sigma {wildcards.sigma} "
        "--data {input.data} --manifest {input.manifest} --out {output.model} "
        "--metrics {output.metrics} --log-csv {output.history}"
        + LOGGED
