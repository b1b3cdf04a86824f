from arq.report import outputs as report_outputs

REPORT_OUT = report_outputs(f"{RESULTS}/report", FIGURES, searches=bool(SEARCHED), quantized=METHODS != ["fp32"])
# Captions of the items in `snakemake --report` (workflow/report/*.rst, templated with the profile's settings).
CAPTIONS = {"certified": "certified_accuracy", "bits": "bits_per_layer", "pareto": "acr_vs_bitops",
            "search": "search_curves", "table_md": "table", "table_csv": "table", "table_tex": "table",
            "tests_csv": "tests", "curves": "certified_accuracy"}


def reported(key, path):
    """A report output as an item of the HTML report (PNG figures and tables; PDFs and metrics.json stay plain)."""
    if key not in CAPTIONS or path.endswith(".pdf"):
        return path
    kind = "Figures" if path.endswith(".png") else "Tables"
    return report(path, caption=f"../report/{CAPTIONS[key]}.rst", category=f"Comparison ({PROFILE})",
                  subcategory=kind)


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
        "--report-dir {params.report_dir} --figures-dir {params.figures_dir}"
        + LOGGED
