# The base model of each σ: trained from scratch (train_base), or imported from a published checkpoint
# (import_base; pretrained in the profile), then noise-finetuned where it was trained without noise (finetune_base).
PRETRAINED = config["pretrained"]

if PRETRAINED is None:

    rule train_base:
        input:
            data=rules.prepare_data.output.data,
            manifest=rules.prepare_data.output.manifest,
        output:
            model=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/model.pt",
            metrics=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/train.json",
            history=f"{RESULTS}/models/fp32{{basetag}}_sigma{{sigma}}/train.csv",
        params:
            **RUN,
            # a robust variant also depends on its robust_base settings; the plain base on the recipe alone
            settings=lambda w: {"model": config["model"], "train": config["train"],
                                **({"robust_base": variant_settings(config, f"fp32{w.basetag}")} if w.basetag else {})},
        log:
            f"{LOGS}/train_base/fp32{{basetag}}_sigma{{sigma}}.log",
        threads: config["resources"]["train"]["threads"]
        resources:
            **stage_resources("train"),
        shell:
            "{params.arq} train --config {params.config} --threads {threads} --sigma {wildcards.sigma} "
            "--base fp32{wildcards.basetag} "
            "--data {input.data} --manifest {input.manifest} --out {output.model} "
            "--metrics {output.metrics} --log-csv {output.history}"
            + LOGGED

else:
    # cohen: the imported file is the base; torchvision: it is the start of finetune_base's noise finetune
    IMPORTED = "fp32" if PRETRAINED["format"] == "cohen" else "imported"

    rule import_base:
        input:
            checkpoint=lambda w: PRETRAINED["checkpoints"][w.sigma],
            data=rules.prepare_data.output.data,
            manifest=rules.prepare_data.output.manifest,
        output:
            model=f"{RESULTS}/models/{IMPORTED}_sigma{{sigma}}/model.pt",
            metrics=f"{RESULTS}/models/{IMPORTED}_sigma{{sigma}}/import.json",
        params:
            **RUN,
            settings={"model": config["model"], "pretrained": PRETRAINED},
        log:
            f"{LOGS}/import_base/sigma{{sigma}}.log",
        resources:
            **stage_resources("prepare"),
        shell:
            "{params.arq} import-base --config {params.config} --sigma {wildcards.sigma} "
            "--checkpoint {input.checkpoint} --data {input.data} --manifest {input.manifest} --out {output.model} "
            "--metrics {output.metrics}"
            + LOGGED

    if PRETRAINED["format"] == "torchvision":

        rule finetune_base:
            input:
                init=rules.import_base.output.model,
                data=rules.prepare_data.output.data,
                manifest=rules.prepare_data.output.manifest,
            output:
                model=f"{RESULTS}/models/fp32_sigma{{sigma}}/model.pt",
                metrics=f"{RESULTS}/models/fp32_sigma{{sigma}}/train.json",
                history=f"{RESULTS}/models/fp32_sigma{{sigma}}/train.csv",
            params:
                **RUN,
                settings={"model": config["model"], "pretrained": PRETRAINED},
            log:
                f"{LOGS}/finetune_base/fp32_sigma{{sigma}}.log",
            threads: config["resources"]["train"]["threads"]
            resources:
                **stage_resources("train"),
            shell:
                "{params.arq} train --config {params.config} --threads {threads} --sigma {wildcards.sigma} "
                "--init {input.init} "
                "--data {input.data} --manifest {input.manifest} --out {output.model} "
                "--metrics {output.metrics} --log-csv {output.history}"
                + LOGGED
