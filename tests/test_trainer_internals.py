"""The Trainer internals hf-ema relies on. Private APIs move between transformers releases: each one used is checked
here by name, so a move fails loudly with the name of what moved (the behaviour tests would fail too, less clearly)."""

import inspect

import transformers
from accelerate.optimizer import AcceleratedOptimizer
from packaging.version import Version
from transformers import Trainer, TrainerCallback, TrainerState
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_ema import resume as resume_module

TRANSFORMERS_MAJOR = Version(transformers.__version__).major


def parameters(function):
    return list(inspect.signature(function).parameters)


def test_private_trainer_methods_overridden_or_called():
    assert parameters(Trainer._save_checkpoint)[:3] == ["self", "model", "trial"]  # EMATrainer._save_checkpoint
    assert parameters(Trainer._save)[:3] == ["self", "output_dir", "state_dict"]  # EMATrainer._save
    assert parameters(Trainer._get_output_dir)[:2] == ["self", "trial"]  # sidecar folder of a checkpoint
    assert parameters(Trainer.train)[:3] == ["self", "resume_from_checkpoint", "trial"]  # EMAMixin.train passes both
    loop = parameters(Trainer.evaluation_loop)  # ema_eval_training_weights
    for name in ("dataloader", "description", "prediction_loss_only", "ignore_keys", "metric_key_prefix"):
        assert name in loop, name
    assert parameters(Trainer.evaluate)[:4] == ["self", "eval_dataset", "ignore_keys", "metric_key_prefix"]
    assert parameters(Trainer.save_model)[:3] == ["self", "output_dir", "_internal_call"]  # EMAMixin.save_model
    # EMAMixin.add_callback keeps the EMA callback last through the handler's public methods.
    from transformers.trainer_callback import CallbackHandler

    assert callable(CallbackHandler.remove_callback) and callable(CallbackHandler.add_callback)
    # A second EMACallback is refused in on_init_end, which the Trainer's constructor calls.
    assert "callback_handler.on_init_end(" in inspect.getsource(Trainer.__init__)


def test_callback_hooks_and_state_fields():
    hooks = ["on_init_end", "on_train_begin", "on_step_begin", "on_pre_optimizer_step", "on_step_end", "on_epoch_end",
             "on_evaluate", "on_save", "on_train_end"]  # fmt: skip
    if TRANSFORMERS_MAJOR >= 5:  # 4.x has no on_push_begin: the sidecar goes in at on_step_end / on_evaluate
        hooks.append("on_push_begin")
    for hook in hooks:
        assert callable(getattr(TrainerCallback, hook, None)), hook
    state = TrainerState()
    for field in ("global_step", "epoch", "max_steps", "num_train_epochs", "num_input_tokens_seen",
                  "train_batch_size", "is_hyper_param_search", "best_model_checkpoint"):  # fmt: skip
        assert hasattr(state, field), field


def test_best_save_rule():
    """hf_ema.callback.saves_as_best foresees, in on_evaluate, the save save_strategy="best" makes after it: the
    Trainer's own rule, read here from its source."""
    decide = inspect.getsource(Trainer._maybe_log_save_evaluate)
    assert decide.index("_evaluate(") < decide.index("_determine_best_metric(") < decide.index("_save_checkpoint(")
    assert "self.control.should_save = is_new_best_metric" in decide
    rule = inspect.getsource(Trainer._determine_best_metric)
    assert 'metric_to_check = f"eval_{metric_to_check}"' in rule
    assert "operator = np.greater if self.args.greater_is_better else np.less" in rule
    assert 'self.state.best_metric = float("-inf") if self.args.greater_is_better else float("inf")' in rule
    assert "if operator(metric_value, self.state.best_metric):" in rule


def test_checkpoint_folder_name_and_skipped_steps():
    assert resume_module.PREFIX_CHECKPOINT_DIR == PREFIX_CHECKPOINT_DIR
    assert isinstance(inspect.getattr_static(AcceleratedOptimizer, "step_was_skipped"), property)


def test_deepspeed_config_is_read_by_name(tmp_path):
    """guards.deepspeed_config reads TrainingArguments.hf_deepspeed_config; check it on a real TrainingArguments."""
    __import__("pytest").importorskip("deepspeed")
    import gc
    import os

    from transformers import TrainingArguments
    from transformers.integrations import deepspeed as hf_deepspeed

    from hf_ema.guards import deepspeed_config

    environment = dict(os.environ)  # TrainingArguments(deepspeed=...) sets ACCELERATE_USE_DEEPSPEED on 4.x
    try:
        zero = {"stage": 3, "stage3_gather_16bit_weights_on_model_save": False}
        args = TrainingArguments(output_dir=str(tmp_path), use_cpu=True, deepspeed={"zero_optimization": zero})
        assert type(args.hf_deepspeed_config).__name__ == "HfTrainerDeepSpeedConfig"
        assert deepspeed_config(args)["zero_optimization"]["stage"] == 3
        del args.hf_deepspeed_config  # as if transformers renamed it: a loud error, not a skipped check
        with __import__("pytest").raises(RuntimeError, match="hf_deepspeed_config"):
            deepspeed_config(args)
    finally:  # leave no DeepSpeed mode behind for the tests that follow (a global weak reference, the environment)
        args = None
        gc.collect()
        if hasattr(hf_deepspeed, "unset_hf_deepspeed_config"):
            hf_deepspeed.unset_hf_deepspeed_config()
        os.environ.clear()
        os.environ.update(environment)


def test_deepspeed_internals():
    """DeepSpeed (ZeRO-3) attributes and engine methods hf-ema reads; the CPU DeepSpeed runs exercise them all."""
    __import__("pytest").importorskip("deepspeed")
    from deepspeed.runtime.engine import DeepSpeedEngine
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from deepspeed.runtime.zero.partition_parameters import Init, ZeroParamStatus

    assert ZeroParamStatus.AVAILABLE.name == "AVAILABLE"  # distributed.refresh_
    # EMATrainer._zero3_gathers_on_save: the engine reads this config field; Trainer.save_model gathers through it.
    assert "gather_16bit_weights_on_model_save" in DeepSpeedZeroConfig.model_fields
    assert callable(DeepSpeedEngine.zero_gather_16bit_weights_on_model_save)
    assert callable(DeepSpeedEngine._zero3_consolidated_16bit_state_dict)
    source = inspect.getsource(Trainer.save_model)
    assert "get_state_dict(self.deepspeed)" in source or "_zero3_consolidated_16bit_state_dict" in source
    # The partition layout distributed._zero3_span assumes: ceil(numel / world) per rank, padded at the end.
    assert "remainder = param.ds_numel % partition_world_size" in inspect.getsource(Init._padding_size)


def test_torch_apis_of_the_declared_oldest_torch():
    """pyproject declares torch>=2.6 for these APIs (added in 2.6); each is checked by name."""
    from torch.distributed.checkpoint import FileSystemWriter, load, save
    from torch.distributed.device_mesh import DeviceMesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor, distribute_tensor

    assert "src_data_rank" in parameters(distribute_tensor)  # layout.DTensorShards.shard: no communication
    assert "no_dist" in parameters(save) and "no_dist" in parameters(load)  # one-process sharded EMA state
    assert callable(DeviceMesh.from_group) and callable(DTensor.from_local) and callable(FileSystemWriter)
    assert callable(FSDPModule.reshard) and callable(fully_shard)
    requirement = [line for line in open(_pyproject()).read().splitlines() if line.strip().startswith('"torch')]
    assert requirement and ">=2.6" in requirement[0]


def _pyproject():
    import pathlib

    return pathlib.Path(__file__).resolve().parent.parent / "pyproject.toml"
