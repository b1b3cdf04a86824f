rule certify_fp32:
    input:
        model=rules.train_base.output.model,
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        tsv=f"{RESULTS}/certify/fp32_sigma{{sigma}}.tsv",
        summary=f"{RESULTS}/certify/fp32_sigma{{sigma}}.json",
    params:
        settings={"certify": config["certify"], "radii": config["report"]["radii"]},
    log:
        f"{LOGS}/certify/fp32_sigma{{sigma}}.log",
    threads: config["resources"]["certify"]["threads"]
    resources:
        **stage_resources("certify"),
    shell:
        "{ARQ} certify --config {RESOLVED_CONFIG} --threads {threads} --method fp32 "
        "--model {input.model} --data {input.data} --manifest {input.manifest} "
        "--out {output.tsv} --summary {output.summary} > {log} 2>&1"
