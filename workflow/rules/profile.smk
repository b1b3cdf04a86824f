# The profile: complete, validated, and split into the part of each architecture it runs (arq.config.split).
from arq.config import ConfigError, drop_unlisted, load, split, validate

# A profile given with --configfile must be complete on its own (later --configfile files are explicit
# overlays); otherwise Snakemake would silently fill its missing keys from config/config.yaml. Both the
# profile alone and the merged result are validated, exactly as `arq check-config PROFILE [OVERLAY...]` does.
try:
    if workflow.overwrite_configfiles:
        drop_unlisted(config, load(*workflow.overwrite_configfiles))
    PARTS = {part["model"]["arch"]: part for part in split(validate(config))}
except ConfigError as exc:
    raise WorkflowError(str(exc))


def check_device():
    """Before any job runs (not while a dry run, a report or a restamp reads the workflow)."""
    import torch

    if config["device"] == "cuda" and not torch.cuda.is_available():
        raise WorkflowError("config device is 'cuda' but no CUDA device is available")


onstart:
    check_device()
