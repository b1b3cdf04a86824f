"""The streamed ImageFolder reader (arq/imagefolder.py) on generated trees."""
from __future__ import annotations

import json
import re
import shutil

import pytest
import torch

from arq import imagefolder
from arq.data import DataError

CLASSES = ("n01", "n02", "n03")


def _config(root, **over):
    d = {"source": "imagefolder", "path": str(root), "content_sha256": False, "search_per_class": 2,
         "split_seed": 7, "cert_skip": 2, "image_size": 16, "workers": 0, **over}
    return {"profile": "test", "data": d}


@pytest.fixture
def tree(tmp_path):
    return imagefolder.write_tree(tmp_path / "tree", CLASSES, {"train": 6, "val": 4}, size=20)


def _prepare(tmp_path, root, **over):
    out = tmp_path / "prep"
    imagefolder.prepare(_config(root, **over), out / "listing.tsv.gz", out / "manifest.json", log=lambda *_: None)
    return out / "listing.tsv.gz", out / "manifest.json"


def test_scan_lists_every_image_in_class_then_file_name_order(tree):
    t = imagefolder.scan(tree)
    assert t.classes == CLASSES
    assert [len(t.files[s]) for s in ("train", "val")] == [18, 12]
    for split in ("train", "val"):
        paths = [e.path for e in t.files[split]]
        assert paths == sorted(paths)  # class folders and file names sort the same way here
        assert [e.label for e in t.files[split]] == sorted(e.label for e in t.files[split])
        assert all(e.size == (tree / e.path).stat().st_size for e in t.files[split])
        assert all(e.sha256 == "" for e in t.files[split])
    hashed = imagefolder.scan(tree, content_sha256=True, log=lambda *_: None)
    assert all(len(e.sha256) == 64 for e in hashed.files["val"])


def test_splits_are_disjoint_balanced_and_deterministic(tmp_path, tree):
    data = imagefolder.load(*_prepare(tmp_path, tree))
    again = imagefolder.load(*_prepare(tmp_path / "again", tree))
    train = {e.path for e in data.train.entries}
    search = {e.path for e in data.val.entries}
    assert not train & search and len(train | search) == 18
    assert all("/train/" in f"/{p}" for p in search)  # the search never sees the val folder
    assert data.val.y.bincount().tolist() == [2, 2, 2]
    assert [e.path for e in again.val.entries] == [e.path for e in data.val.entries]
    other_seed = imagefolder.load(*_prepare(tmp_path / "seed", tree, split_seed=8))
    assert {e.path for e in other_seed.val.entries} != search  # the seed decides (3 classes, C(6,2)³ choices)


def test_certification_subset_is_every_kth_val_image_in_canonical_order(tmp_path, tree):
    data = imagefolder.load(*_prepare(tmp_path, tree))
    val = imagefolder.scan(tree).files["val"]
    assert data.cert_idx.tolist() == list(range(0, 12, 2))
    assert [e.path for e in data.cert.entries] == [val[i].path for i in range(0, 12, 2)]
    manifest = json.loads((tmp_path / "prep" / "manifest.json").read_text())
    assert manifest["sizes"] == {"train": 12, "val": 6, "test": 12, "cert": 6}
    assert "every 2-th val image" in manifest["cert_rule"]


def test_images_come_out_as_uint8_crops_of_the_configured_size(tmp_path, tree):
    data = imagefolder.load(*_prepare(tmp_path, tree))
    one = data.cert.x[0]
    assert one.dtype == torch.uint8 and one.shape == (3, 16, 16)
    assert data.cert.x[:3].shape == (3, 3, 16, 16)
    assert torch.equal(data.cert.x[torch.tensor([0, 2])][1], data.cert.x[2])  # evaluation is deterministic
    assert torch.equal(data.cert.x[torch.tensor(2)], data.cert.x[2])  # a 0-d index gives one image, as a tensor does
    x, y = next(iter(data.train.loader(4, train=True, seed=0)))
    assert x.dtype == torch.uint8 and x.shape == (4, 3, 16, 16) and y.dtype == torch.int64


def test_training_batches_repeat_with_the_seed_and_change_without_it(tmp_path, tree):
    data = imagefolder.load(*_prepare(tmp_path, tree), workers=1)

    def first(seed):
        x, y = next(iter(data.train.loader(6, train=True, seed=seed)))
        return x, y

    a, b, c = first(3), first(3), first(4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])


def test_a_class_missing_from_val_is_named(tmp_path, tree):
    shutil.rmtree(tree / "val" / "n02")
    with pytest.raises(DataError, match=r"val/n02 is missing"):
        imagefolder.scan(tree)


def test_a_class_without_images_is_named(tmp_path, tree):
    for f in (tree / "train" / "n03").iterdir():
        f.unlink()
    with pytest.raises(DataError, match=r"train/n03 holds no images"):
        imagefolder.scan(tree)


def test_a_corrupt_jpeg_is_named_in_the_main_process_and_from_a_worker(tmp_path, tree):
    listing, manifest = _prepare(tmp_path, tree)
    data = imagefolder.load(listing, manifest, workers=1)
    victim = tree / data.cert.entries[1].path
    victim.write_bytes(b"\0" * victim.stat().st_size)  # same size: only decoding can tell
    with pytest.raises(DataError, match=f"{victim.name} is not a readable image"):
        data.cert.x[1]
    with pytest.raises(Exception, match=victim.name):
        list(data.cert.loader(2, train=False))


def test_a_file_changed_since_prepare_is_named(tmp_path, tree):
    data = imagefolder.load(*_prepare(tmp_path, tree))
    victim = tree / data.val.entries[0].path
    victim.write_bytes(victim.read_bytes()[:-10])
    with pytest.raises(DataError, match=f"{victim.name} has .* bytes.*changed"):
        data.val.x[0]
    victim.unlink()
    with pytest.raises(DataError, match=f"{victim.name} is missing"):
        data.val.x[0]


def test_a_tampered_listing_is_refused(tmp_path, tree):
    listing, manifest = _prepare(tmp_path, tree)
    listing.write_bytes(listing.read_bytes() + b"\0")
    with pytest.raises(DataError, match="does not match its manifest"):
        imagefolder.load(listing, manifest)


def test_the_listing_is_byte_identical_across_runs(tmp_path, tree):
    a, _ = _prepare(tmp_path / "a", tree)
    b, _ = _prepare(tmp_path / "b", tree)
    assert a.read_bytes() == b.read_bytes()


def test_a_search_split_that_leaves_nothing_to_train_on_is_refused(tmp_path, tree):
    with pytest.raises(DataError, match="must leave some to train on"):
        _prepare(tmp_path, tree, search_per_class=6)


def test_the_shared_training_loop_streams_a_folder_split_reproducibly(tmp_path, tree):
    from arq import models
    from arq.data import balanced
    from arq.train import first_images, noisy_accuracy, run_epochs

    data = imagefolder.load(*_prepare(tmp_path, tree))
    assert len(first_images(data.train, 5)) == 5 and first_images(data.train, 5).streamed
    assert balanced(data.val, 3).y.tolist() == [0, 1, 2] and balanced(data.val, 3).streamed

    def run():
        torch.manual_seed(0)
        model = models.ResNetCifar(20, len(CLASSES))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, 1)
        history = run_epochs(model, opt, sched, data.train, data.val, 0.25, "train", 0, 2, 4, torch.device("cpu"),
                             log=lambda *_: None)
        return history, model

    (h1, m1), (h2, _) = run(), run()
    assert [r["loss"] for r in h1] == [r["loss"] for r in h2] and len(h1) == 2
    acc = noisy_accuracy(m1, data.cert, 0.25, 4, torch.Generator().manual_seed(0))
    assert 0.0 <= acc <= 1.0


# ------------------------------------------------------------------------ the imagenet-smoke profile's plumbing

def test_an_imagefolder_profile_validates_and_refuses_cifar_keys_and_an_unbounded_search(repo_root):
    from arq import config as cfg
    from arq import layout

    profile = cfg.split(cfg.load(repo_root / "config" / "imagenet-smoke.yaml"))[0]  # the ResNet-50 part
    assert profile["data"]["source"] == "imagefolder" and profile["model"]["arch"] == "resnet50"
    stray = {**profile, "data": {**profile["data"], "val_size": 5000}}
    with pytest.raises(cfg.ConfigError, match="data: .* should not be valid"):
        cfg.validate(stray)
    missing = {**profile, "data": {k: v for k, v in profile["data"].items() if k != "image_size"}}
    with pytest.raises(cfg.ConfigError, match="'image_size' is a required property"):
        cfg.validate(missing)
    unbounded = json.loads(json.dumps(profile))
    unbounded["search"]["finetune"]["train_images"] = None
    with pytest.raises(cfg.ConfigError, match="search.finetune.train_images"):
        layout.check(unbounded)
    assert layout.prepared_data(profile).endswith("listing.tsv.gz")


def test_snakemakes_default_config_keys_are_dropped_under_a_complete_profile(repo_root):
    from arq import config as cfg

    profile = cfg.load(repo_root / "config" / "imagenet-smoke.yaml")
    merged = json.loads(json.dumps(cfg.load(repo_root / "config" / "config.yaml")))
    for key, value in profile.items():  # Snakemake's merge of a --configfile over config/config.yaml
        if isinstance(value, dict):
            merged.setdefault(key, {}).update(value)
        else:
            merged[key] = value
    assert "val_size" in merged["data"]
    cfg.drop_unlisted(merged, profile)
    assert merged == profile
    cifar = cfg.load(repo_root / "config" / "smoke.yaml")
    assert cfg.drop_unlisted(json.loads(json.dumps(cifar)), cifar) == cifar  # nothing to drop in a CIFAR profile


def test_the_cost_estimate_counts_the_tree_and_scales_with_the_network(tmp_path, tree, repo_root):
    from arq import estimate
    from arq import config as cfg

    profile = cfg.split(cfg.load(repo_root / "config" / "imagenet-smoke.yaml"))[0]  # the ResNet-50 part
    profile["data"]["path"] = str(tree)
    profile["data"]["search_per_class"] = 2
    assert estimate.split_sizes(profile) == {"train": 12, "val": 6, "cert": 6}
    profile["data"]["path"] = str(tmp_path / "absent")
    assert estimate.split_sizes(profile)["cert"] == 25_000  # ImageNet's 50,000 val images, every 2nd
    profile["data"]["image_size"] = 224
    assert 90 < estimate.work_per_image(profile) < 110  # ResNet-50 at 224 px: ~100× ResNet-20 on CIFAR-10
    profile["model"]["arch"] = "mobilenet_v2"
    assert 5 < estimate.work_per_image(profile) < 10


def test_a_checkpoint_remembers_a_class_count_other_than_its_architectures(tmp_path):
    from arq import models

    model = models.build("mobilenet_v2", 5)
    models.save_checkpoint(tmp_path / "m.pt", model, "mobilenet_v2", sigma=0.5)
    again, meta = models.load_checkpoint(tmp_path / "m.pt", "mobilenet_v2")
    assert meta["num_classes"] == 5 and models.num_classes(again) == 5
    models.save_checkpoint(tmp_path / "r.pt", models.build("resnet20"), "resnet20", sigma=0.5)
    assert "num_classes" not in models.load_checkpoint(tmp_path / "r.pt")[1]  # CIFAR-10 checkpoints as before


def test_sample_tree_writes_a_tree_the_reader_accepts(tmp_path):
    from documented import run_documented

    from arq.cli import main

    assert main(["sample-tree", str(tmp_path / "t"), "--classes", "2", "--train", "3", "--val", "2"]) == 0
    t = imagefolder.scan(tmp_path / "t")
    assert t.classes == ("n00000000", "n00000001") and len(t.files["train"]) == 6 and len(t.files["val"]) == 4
    done = run_documented("arq sample-tree data/imagenet-smoke/tree", tmp_path)  # README's command, as given
    assert done.returncode == 0, done.stderr
    t = imagefolder.scan(tmp_path / "data" / "imagenet-smoke" / "tree")
    assert len(t.classes) == 5 and len(t.files["train"]) == 80 and len(t.files["val"]) == 30


# ------------------------------------------------------------------- a profile of several architectures (issue 25)

def test_a_profile_of_two_architectures_splits_into_parts_with_their_own_folders(repo_root):
    from arq import config as cfg
    from arq import layout

    profile = cfg.load(repo_root / "config" / "imagenet-smoke.yaml")
    assert cfg.architectures(profile) == ["resnet50", "mobilenet_v2"]
    resnet, mobilenet = cfg.split(profile)
    assert (resnet["profile"], mobilenet["profile"]) == ("imagenet-smoke/resnet50", "imagenet-smoke/mobilenet_v2")
    assert resnet["model"] == {"arch": "resnet50"} and "per_arch" not in resnet and "per_arch" not in mobilenet
    # per_arch reaches its own part only
    assert mobilenet["train"]["weight_decay"] == 4.0e-5 and resnet["train"]["weight_decay"] == 1.0e-4
    assert mobilenet["quant"]["act_clip"] == "calibrated" and resnet["quant"]["act_clip"] == "learned"
    assert layout.results_dir(mobilenet) == "results/imagenet-smoke/mobilenet_v2"
    assert layout.prepared_dir(resnet) == "data/prepared/imagenet-smoke/resnet50"
    assert cfg.validate(mobilenet) is mobilenet  # a part is a profile of its own (what each job reads)
    assert cfg.config_hash(resnet) != cfg.config_hash(mobilenet)
    one = cfg.load(repo_root / "config" / "smoke.yaml")
    assert cfg.split(one) == [one] and cfg.for_arch(one, "resnet20") is one  # a profile of one: itself
    with pytest.raises(cfg.ConfigError, match="runs 'resnet20', not 'resnet50'"):
        cfg.for_arch(one, "resnet50")


def test_settings_per_architecture_are_checked_against_the_architectures_and_each_part(repo_root):
    from arq import config as cfg

    profile = cfg.load(repo_root / "config" / "imagenet-smoke.yaml")
    stray = {**profile, "per_arch": {"resnet20": {}}}
    with pytest.raises(cfg.ConfigError, match=r"per_arch.resnet20: not one of model.arch"):
        cfg.validate(stray)
    bad = {**profile, "per_arch": {"mobilenet_v2": {"finetune": {"lr": -1}}}}
    with pytest.raises(cfg.ConfigError, match=r"(?s)finetune.lr: .*in the part of architecture mobilenet_v2"):
        cfg.validate(bad)
    renamed = {**profile, "per_arch": {"mobilenet_v2": {"model": {"arch": "resnet20"}}}}
    with pytest.raises(cfg.ConfigError, match="per_arch.mobilenet_v2"):
        cfg.validate(renamed)
    single = cfg.load(repo_root / "config" / "smoke.yaml")
    with pytest.raises(cfg.ConfigError, match="per_arch: only a profile of several architectures"):
        cfg.validate({**single, "per_arch": {"resnet20": {}}})
    with pytest.raises(cfg.ConfigError, match="profile"):
        cfg.validate({**single, "profile": "smoke/extra"})  # only the workflow names a part <profile>/<arch>


def test_stage_commands_take_one_part_and_profile_commands_every_part(repo_root, capsys):
    from arq import cli

    profile = str(repo_root / "config" / "imagenet-smoke.yaml")
    assert cli.main(["check-config", profile]) == 0
    out = capsys.readouterr().out
    assert "profile imagenet-smoke/resnet50," in out and "profile imagenet-smoke/mobilenet_v2," in out
    assert cli.main(["uniform", "--config", profile, "--bits", "W8A8", "--out", "x.json"]) == 2
    assert "runs several architectures ['resnet50', 'mobilenet_v2']" in capsys.readouterr().err


# ---------------------------------------------------------------------------- imported base models (pretrained)

def _with_pretrained(profile, **pretrained):
    out = json.loads(json.dumps(profile))
    out["pretrained"] = {"format": "torchvision", "checkpoints": {"0.5": "x.pth"}, "finetune": dict(out["train"]),
                         **pretrained}
    return out


def test_pretrained_settings_are_checked(repo_root):
    from arq import config as cfg

    part = cfg.split(cfg.load(repo_root / "config" / "imagenet-smoke.yaml"))[1]  # MobileNetV2, σ 0.5
    assert cfg.validate(_with_pretrained(part))
    with pytest.raises(cfg.ConfigError, match=r"checkpoints: no checkpoint for σ \['0.5'\]"):
        cfg.validate(_with_pretrained(part, checkpoints={"1.0": "x.pth"}))
    with pytest.raises(cfg.ConfigError, match=r"checkpoints: \['0.25'\] are not σ of sigmas"):
        cfg.validate(_with_pretrained(part, checkpoints={"0.5": "x", "0.25": "y"}))
    with pytest.raises(cfg.ConfigError, match="finetune_base needs a recipe"):
        cfg.validate(_with_pretrained(part, finetune=None))
    with pytest.raises(cfg.ConfigError, match="Cohen et al. released ImageNet ResNet-50s, not mobilenet_v2"):
        cfg.validate(_with_pretrained(part, format="cohen", finetune=None))
    with pytest.raises(cfg.ConfigError, match="must be null for cohen"):
        cfg.validate(_with_pretrained(cfg.split(cfg.load(repo_root / "config" / "imagenet-smoke.yaml"))[0],
                                      format="cohen"))
    robust = _with_pretrained(part)
    robust["robust_base"]["bases"] = ["fp32", "fp32_symreg"]
    with pytest.raises(cfg.ConfigError, match="robust_base.bases must be \\[fp32\\]"):
        cfg.validate(robust)
    with pytest.raises(cfg.ConfigError, match="pretrained.finetune.lr"):
        cfg.validate(_with_pretrained(part, finetune={**part["train"], "lr": 0}))


def test_the_imagenet_profile_plans_both_architectures_from_imported_weights(tmp_path, repo_root):
    """The paper's ImageNet profile, as README gives it, in a copy of the repository holding a generated tree and
    stand-in weight files where the profile expects them: a dry run plans every stage of both architectures, each
    σ's base imported and noise-finetuned (no train_base), and prints the estimated cost of each part first."""
    from documented import repository_copy, run_documented

    from arq import config as cfg

    profile = cfg.load(repo_root / "config" / "imagenet.yaml")
    assert [p["profile"] for p in cfg.split(profile)] == ["imagenet/resnet50", "imagenet/mobilenet_v2"]
    assert profile["sigmas"] == [0.5, 1.0, 2.0] and profile["data"]["cert_skip"] == 100
    workdir = repository_copy(tmp_path, "repo")
    imagefolder.write_tree(workdir / "data" / "imagenet", CLASSES, {"train": 12, "val": 4}, size=20)
    for part in cfg.split(profile):
        for published in set(part["pretrained"]["checkpoints"].values()):
            (workdir / published).parent.mkdir(parents=True, exist_ok=True)
            (workdir / published).write_bytes(b"stand-in: a dry run only checks that it exists")
    plan = run_documented("snakemake --cores all --configfile config/imagenet.yaml", workdir, dry_run=True)
    out = plan.stdout + plan.stderr
    assert plan.returncode == 0, out[-3000:]
    assert "[arq] profile 'imagenet/resnet50' on" in out and "[arq] profile 'imagenet/mobilenet_v2' on" in out
    counts = {m.group(1): int(m.group(2)) for m in re.finditer(r"^(\w+)\s+(\d+)$", out, re.M)}
    for arch in ("resnet50", "mobilenet_v2"):
        assert counts[f"{arch}_import_base"] == 3 and counts[f"{arch}_finetune_base"] == 3
        assert counts[f"{arch}_search"] == 9 and counts[f"{arch}_report"] == 1  # 3 methods × 3 σ
    assert not any("train_base" in job for job in counts)
