rule prepare_data:
    output:
        data=f"{PREPARED}/cifar10.pt",
        manifest=f"{PREPARED}/manifest.json",
    params:
        settings=config["data"],
    log:
        f"{LOGS}/prepare_data.log",
    threads: config["resources"]["prepare"]["threads"]
    resources:
        **stage_resources("prepare"),
    shell:
        "{ARQ} prepare --config {RESOLVED_CONFIG} --threads {threads} "
        "--out {output.data} --manifest-out {output.manifest}"
        + LOGGED
