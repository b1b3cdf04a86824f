rule search:
    input:
        model=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/model.pt",
        cache=rules.irs_cache.output.cache,
        data=rules.prepare_data.output.data,
        manifest=rules.prepare_data.output.manifest,
    output:
        policy=f"{RESULTS}/policies/{{search}}_b{{budget}}{{basetag}}_s{{seed}}_sigma{{sigma}}.json",
        episodes=f"{RESULTS}/search/{{search}}_b{{budget}}{{basetag}}_s{{seed}}_sigma{{sigma}}.csv",
        curve=report(f"{FIGURES}/search/{{search}}_b{{budget}}{{basetag}}_s{{seed}}_sigma{{sigma}}.png",
                      caption="../report/search_curve.rst", category=f"Searches ({PROFILE})"),
    params:
        **RUN,
        settings=search_settings(config),
        state=lambda w: f"{RESULTS}/search/{w.search}_b{w.budget}{w.basetag}_s{w.seed}_sigma{w.sigma}.state.pt",
    log:
        f"{LOGS}/search/{{search}}_b{{budget}}{{basetag}}_s{{seed}}_sigma{{sigma}}.log",
    threads: config["resources"]["search"]["threads"]
    resources:
        **stage_resources("search"),
    shell:
        "{params.arq} search --config {params.config} --threads {threads} --method {wildcards.search} "
        "--sigma {wildcards.sigma} --budget {wildcards.budget} --seed {wildcards.seed} --model {input.model} "
        "--cache {input.cache} --base fp32{wildcards.basetag} "
        "--data {input.data} --manifest {input.manifest} --out-policy {output.policy} "
        "--out-csv {output.episodes} --out-png {output.curve} --state {params.state}"
        + LOGGED
