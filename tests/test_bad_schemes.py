"""Schemes given wrong values, wrong types or broken files: each is a UserInputError naming the value or the file;
and parameters the user froze (requires_grad=False) are never trained by any scheme."""

import math

import pytest
import torch
import torch.nn as nn

import pockengine as pe
from pockengine.scheme import Scheme, Selection


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3))


def batch():
    return (torch.randn(5, 4),), torch.randint(0, 3, (5,))


@pytest.mark.parametrize("last,match", [
    (0, "integer k >= 1.*got 0"), (-1, "got -1"), ("x", "got 'x'"), (1.5, "got 1.5"), (True, "got True"),
])
def test_last_must_be_a_positive_integer(last, match):
    with pytest.raises(pe.UserInputError, match=match):
        Scheme.from_dict({"last": last})
    with pytest.raises(pe.UserInputError, match=match):
        Scheme.last(last)


@pytest.mark.parametrize("d,match", [
    ({"rules": [{"modules": 2, "mode": "full"}]}, "modules.*string.*got 2"),
    ({"rules": [{"modules": "", "mode": "full"}]}, "modules.*got ''"),
    ({"rules": [{"modules": "0", "mode": 3}]}, "unknown mode 3"),
    ({"rules": [{"modules": "0", "mode": "partial", "ratio": 0}]}, "ratio in"),
    ({"rules": [{"modules": "0", "mode": "partial", "ratio": 1.01}]}, "ratio in"),
    ({"rules": [{"modules": "0", "mode": "partial", "ratio": -0.5}]}, "ratio in"),
    ({"rules": [{"modules": "0", "mode": "partial", "ratio": math.nan}]}, "cannot read ratio nan"),
    ({"rules": [{"modules": "0", "mode": "partial", "ratio": math.inf}]}, "cannot read ratio inf"),
    ({"rules": [{"modules": "0", "mode": "partial", "ratio": "1/0"}]}, "cannot read ratio '1/0'"),
    ({"rules": [{"modules": "0", "mode": "partial", "ratio": True}]}, "cannot read ratio True"),
    ({"rules": [{"modules": "0", "mode": "partial", "ratio": [0.5]}]}, r"cannot read ratio \[0.5\]"),
    ({"rules": [{"modules": "0", "mode": "partial", "ratio": 0.5, "select": 1}]}, "select must be"),
    ({"rules": {"modules": "0", "mode": "full"}}, "list of rules"),
    ({"rules": ["0"]}, "a rule is a mapping"),
    ({"rules": [], "name": 5}, "name is a string"),
    ({"rules": [], "layers": 2}, r"unknown scheme keys \['layers'\]"),
    ({"resolved": [1]}, "recorded scheme"),
    ([1, 2], "a scheme is a mapping"),
])
def test_bad_scheme_dicts_are_clear_errors(d, match):
    with pytest.raises(pe.UserInputError, match=match):
        Scheme.from_dict(d)


@pytest.mark.parametrize("name,text,match", [
    ("s.yaml", "rules:\n  - {modules: 2, mode: full}\n", "s.yaml: a rule's 'modules'.*got 2"),
    ("s.yaml", "rules: [ {modules: '0', mode: full\n", "cannot read the scheme file .*s.yaml: ParserError"),
    ("s.yaml", "rules:\n\t- x\n", "cannot read the scheme file .*s.yaml"),
    ("s.json", '{"rules": [', "cannot read the scheme file .*s.json: JSONDecodeError"),
    ("s.json", "[1, 2]", "s.json must hold a mapping"),
    ("s.yaml", "", "s.yaml must hold a mapping"),
    ("s.yaml", "last: 0\n", "s.yaml: last"),
])
def test_bad_scheme_files_name_the_file(tmp_path, name, text, match):
    (tmp_path / name).write_text(text)
    with pytest.raises(pe.UserInputError, match=match):
        Scheme.from_file(tmp_path / name)


def test_unreadable_scheme_files_are_clear_errors(tmp_path):
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00rules")
    with pytest.raises(pe.UserInputError, match="bin.yaml"):
        Scheme.from_file(tmp_path / "bin.yaml")
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(pe.UserInputError, match="dir.yaml does not exist"):
        Scheme.from_file(tmp_path / "dir.yaml")


@pytest.mark.parametrize("d", [
    {"kind": "partial", "dim": 0, "channels": []}, {"kind": "partial", "dim": -1, "channels": [0]},
    {"kind": "partial", "dim": 0, "channels": [2, 1]}, {"kind": "partial", "dim": 0, "channels": [1, 1]},
    {"kind": "partial", "dim": 0, "channels": [-1]}, {"kind": "partial", "channels": [0]}, {"kind": "some"}, "full",
])
def test_bad_recorded_selections_are_refused(d):
    with pytest.raises(pe.UserInputError, match="selection"):
        Selection.from_dict(d)


def test_recorded_selections_must_fit_the_model():
    scheme = Scheme.from_resolved({"2.weight": Selection("partial", 1, (0, 8))})
    with pytest.raises(pe.UserInputError, match=r"selection of 2.weight .*does not fit its shape \[8, 8\]"):
        scheme.resolve(net())


def test_frozen_parameters_are_never_trained():
    model = net()
    for p in model[0].parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), scheme=Scheme.full(),
                         optimizer=pe.optim.SGD(lr=0.5))
    assert set(trainer.trained) == {"2.weight", "2.bias", "4.weight", "4.bias"}
    trainer.step(batch())
    assert torch.equal(model[0].weight, before["0.weight"]) and torch.equal(model[0].bias, before["0.bias"])
    assert not torch.equal(model[2].weight, before["2.weight"])


def test_last_k_counts_only_layers_with_trainable_parameters():
    model = net()
    for p in model[4].parameters():
        p.requires_grad_(False)
    assert set(Scheme.last(1).resolve(model)) == {"2.weight", "2.bias"}


def test_a_rule_reaching_only_frozen_parameters_warns_and_an_empty_result_is_an_error():
    model = net()
    for p in [*model[0].parameters(), *model[2].parameters()]:
        p.requires_grad_(False)
    scheme = Scheme.from_dict({"rules": [{"modules": "0", "mode": "full"}, {"modules": "4", "mode": "bias"}]})
    with pytest.warns(UserWarning, match="rule '0' .*requires_grad=False"):
        assert set(scheme.resolve(model)) == {"4.bias"}
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(pe.UserInputError, match="requires_grad=False"):
        Scheme.full().resolve(model)
    with pytest.raises(pe.UserInputError, match=r"requires_grad=False here: \['0.weight'\]"):
        Scheme.from_resolved({"0.weight": Selection("full")}).resolve(model)


def no_bias_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8, bias=False), nn.ReLU(), nn.Linear(8, 3, bias=False))


@pytest.mark.parametrize("freeze", [False, True], ids=["nothing-frozen", "first-layer-frozen"])
def test_a_scheme_selecting_nothing_says_so_whether_or_not_parameters_are_frozen(freeze):
    # bias-only selects nothing in a model without biases; the user's frozen first layer is not the cause, and the
    # error must not blame it
    model = no_bias_net()
    if freeze:
        model[0].weight.requires_grad_(False)
    assert Scheme.bias_only().resolve(model) == {}
    with pytest.raises(pe.UserInputError, match="trains no parameter of this model: its rules select none") as e:
        pe.compile(model, pe.losses.cross_entropy(), batch(), scheme=Scheme.bias_only())
    assert "requires_grad" not in str(e.value)


def test_a_scheme_whose_selection_is_all_frozen_names_the_frozen_parameters():
    model = net()
    for p in model[4].parameters():
        p.requires_grad_(False)
    head = Scheme.from_dict({"name": "head", "rules": [{"modules": "4", "mode": "full"}]})
    with pytest.raises(pe.UserInputError, match=r"scheme 'head' trains nothing: every parameter it selects has "
                                                r"requires_grad=False \(2: \['4.weight', '4.bias'\]\)"), \
            pytest.warns(UserWarning, match="rule '4' .*reaches only parameters with requires_grad=False"):
        head.resolve(model)
    # a frozen-mode rule after it deselects them: then the scheme selects nothing, and no frozen parameter is named
    unselected = Scheme.from_dict({"rules": [{"modules": "4", "mode": "full"}, {"modules": "*", "mode": "frozen"}]})
    with pytest.warns(UserWarning, match="rule '4'"):
        assert unselected.resolve(model) == {}
    # bias mode selects only the bias among the frozen ones
    with pytest.raises(pe.UserInputError, match=r"requires_grad=False \(1: \['4.bias'\]\)"), \
            pytest.warns(UserWarning, match="rule '4'"):
        Scheme.from_dict({"rules": [{"modules": "4", "mode": "bias"}]}).resolve(model)


def test_last_k_beyond_the_trainable_layers_counts_the_frozen_ones():
    model = net()
    for p in [*model[2].parameters(), *model[4].parameters()]:
        p.requires_grad_(False)
    with pytest.raises(pe.UserInputError, match=r"last\(2\) asks for more layers than the model's 1 with a parameter "
                                                r"that requires grad \(2 more have only requires_grad=False"):
        Scheme.last(2).resolve(model)


@pytest.mark.parametrize("make,match", [
    (lambda: Scheme("mine", [], last_k=0), "integer k >= 1"),
    (lambda: Scheme("mine", [{"modules": "*", "mode": "full"}]), "list of pockengine.scheme.Rule"),
    (lambda: Scheme.from_resolved({"0.weight": {"kind": "full"}}), "maps parameter names to"),
    (lambda: Selection("partial", 1, ()), "non-empty sorted tuple"),
    (lambda: Selection("sideways"), "a selection is full, or partial"),
    (lambda: pe.scheme.Rule("0", "partial", ratio=math.nan), "ratio in"),
])
def test_schemes_built_directly_are_checked_too(make, match):
    with pytest.raises(pe.UserInputError, match=match):
        make()


def test_ratio_on_a_rule_that_is_not_partial_warns():
    with pytest.warns(UserWarning, match="apply to mode partial only; ignored"):
        scheme = Scheme.from_dict({"rules": [{"modules": "0", "mode": "full", "ratio": 0.5}]})
    assert scheme.resolve(net()) == {"0.weight": Selection("full"), "0.bias": Selection("full")}
