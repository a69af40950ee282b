"""The scheme language: presets, rule files, resolution, errors, summaries, recorded channel choices."""

import json

import pytest
import torch
import torch.nn as nn

import pockengine as pe
from pockengine.scheme import Scheme, Selection, gradient_masks, summary


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(),
        nn.Conv2d(8, 16, 1), nn.Flatten(), nn.Linear(16 * 16, 4))


def batch():
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, 4, 4, generator=g),), torch.tensor([1, 3])


def test_presets():
    model = net()
    assert set(Scheme.full().resolve(model)) == {n for n, _ in model.named_parameters()}
    assert set(Scheme.bias_only().resolve(model)) == {"0.bias", "1.bias", "3.bias", "5.bias", "7.bias"}
    assert set(Scheme.last(2).resolve(model)) == {"5.weight", "5.bias", "7.weight", "7.bias"}
    assert set(Scheme.head().resolve(model)) == {"7.weight", "7.bias"}


def test_later_rules_override_earlier_ones():
    scheme = Scheme.from_dict({"rules": [{"modules": "*", "mode": "full"}, {"modules": "[0-3]", "mode": "frozen"},
                                         {"modules": "1", "mode": "bias"}]})
    assert set(scheme.resolve(net())) == {"1.bias", "5.weight", "5.bias", "7.weight", "7.bias"}


def test_partial_channels_first_and_magnitude():
    model = net()
    scheme = Scheme.from_dict({"rules": [
        {"modules": "5", "mode": "partial", "ratio": "1/4"},
        {"modules": "3", "mode": "partial", "ratio": 0.5, "select": "magnitude"},
        {"modules": "7", "mode": "partial", "ratio": "1/8", "select": "magnitude"}]})
    sel = scheme.resolve(model)
    assert sel["5.weight"] == Selection("partial", 1, (0, 1))  # pointwise: input channels
    assert sel["5.bias"] == Selection("full")
    depthwise = model[3].weight  # one input channel per output channel: channels along dim 0
    norms = depthwise.detach().flatten(1).norm(dim=1)
    assert sel["3.weight"].dim == 0 and set(sel["3.weight"].channels) == set(norms.topk(4).indices.tolist())
    lin = model[7].weight.detach()
    assert set(sel["7.weight"].channels) == set(lin.norm(dim=0).topk(32).indices.tolist())
    mask = gradient_masks(model, sel)["5.weight"]
    assert mask.shape == model[5].weight.shape and mask.sum() == 16 * 2


def test_rule_naming_no_module_lists_closest_names():
    with pytest.raises(pe.UserInputError, match=r"names no module.*closest"):
        Scheme.from_dict({"rules": [{"modules": "features.99", "mode": "full"}]}).resolve(net())
    with pytest.raises(pe.UserInputError) as err:
        Scheme.from_dict({"rules": [{"modules": "7x", "mode": "bias"}]}).resolve(net())
    assert "'7'" in str(err.value)


@pytest.mark.parametrize("rule,match", [
    ({"modules": "5", "mode": "partial", "ratio": 1.5}, "ratio in"),
    ({"modules": "5", "mode": "partial", "ratio": 0}, "ratio in"),
    ({"modules": "5", "mode": "partial"}, "ratio in"),
    ({"modules": "5", "mode": "partial", "ratio": "one half"}, "cannot read ratio"),
    ({"modules": "5", "mode": "sometimes"}, "unknown mode"),
    ({"modules": "5", "mode": "partial", "ratio": 0.5, "select": "random"}, "select"),
    ({"mode": "full"}, "needs 'modules'"),
])
def test_bad_rules_are_clear_errors(rule, match):
    with pytest.raises(pe.UserInputError, match=match):
        Scheme.from_dict({"rules": [rule]})


def test_ratio_selecting_no_channel_is_an_error():
    with pytest.raises(pe.UserInputError, match="selects no channel"):
        Scheme.from_dict({"rules": [{"modules": "5", "mode": "partial", "ratio": 0.01}]}).resolve(net())


def test_last_k_beyond_the_model_is_an_error():
    with pytest.raises(pe.UserInputError, match="more layers"):
        Scheme.last(50).resolve(net())


def test_scheme_files_yaml_and_json(tmp_path):
    rules = {"name": "mine", "rules": [{"modules": "*", "mode": "bias"},
                                       {"modules": "5", "mode": "partial", "ratio": "1/2"}]}
    (tmp_path / "s.yaml").write_text("name: mine\nrules:\n  - {modules: '*', mode: bias}\n"
                                     "  - {modules: '5', mode: partial, ratio: 1/2}\n")
    (tmp_path / "s.json").write_text(json.dumps(rules))
    a = Scheme.from_file(tmp_path / "s.yaml")
    b = Scheme.from_file(tmp_path / "s.json")
    assert a.resolve(net()) == b.resolve(net()) == Scheme.from_dict(a.to_dict()).resolve(net())
    with pytest.raises(pe.UserInputError, match=".json, .yaml"):
        Scheme.from_file(tmp_path / "s.txt")


def test_summary_table_counts_trained_entries():
    model = net()
    sel = Scheme.from_dict({"rules": [{"modules": "5", "mode": "partial", "ratio": "1/4"}]}).resolve(model)
    text = summary(model, sel)
    assert "5.weight" in text and "2/8 ch" in text
    total = sum(p.numel() for p in model.parameters())
    assert text.splitlines()[-1].split()[-2:] == [str(16 * 2 + 16), str(total)]


def test_magnitude_choice_is_recorded_and_replayed(tmp_path):
    model = net()
    scheme = Scheme.from_dict({"rules": [{"modules": "7", "mode": "partial", "ratio": 0.25,
                                          "select": "magnitude"}]})
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.5), scheme=scheme)
    chosen = trainer.trained["7.weight"].channels
    for _ in range(3):
        trainer.step(batch())
    trainer.save(tmp_path / "ckpt")
    resumed = pe.load(tmp_path / "ckpt", net(), pe.losses.cross_entropy(), batch())
    assert resumed.trained["7.weight"].channels == chosen
    assert "2/8" not in resumed.summary() and "64/256 ch" in resumed.summary()


def test_scheme_training_nothing_is_refused():
    with pytest.raises(pe.UserInputError, match="trains no parameter"):
        pe.compile(net(), pe.losses.cross_entropy(), batch(),
                   scheme=Scheme.from_dict({"rules": [{"modules": "*", "mode": "frozen"}]}))
