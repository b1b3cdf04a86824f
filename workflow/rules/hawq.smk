rule hessian:
    input:
        model=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/model.pt",
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        traces=f"{RESULTS}/hawq/hessian{{basetag}}_sigma{{sigma}}.json",
    params:
        **RUN,
        settings={k: v for k, v in config["hawq"].items() if k in ("images", "batch_size", "probes", "max_iterations",
                                                                   "tol", "patience", "seed")},
    log:
        f"{LOGS}/hessian/fp32{{basetag}}_sigma{{sigma}}.log",
    threads: config["resources"]["hawq"]["threads"]
    resources:
        **stage_resources("hawq"),
    shell:
        "{params.arq} hessian --config {params.config} --threads {threads} --sigma {wildcards.sigma} "
        "--model {input.model} --base fp32{wildcards.basetag} --data {input.data} --manifest {input.manifest} "
        "--out {output.traces}"
        + LOGGED


rule allocate_hawq:
    input:
        model=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/model.pt",
        traces=rules.hessian.output.traces,
    output:
        policy=f"{RESULTS}/policies/hawq_b{{budget}}{{basetag}}_sigma{{sigma}}.json",
    params:
        **RUN,
        settings={"hawq": {k: config["hawq"][k] for k in ("bits", "a_bits")}, "quant": config["quant"],
                  "model": config["model"]},
    log:
        f"{LOGS}/allocate_hawq/b{{budget}}{{basetag}}_sigma{{sigma}}.log",
    threads: 1
    resources:
        **stage_resources("report"),
    shell:
        "{params.arq} allocate-hawq --config {params.config} --sigma {wildcards.sigma} --budget {wildcards.budget} "
        "--model {input.model} --base fp32{wildcards.basetag} --hessian {input.traces} --out {output.policy}"
        + LOGGED
