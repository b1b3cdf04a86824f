rule sweep:
    input:
        model=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/model.pt",
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        points=f"{RESULTS}/sweep/fp32{{basetag}}_sigma{{sigma}}.csv",
        summary=f"{RESULTS}/sweep/fp32{{basetag}}_sigma{{sigma}}.json",
    params:
        **RUN,
        settings={"sweep": config["sweep"], "model": config["model"], "quant": config["quant"],
                  "finetune": config["finetune"], "certify": config["certify"], "engine": config["engine"]},
        points_dir=lambda w: f"{RESULTS}/sweep/fp32{w.basetag}_sigma{w.sigma}",  # per-point records: resumable
    log:
        f"{LOGS}/sweep/fp32{{basetag}}_sigma{{sigma}}.log",
    threads: config["resources"]["finetune"]["threads"]
    resources:
        **stage_resources("finetune"),
    shell:
        "{params.arq} sweep --config {params.config} --threads {threads} --sigma {wildcards.sigma} "
        "--base fp32{wildcards.basetag} --model {input.model} --data {input.data} --manifest {input.manifest} "
        "--out-csv {output.points} --summary {output.summary} --out-dir {params.points_dir}"
        + LOGGED
