rule uniform:
    output:
        policy=f"{RESULTS}/policies/uniform_w{{w}}a{{a}}.json",
    params:
        **RUN,
        settings={"model": config["model"], "quant": config["quant"]},
    log:
        f"{LOGS}/uniform/w{{w}}a{{a}}.log",
    threads: 1
    resources:
        **stage_resources("report"),
    shell:
        "{params.arq} uniform --config {params.config} --bits W{wildcards.w}A{wildcards.a} --out {output.policy}"
        + LOGGED


rule finetune:
    input:
        base=base_model,
        policy=policy_path,
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        model=f"{RESULTS}/models/{{method}}_sigma{{sigma}}/model.pt",
        metrics=f"{RESULTS}/models/{{method}}_sigma{{sigma}}/finetune.json",
        history=f"{RESULTS}/models/{{method}}_sigma{{sigma}}/finetune.csv",
    wildcard_constraints:
        method=QUANT_METHOD,
    params:
        **RUN,
        settings={"model": config["model"], "quant": config["quant"], "finetune": config["finetune"]},
    log:
        f"{LOGS}/finetune/{{method}}_sigma{{sigma}}.log",
    threads: config["resources"]["finetune"]["threads"]
    resources:
        **stage_resources("finetune"),
    shell:
        "{params.arq} finetune --config {params.config} --threads {threads} --sigma {wildcards.sigma} "
        "--method {wildcards.method} --base {input.base} --policy {input.policy} "
        "--data {input.data} --manifest {input.manifest} --out {output.model} "
        "--metrics {output.metrics} --log-csv {output.history}"
        + LOGGED
