rule prepare_data:
    output:
        data=layout.prepared_data(config),
        manifest=f"{PREPARED}/manifest.json",
    params:
        **RUN,
        settings=config["data"],
    log:
        f"{LOGS}/prepare_data.log",
    threads: config["resources"]["prepare"]["threads"]
    resources:
        **stage_resources("prepare"),
    shell:
        "{params.arq} prepare --config {params.config} --threads {threads} "
        "--out {output.data} --manifest-out {output.manifest}"
        + LOGGED
