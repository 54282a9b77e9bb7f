"""GPU checks: no host synchronisation per update or swap, a bf16 model with a float32 average on CUDA, exact resume.

They skip themselves without CUDA; `tests/gpu/run.sh` runs them (and the update benchmark) on a lent GPU machine.
"""

import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir))

from conftest import TinyConfig, TinyModel, assert_close, reference_ema, state_of  # noqa: E402
from helpers import build  # noqa: E402

from hf_ema import EMAArguments  # noqa: E402
from hf_ema.core import UpdatePlan  # noqa: E402
from hf_ema.store import EMAStore  # noqa: E402

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_update_and_swap_never_synchronise_with_the_host():
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.LayerNorm(256), torch.nn.Linear(256, 8))
    model = model.cuda().to(torch.bfloat16)
    store = EMAStore(model, "auto")
    same = [torch.randn(1000, device="cuda") for _ in range(4)]
    live = [torch.randn(1000, device="cuda") for _ in range(4)]
    plan = UpdatePlan([same], live)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(3):
            store.update_(model, 0.99)
            plan.run([0.9])
        store.place_(model, store.primary)
        store.place_(model, None)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(t.dtype == torch.float32 and t.is_cuda for t in store.shadow.values())


def test_bf16_model_float32_average_and_exact_resume_on_cuda(tmp_path):
    ema_args = EMAArguments(smoothing=0.9)
    common = dict(use_cpu=False, num_train_epochs=2, save_strategy="steps", save_steps=8)

    def model():
        return TinyModel(TinyConfig()).to(torch.bfloat16)

    full, recorder, callback = build(tmp_path, ema_args, model=model(), **common)
    full.train()
    assert full.model.linear.weight.is_cuda and full.model.linear.weight.dtype == torch.bfloat16
    assert all(t.dtype == torch.float32 and t.is_cuda for t in callback.store.shadow.values())
    expected = reference_ema(recorder.weights, 0, [(k, 0.9) for k in range(1, 17)])
    shadow = {n: t.double().cpu() for n, t in callback.store.shadow.items()}
    assert_close(shadow, expected, rtol=1e-5, atol=1e-6)  # float32 average of bf16 weights
    exported = {n: t.double().cpu() for n, t in state_of(full.model).items()}
    assert_close(exported, expected, rtol=8e-3, atol=1e-3)  # rounded once to bf16

    ema_final = {n: t.clone() for n, t in callback.store.ema_tensors(full.model).items()}
    training_final = {n: t.clone() for n, t in callback.store.training_tensors(full.model).items()}
    shutil.rmtree(tmp_path / "checkpoint-16")
    resumed, _, resumed_cb = build(tmp_path, ema_args, model=model(), **common)
    resumed.train(resume_from_checkpoint=True)
    for name in ema_final:
        assert torch.equal(resumed_cb.store.ema_tensors(resumed.model)[name], ema_final[name]), name
        assert torch.equal(resumed_cb.store.training_tensors(resumed.model)[name], training_final[name]), name


def test_host_average_of_a_cuda_model(tmp_path):
    results = {}
    for device in (None, "cpu"):
        trainer, recorder, callback = build(
            tmp_path / str(device),
            EMAArguments(half_life="4ba", ema_device=device),
            use_cpu=False,
            num_train_epochs=2,
            save_strategy="steps",
            save_steps=8,
        )
        trainer.train()
        where = {t.device.type for t in callback.store.shadow.values()}
        assert where == ({"cpu"} if device == "cpu" else {"cuda"})
        if device == "cpu":
            assert all(t.is_pinned() for t in callback.store.shadow.values())
        expected = reference_ema(recorder.weights, 0, [(k, 2 ** (-1 / 4)) for k in range(1, 17)])
        assert_close({n: t.double().cpu() for n, t in callback.store.ema_tensors(trainer.model).items()}, expected)
        results[device] = {n: t.cpu() for n, t in callback.store.ema_tensors(trainer.model).items()}
        assert (tmp_path / str(device) / "checkpoint-16" / "ema_state.safetensors").is_file()
    for name in results[None]:
        torch.testing.assert_close(results["cpu"][name], results[None][name], rtol=1e-6, atol=1e-7)
