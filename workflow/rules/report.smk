from arq.report import outputs as report_outputs

REPORT_OUT = report_outputs(layout.report_dir(config), FIGURES, searches=bool(SEARCHED), quantized=METHODS != ["fp32"],
                            robust=len(layout.bases(config)) > 1, sweep=config["sweep"]["enabled"])


rule report:
    input:
        **layout.report_inputs(config),
    output:
        *[reported(k, f) for k, v in REPORT_OUT.items() if isinstance(v, tuple) for f in v],  # figures (PNG, PDF)
        **{k: reported(k, v) for k, v in REPORT_OUT.items() if isinstance(v, str)},  # tables
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
        "--sweeps {input.sweeps} "
        "--report-dir {params.report_dir} --figures-dir {params.figures_dir}"
        + LOGGED
