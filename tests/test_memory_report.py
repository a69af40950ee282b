"""`Trainer.memory_report()`: the whole process's training memory by kind, and what compiling leaves alive.

The report's lines add up to its prediction and, with the measured runtime overhead, to the resident set; every
tensor storage is counted once; a frozen weight is never kept a second time (a folded copy beside the original);
and the compiler residue (what compiling keeps alive that no step reads), counted by the report's tensor and object
accounting (deterministic, unlike the resident set), stays under a stated bound for a small model, with nothing of
torch.export's fake tensors surviving the capture.
"""

import gc

import pytest
import torch
import torch.nn as nn

import pockengine as pe
from pockengine.ir.graph import CONST
from pockengine.memory.report import MemoryReport, StorageCounter, python_bytes

# The compiler residue of `small_cnn` below (its kept capture, its step program's graph and its example batch):
# 80 KB measured when written (torch 2.13; 49 + 82 nodes). The bound leaves room for the graphs to grow by a few
# passes' nodes; an fx graph or fake tensors left alive by the capture would be far above it.
RESIDUE_BOUND = 200 * 1024


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # statistics that are not the identity, so that folding them shows
                m.running_var.uniform_(0.5, 2.0)
    return model


def batch(n: int = 4):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(n, 3, 8, 8, generator=g),), torch.randint(0, 4, (n,), generator=g)


def storage_bytes(tensors) -> int:
    return sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}.values())


def test_lines_add_up_to_the_prediction_and_the_resident_set():
    trainer = pe.compile(small_cnn(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1, momentum=0.9),
                         scheme=pe.Scheme.last(2), freeze_batchnorm=True)
    trainer.step(batch())
    report = trainer.memory_report()
    assert isinstance(report, MemoryReport)
    counted = (report.trained_weights + report.frozen_weights + report.optimizer_state + report.program_constants
               + report.generated_code + report.step_buffers + report.compiler_residue)
    assert report.predicted == counted
    assert report.compiler_residue == sum(size for _, size in report.residue)
    assert report.process_rss is not None and report.baseline_rss is not None  # Linux: /proc/self/status
    assert report.runtime_overhead == report.process_rss - report.baseline_rss - report.predicted
    assert report.step_buffers == trainer.memory_plan().peak_bytes > 0
    assert report.optimizer_state == trainer.optimizer_state_bytes()
    text = str(report)
    for line in ("trained weights", "frozen weights", "optimizer state", "planned step buffers", "compiler residue",
                 "capture, batch [[4, 3, 8, 8], [4]]", "step program's graph", "runtime overhead", "predicted"):
        assert line in text
    assert len(text.splitlines()) == len(report.lines())


def test_each_storage_is_counted_once():
    """Tied weights (one parameter under two modules) and views of one storage count once."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 3))
    model[2].weight = model[0].weight
    example = ((torch.randn(5, 6),), torch.randint(0, 3, (5,)))
    trainer = pe.compile(model, pe.losses.cross_entropy(), example, scheme=pe.Scheme.full())
    report = trainer.memory_report()
    params = list(model.parameters())  # named_parameters() lists the tied weight once
    assert report.trained_weights + report.frozen_weights == storage_bytes(params)
    assert report.trained_weights == storage_bytes(params)

    counter = StorageCounter()
    w = torch.zeros(4, 4)
    assert counter.claim([w, w[1:], w.t(), w.view(16)]) == 64
    assert counter.claim([w]) == 0


def test_a_frozen_weight_is_not_kept_twice():
    """The frozen BatchNorm after the depthwise convolution is folded into it: the scaled kernel is computed in the
    step from the model's weight, not kept as a second copy; per-channel scales are still folded."""
    model = small_cnn()
    trainer = pe.compile(model, pe.losses.cross_entropy(), batch(), scheme=pe.Scheme.bias_only(),
                         freeze_batchnorm=True)
    graph = trainer.program().graph
    weight_forms = {(tuple(p.shape), p.dtype) for p in model.parameters() if p.dim() >= 2}
    constants = [graph.constants[n] for n in graph.inputs(CONST)]
    assert any(n.name.endswith("_folded") for n in graph.inputs(CONST))  # BatchNorm scales are still folded
    assert not [c for c in constants if (tuple(c.shape), c.dtype) in weight_forms]
    model_storages = {t.untyped_storage().data_ptr() for t in (*model.parameters(), *model.buffers())}
    assert all(c.untyped_storage().data_ptr() not in model_storages for c in constants)
    report = trainer.memory_report()
    assert report.frozen_kept_twice == 0 and "none kept twice" in str(report)
    # the loss is the eager model's: the kernel scaled in the step is the folded one
    expected = pe.losses.cross_entropy()(model(*batch()[0]), batch()[1]).item()
    assert abs(trainer.loss(batch()) - expected) <= 1e-5 * abs(expected)


def test_compiler_residue_stays_small_and_holds_no_fake_tensor():
    trainer = pe.compile(small_cnn(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1),
                         scheme=pe.Scheme.last(2), freeze_batchnorm=True)
    gc.collect()
    report = trainer.memory_report()
    assert 0 < report.compiler_residue < RESIDUE_BOUND, str(report)
    # the kept capture (to compile the gradient program without exporting again) is there, and counted
    assert len(trainer._captures) == 1 and any(name.startswith("capture") and size > 0
                                               for name, size in report.residue)
    # nothing of torch.export's tracing survives: no fake tensor reachable from the trainer or anywhere else
    _, tensors = python_bytes([trainer._captures, trainer._programs], set())
    assert not [t for t in tensors if isinstance(t, torch._subclasses.FakeTensor)]
    from torch.fx.experimental import proxy_tensor
    assert not proxy_tensor._FAKE_TENSOR_ID_TO_PROXY_MAP_FOR_EXPORT
    assert not [o for o in gc.get_objects() if isinstance(o, torch._subclasses.FakeTensor)
                and o.shape == (4, 16, 8, 8)]  # an activation of this model, as export's fake tensors had it


def test_capture_in_a_forked_child_gives_the_same_program():
    """capture_process="fork": torch.export runs in a child that sends back the IR; the program, the steps and the
    errors are those of a capture in this process."""
    same = pe.compile(small_cnn(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1),
                      scheme=pe.Scheme.last(2), freeze_batchnorm=True)
    forked = pe.compile(small_cnn(), pe.losses.cross_entropy(), batch(), optimizer=pe.optim.SGD(lr=0.1),
                        scheme=pe.Scheme.last(2), freeze_batchnorm=True, capture_process="fork")
    assert str(forked.program().graph) == str(same.program().graph)
    assert [forked.step(batch()) for _ in range(2)] == [same.step(batch()) for _ in range(2)]
    assert forked.options.to_dict()["capture_process"] == "fork"
    from pockengine.capture.child import capture_in_child
    captured = capture_in_child(small_cnn().eval(), pe.losses.cross_entropy(), batch())  # None: "in here"
    assert captured is not None and len(captured.graph.nodes) == len(same._captures[next(iter(same._captures))]
                                                                      .graph.nodes)
    with pytest.raises(pe.UserInputError, match="fail on this batch in plain PyTorch"):  # the child failed: in here
        pe.compile(small_cnn(), pe.losses.cross_entropy(), ((torch.randn(4, 5, 8, 8),), batch()[1]),
                   capture_process="fork")
    with pytest.raises(pe.UserInputError, match="capture_process must be one of"):
        pe.compile(small_cnn(), pe.losses.cross_entropy(), batch(), capture_process="spawn")
