"""The update path built once: `UpdatePlan` (several averages, batches, upcasts), `compute_ema`'s cached pairing and
the store's change detection, against float64 references."""

import copy
import gc

import pytest
import torch
from torch import nn

import hf_ema.core as core
import hf_ema.store as store_module
from hf_ema import compute_ema
from hf_ema.core import UpdatePlan, tracked_tensors, watch
from hf_ema.store import EMAStore


def tensors(dtype, seed=0):
    generator = torch.Generator().manual_seed(seed)
    shapes = [(3, 5), (200,), (7,), (13, 11), (1,), (40,)]
    out = [torch.randn(s, generator=generator).to(dtype) for s in shapes]
    out.append(torch.randn(30, 20, generator=generator).to(dtype).t())  # larger than a batch, not contiguous
    return out


def run_against_reference(plan, sources, averages, smoothings_per_update, atol, seed=1):
    """Runs `plan` once per entry of `smoothings_per_update`, moving `sources` in place before each run, and checks
    every average against a float64 reference stepped alongside."""
    expected = [[a.double().clone() for a in average] for average in averages]
    generator = torch.Generator().manual_seed(seed)
    for smoothings in smoothings_per_update:
        for t in sources:  # in place: the plan reads whatever the tensors hold now
            t.add_(torch.randn(t.shape, generator=generator).to(t.dtype))
        plan.run(smoothings)
        for reference, s in zip(expected, smoothings, strict=True):
            for i, t in enumerate(sources):
                reference[i] = s * reference[i] + (1 - s) * t.double()
    for average, reference in zip(averages, expected, strict=True):
        for got, want in zip(average, reference, strict=True):
            torch.testing.assert_close(got.double(), want, rtol=0, atol=atol)


@pytest.mark.parametrize("count", [1, 3])
@pytest.mark.parametrize(
    "source_dtype, average_dtype",
    [(torch.float32, torch.float32), (torch.bfloat16, torch.float32), (torch.float64, torch.float64)],
)
def test_plan_matches_float64_reference(monkeypatch, count, source_dtype, average_dtype):
    # Batches of 50 and a scratch of 64 elements: tensors are batched, cut into slices and staged several times.
    monkeypatch.setattr(core, "BLOCK_NUMEL", 50)
    monkeypatch.setattr(core, "SCRATCH_NUMEL", 64)
    sources = tensors(source_dtype)
    averages = [[t.to(average_dtype).clone() + k for t in sources] for k in range(count)]
    plan = UpdatePlan(averages, sources)
    assert len(plan._batches) > 1 or count == 1 and source_dtype == average_dtype
    tolerance = 1e-12 if average_dtype == torch.float64 else 2e-6
    run_against_reference(plan, sources, averages, [[0.9, 0.5, 0.0][:count]] * 3, tolerance)
    assert all(t.dtype == average_dtype for average in averages for t in average)


def test_plan_refuses_mismatched_input():
    sources = tensors(torch.float32)
    with pytest.raises(ValueError, match="2 average tensors but 7"):
        UpdatePlan([sources[:2]], sources)
    plan = UpdatePlan([[t.clone() for t in sources]] * 2, sources)
    with pytest.raises(ValueError, match="2 averages but got 1"):
        plan.run([0.5])
    with pytest.raises(ValueError, match=r"in \[0, 1\], got 1.5"):
        plan.run([0.5, 1.5])


def test_watch_counts_registrations_on_the_watched_tree_only():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].register_buffer("cache", torch.zeros(1), persistent=False)
    token = watch(model)
    model[1].cache = torch.ones(1)  # a non-persistent buffer set again (as rotary caches are): not counted
    model[1].register_buffer("cache", torch.ones(1), persistent=False)
    other = nn.Linear(2, 2)
    other.weight = nn.Parameter(torch.zeros(2, 2))  # another module's registrations: not counted
    assert token.count == 0
    model[0].weight = nn.Parameter(torch.zeros(2, 2))
    assert token.count == 1
    model[1].register_buffer("stat", torch.zeros(2))
    model.append(other)  # the Sequential registers a submodule
    assert token.count == 3
    fresh = watch(model)  # a module added after a watch began is covered by the next one (the store re-watches)
    other.bias = nn.Parameter(torch.zeros(2))
    assert token.count == 3 and fresh.count == 1


class Chain(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(3, 3)
        self.b = nn.Linear(3, 2)
        self.norm = nn.BatchNorm1d(2)


def nudge(model, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))
        model.norm.running_mean.add_(1.0)
        model.norm.num_batches_tracked.add_(1)


def step(reference, model, s):
    """One float64 EMA step of `reference` (name -> tensor) towards the model's tracked tensors."""
    for name, tensor, kind in tracked_tensors(model):
        if kind == "average":
            reference[name] = s * reference[name] + (1 - s) * tensor.detach().double()


def assert_matches(ema_model, reference, atol=1e-6):
    tensors = dict(ema_model.named_parameters()) | dict(ema_model.named_buffers())
    for name, want in reference.items():
        torch.testing.assert_close(tensors[name].detach().double(), want, rtol=0, atol=atol, msg=name)


def test_compute_ema_follows_changes_to_the_model_after_the_first_call():
    model = Chain()
    ema_model = copy.deepcopy(model)
    reference = {n: t.detach().double().clone() for n, t, k in tracked_tensors(ema_model) if k == "average"}
    for seed in range(3):  # the pairing is built on the first call and reused
        nudge(model, seed)
        compute_ema(model, ema_model, 0.8)
        step(reference, model, 0.8)
    assert_matches(ema_model, reference)
    assert ema_model.norm.num_batches_tracked.item() == 3  # copied, not averaged

    model.a.requires_grad_(False)  # frozen: left alone from now on
    nudge(model, 10)
    compute_ema(model, ema_model, 0.5)
    step(reference, model, 0.5)  # steps trainable tensors only: the reference of a.* stays
    assert_matches(ema_model, reference)
    model.a.requires_grad_(True)  # unfrozen: averaged again

    with torch.no_grad():  # replaced through `.data` (same shape): the pairing holds the parameter, sees the new data
        model.b.weight.data = torch.full((2, 3), 7.0)
    model.a.weight = nn.Parameter(torch.full((3, 3), -1.0))  # replaced by registration: paired afresh
    compute_ema(model, ema_model, 0.5)
    step(reference, model, 0.5)
    assert_matches(ema_model, reference)
    assert (dict(ema_model.named_parameters())["b.weight"] - reference["b.weight"]).abs().max() < 1e-6

    with torch.no_grad():  # reshaped through `.data`: no registration, the kernels fail and the pairing is redone
        model.b.bias.data = torch.zeros(5)
    with pytest.raises(ValueError, match=r"'b.bias' has shape \(5,\) in `model` but \(2,\)"):
        compute_ema(model, ema_model, 0.5)


def test_compute_ema_keeps_one_pairing_per_ema_model():
    model = Chain()
    slow, fast = copy.deepcopy(model), copy.deepcopy(model).double()
    expected = {
        id(m): {n: t.detach().double().clone() for n, t, k in tracked_tensors(m) if k == "average"}
        for m in (slow, fast)
    }
    for seed in range(3):
        nudge(model, seed)
        for ema_model, s in ((slow, 0.9), (fast, 0.1)):
            compute_ema(model, ema_model, s)
            step(expected[id(ema_model)], model, s)
    assert_matches(slow, expected[id(slow)])
    assert_matches(fast, expected[id(fast)], atol=1e-6)
    assert set(core._PAIRINGS[model]) == {id(slow), id(fast)}
    del fast, ema_model  # a collected ema_model's pairing is dropped when a new pairing is made (its tensors with it)
    gc.collect()
    other = copy.deepcopy(model)
    compute_ema(model, other, 0.5)
    pairings = core._PAIRINGS[model]
    assert len(pairings) == 2 and {p.ema_model() for p in pairings.values()} == {slow, other}


def test_store_update_walks_no_module_tree(monkeypatch):
    model = Chain()
    store = EMAStore(model, labels=("a", "b", "c"))
    walks = []
    original = EMAStore._tracked
    monkeypatch.setattr(EMAStore, "_tracked", lambda self, module: walks.append(1) or original(self, module))
    monkeypatch.setattr(store_module, "CHECK_EVERY", 4)
    expected = {label: {n: t.detach().double().clone() for n, t in store.averages[label].items()} for label in "abc"}
    smoothings = {"a": 0.9, "b": 0.5, "c": 0.1}
    for seed in range(10):
        nudge(model, seed)
        store.update_(model, smoothings)
        for label, s in smoothings.items():
            step(expected[label], model, s)
    assert walks == []  # checks of registrations, flags and metadata only
    for label in "abc":
        for name, want in expected[label].items():
            torch.testing.assert_close(store.averages[label][name].double(), want, rtol=0, atol=1e-6)


def test_store_follows_replaced_and_recast_tensors():
    model = Chain()
    store = EMAStore(model)  # float32 averages
    reference = {n: t.detach().double().clone() for n, t in store.shadow.items()}
    nudge(model, 0)
    store.update_(model, 0.5)
    step(reference, model, 0.5)
    model.b.weight = nn.Parameter(torch.full((2, 3), 3.0))  # a replaced parameter is registered: the plan follows
    store.update_(model, 0.5)
    step(reference, model, 0.5)
    model.to(torch.bfloat16)  # cast through `.data`; a placement (evaluation, save) makes the next update check
    store.place_(model, store.primary)
    store.place_(model, None)
    nudge(model, 1)
    store.update_(model, 0.5)
    step(reference, model, 0.5)
    for name, want in reference.items():
        assert store.shadow[name].dtype == torch.float32
        torch.testing.assert_close(store.shadow[name].double(), want, rtol=0, atol=1e-6)


def test_store_refuses_changes_it_cannot_follow():
    model = Chain()
    store = EMAStore(model)
    model.a.bias.requires_grad_(False)  # frozen: the next update refuses
    with pytest.raises(RuntimeError, match="no longer trainable or gone: a.bias"):
        store.update_(model, 0.5)
    model.a.bias.requires_grad_(True)
    store.update_(model, 0.5)
    with torch.no_grad():
        model.a.bias.data = torch.zeros(4)  # reshaped without a registration: the kernels fail, the check names it
    with pytest.raises(RuntimeError, match=r"reshaped: a.bias \(3,\) -> \(4,\)"):
        store.update_(model, 0.5)


@pytest.mark.parametrize("count", [1, 2])
def test_packed_averages_are_lerped_as_one_tensor_per_batch(monkeypatch, count):
    monkeypatch.setattr(core, "SCRATCH_NUMEL", 64)  # several packed batches (one average)
    monkeypatch.setattr(core, "BLOCK_NUMEL", 64)  # (several)
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 5), (7,), (2, 2), (30,), (9,), (100,), (4,)]  # (100,) is larger than a batch: cut, not packed
    sources = [torch.randn(s, generator=generator).bfloat16() for s in shapes]
    averages = []
    for k in range(count):
        buffer = torch.empty(sum(t.numel() for t in sources))
        views, offset = [], 0
        for t in sources:
            views.append(buffer[offset : offset + t.numel()].view(t.shape))
            offset += t.numel()
        for view, t in zip(views, sources, strict=True):
            view.copy_(t.float() + k)
        averages.append(views)
    plan = UpdatePlan(averages, sources, packed=True)
    flat = [b for b in plan._batches if b.flat]
    # The five small tensors before the cut one, in packed batches; (4,) does not follow (9,) in storage: alone.
    assert [len(b.sources) for b in flat] == [4, 1]  # 15 + 7 + 4 + 30 elements fill a 64-element batch
    run_against_reference(plan, sources, averages, [[0.75, 0.25][:count]] * 3, 2e-6)


def test_store_packs_small_upcast_averages_and_saves_them(tmp_path):
    from hf_ema.checkpoint import load_sidecar, save_sidecar

    model = Chain().to(torch.bfloat16)
    store = EMAStore(model, labels=("a", "b"))
    storages = {label: {t.untyped_storage().data_ptr() for t in store.averages[label].values()} for label in "ab"}
    assert all(len(s) == 1 for s in storages.values())  # every average of this small model in one buffer
    reference = {label: {n: t.double().clone() for n, t in store.averages[label].items()} for label in "ab"}
    for seed in range(3):
        nudge(model, seed)
        store.update_(model, {"a": 0.5, "b": 0.9})
        step(reference["a"], model, 0.5)
        step(reference["b"], model, 0.9)
    for label in "ab":
        for name, want in reference[label].items():
            torch.testing.assert_close(store.averages[label][name].double(), want, rtol=0, atol=1e-6)
    tensors = {f"{label}/{n}": t for label in "ab" for n, t in store.averages[label].items()}
    save_sidecar(tmp_path, {"step": 3}, tensors)  # views of one buffer are copied out, not refused
    loaded = load_sidecar(tmp_path).tensors
    assert loaded.keys() == tensors.keys()
    for key, tensor in tensors.items():
        assert torch.equal(loaded[key], tensor)
