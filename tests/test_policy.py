"""Quantization policies (arq/policy.py): strict validation naming the layer, file round trip, uniform tags."""
from __future__ import annotations

import json

import pytest

from arq import cost, policy
from arq.policy import PolicyError

pytestmark = pytest.mark.usefixtures("single_thread")

QUANT = {"min_bits": 2, "max_bits": 8, "pin_first_last": True, "pinned_bits": 8}


@pytest.fixture(scope="module")
def costs():
    return cost.for_arch("resnet20")


@pytest.fixture(scope="module")
def rules(costs):
    return policy.rules_for("resnet20", costs, QUANT)


def _mixed(rules) -> dict:
    """A valid non-uniform policy: bits vary over the free layers, pinned layers at 8."""
    layers = {}
    for i, name in enumerate(rules.layers):
        b = rules.pinned.get(name)
        layers[name] = {"w_bits": b or 2 + i % 7, "a_bits": b or 2 + (i * 3) % 7}
    return layers


# ----------------------------------------------------------------------------------------------- rules

def test_rules_pin_the_first_conv_and_the_last_fc(costs, rules):
    assert rules.arch == "resnet20"
    assert rules.layers == tuple(c.name for c in costs)
    assert dict(rules.pinned) == {"conv1": 8, "fc": 8}
    assert (rules.min_bits, rules.max_bits) == (2, 8)
    free = policy.rules_for("resnet20", costs, {**QUANT, "pin_first_last": False})
    assert dict(free.pinned) == {}


def test_uniform_layers_keep_pinned_bits(rules):
    layers = policy.uniform_layers(rules, 3, 5)
    assert list(layers) == list(rules.layers)
    assert layers["conv1"] == layers["fc"] == {"w_bits": 8, "a_bits": 8}
    assert layers["layer2.0.conv1"] == {"w_bits": 3, "a_bits": 5}


def test_validate_returns_forward_order_and_plain_ints(rules):
    layers = _mixed(rules)
    shuffled = dict(reversed(list(layers.items())))
    out = policy.validate(shuffled, rules)
    assert list(out) == list(rules.layers)
    assert out == layers


# ---------------------------------------------------------------------------------------- validation

@pytest.mark.parametrize("bad", [1, 9, 0, -4, 4.0, 4.5, True, False, "4", None])
@pytest.mark.parametrize("key", ["w_bits", "a_bits"])
def test_bits_out_of_range_or_not_an_integer_name_the_layer(rules, bad, key):
    layers = _mixed(rules)
    layers["layer2.1.conv2"][key] = bad
    with pytest.raises(PolicyError, match=r"layer 'layer2\.1\.conv2'") as exc:
        policy.validate(layers, rules)
    assert key in str(exc.value) and "2..8" in str(exc.value)


def test_bits_at_the_range_limits_are_accepted(rules):
    layers = _mixed(rules)
    layers["layer1.0.conv1"] = {"w_bits": 2, "a_bits": 8}
    assert policy.validate(layers, rules)["layer1.0.conv1"] == {"w_bits": 2, "a_bits": 8}


def test_unknown_layer_is_named(rules):
    layers = {**_mixed(rules), "layer4.0.conv1": {"w_bits": 4, "a_bits": 4}}
    with pytest.raises(PolicyError, match=r"'layer4\.0\.conv1'.*resnet20 does not have"):
        policy.validate(layers, rules)


def test_missing_layer_is_named(rules):
    layers = _mixed(rules)
    del layers["layer3.0.shortcut.0"]
    with pytest.raises(PolicyError, match=r"misses layer 'layer3\.0\.shortcut\.0'"):
        policy.validate(layers, rules)
    del layers["layer1.2.conv2"]
    with pytest.raises(PolicyError, match=r"'layer1\.2\.conv2' of resnet20 \(and 1 more\)"):
        policy.validate(layers, rules)


@pytest.mark.parametrize("layer,bits", [("conv1", {"w_bits": 4, "a_bits": 8}), ("fc", {"w_bits": 8, "a_bits": 7}),
                                        ("conv1", {"w_bits": 2, "a_bits": 2})])
def test_pinned_layer_at_other_bits_is_named(rules, layer, bits):
    layers = {**_mixed(rules), layer: bits}
    with pytest.raises(PolicyError, match=rf"layer '{layer}' is pinned to 8 bits"):
        policy.validate(layers, rules)


@pytest.mark.parametrize("entry", [{"w_bits": 4}, {"w_bits": 4, "a_bits": 4, "bits": 4}, {"w": 4, "a": 4}, 4,
                                   [4, 4]])
def test_wrong_keys_name_the_layer(rules, entry):
    layers = {**_mixed(rules), "layer1.1.conv1": entry}
    with pytest.raises(PolicyError, match=r"layer 'layer1\.1\.conv1': expected exactly the keys w_bits and a_bits"):
        policy.validate(layers, rules)


def test_layers_must_be_a_mapping(rules):
    with pytest.raises(PolicyError, match="must map layer names"):
        policy.validate([["conv1", {"w_bits": 8, "a_bits": 8}]], rules)


# ------------------------------------------------------------------------------------------ documents

def test_make_records_architecture_producer_cost_and_extras(costs, rules):
    layers = _mixed(rules)
    doc = policy.make(layers, costs, rules, "unit test", episode=7, reward=0.5)
    assert doc["format"] == policy.FORMAT
    assert doc["architecture"] == "resnet20" and doc["produced_by"] == "unit test"
    assert doc["pinned"] == {"conv1": 8, "fc": 8}
    assert doc["episode"] == 7 and doc["reward"] == 0.5
    assert doc["layers"] == layers
    for key, value in cost.summary(costs, layers).items():
        assert doc[key] == value
    assert doc["bitops"] == sum(c.macs * layers[c.name]["w_bits"] * layers[c.name]["a_bits"] for c in costs)


def test_make_validates(costs, rules):
    layers = _mixed(rules)
    layers["fc"] = {"w_bits": 4, "a_bits": 4}
    with pytest.raises(PolicyError, match="'fc' is pinned"):
        policy.make(layers, costs, rules, "unit test")


def test_save_load_round_trip(costs, rules, tmp_path):
    doc = policy.make(_mixed(rules), costs, rules, "unit test", search={"episodes": 3, "seed": 1})
    path = tmp_path / "sub" / "policy.json"
    policy.save(path, doc)
    loaded = policy.load(path, rules, costs)
    assert loaded == doc
    assert list(loaded["layers"]) == list(doc["layers"])
    for key in cost.SUMMARY_FIELDS:
        assert loaded[key] == doc[key]
    assert policy.load(path, rules, costs) == loaded  # stable


def test_hand_edited_cost_fields_are_recomputed_on_load(costs, rules, tmp_path):
    doc = policy.make(_mixed(rules), costs, rules, "unit test")
    edited = {**doc, "bitops": 1, "bitops_pct": 0.001, "macs": 5, "fp32_bitops": 7, "weight_bits": 0,
              "fp32_weight_bits": 3, "pinned": {}, "format": "something-else"}
    path = tmp_path / "edited.json"
    path.write_text(json.dumps(edited))
    loaded = policy.load(path, rules, costs)
    assert loaded == doc


def test_load_without_metadata_fills_it_in(costs, rules, tmp_path):
    layers = _mixed(rules)
    path = tmp_path / "bare.json"
    path.write_text(json.dumps({"layers": layers}))
    loaded = policy.load(path, rules, costs)
    assert loaded["architecture"] == "resnet20" and loaded["produced_by"] == "unknown"
    assert loaded["bitops"] == cost.bitops(costs, layers)


def test_load_errors_name_the_file(costs, rules, tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(PolicyError, match="not found.*nope.json"):
        policy.load(missing, rules, costs)

    broken = tmp_path / "broken.json"
    broken.write_text('{"layers": {')
    with pytest.raises(PolicyError, match="broken.json is not valid JSON"):
        policy.load(broken, rules, costs)

    for i, content in enumerate(([1, 2], {"bits": {}}, "W4A4")):
        p = tmp_path / f"notpolicy{i}.json"
        p.write_text(json.dumps(content))
        with pytest.raises(PolicyError, match=rf"notpolicy{i}.json is not a policy"):
            policy.load(p, rules, costs)

    other = tmp_path / "other.json"
    policy.save(other, {**policy.make(_mixed(rules), costs, rules, "x"), "architecture": "resnet50"})
    with pytest.raises(PolicyError, match=r"other.json is a policy for 'resnet50', not 'resnet20'"):
        policy.load(other, rules, costs)


@pytest.mark.parametrize("key", ["costs", "rules"])
def test_metadata_named_like_a_make_argument_does_not_crash_load(costs, rules, tmp_path, key):
    doc = policy.make(_mixed(rules), costs, rules, "unit test")
    path = tmp_path / "meta.json"
    path.write_text(json.dumps({**doc, key: {"note": "method metadata"}}))
    try:
        loaded = policy.load(path, rules, costs)
    except PolicyError as exc:  # refusing the file, naming it, would also be acceptable
        assert "meta.json" in str(exc)
    else:
        assert loaded[key] == {"note": "method metadata"}
        assert loaded["layers"] == doc["layers"]


@pytest.mark.parametrize("edit,layer", [
    (lambda l: l.update({"layer9.conv": {"w_bits": 4, "a_bits": 4}}), "layer9.conv"),
    (lambda l: l.pop("layer2.2.conv1"), "layer2.2.conv1"),
    (lambda l: l.update({"layer1.0.conv2": {"w_bits": 9, "a_bits": 4}}), "layer1.0.conv2"),
    (lambda l: l.update({"layer1.0.conv2": {"w_bits": 4, "a_bits": 1}}), "layer1.0.conv2"),
    (lambda l: l.update({"layer1.0.conv2": {"w_bits": 4.0, "a_bits": 4}}), "layer1.0.conv2"),
    (lambda l: l.update({"layer1.0.conv2": {"w_bits": True, "a_bits": 4}}), "layer1.0.conv2"),
    (lambda l: l.update({"fc": {"w_bits": 4, "a_bits": 4}}), "fc"),
    (lambda l: l.update({"layer3.1.conv1": {"w_bits": 4, "a_bits": 4, "note": "x"}}), "layer3.1.conv1"),
])
def test_invalid_policy_file_names_the_file_and_the_layer(costs, rules, tmp_path, edit, layer):
    doc = policy.make(_mixed(rules), costs, rules, "unit test")
    edit(doc["layers"])
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(PolicyError) as exc:
        policy.load(path, rules, costs)
    assert "bad.json" in str(exc.value)
    assert f"'{layer}'" in str(exc.value)


# --------------------------------------------------------------------------------------- uniform tags

@pytest.mark.parametrize("tag,bits", [("W4A4", (4, 4)), ("W8A8", (8, 8)), ("w2a8", (2, 8)), ("W8A4", (8, 4))])
def test_parse_uniform(tag, bits):
    assert policy.parse_uniform(tag) == bits


@pytest.mark.parametrize("tag", ["W4", "A4", "W4A", "WA4", "4A4", "W4A4x", " W4A4", "W4 A4", "W-4A4", "W4.5A4",
                                 "", "A4W4"])
def test_parse_uniform_rejects_other_forms(tag):
    with pytest.raises(PolicyError, match="not of the form W<bits>A<bits>"):
        policy.parse_uniform(tag)


def test_uniform_policy_from_config(smoke_config, costs):
    doc = policy.uniform_policy(smoke_config, "w8a8")
    assert doc["produced_by"] == "uniform W8A8"
    assert doc["architecture"] == "resnet20"
    assert all(v == {"w_bits": 8, "a_bits": 8} for v in doc["layers"].values())
    assert doc["bitops"] * 16 == doc["fp32_bitops"]
    assert doc["bitops_pct"] == 6.25
    # like every result file, the policy says which run made it
    assert doc["profile"] == "smoke" and doc["git_commit"] and doc["config_hash"] and doc["wall_seconds"] >= 0
    with pytest.raises(PolicyError, match="not of the form"):
        policy.uniform_policy(smoke_config, "W4")
    with pytest.raises(PolicyError, match="outside the allowed range"):
        policy.uniform_policy(smoke_config, "W1A4")
