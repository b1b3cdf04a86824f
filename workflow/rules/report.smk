rule report:
    input:
        summaries=expand(f"{RESULTS}/certify/{{method}}_sigma{{sigma}}.json", sigma=SIGMAS, method=METHODS),
        tsvs=expand(f"{RESULTS}/certify/{{method}}_sigma{{sigma}}.tsv", sigma=SIGMAS, method=METHODS),
    output:
        table_md=f"{RESULTS}/report/table.md",
        table_csv=f"{RESULTS}/report/table.csv",
        png=f"{FIGURES}/certified_accuracy.png",
        pdf=f"{FIGURES}/certified_accuracy.pdf",
    log:
        f"{LOGS}/report.log",
    threads: config["resources"]["report"]["threads"]
    resources:
        **stage_resources("report"),
    shell:
        "{ARQ} report --config {RESOLVED_CONFIG} --summaries {input.summaries} --tsvs {input.tsvs} "
        "--table-md {output.table_md} --table-csv {output.table_csv} --figure {output.png} {output.pdf}"
        + LOGGED
