"""Contribution analysis and scheme search (pockengine.search, docs/search.md) on a tiny pretrained conv net."""

from __future__ import annotations

import dataclasses
import importlib
import itertools
import math
import random
from fractions import Fraction

import pytest
import torch
import yaml

import pockengine as pe
from pockengine.cli import main
from pockengine.search import BudgetTooSmallError, SearchReport, analyze, choose_scheme, parse_memory, search
from pockengine.search.analysis import Measurement, Plan, measure
from pockengine.search.search import (MEMORY_GRID, SearchResult, mb, refine_lr, shrunk_gains, tune_lr,
                                      verify)
from pockengine.search.candidates import Candidate, Structure, block_of, build_scheme, candidates
from pockengine.search.solver import Option, solve
from pockengine.trainer import Trainer
from search_tasks import CLASSES as CLASSES_OUT, tiny_task

STEPS, GRID = 3, (1e-2,)
MEASURED = Measurement(0.0, 1, 1, 0, 1.0, 1, 1, 0.0)
# Under pytest-xdist one worker runs this file: its tests share the module's analysis and the pretrained weights of
# search_tasks (computed once per process).
pytestmark = pytest.mark.xdist_group("search")


# -- the solver ------------------------------------------------------------------------------------------------
def brute_force(groups, budgets):
    best = None
    for chosen in itertools.product(*(range(len(g)) for g in groups)):
        costs = [sum(g[i].costs[d] for g, i in zip(groups, chosen)) for d in range(len(budgets))]
        if all(b is None or c <= b for c, b in zip(costs, budgets)):
            gain = sum(g[i].gain for g, i in zip(groups, chosen))
            best = gain if best is None else max(best, gain)
    return best


@pytest.mark.parametrize("seed", range(40))
def test_solver_matches_brute_force(seed):
    rng = random.Random(seed)
    dims = rng.choice([1, 2])
    groups = [[Option(0.0, (0,) * 2)] + [Option(rng.uniform(-0.2, 1), (rng.randint(0, 9), rng.randint(0, 9)))
                                         for _ in range(rng.randint(1, 4))] for _ in range(rng.randint(1, 6))]
    groups[0] = groups[0][1:] or groups[0]  # one group without a free option, like the biases
    budgets = [rng.randint(0, 25), rng.randint(0, 25) if dims == 2 else None]
    expected = brute_force(groups, budgets)
    solved = solve(groups, budgets)
    if expected is None:
        assert solved is None
        return
    chosen, gain = solved
    assert gain == pytest.approx(expected)
    picked = [g[i] for g, i in zip(groups, chosen)]
    assert sum(o.gain for o in picked) == pytest.approx(gain)
    for d, b in enumerate(budgets):
        assert b is None or sum(o.costs[d] for o in picked) <= b


def test_solver_known_optimum():
    # Two layers, budget 10: the two mid options (6 + 4 = 10) beat the single best option (9).
    groups = [[Option(0, (0,)), Option(5, (6,)), Option(9, (10,))], [Option(0, (0,)), Option(5, (4,)),
                                                                      Option(6, (11,))]]
    assert solve(groups, [10]) == ([1, 1], 10)
    assert solve(groups, [3]) == ([0, 0], 0)
    assert solve([[Option(1, (4,))]], [3]) is None
    with pytest.raises(ValueError, match=">= 0"):
        solve([[Option(1, (-1,))]], [3])


def test_parse_memory():
    assert parse_memory("4MB") == 4 * 2 ** 20
    assert parse_memory("512 KiB") == 512 * 1024
    assert parse_memory("1.5GB") == int(1.5 * 2 ** 30)
    assert parse_memory(1000) == 1000
    for bad in ("4 parsecs", "-1MB", "0", "MB"):
        with pytest.raises(pe.UserInputError, match="memory budget"):
            parse_memory(bad)


# -- candidates ------------------------------------------------------------------------------------------------
def test_structure_and_candidates_come_from_the_model():
    s = Structure.of(tiny_task())
    assert s.layers == ("0.0", "0.1", "1.0", "1.1", "2.0", "2.1", "5")
    assert (s.classifier, s.blocks, s.weights, s.channels) == ("5", ("0", "1", "2"), ("0.0", "1.0", "2.0"), (3, 8, 16))
    assert block_of("features.3.conv.0.0") == "features.3" and block_of("fc") == "fc"
    # 1/8 of 3 channels selects none (round(0.375)); of 8 channels 1/8 and 1/4 select 1 and 2.
    every = (Fraction(1, 8), Fraction(1, 4), Fraction(1, 2), Fraction(1))
    assert s.ratios("0.0", every) == list(every[1:]) and s.ratios("1.0", every) == list(every)
    assert s.ratios("0.0", (Fraction(1, 4), Fraction(1, 3))) == [Fraction(1, 4)]  # both select 1 of 3
    bias, weights = candidates(s, quick=False)
    assert [c.k for c in bias] == [0, 1, 2, 3]
    assert {c.k for c in weights} == {3} and len(weights) == 3 + 4 + 4
    model = tiny_task().build_model()
    trained = Candidate(2, "1.0", Fraction(1, 4)).scheme(s).resolve(model)
    assert trained["1.0.weight"].channels == (0, 1)  # 1/4 of 8 input channels
    assert {n for n, sel in trained.items() if sel.kind == "full"} == {"1.1.bias", "2.1.bias", "5.weight", "5.bias"}


# -- the analysis ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def analysed(tmp_path_factory):
    """One analysis, interrupted after 3 trained runs, then resumed; then run again (all from the cache)."""
    cache = tmp_path_factory.mktemp("analysis")
    task = tiny_task()
    seen = []

    def interrupt(candidate, lr, m):
        seen.append(candidate)
        if len(seen) == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        analyze(task, cache, quick=True, steps=STEPS, lr_grid=GRID, progress=False, on_result=interrupt)
    resumed = analyze(task, cache, quick=True, steps=STEPS, lr_grid=GRID, progress=False)
    again = analyze(task, cache, quick=True, steps=STEPS, lr_grid=GRID, progress=False)
    return task, cache, seen, resumed, again


def test_analysis_resumes_after_an_interruption_and_caches_everything(analysed):
    task, cache, seen, resumed, again = analysed
    s = Structure.of(task)
    bias, weights = candidates(s, quick=True)
    runs = len(bias) + len(weights)  # every candidate once at the one rate (the probes are candidates too)
    assert len(seen) == 3 and resumed.trained == runs - 3 and again.trained == 0
    assert len([p for p in cache.rglob("*.json") if not p.name.startswith("plan-")]) == runs
    # One plan (compiled, not trained) per analysed weight: that weight alone with the classifier, cached too.
    assert len(list(cache.rglob("plan-*.json"))) == len(s.weights) and again.alone == resumed.alone
    assert set(resumed.alone) == {(w, Fraction(1)) for w in s.weights}
    assert again.rows() == resumed.rows()
    assert set(resumed.bias) == {0, 1, 2, 3} and resumed.bias_gain(0) == 0
    assert set(resumed.weights) == {(w, r) for w in s.weights for r in s.ratios(w, (Fraction(1, 4), Fraction(1)))}
    for m in (*resumed.bias.values(), *resumed.weights.values()):
        assert m.planned_peak > 0 and m.flops > 0 and m.step_ms > 0 and 0 <= m.metric <= 1
        assert abs(m.tracked_peak - m.planned_peak) <= 0.05 * m.planned_peak  # the plan predicts the tracker
    rows = {row["candidate"]: row for row in resumed.rows()}
    assert rows["bias k=0"]["trained"] == 16 * CLASSES_OUT + CLASSES_OUT  # the classifier
    assert rows["1.0 @ 1/4"]["trained"] == 16 * 2 * 3 * 3  # over the baseline: 2 of 8 input channels of a 3x3 conv
    # Training weights on top of the biases helps this task (it learns within a few steps).
    assert max(resumed.weight_gain(*key) for key in resumed.weights) > 0
    # Another step count is another analysis: its first candidate is trained, not read from this one's cache.
    class Trained(Exception):
        pass

    def stop(*args):
        raise Trained

    with pytest.raises(Trained):
        analyze(task, cache, quick=True, steps=STEPS + 1, lr_grid=GRID, progress=False, on_result=stop)


def test_one_compiled_program_serves_every_rate_like_a_fresh_one():
    task = tiny_task()
    scheme = Candidate(3, "2.0", Fraction(1, 4)).scheme(Structure.of(task))
    shared = measure(task, scheme, [1e-3, 1e-2], STEPS, 0)
    fresh = measure(task, scheme, [1e-2], STEPS, 0)
    assert shared[1].metric == fresh[0].metric
    assert shared[1].planned_peak == fresh[0].planned_peak and shared[1].flops == fresh[0].flops


def test_every_candidate_starts_from_the_warmed_up_classifier(tmp_path, monkeypatch):
    task = tiny_task()
    started = []  # (scheme name, the classifier's weight when each program is compiled)

    class Recording(Trainer):
        def __init__(self, model, *args, **kwargs):
            started.append((args[3].name, model[5].weight.detach().clone()))
            super().__init__(model, *args, **kwargs)

    monkeypatch.setattr(importlib.import_module("pockengine.search.analysis"), "Trainer", Recording)
    grid = (1e-3, 1e-2)
    a = analyze(task, tmp_path, quick=True, steps=STEPS, lr_grid=grid, warmup_steps=6, progress=False)
    w = a.warmup
    assert w.steps == 6 and set(w.trials) == set(grid) and w.metric == max(w.trials.values())
    assert set(w.state) == {"5.weight", "5.bias"}  # the classifier's parameters only
    pretrained = task.build_model()[5].weight
    (warm_name, warm_start), *candidate_starts = started
    # The warm-up is the classifier alone trained at its best rate: the same run again gives the same metric.
    assert measure(task, Candidate(0).scheme(a.structure), [w.lr], 6, 0)[0].metric == w.metric
    assert warm_name == "bias k=0" and torch.equal(warm_start, pretrained)  # the warm-up starts from the new head
    assert not torch.equal(w.state["5.weight"], pretrained)
    bias, weights = candidates(a.structure, quick=True)
    assert {name for name, _ in candidate_starts} == {c.label for c in (*bias, *weights)}
    assert all(torch.equal(weight, w.state["5.weight"]) for _, weight in candidate_starts)
    # The search's verification round starts there too.
    started.clear()
    search(task, a, memory_budget="1GB")
    assert len(started) == 1 and torch.equal(started[0][1], w.state["5.weight"])


def test_another_warm_up_is_another_analysis(tmp_path):
    task = tiny_task()
    kwargs = dict(quick=True, steps=STEPS, lr_grid=GRID, progress=False)
    first = analyze(task, tmp_path, warmup_steps=5, **kwargs)
    runs = len(first.bias) + len(first.weights)
    assert first.trained == runs + 1  # the warm-up (one rate) and every candidate
    assert analyze(task, tmp_path, warmup_steps=5, **kwargs).trained == 0  # the warm-up is cached too
    assert len(list(tmp_path.rglob("warmup-*.safetensors"))) == 1
    # Another warm-up length starts every candidate from other weights: everything is trained again, and so it is
    # without a warm-up.
    assert analyze(task, tmp_path, warmup_steps=7, **kwargs).trained == runs + 1
    unwarmed = analyze(task, tmp_path, warmup_steps=0, **kwargs)
    assert unwarmed.warmup is None and unwarmed.start is None and unwarmed.trained == runs
    # A damaged warm-up file is trained again, with a warning, and gives the same classifier.
    path, = (p for p in tmp_path.rglob("warmup-*.safetensors") if p.stat().st_mtime == min(
        q.stat().st_mtime for q in tmp_path.rglob("warmup-*.safetensors")))
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(RuntimeWarning, match="unreadable"):
        again = analyze(task, tmp_path, warmup_steps=5, **kwargs)
    assert again.trained == 1 and again.rows() == first.rows()
    assert all(torch.equal(again.start[n], first.start[n]) for n in first.start)
    with pytest.raises(pe.UserInputError, match="at least 3 steps"):
        analyze(task, tmp_path, warmup_steps=2, **kwargs)


# -- the search ------------------------------------------------------------------------------------------------
def test_the_chosen_scheme_fits_the_memory_budget(analysed, tmp_path):
    task, cache, _, a, _ = analysed
    smallest = min(m.memory for m in a.bias.values())
    largest = max(m.memory for m in (*a.bias.values(), *a.weights.values()))
    budget = (smallest + largest) // 2
    result = search(task, a, memory_budget=budget)
    measured = result.chosen.measured
    assert measured.memory <= budget and measured.tracked_memory <= budget
    assert result.chosen.predicted_gain >= max(a.bias_gain(k) for k, m in a.bias.items() if m.memory <= budget)
    # The scheme file, read back as `pockengine train --scheme` reads it, trains within the budget too.
    files = SearchReport(a, result).write(tmp_path)
    scheme = pe.Scheme.from_file(files["scheme"])
    trainer = pe.compile(task.build_model(), task.loss_fn, task.example_batch, pe.optim.AdamW(lr=result.lr), scheme,
                         freeze_batchnorm=True)
    state = sum(t.numel() * t.element_size() for s in trainer.state.values() for t in s.values())
    assert trainer.memory_plan().peak_bytes + state <= budget
    assert trainer.trained == result.scheme.resolve(task.build_model())


def test_a_choice_over_the_budget_when_measured_tightens_the_budget_and_solves_again(analysed):
    task, _, _, a, _ = analysed
    # Pretend every weight is free in memory (its extra and its reach): the first choice (every useful weight) is
    # predicted within the budget but measured over it, so the search must tighten and choose again.
    base = a.weight_baseline
    cheapest = min(m.memory for m in a.bias.values())
    free = dataclasses.replace(a, weights={key: dataclasses.replace(m, planned_peak=base.planned_peak,
                                                                    optimizer_state=base.optimizer_state)
                                           for key, m in a.weights.items()},
                               alone={key: Plan(cheapest, 0) for key in a.alone})
    free.weights[max(a.weights, key=lambda key: a.weights[key].memory)] = dataclasses.replace(
        base, metric=base.metric + 1)  # and the most expensive weight the most useful one
    budget = a.bias[3].memory + MEMORY_GRID  # the solver rounds each cost up to its grid
    result = search(task, free, memory_budget=budget)
    assert len(result.rounds) >= 2 and not result.rounds[0].within
    assert result.rounds[0].measured.memory > budget >= result.rounds[0].predicted_memory
    assert result.chosen.within and max(result.chosen.measured.memory, result.chosen.measured.tracked_memory) <= budget


def _useful(a, layer: str, ratio: Fraction):
    """`a` with `layer` at `ratio` the most useful candidate by far (its costs as measured)."""
    weights = dict(a.weights)
    weights[layer, ratio] = dataclasses.replace(weights[layer, ratio], metric=a.weight_baseline.metric + 1)
    return dataclasses.replace(a, weights=weights)


def test_a_weight_below_the_trained_biases_is_priced_by_its_own_reach(analysed):
    # The tiny net's middle conv ("1.0") trained alone costs less than the biases of its block and the one after
    # plus its extra over the biases of every block, which is all the old pricing offered it with (a weight only
    # inside the last k blocks). Under a budget between the two, the new pricing finds it and the plan agrees.
    task, _, _, a, _ = analysed
    layer, ratio = "1.0", Fraction(1)
    useful = _useful(a, layer, ratio)
    alone = build_scheme(a.structure, 0, {layer: ratio})
    m = measure(task, alone, [1e-2], STEPS, 0)[0]
    assert m.memory == a.alone[layer, ratio].memory  # the analysis's plan of it is the compiler's
    budget = math.ceil(max(m.memory, m.tracked_memory) / MEMORY_GRID) * MEMORY_GRID + MEMORY_GRID
    extra = a.weights[layer, ratio].memory - a.weight_baseline.memory
    old_price = min(b.memory for k, b in a.bias.items() if k >= 2) + extra  # block "1" is the second from the end
    assert old_price > budget
    result = search(task, useful, memory_budget=budget)
    assert result.chosen.ratios.get(layer) == ratio and len(result.rounds) == 1
    chosen = result.chosen
    assert chosen.within and max(chosen.measured.memory, chosen.measured.tracked_memory) <= budget
    assert chosen.predicted_memory >= chosen.measured.memory  # priced at its reach plus its extra, rounded up
    planned = pe.compile(task.build_model(), task.loss_fn, task.example_batch, pe.optim.AdamW(lr=1e-2),
                         result.scheme, freeze_batchnorm=True)
    assert planned.memory_plan().peak_bytes + planned.optimizer_state_bytes() == chosen.measured.memory <= budget


def test_the_plan_rejects_a_reach_predicted_too_cheap(analysed):
    # The analysis says "1.0" alone reaches no further than the cheapest bias option: the combination is predicted
    # within the budget, the compiler's plan of it is over, so it is not returned.
    task, _, _, a, _ = analysed
    layer, ratio = "1.0", Fraction(1)
    cheapest = min(m.memory for m in a.bias.values())
    optimistic = dataclasses.replace(_useful(a, layer, ratio), alone={**a.alone, (layer, ratio): Plan(
        cheapest + a.weights[layer, ratio].memory - a.weight_baseline.memory, 0)})
    budget = a.alone[layer, ratio].memory - MEMORY_GRID  # below the true plan of that weight alone
    result = search(task, optimistic, memory_budget=budget)
    first = result.rounds[0]
    assert first.ratios.get(layer) == ratio and first.predicted_memory <= budget < first.measured.memory
    assert not first.within and result.chosen.within and layer not in result.chosen.ratios
    assert max(result.chosen.measured.memory, result.chosen.measured.tracked_memory) <= budget


def _lucky(a):
    """`a` with gains set by hand: at ratio 1/4 the first weight +0.05 and the others -0.01 (mean above zero); at
    ratio 1 the second weight +0.2, a lucky spike, and the others -0.15 (mean below zero)."""
    layers = sorted({layer for layer, _ in a.weights})
    assert len(layers) >= 3 and all((layer, r) in a.weights for layer in layers for r in (Fraction(1, 4), Fraction(1)))
    gains = {(layer, Fraction(1, 4)): 0.05 if i == 0 else -0.01 for i, layer in enumerate(layers)}
    gains |= {(layer, Fraction(1)): 0.2 if i == 1 else -0.15 for i, layer in enumerate(layers)}
    base = a.weight_baseline.metric
    weights = {key: dataclasses.replace(m, metric=base + gains[key]) for key, m in a.weights.items()
               if key in gains}
    return dataclasses.replace(a, weights=weights), layers, gains


def test_shrunk_gains_pull_each_weight_toward_its_ratios_mean(analysed):
    _, _, _, a, _ = analysed
    lucky, layers, gains = _lucky(a)
    quarter = sum(g for (_, r), g in gains.items() if r == Fraction(1, 4)) / len(layers)
    for key, gain in gains.items():
        mean = quarter if key[1] == Fraction(1, 4) else sum(g for (_, r), g in gains.items() if r == 1) / len(layers)
        assert shrunk_gains(lucky, 0.0)[key] == pytest.approx(gain)
        assert shrunk_gains(lucky, 1.0)[key] == pytest.approx(mean)
        assert shrunk_gains(lucky, 0.5)[key] == pytest.approx((gain + mean) / 2)
    with pytest.raises(pe.UserInputError, match="between 0"):
        shrunk_gains(lucky, 1.5)


def test_full_shrinkage_trusts_the_mean_of_each_ratio_not_a_lucky_weight(analysed):
    # With room for everything, the knapsack takes each weight at the ratio of the largest positive gain: as
    # measured, the first weight at 1/4 and the lucky second at 1; shrunk fully, every weight at 1/4 (mean +0.01
    # when 3 weights) and none at 1 (mean below zero).
    task, _, _, a, _ = analysed
    lucky, layers, _ = _lucky(a)
    measured = search(task, lucky, memory_budget="1GB")
    assert measured.ratios == {layers[0]: Fraction(1, 4), layers[1]: Fraction(1)} and measured.shrink == 0
    shrunk = search(task, lucky, memory_budget="1GB", shrink=1.0)
    assert shrunk.ratios == {layer: Fraction(1, 4) for layer in layers} and shrunk.shrink == 1


def test_verify_keeps_the_proposal_best_over_the_runs_length(analysed, monkeypatch):
    # The run's metric, faked: one point per trained weight, peaking at rate 1/100 around it. The fully shrunk
    # proposal trains every weight (3), the measured one 2, so verification must keep the shrunk one, at 1/100.
    task, _, _, a, _ = analysed
    lucky, layers, _ = _lucky(a)
    module = importlib.import_module("pockengine.search.search")
    real_measure = module.measure
    long_runs = []

    def measure(task_, scheme, lrs, steps, seed, start=None):
        if steps != 7:  # the search's check of the budget: as measured
            return real_measure(task_, scheme, lrs, steps, seed, start=start)
        trained = sum(1 for layer in layers if scheme.resolve(task_.build_model()).get(f"{layer}.weight"))
        long_runs.extend((scheme, lr) for lr in lrs)
        return [dataclasses.replace(MEASURED, metric=trained - abs(math.log(lr * 100))) for lr in lrs]

    monkeypatch.setattr(module, "measure", measure)
    monkeypatch.setattr(lucky, "scheme_lr", lambda ratios: 1e-2)
    best = verify(task, lucky, steps=7, memory_budget="1GB", shrinks=(0.0, 0.5, 1.0))
    assert best.shrink == 1.0 and best.ratios == {layer: Fraction(1, 4) for layer in layers}
    assert best.lr == pytest.approx(1e-2) and best.lr_steps == 7
    assert [p.shrink for p in best.proposals][0] == 0.0 and best in best.proposals
    keys = [(p.k, p.ratios) for p in best.proposals]
    assert len(keys) == len(set(map(repr, keys)))  # distinct schemes only, each tuned
    # 1/3, 1, 3 around 1e-2: the middle is best; the kept one's rate is refined at the two midpoints, both worse.
    assert all(len(p.lr_trials) == (5 if p is best else 3) for p in best.proposals)
    assert len(long_runs) == 3 * len(best.proposals) + 2
    assert best.lr_trials[best.lr] == max(m for p in best.proposals for m in p.lr_trials.values())


def test_choose_scheme_verifies_proposals_over_the_runs_length(analysed, tmp_path):
    task, cache, _, a, _ = analysed
    scheme, report = choose_scheme(task, memory_budget="1GB", cache_dir=cache, quick=True, steps=STEPS,
                                   lr_grid=GRID, progress=False, out_dir=tmp_path, lr_steps=STEPS + 1)
    best = report.result
    assert best.proposals and best in best.proposals and scheme is best.scheme
    assert best.lr_trials[best.lr] == max(m for p in best.proposals for m in p.lr_trials.values())
    # The kept scheme's trial at its rate is that scheme trained alone for the run's length, as the run trains it.
    assert measure(task, best.scheme, [best.lr], STEPS + 1, 0)[0].metric == best.lr_trials[best.lr]
    markdown = (tmp_path / "report.md").read_text()
    assert "## Proposals verified" in markdown and markdown.count("| **yes** |") >= 1


def test_a_budget_below_the_smallest_scheme_is_a_clear_error(analysed):
    task, _, _, a, _ = analysed
    smallest = min(m.memory for m in a.bias.values())
    with pytest.raises(BudgetTooSmallError, match=rf"smallest scheme needs: {mb(smallest)} \(bias k="):
        search(task, a, memory_budget=smallest - 1)
    with pytest.raises(BudgetTooSmallError, match="below what the fastest scheme takes"):
        search(task, a, time_budget_ms=1e-6)
    with pytest.raises(pe.UserInputError, match="needs a budget"):
        search(task, a)


def test_report_and_choose_scheme(analysed, tmp_path):
    task, cache, _, a, _ = analysed
    scheme, report = choose_scheme(task, memory_budget="1GB", time_budget_ms=1e6, cache_dir=cache, quick=True,
                                   steps=STEPS, lr_grid=GRID, progress=False, out_dir=tmp_path)
    assert report.analysis.trained == 0  # cached
    # With room for everything: the best bias gain plus each positive weight gain (at its best ratio), a weight
    # below the trained biases included (priced by its own reach).
    def best_weight(w):
        return max(0, max(a.weight_gain(w, r) for (w2, r) in a.weights if w2 == w))

    expected = max(a.bias_gain(k) for k in a.bias) + sum(best_weight(w) for w in a.structure.weights)
    assert report.result.chosen.predicted_gain == pytest.approx(expected)
    assert yaml.safe_load((tmp_path / "scheme.yaml").read_text()) == scheme.to_dict()
    for png in ("gains.png", "scheme.png", "costs.png"):
        assert (tmp_path / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    markdown = (tmp_path / "report.md").read_text()
    assert all(row["candidate"] in markdown for row in a.rows()) and "![costs](costs.png)" in markdown


def test_the_rate_of_the_chosen_scheme_is_tuned_on_its_own_runs(analysed):
    task, _, _, a, _ = analysed
    result = search(task, a, memory_budget="1GB")
    analysis_rate = result.lr
    tuned = tune_lr(task, result, STEPS + 2, factors=(0.1, 1.0, 10.0), extensions=0)
    assert tuned.lr_steps == STEPS + 2 and set(tuned.lr_trials) == {analysis_rate * f for f in (0.1, 1.0, 10.0)}
    # Each trial is the scheme trained alone at that rate; the best validation metric wins.
    for lr, metric in tuned.lr_trials.items():
        assert measure(task, result.scheme, [lr], STEPS + 2, 0)[0].metric == metric
    assert tuned.lr_trials[tuned.lr] == max(tuned.lr_trials.values())


def test_the_rate_grid_extends_past_a_best_rate_at_its_edge(monkeypatch):
    # A validation metric that peaks at 1/27: from 1/3, 1 and 3 the best is the lowest rate each time until 1/81
    # scores worse than 1/27.
    def fake_measure(task, scheme, lrs, steps, seed):
        return [dataclasses.replace(MEASURED, metric=-abs(math.log(lr * 27))) for lr in lrs]

    monkeypatch.setattr(importlib.import_module("pockengine.search.search"), "measure", fake_measure)
    result = SearchResult(pe.Scheme.full(), 0, {}, 1.0, None, None, [], 0.0)
    tuned = tune_lr(None, result, 10, factors=(1 / 3, 1.0, 3.0), extensions=3)
    assert list(tuned.lr_trials) == pytest.approx([1 / 81, 1 / 27, 1 / 9, 1 / 3, 1.0, 3.0])
    assert tuned.lr == pytest.approx(1 / 27)
    result = SearchResult(pe.Scheme.full(), 0, {}, 1.0, None, None, [], 0.0)
    assert tune_lr(None, result, 10, extensions=1).lr == pytest.approx(1 / 9)  # the search stops after one more


def test_the_rate_is_refined_between_the_best_and_its_neighbours(monkeypatch):
    # A validation metric that peaks at sqrt(3) / 100, between the grid's 1/100 and 3/100 (a tie: the lower kept);
    # the midpoint of those two is the peak.
    def fake_measure(task, scheme, lrs, steps, seed):
        return [dataclasses.replace(MEASURED, metric=-abs(math.log(lr * 100 / math.sqrt(3)))) for lr in lrs]

    monkeypatch.setattr(importlib.import_module("pockengine.search.search"), "measure", fake_measure)
    result = tune_lr(None, SearchResult(pe.Scheme.full(), 0, {}, 1e-2, None, None, [], 0.0), 10, extensions=0)
    assert result.lr == pytest.approx(1e-2)
    refined = refine_lr(None, result)
    assert list(refined.lr_trials) == pytest.approx([1 / 300, 1e-2 / math.sqrt(3), 1e-2, math.sqrt(3) / 100, 3e-2])
    assert refined.lr == pytest.approx(math.sqrt(3) / 100) and refined.lr_steps == 10
    with pytest.raises(pe.UserInputError, match="tune_lr first"):
        refine_lr(None, SearchResult(pe.Scheme.full(), 0, {}, 1e-2, None, None, [], 0.0))


def test_each_weight_candidate_is_measured_at_its_own_best_rate(tmp_path):
    task = tiny_task()
    grid = (1e-3, 1e-2)
    a = analyze(task, tmp_path, quick=True, steps=STEPS, lr_grid=grid, progress=False)
    assert set(a.bias_lr_trials) == set(grid) and a.bias_lr == max(grid, key=lambda r: a.bias_lr_trials[r])
    assert a.weight_baseline == a.bias[len(a.structure.blocks)]  # the biases of every block, at the bias rate
    for key, m in a.weights.items():
        trials = a.weight_lr_trials[key]
        assert set(trials) == set(grid) and m.metric == max(trials.values()) == trials[a.weight_lr[key]]
        assert a.weight_gain(*key) == m.metric - a.bias_lr_trials[a.bias_lr]
    ratios = {layer: ratio for layer, ratio in a.weights}  # one analysed ratio of each weight
    assert a.scheme_lr(ratios) == min(a.weight_lr[key] for key in ratios.items()) and a.scheme_lr({}) == a.bias_lr


# -- the command line ------------------------------------------------------------------------------------------
def test_cli_analyze_and_search_on_a_tiny_task(analysed, tmp_path, monkeypatch, capsys):
    task, cache, _, a, _ = analysed
    monkeypatch.setattr("pockengine.search.cli.task_from_args", lambda args: task)
    common = ["--cache", str(cache), "--quick", "--steps", str(STEPS), "--lr-grid", "1e-2", "--no-progress"]
    assert main(["analyze", *common]) == 0
    out = capsys.readouterr().out
    assert "bias k=3" in out and "0 runs trained" in out
    budget = max(m.memory for m in a.bias.values())
    assert main(["search", *common, "--memory-budget", f"{budget}B", "--out", str(tmp_path)]) == 0
    scheme = pe.Scheme.from_file(tmp_path / "scheme.yaml")
    assert scheme.resolve(task.build_model())
    assert main(["search", *common]) == 2
    assert "needs --memory-budget" in capsys.readouterr().err
    assert main(["search", *common, "--memory-budget", "1B", "--out", str(tmp_path)]) == 2
    assert "smallest scheme needs" in capsys.readouterr().err

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("pockengine.search.cli.analyze", interrupted)
    assert main(["analyze", *common]) == 130
    assert "the same command resumes" in capsys.readouterr().err
