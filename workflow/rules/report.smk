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
        *[v for v in REPORT_OUT.values() if isinstance(v, str)],
        *[f for v in REPORT_OUT.values() if isinstance(v, tuple) for f in v],
    params:
        settings={"report": config["report"], "budgets": config["search"]["budgets"]},
    log:
        f"{LOGS}/report.log",
    threads: config["resources"]["report"]["threads"]
    resources:
        **stage_resources("report"),
    shell:
        "{ARQ} report --config {RESOLVED_CONFIG} --summaries {input.summaries} --tsvs {input.tsvs} "
        "--policies {input.policies} --search-csvs {input.search_csvs} --irs-caches {input.irs_caches} "
        "--report-dir {RESULTS}/report --figures-dir {FIGURES}"
        + LOGGED
