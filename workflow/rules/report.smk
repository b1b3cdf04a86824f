from arq.report import outputs as report_outputs

REPORT_OUT = report_outputs(f"{RESULTS}/report", FIGURES, searches=bool(SEARCHED), quantized=METHODS != ["fp32"])


rule report:
    input:
        summaries=expand(f"{RESULTS}/certify/{{method}}_sigma{{sigma}}.json", sigma=SIGMAS, method=METHODS),
        tsvs=expand(f"{RESULTS}/certify/{{method}}_sigma{{sigma}}.tsv", sigma=SIGMAS, method=METHODS),
        policies=sorted({policy_file(m, s) for m in METHODS if m != "fp32" for s in SIGMAS}),
        search_csvs=expand(f"{RESULTS}/search/{{method}}_sigma{{sigma}}.csv", sigma=SIGMAS, method=SEARCHED),
        irs_caches=expand(f"{RESULTS}/irs/cache_sigma{{sigma}}.json", sigma=SIGMAS) if SEARCHED else [],
    output:
        *[f for v in REPORT_OUT.values() if isinstance(v, tuple) for f in v],  # figures (PNG, PDF)
        **{k: v for k, v in REPORT_OUT.items() if isinstance(v, str)},  # tables
    params:
        **RUN,
        settings={"report": config["report"], "budgets": config["search"]["budgets"]},
        report_dir=lambda w, output: os.path.dirname(output.table_md),
        figures_dir=lambda w, output: os.path.dirname(output[0]),
    log:
        f"{LOGS}/report.log",
    threads: config["resources"]["report"]["threads"]
    resources:
        **stage_resources("report"),
    shell:
        "{params.arq} report --config {params.config} --summaries {input.summaries} --tsvs {input.tsvs} "
        "--policies {input.policies} --search-csvs {input.search_csvs} --irs-caches {input.irs_caches} "
        "--report-dir {params.report_dir} --figures-dir {params.figures_dir}"
        + LOGGED
