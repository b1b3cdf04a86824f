"""Up-front cost estimate of a profile on the current machine, from measured throughput anchors.

Anchors (DESIGN §6, ResNet-20): one H100 trains ~21,700 img/s and infers ~234,000 noisy samples/s in plain
fp32; two CPU cores train ~370 img/s and infer ~900 samples/s. CPU figures scale with the threads used, and
every rate with the network's MACs per image (``work_per_image``).
"""
from __future__ import annotations

from arq.layout import bases, methods, parse, searched

ANCHORS = {  # images (or noisy samples) per second for ResNet-20
    "cuda": {"train": 21_700.0, "infer": 234_000.0},
    "cpu_per_2_threads": {"train": 370.0, "infer": 900.0},
}
# Fake quantization slows a pass down; measured on two CPU cores (benchmarks/RESULTS.md); GPU assumed alike.
QUANT_SLOWDOWN = {"train": 1.6, "infer": 1.3}


IMAGENET_SIZES = (1_281_167, 50_000)  # ILSVRC-2012 training and validation images


def split_sizes(config: dict) -> dict:
    """Images in the train, val (search) and certification splits: CIFAR-10's; for an ImageFolder tree those of the
    tree at data.path when it is there (counted by name, not opened), else ImageNet's."""
    d = config["data"]
    if d["source"] != "imagefolder":
        return {"train": 50_000 - d["val_size"], "val": d["val_size"], "cert": -(-10_000 // d["cert_skip"])}
    from pathlib import Path

    from arq.imagefolder import SUFFIXES

    root = Path(d["path"])
    n_train, n_val, classes = *IMAGENET_SIZES, 1000
    if (root / "train").is_dir() and (root / "val").is_dir():  # counted as arq.imagefolder.scan counts, unopened
        counts = {split: [sum(1 for f in c.iterdir() if f.suffix.lower() in SUFFIXES) for c in (root / split).iterdir()
                          if c.is_dir()] for split in ("train", "val")}
        n_train, n_val, classes = sum(counts["train"]), sum(counts["val"]), len(counts["train"])
    search = d["search_per_class"] * classes
    return {"train": n_train - search, "val": search, "cert": -(-n_val // d["cert_skip"])}


def work_per_image(config: dict) -> float:
    """MACs of one image of the profile's network at its input size, relative to the anchors' ResNet-20 on 32×32
    CIFAR-10 images (ResNet-50 at 224 pixels: about 100×). An estimate: throughput is taken to scale with MACs,
    which overrates MobileNetV2's depthwise layers."""
    from arq import cost, models

    arch = config["model"]["arch"]
    macs = cost.total_macs(cost.for_arch(arch))
    if config["data"]["source"] == "imagefolder":
        macs *= (config["data"]["image_size"] / models.INPUT_SHAPES[arch][-1]) ** 2
    return macs / cost.total_macs(cost.for_arch("resnet20"))


def estimate_seconds(config: dict, device_type: str, threads: int = 2) -> dict:
    """Seconds for the stages of ``config`` (train, search, finetune, certify, IRS, sweep) on a device type; a search
    episode is priced as calibration + its finetune steps + IRS on the cache's images. Every base variant is
    trained (twice the passes with (A)SAM) and certified; a sweep point is a finetune (none for PTQ) and a
    certification at the sweep's N."""
    if device_type == "cuda":
        rate = ANCHORS["cuda"]
    else:
        scale = max(threads, 1) / 2
        rate = {k: v * scale for k, v in ANCHORS["cpu_per_2_threads"].items()}
    scale = work_per_image(config)
    rate = {k: v / scale for k, v in rate.items()}
    sizes = split_sizes(config)
    f, c = config["finetune"], config["certify"]
    # the base models: trained (train), noise-finetuned from an imported network (pretrained.finetune), or imported
    # as they are (pretrained.finetune null: Cohen's noise-trained ones; a conversion costs seconds)
    t = config["train"] if config["pretrained"] is None else config["pretrained"]["finetune"]

    def count(k, full):
        return min(k or full, full)

    k = len(config["sigmas"])
    base_names = bases(config)
    passes = sum(2 if (b != "fp32" and "satnl" in b and config["robust_base"]["sam"]) else 1 for b in base_names)
    train = 0.0 if t is None else k * t["epochs"] * (passes * count(t["train_images"], sizes["train"]) / rate["train"]
                                                     + len(base_names) * count(t["val_images"], sizes["val"])
                                                     / rate["infer"])
    sc, ic = config["search"], config["irs"]
    hc = config["hawq"]
    quantized = [m for m in methods(config) if parse(m).family != "fp32"]
    models_q = len(quantized)  # quantized models per σ: each finetuned and certified once per seed
    one_finetune = f["epochs"] * (count(f["train_images"], sizes["train"]) * QUANT_SLOWDOWN["train"] / rate["train"]
                                  + count(f["val_images"], sizes["val"]) * QUANT_SLOWDOWN["infer"] / rate["infer"])
    finetune = k * models_q * one_finetune
    one_certify = count(c["max_images"], sizes["cert"]) * (c["n0"] + c["n"]) / rate["infer"]
    certify = k * one_certify * (len(base_names) + models_q * QUANT_SLOWDOWN["infer"])
    irs_images = count(ic["images"], sizes["val"])
    caches = max(len({parse(m).base for m in searched(config)}), 1)
    irs = k * irs_images * (caches * (ic["n0"] + ic["n"]) + models_q * ic["n_p"] * QUANT_SLOWDOWN["infer"]) / rate["infer"]
    episode = ((config["quant"]["calibration"]["images"] + sc["finetune"]["bn_images"]) * QUANT_SLOWDOWN["infer"]
               / rate["infer"]
               + sc["finetune"]["steps"] * sc["finetune"]["batch_size"] * QUANT_SLOWDOWN["train"] / rate["train"])
    certified_reward = irs_images * ic["n_p"] * QUANT_SLOWDOWN["infer"] / rate["infer"]  # arq, random
    accuracy_reward = count(sc["haq_images"], sizes["val"]) * QUANT_SLOWDOWN["infer"] / rate["infer"]  # haq
    search = k * sc["episodes"] * sum(episode + (certified_reward if parse(m).family != "haq" else accuracy_reward)
                                      for m in searched(config))
    # a Hessian-vector product costs about two training passes over the images, per probe
    hessians = max(len({parse(m).base for m in quantized if parse(m).family == "hawq"}), 1)
    hawq = (k * hc["enabled"] * hessians * hc["max_iterations"] * hc["probes"] * 2 * min(hc["images"], sizes["train"])
            / rate["train"])
    sw = config["sweep"]
    sweep = 0.0
    if sw["enabled"]:
        ptq = len(sw["ptq"]) + len([b for b in sw["weight_only"] if not (b == 8 and 8 in sw["ptq"])])  # arq.sweep
        point_certify = sw["images"] * (sw["n0"] + sw["n"]) * QUANT_SLOWDOWN["infer"] / rate["infer"]
        calibrate = config["quant"]["calibration"]["images"] * QUANT_SLOWDOWN["infer"] / rate["infer"]
        sweep = k * len(base_names) * ((ptq + len(sw["qat"])) * (point_certify + calibrate)
                                       + len(sw["qat"]) * one_finetune)
    return {"train": train, "finetune": finetune, "certify": certify, "irs": irs, "search": search, "hawq": hawq,
            "sweep": sweep, "total": train + finetune + certify + irs + search + hawq + sweep + 30.0}


def _human(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def describe(config: dict, device_type: str, threads: int) -> str:
    here = estimate_seconds(config, device_type, threads)
    where = "one GPU" if device_type == "cuda" else f"this CPU ({threads} thread{'' if threads == 1 else 's'})"
    text = (f"profile '{config['profile']}' on {where}: about {_human(here['total'])} "
            f"(training {_human(here['train'])}, searches {_human(here['search'])}, HAWQ Hessian at most "
            f"{_human(here['hawq'])}, QAT finetune "
            f"{_human(here['finetune'])}, certification {_human(here['certify'])}, IRS {_human(here['irs'])}"
            + (f", bit-width sweep {_human(here['sweep'])}" if here["sweep"] else "") + ")")
    if device_type != "cuda":
        gpu = estimate_seconds(config, "cuda")
        text += f"; about {_human(gpu['total'])} on one H100-class GPU"
    return text
