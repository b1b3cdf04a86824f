# update(): Snakemake keeps the previous prepared data (backed up, restored if the job fails) instead of
# deleting it before the job runs, so a refused source (missing, corrupt) never costs the good copy.
rule prepare_data:
    output:
        data=update(f"{PREPARED}/cifar10.pt"),
        manifest=update(f"{PREPARED}/manifest.json"),
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
