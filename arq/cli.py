"""Command-line interface: one subcommand per pipeline stage. Argument parsing only; the work is in the library."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from arq.variants import BASES

# torch and the stages are imported where a subcommand needs them, so `arq --help` answers at once.


def _device(config: dict):
    import torch

    want = config["device"]
    if want == "cuda" and not torch.cuda.is_available():
        raise SystemExit("config device is 'cuda' but no CUDA device is available")
    return torch.device("cuda" if want == "cuda" or (want == "auto" and torch.cuda.is_available()) else "cpu")


def _common(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--config", required=True, help="profile YAML (validated against the schema)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)")
    if data:
        p.add_argument("--data", required=True, help="prepared tensor file from `arq prepare`")
        p.add_argument("--manifest", required=True, help="its manifest JSON")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("check-config", help="validate a profile (plus optional overlays) and print its hash")
    p.add_argument("config", help="a complete profile YAML")
    p.add_argument("overlays", nargs="*", help="partial YAMLs applied on top, key by key, in order")

    p = sub.add_parser("prepare", help="verify CIFAR-10 and write the prepared tensor file + manifest (or list an "
                                       "ImageFolder tree: its listing + manifest)")
    _common(p, data=False)
    p.add_argument("--out", required=True,
                   help="prepared tensor file (uint8 images, labels, splits), or an ImageFolder tree's listing")
    p.add_argument("--manifest-out", required=True,
                   help="manifest JSON: source, what was verified against what, split rule, seed")

    p = sub.add_parser("train", help="noise-augmented training of the base model at one σ (resumable)")
    _common(p)
    p.add_argument("--sigma", type=float, required=True, help="noise level σ of the Gaussian augmentation")
    p.add_argument("--out", required=True, help="final checkpoint")
    p.add_argument("--metrics", required=True, help="summary JSON")
    p.add_argument("--log-csv", required=True, help="per-epoch CSV")
    p.add_argument("--resume", default=None, help="per-epoch resume checkpoint (default: <out>.resume.pt)")
    p.add_argument("--base", default="fp32", choices=BASES,
                   help="the FP32 base variant (arq.variants): plain fp32, or trained with SymReg and/or SatNL")
    p.add_argument("--init", default=None,
                   help="finetune_base: start from this imported checkpoint (import-base) with the recipe "
                        "pretrained.finetune, instead of training from scratch with train")

    p = sub.add_parser("import-base", help="convert a published checkpoint (pretrained.format) into the base model "
                                           "of one σ")
    p.add_argument("--config", required=True, help="profile YAML (validated against the schema)")
    p.add_argument("--sigma", type=float, required=True,
                   help="the σ the base serves (cohen: the σ the file was noise-trained at)")
    p.add_argument("--checkpoint", required=True, help="the published file (pretrained.checkpoints of that σ)")
    p.add_argument("--data", required=True, help="the prepared data (checked against its manifest)")
    p.add_argument("--manifest", required=True, help="the prepared data's manifest (its class count)")
    p.add_argument("--out", required=True, help="our checkpoint")
    p.add_argument("--metrics", required=True, help="summary JSON (the file's sha256, format, provenance)")

    p = sub.add_parser("uniform", help="write the uniform WxAy policy of the configured architecture")
    p.add_argument("--config", required=True, help="profile YAML (validated against the schema)")
    p.add_argument("--bits", required=True, help="e.g. W4A4 (pinned layers keep quant.pinned_bits)")
    p.add_argument("--out", required=True, help="policy JSON")

    p = sub.add_parser("finetune", help="quantize an FP32 model with a policy, calibrate, QAT under noise (resumable)")
    _common(p)
    p.add_argument("--sigma", type=float, required=True,
                   help="noise level σ of the QAT (the base checkpoint must match)")
    p.add_argument("--base", required=True, help="FP32 checkpoint trained at the same σ")
    p.add_argument("--policy", required=True, help="policy JSON")
    p.add_argument("--method", required=True,
                   help="model name recorded in the checkpoint and the report, with its seed, e.g. uniform_w4a4_s0: "
                        "the finetune draws from finetune.seed + that seed")
    p.add_argument("--out", required=True, help="quantized checkpoint")
    p.add_argument("--metrics", required=True, help="summary JSON")
    p.add_argument("--log-csv", required=True, help="per-epoch CSV")
    p.add_argument("--resume", default=None, help="per-epoch resume checkpoint (default: <out>.resume.pt)")

    p = sub.add_parser("cost", help="per-layer MACs and BitOps of an architecture, optionally under a policy")
    p.add_argument("arch", help="resnet20, resnet50 or mobilenet_v2")
    p.add_argument("--policy", default=None, help="policy JSON to price (default: FP32)")

    p = sub.add_parser("certify", help="Cohen CERTIFY on the certification subset")
    _common(p)
    p.add_argument("--sigma", type=float, required=True, help="σ the outputs are for (the checkpoint must match)")
    p.add_argument("--model", required=True, help="checkpoint to certify (FP32 or quantized)")
    p.add_argument("--out", required=True, help="TSV in Cohen's format")
    p.add_argument("--summary", required=True, help="JSON summary")
    p.add_argument("--method", default="fp32", help="model name the outputs are for (the checkpoint must match)")

    p = sub.add_parser("irs-cache", help="certify the FP32 model once on the val subset and cache it for IRS")
    _common(p)
    p.add_argument("--sigma", type=float, required=True, help="σ the cache is for (the checkpoint must match)")
    p.add_argument("--model", required=True, help="FP32 checkpoint")
    p.add_argument("--out", required=True, help="cache file")
    p.add_argument("--summary", required=True, help="JSON summary")
    p.add_argument("--base", default="fp32", choices=BASES,
                   help="the FP32 base variant (arq.variants): plain fp32, or trained with SymReg and/or SatNL")

    p = sub.add_parser("certify-incremental", help="IRS certification of a quantized model against its FP32 cache")
    _common(p)
    p.add_argument("--sigma", type=float, required=True, help="σ the outputs are for (the checkpoint must match)")
    p.add_argument("--model", required=True, help="quantized checkpoint (records its FP32 base)")
    p.add_argument("--cache", required=True, help="IRS cache of that FP32 base")
    p.add_argument("--out", required=True, help="TSV (Cohen's columns plus zeta and branch)")
    p.add_argument("--summary", required=True, help="JSON summary")
    p.add_argument("--method", required=True,
                   help="model name the outputs are for (the checkpoint must match), e.g. uniform_w4a4")

    p = sub.add_parser("search", help="mixed-precision search (arq, haq or random) at one σ and budget (resumable)")
    _common(p)
    p.add_argument("--sigma", type=float, required=True, help="noise level σ (the FP32 checkpoint must match)")
    p.add_argument("--method", required=True, choices=["arq", "haq", "random"],
                   help="arq: DDPG + certified reward; haq: DDPG + accuracy reward; "
                        "random: random actions + certified reward")
    p.add_argument("--budget", type=float, required=True, help="BitOps budget in %% of FP32")
    p.add_argument("--seed", type=int, required=True,
                   help="one of search.seeds: the agent's and the episodes' random streams")
    p.add_argument("--model", required=True, help="FP32 checkpoint trained at σ")
    p.add_argument("--cache", default=None, help="IRS cache of that model (its val images are the search's)")
    p.add_argument("--out-policy", required=True, help="best policy JSON")
    p.add_argument("--out-csv", required=True, help="per-episode CSV")
    p.add_argument("--out-png", required=True, help="learning-curve figure")
    p.add_argument("--state", default=None, help="per-episode resume checkpoint (default: <out-csv>.state.pt)")
    p.add_argument("--base", default="fp32", choices=BASES,
                   help="the FP32 base variant (arq.variants): plain fp32, or trained with SymReg and/or SatNL")

    p = sub.add_parser("hessian", help="HAWQ: Hutchinson trace of every quantizable layer's Hessian at σ")
    _common(p)
    p.add_argument("--sigma", type=float, required=True,
                   help="noise level σ of the loss (the FP32 checkpoint must match)")
    p.add_argument("--model", required=True, help="FP32 checkpoint trained at σ")
    p.add_argument("--out", required=True, help="JSON: traces per layer and the convergence history")
    p.add_argument("--base", default="fp32", choices=BASES,
                   help="the FP32 base variant (arq.variants): plain fp32, or trained with SymReg and/or SatNL")

    p = sub.add_parser("allocate-hawq", help="HAWQ: bits per layer by integer linear program (CBC) under a budget")
    p.add_argument("--config", required=True, help="profile YAML (validated against the schema)")
    p.add_argument("--sigma", type=float, required=True, help="noise level σ the traces were computed at")
    p.add_argument("--budget", type=float, required=True, help="BitOps budget in %% of FP32")
    p.add_argument("--model", required=True, help="the FP32 checkpoint the traces were computed for")
    p.add_argument("--hessian", required=True, help="JSON from `arq hessian`")
    p.add_argument("--out", required=True, help="policy JSON")
    p.add_argument("--base", default="fp32", choices=BASES,
                   help="the FP32 base variant (arq.variants): plain fp32, or trained with SymReg and/or SatNL")

    p = sub.add_parser("sweep", help="bit-width sweep of one base variant: uniform PTQ and QAT points, each certified")
    _common(p)
    p.add_argument("--sigma", type=float, required=True, help="noise level σ (the base must have been trained at it)")
    p.add_argument("--base", default="fp32", choices=BASES, help="the base variant swept (arq.variants)")
    p.add_argument("--model", required=True, help="that base's checkpoint")
    p.add_argument("--out-csv", required=True, help="one row per point")
    p.add_argument("--summary", required=True, help="JSON summary")
    p.add_argument("--out-dir", required=True, help="each point's finetune and certification records (resumable)")

    p = sub.add_parser("predict", help="Cohen PREDICT (binomial test) on the certification subset")
    _common(p)
    p.add_argument("--sigma", type=float, required=True, help="σ of the model (the checkpoint must match)")
    p.add_argument("--model", required=True, help="checkpoint to run (FP32 or quantized)")
    p.add_argument("--method", default="fp32", help="model name (the checkpoint must match)")
    p.add_argument("--out", required=True,
                   help="TSV in Cohen's format: idx label predict correct time (predict -1: abstained)")
    p.add_argument("--n", type=int, default=None, help="samples per image (default: certify.n)")
    p.add_argument("--alpha", type=float, default=None, help="test level (default: certify.alpha)")

    p = sub.add_parser("report", help="comparison table (Markdown, CSV, LaTeX, paired tests) and figures (PNG + PDF)")
    p.add_argument("--config", required=True, help="profile YAML (validated against the schema)")
    p.add_argument("--summaries", nargs="+", required=True, help="certification summaries (JSON)")
    p.add_argument("--tsvs", nargs="+", required=True, help="certification TSVs, in the same order as --summaries")
    p.add_argument("--policies", nargs="*", default=[], help="policy JSONs of the quantized models")
    p.add_argument("--search-csvs", nargs="*", default=[], help="search episode CSVs (learning-curve figure)")
    p.add_argument("--irs-caches", nargs="*", default=[],
                   help="FP32 IRS cache summaries (JSON): their time counts towards the certified-reward searches")
    p.add_argument("--sweeps", nargs="*", default=[], help="bit-width sweep CSVs (arq sweep): the sweep figure")
    p.add_argument("--report-dir", required=True, help="where table.{md,csv,tex} and tests.csv go")
    p.add_argument("--figures-dir", required=True, help="where the figures go")

    p = sub.add_parser("artifacts", help="DVC: track, push, pull and verify a profile's binary artifacts")
    p.add_argument("action", choices=("add", "push", "pull", "verify"),
                   help="add: dvc add every binary output of a finished run; push: add, then upload; pull: "
                        "download, verify and stamp in DAG order so Snakemake has nothing to rerun; verify: check "
                        "every tracked file against its .dvc record")
    p.add_argument("config", help="the profile YAML, as given to snakemake --configfile")
    p.add_argument("overlays", nargs="*", help="further --configfile YAMLs of the run, in order")
    p.add_argument("--remote", default=None, help="DVC remote name (default: the repository's default remote)")
    p.add_argument("--partial", action="store_true",
                   help="a run done in pieces: add/push/pull what is there and list the jobs left, instead of "
                        "refusing an unfinished workflow")

    p = sub.add_parser("sample-tree", help="write a small ImageFolder tree of random images (the imagenet-smoke "
                                           "profile's data; not ImageNet)")
    p.add_argument("out", help="the tree's root (train/ and val/ go under it)")
    p.add_argument("--classes", type=int, default=5, help="number of classes (folders n00000000, n00000001, ...)")
    p.add_argument("--train", type=int, default=16, help="training images per class")
    p.add_argument("--val", type=int, default=6, help="val images per class")
    p.add_argument("--size", type=int, default=40, help="image width in pixels (heights vary a little)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pixels")

    p = sub.add_parser("regenerate", help="rebuild a profile's tables and figures from its committed text results")
    p.add_argument("--config", required=True, help="profile YAML (validated against the schema)")
    p.add_argument("--check", action="store_true",
                   help="rebuild into a scratch directory and fail if a table differs from the profile's own")
    return parser


def _cost_table(arch: str, policy_path: str | None) -> str:
    from tabulate import tabulate

    from arq import cost, models, policy

    if arch not in models.ARCHITECTURES:
        raise SystemExit(f"arq cost: unknown architecture {arch!r}; known: {', '.join(models.ARCHITECTURES)}")
    costs = cost.for_arch(arch)
    if policy_path:
        import json

        try:
            pinned = json.loads(Path(policy_path).read_text()).get("pinned", {}) if Path(policy_path).exists() else {}
        except (ValueError, AttributeError) as exc:
            raise SystemExit(f"arq cost: {policy_path} is not a policy JSON ({exc})") from exc
        layers = policy.load(policy_path, policy.Rules(arch, tuple(c.name for c in costs), pinned=pinned),
                             costs)["layers"]
    else:
        layers = {c.name: {"w_bits": 32, "a_bits": 32} for c in costs}
    rows = [(c.name, c.kind, c.macs, c.weights, layers[c.name]["w_bits"], layers[c.name]["a_bits"],
             c.macs * layers[c.name]["w_bits"] * layers[c.name]["a_bits"]) for c in costs]
    s = cost.summary(costs, layers)
    return (tabulate(rows, headers=("layer", "kind", "MACs", "weights", "w_bits", "a_bits", "BitOps"),
                     intfmt=",") +
            f"\n{arch}: {len(costs)} layers, {s['macs'] / 1e6:,.2f}M MACs, {s['bitops'] / 1e9:,.3f} GBitOps "
            f"= {s['bitops_pct']:.3f}% of FP32, weights {s['weight_bits'] / 8e6:,.3f} MB")


def _log(text: str) -> None:
    print(text, flush=True)


def _stage_inputs(args, config: dict):
    """The prepared data (checked against its manifest) and the device of a stage that reads data."""
    from arq.data import load_prepared

    return load_prepared(args.data, args.manifest), _device(config)


def _resume(args) -> str:
    return args.resume or str(Path(args.out).with_suffix(".resume.pt"))


# ------------------------------------------------------------------------------- one handler per subcommand

def _check_config(args, config: dict) -> None:
    from arq import config as cfg
    from arq import layout

    for part in cfg.split(config):  # each architecture's part, for a profile of several
        layout.check(part)
        print(f"{args.config}: valid (profile {part['profile']}, hash {cfg.config_hash(part)})")


def _prepare(args, config: dict) -> None:
    if config["data"]["source"] == "imagefolder":
        from arq.imagefolder import prepare

        m = prepare(config, args.out, args.manifest_out, log=_log)
    else:
        from arq.data import prepare

        m = prepare(config, args.out, args.manifest_out, threads=args.threads or 2, log=_log)
    print(f"prepared {m['sizes']} from {m['source']['path']} → {args.out}")


def _train(args, config: dict) -> None:
    from arq.train import train

    data, device = _stage_inputs(args, config)
    train(config, args.sigma, data, args.out, _resume(args), args.log_csv, args.metrics, device, log=_log,
          base=args.base, init=args.init)


def _import_base(args, config: dict) -> None:
    from arq.config import ConfigError
    from arq.data import read_manifest
    from arq.pretrained import run_import

    if config["pretrained"] is None:
        raise ConfigError("pretrained is null in this profile: there is no published checkpoint to import")
    classes = len(read_manifest(args.data, args.manifest).get("classes", ())) or None
    run_import(config, args.sigma, args.checkpoint, config["pretrained"]["format"], args.out, args.metrics,
               log=_log, num_classes=classes)


def _uniform(args, config: dict) -> None:
    from arq import policy

    doc = policy.uniform_policy(config, args.bits)
    policy.save(args.out, doc)
    print(f"{doc['produced_by']}: {doc['bitops_pct']:.3f}% of FP32 BitOps → {args.out}")


def _finetune(args, config: dict) -> None:
    from arq import policy
    from arq.train import finetune

    data, device = _stage_inputs(args, config)
    costs, rules = policy.for_config(config)
    doc = policy.load(args.policy, rules, costs)
    finetune(config, args.sigma, args.base, doc, data, args.out, _resume(args), args.log_csv, args.metrics, device,
             args.method, log=_log)


def _certify(args, config: dict) -> None:
    from arq.certify import run_certify

    data, device = _stage_inputs(args, config)
    s = run_certify(config, args.sigma, args.method, args.model, data, args.out, args.summary, device)
    print(f"σ={s['sigma']}: clean {s['clean_accuracy']:.3f}  ACR {s['acr']:.3f}  abstain {s['abstain_rate']:.3f}  "
          f"{s['samples_per_s']:.0f} samples/s")


def _irs_cache(args, config: dict) -> None:
    from arq.irs import run_cache

    data, device = _stage_inputs(args, config)
    s = run_cache(config, args.sigma, args.model, data, args.out, args.summary, device, base=args.base)
    print(f"σ={s['sigma']}: cached {s['images']} val images, ACR {s['acr']:.3f}, {s['samples_per_s']:.0f} samples/s")


def _certify_incremental(args, config: dict) -> None:
    from arq.irs import run_incremental

    data, device = _stage_inputs(args, config)
    s = run_incremental(config, args.sigma, args.method, args.model, args.cache, data, args.out, args.summary, device)
    print(f"{args.method} σ={s['sigma']}: ACR {s['acr']:.3f} (FP32 {s['fp32_acr']:.3f}), branches {s['branches']}, "
          f"{s['seconds_certifying']:.1f} s")


def _search(args, config: dict) -> None:
    from arq.search.run import run_search

    data, device = _stage_inputs(args, config)
    doc = run_search(config, args.sigma, args.method, args.budget, args.seed, args.model, data, args.cache,
                     args.out_csv, args.out_policy, args.out_png, args.state or f"{args.out_csv}.state.pt", device,
                     log=_log, base=args.base)
    print(f"{args.method} σ={args.sigma}: best reward {doc['reward']:.4f} at episode {doc['episode']}, "
          f"{doc['bitops_pct']:.3f}% of FP32 BitOps → {args.out_policy}")


def _hessian(args, config: dict) -> None:
    from arq.hawq.hessian import run_hessian

    data, device = _stage_inputs(args, config)
    run_hessian(config, args.sigma, args.model, data, args.out, device, log=_log, base=args.base)


def _allocate_hawq(args, config: dict) -> None:
    from arq.hawq.ilp import run_allocate

    run_allocate(config, args.sigma, args.budget, args.model, args.hessian, args.out, log=_log, base=args.base)


def _sweep(args, config: dict) -> None:
    from arq.sweep import run_sweep

    data, device = _stage_inputs(args, config)
    rows = run_sweep(config, args.sigma, args.base, args.model, data, args.out_csv, args.summary, args.out_dir, device,
                     log=_log)
    print(f"{args.base} σ={args.sigma}: {len(rows)} points → {args.out_csv}")


def _predict(args, config: dict) -> None:
    from arq.certify import run_predict

    data, device = _stage_inputs(args, config)
    rows = run_predict(config, args.sigma, args.method, args.model, data, args.out, args.n or config["certify"]["n"],
                       args.alpha or config["certify"]["alpha"], device)
    print(f"accuracy {sum(r['correct'] for r in rows) / len(rows):.3f} on {len(rows)} images")


def _report(args, config: dict) -> None:
    from arq import report

    out = report.outputs(args.report_dir, args.figures_dir, bool(args.search_csvs), bool(args.policies),
                         any(map(report.is_robust, args.summaries)), bool(args.sweeps))
    tables = report.run(config, args.summaries, args.tsvs, args.policies, args.search_csvs, out, args.irs_caches,
                        args.sweeps)
    print(tables["main"][["sigma", "name", "bitops_pct", "clean", "ACR"]].to_string(index=False))


def _artifacts(args, config: dict) -> None:
    from arq import artifacts

    files = [args.config, *args.overlays]
    if args.action == "verify":
        n = len(artifacts.verify(config))
        print(f"profile {config['profile']!r}: {n} DVC-tracked file(s) match their records")
    elif args.action == "add":
        artifacts.add(config, files, partial=args.partial)
    else:
        getattr(artifacts, args.action)(config, files, args.remote, partial=args.partial)


def _regenerate(args, config: dict) -> int:
    import tempfile

    from arq import config as cfg
    from arq import report

    failed = 0
    for part in cfg.split(config):  # each architecture's part, for a profile of several
        if not args.check:
            out = report.regenerate(part)
            print("\n".join(v if isinstance(v, str) else "\n".join(v) for v in out.values()))
            continue
        with tempfile.TemporaryDirectory() as scratch:
            diffs = report.check(part, scratch)
        if diffs:
            print("".join(diffs), file=sys.stderr)
            print(f"arq regenerate: {len(diffs)} problem(s): profile {part['profile']!r} has inconsistent text "
                  f"results or tables that differ from what its text results give", file=sys.stderr)
            failed = 1
        else:
            print(f"profile {part['profile']!r}: every table regenerates byte for byte")
    return failed


HANDLERS = {"check-config": _check_config, "prepare": _prepare, "train": _train, "uniform": _uniform,
            "finetune": _finetune, "import-base": _import_base, "certify": _certify, "irs-cache": _irs_cache,
            "certify-incremental": _certify_incremental, "search": _search, "hessian": _hessian,
            "allocate-hawq": _allocate_hawq, "sweep": _sweep, "predict": _predict, "report": _report,
            "artifacts": _artifacts, "regenerate": _regenerate}


# the subcommands that take a whole profile (every architecture of one that runs several)
PROFILE_COMMANDS = ("check-config", "artifacts", "regenerate")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from arq import config as cfg
    from arq.artifacts import ArtifactError
    from arq.data import DataError
    from arq.irs import CacheError
    from arq.models import CheckpointError
    from arq.policy import BudgetError, PolicyError
    from arq.train import DivergedError

    try:
        if args.command == "cost":  # the subcommands without a profile
            print(_cost_table(args.arch, args.policy))
            return 0
        if args.command == "sample-tree":
            from arq.imagefolder import write_tree

            classes = [f"n{i:08d}" for i in range(args.classes)]
            root = write_tree(args.out, classes, {"train": args.train, "val": args.val}, args.size, args.seed)
            print(f"{root}: {args.classes} classes, {args.train} training and {args.val} val images each (random)")
            return 0
        config = cfg.load(args.config, *getattr(args, "overlays", ()))
        if args.command not in PROFILE_COMMANDS and len(cfg.architectures(config)) > 1:
            raise cfg.ConfigError(f"{args.config} runs several architectures {cfg.architectures(config)}; a stage "
                                  "runs one architecture's part, the file the workflow writes under "
                                  "<results>/<profile>/<arch>/config/")
        if getattr(args, "threads", None):
            import torch

            torch.set_num_threads(args.threads)
        return HANDLERS[args.command](args, config) or 0
    except (cfg.ConfigError, DataError, CheckpointError, PolicyError, CacheError, BudgetError, ArtifactError,
            DivergedError, FileNotFoundError) as exc:
        print(f"arq {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
