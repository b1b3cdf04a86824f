# ARQ reproduction pipeline. Thin by design: configuration, validation, rule files, and the final target.
# Run `snakemake --cores all` (paper protocol) or add `--configfile config/smoke.yaml` (CPU minutes).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/common.smk"
include: "workflow/rules/data.smk"
include: "workflow/rules/train.smk"
include: "workflow/rules/quant.smk"
include: "workflow/rules/certify.smk"
include: "workflow/rules/irs.smk"
include: "workflow/rules/search.smk"
include: "workflow/rules/hawq.smk"
include: "workflow/rules/sweep.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        rules.report.output,
        IRS_OUTPUTS,
