rule irs_cache:
    input:
        model=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/model.pt",
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        cache=f"{RESULTS}/irs/cache{{basetag}}_sigma{{sigma}}.pt",
        summary=f"{RESULTS}/irs/cache{{basetag}}_sigma{{sigma}}.json",
    params:
        **RUN,
        settings={"irs": config["irs"], "engine": config["engine"]},
    log:
        f"{LOGS}/irs_cache/fp32{{basetag}}_sigma{{sigma}}.log",
    threads: config["resources"]["irs"]["threads"]
    resources:
        **stage_resources("irs"),
    shell:
        "{params.arq} irs-cache --config {params.config} --threads {threads} --sigma {wildcards.sigma} "
        "--model {input.model} --base fp32{wildcards.basetag} "
        "--data {input.data} --manifest {input.manifest} --out {output.cache} --summary {output.summary}"
        + LOGGED


rule certify_incremental:
    input:
        model=f"{RESULTS}/models/{{method}}_sigma{{sigma}}/model.pt",
        cache=base_cache,
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        tsv=f"{RESULTS}/irs/{{method}}_sigma{{sigma}}.tsv",
        summary=f"{RESULTS}/irs/{{method}}_sigma{{sigma}}.json",
    wildcard_constraints:
        method=QUANT_METHOD,
    params:
        **RUN,
        settings={"irs": config["irs"], "engine": config["engine"], "radii": config["report"]["radii"]},
    log:
        f"{LOGS}/certify_incremental/{{method}}_sigma{{sigma}}.log",
    threads: config["resources"]["irs"]["threads"]
    resources:
        **stage_resources("irs"),
    shell:
        "{params.arq} certify-incremental --config {params.config} --threads {threads} --method {wildcards.method} "
        "--sigma {wildcards.sigma} "
        "--model {input.model} --cache {input.cache} --data {input.data} --manifest {input.manifest} "
        "--out {output.tsv} --summary {output.summary}"
        + LOGGED
