"""Pure math: compute_ema, the fused update, swaps, against float64 references."""

import copy

import pytest
import torch
from torch import nn

from hf_ema import compute_ema
from hf_ema.core import UpdatePlan, exchange_, tracked_tensors
from hf_ema.rules import Counters, HalfLife
from hf_ema.store import EMAStore
from hf_ema.time import Clock, Time


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(7, 4)
        self.norm = nn.BatchNorm1d(4)
        self.head = nn.Linear(4, 7, bias=False)
        self.head.weight = self.embed.weight  # tied
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)
        self.register_buffer("scratch", torch.ones(2), persistent=False)


def perturb(module, seed):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=generator).to(p.dtype))
        module.norm.running_mean.add_(torch.randn(4, generator=generator))
        module.norm.num_batches_tracked.add_(3)


def test_tracked_tensors_selection():
    kinds = {name: kind for name, _, kind in tracked_tensors(Net())}
    assert kinds == {
        "embed.weight": "average",  # tied with head.weight: once
        "norm.weight": "average",
        "norm.bias": "average",
        "norm.running_mean": "average",
        "norm.running_var": "average",
        "norm.num_batches_tracked": "copy",
    }  # no frozen.*, no non-persistent scratch


def test_smoothing_from_half_life():
    def smoothing(elapsed, half_life):
        return HalfLife(Time(half_life, "ba"))(Counters(Clock(ba=elapsed), Clock(), Clock()))

    assert smoothing(10, 10) == 0.5
    assert smoothing(1, 1000) == pytest.approx(0.5 ** (1 / 1000), rel=1e-15)


def test_compute_ema_matches_float64_reference():
    model = Net()
    ema_model = copy.deepcopy(model)
    expected = {n: t.detach().double().clone() for n, t, k in tracked_tensors(ema_model)}
    for seed, s in [(1, 0.9), (2, 0.5), (3, 0.99)]:
        perturb(model, seed)
        compute_ema(model, ema_model, smoothing=s)
        for name, tensor, kind in tracked_tensors(model):
            if kind == "copy":
                expected[name] = tensor.double().clone()
            else:
                expected[name] = s * expected[name] + (1 - s) * tensor.detach().double()
    got = dict(ema_model.named_parameters()) | dict(ema_model.named_buffers())
    for name, value in expected.items():
        torch.testing.assert_close(got[name].double(), value, rtol=1e-6, atol=1e-6)
    assert got["norm.num_batches_tracked"].item() == 9
    assert ema_model.head.weight is ema_model.embed.weight
    torch.testing.assert_close(ema_model.frozen.weight, model.frozen.weight)


def test_compute_ema_float32_shadow_of_bf16_model_moves():
    model = nn.Linear(64, 64).to(torch.bfloat16)
    ema32 = copy.deepcopy(model).float()
    ema16 = copy.deepcopy(model)
    reference = ema32.weight.detach().double().clone()
    torch.manual_seed(1)
    for _ in range(20):
        with torch.no_grad():
            model.weight.add_(torch.randn_like(model.weight) * 0.5)
        compute_ema(model, ema32, smoothing=0.999)
        compute_ema(model, ema16, smoothing=0.999)
        reference = 0.999 * reference + 0.001 * model.weight.detach().double()
    torch.testing.assert_close(ema32.weight.double(), reference, rtol=1e-5, atol=1e-6)
    # The bf16 copy's error is far larger than the float32 copy's: updates of 0.1% round away.
    err32 = (ema32.weight.double() - reference).abs().max().item()
    err16 = (ema16.weight.double() - reference).abs().max().item()
    assert err16 > 100 * err32


def test_compute_ema_rejects_mismatch():
    with pytest.raises(KeyError, match="no tensor named"):
        compute_ema(nn.Linear(2, 2), nn.Sequential(nn.Linear(2, 2)), 0.9)
    with pytest.raises(ValueError, match="shape"):
        compute_ema(nn.Linear(2, 2), nn.Linear(2, 3), 0.9)
    with pytest.raises(ValueError, match="smoothing"):
        compute_ema(nn.Linear(2, 2), nn.Linear(2, 2), 1.5)


def test_update_of_a_constant_tensor_stays_exact():
    shadow = [torch.full((5,), 0.1)]
    UpdatePlan([shadow], [torch.full((5,), 0.1)]).run([0.3])
    assert torch.equal(shadow[0], torch.full((5,), 0.1))


def test_exchange_keeps_storage():
    a, b = torch.arange(4.0), torch.arange(4.0) + 10
    pa, pb = a.data_ptr(), b.data_ptr()
    exchange_([a], [b])
    assert a.tolist() == [10, 11, 12, 13] and b.tolist() == [0, 1, 2, 3]
    assert (a.data_ptr(), b.data_ptr()) == (pa, pb)


@pytest.mark.parametrize(
    "dtype, policy", [(torch.float32, "auto"), (torch.bfloat16, "auto"), (torch.bfloat16, "same")]
)
def test_store_swap_round_trip_is_bit_exact(dtype, policy):
    model = Net().to(dtype)
    store = EMAStore(model, policy)
    perturb(model, 5)
    store.update_(model, 0.7)
    before = {n: t.clone() for n, t, _ in tracked_tensors(model)}
    pointers = {n: t.data_ptr() for n, t, _ in tracked_tensors(model)}
    store.place_(model, store.primary)
    for name, tensor, kind in tracked_tensors(model):
        if kind == "average":
            assert torch.equal(tensor, store.ema_tensors(model)[name].to(dtype))
            assert torch.equal(store.training_tensors(model)[name], before[name])
    store.place_(model, None)
    for name, tensor, _ in tracked_tensors(model):
        assert torch.equal(tensor, before[name]), name
        assert tensor.data_ptr() == pointers[name]
    expected_dtype = torch.float32 if policy == "auto" else dtype
    assert all(s.dtype == expected_dtype for s in store.shadow.values())


def test_store_refuses_changed_model():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    store = EMAStore(model)
    model[1].requires_grad_(False)
    with pytest.raises(RuntimeError, match="1.weight"):
        store.update_(model, 0.5)
    model[1].requires_grad_(True)
    model[0] = nn.Linear(2, 3)
    with pytest.raises(RuntimeError, match=r"reshaped: 0.weight"):
        store.update_(model, 0.5)
