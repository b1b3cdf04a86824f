rule certify:
    input:
        model=f"{RESULTS}/models/{{method}}_sigma{{sigma}}/model.pt",
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        tsv=f"{RESULTS}/certify/{{method}}_sigma{{sigma}}.tsv",
        summary=f"{RESULTS}/certify/{{method}}_sigma{{sigma}}.json",
    params:
        **RUN,
        settings={"certify": config["certify"], "engine": config["engine"], "radii": config["report"]["radii"]},
    log:
        f"{LOGS}/certify/{{method}}_sigma{{sigma}}.log",
    threads: config["resources"]["certify"]["threads"]
    resources:
        **stage_resources("certify"),
    shell:
        "{params.arq} certify --config {params.config} --threads {threads} --method {wildcards.method} "
        "--sigma {wildcards.sigma} "
        "--model {input.model} --data {input.data} --manifest {input.manifest} "
        "--out {output.tsv} --summary {output.summary}"
        + LOGGED
