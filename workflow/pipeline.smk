# One architecture's pipeline: every stage, and `targets`, the files it ends in. The Snakefile includes it as it
# is for a profile of one architecture, and as one module per architecture (rules prefixed <arch>_) otherwise.
include: "rules/common.smk"
include: "rules/data.smk"
include: "rules/train.smk"
include: "rules/quant.smk"
include: "rules/certify.smk"
include: "rules/irs.smk"
include: "rules/search.smk"
include: "rules/hawq.smk"
include: "rules/sweep.smk"
include: "rules/report.smk"


rule targets:
    input:
        rules.report.output,
        IRS_OUTPUTS,
