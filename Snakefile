# ARQ reproduction pipeline. Thin by design: configuration, validation, the pipeline, and the final target.
# Run `snakemake --cores all` (paper protocol) or add `--configfile config/smoke.yaml` (CPU minutes).
from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


report: "workflow/report/workflow.rst"


include: "workflow/rules/profile.smk"


if len(PARTS) == 1 and isinstance(config["model"]["arch"], str):
    include: "workflow/pipeline.smk"

    rule all:
        default_target: True
        input:
            rules.targets.input,

else:  # one module per architecture, its results under <profile>/<arch>/
    if "resnet20" in PARTS:
        module resnet20:
            snakefile: "workflow/pipeline.smk"
            config: PARTS["resnet20"]
        use rule * from resnet20 as resnet20_*
    if "resnet50" in PARTS:
        module resnet50:
            snakefile: "workflow/pipeline.smk"
            config: PARTS["resnet50"]
        use rule * from resnet50 as resnet50_*
    if "mobilenet_v2" in PARTS:
        module mobilenet_v2:
            snakefile: "workflow/pipeline.smk"
            config: PARTS["mobilenet_v2"]
        use rule * from mobilenet_v2 as mobilenet_v2_*

    rule all:
        default_target: True
        input:
            [getattr(rules, f"{arch}_targets").input for arch in PARTS],
