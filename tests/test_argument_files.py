"""`HfArgumentParser((TrainingArguments, EMAArguments))` reads one JSON or YAML file holding both sets of settings, as
the README shows (`parse_json_file` / `parse_yaml_file`; `parse_args_into_dataclasses` reads the command line)."""

import json

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_ema import EMAArguments

SETTINGS = {
    "output_dir": "out",
    "learning_rate": 0.001,
    "max_steps": 50,
    "use_cpu": True,
    "report_to": "none",
    "half_life": "200ba",
    "update_interval": "5ba",
    "ema_start": "0.1dur",
    "ema_eval_training_weights": True,
    "ema_checkpoint_weights": "training",
}

YAML = """\
output_dir: out
learning_rate: 0.001
max_steps: 50
use_cpu: true
report_to: none
half_life: 200ba
update_interval: 5ba
ema_start: 0.1dur
ema_eval_training_weights: true
ema_checkpoint_weights: training
"""


def parser():
    return HfArgumentParser((TrainingArguments, EMAArguments))


def check(training_args, ema_args):
    assert isinstance(training_args, TrainingArguments) and isinstance(ema_args, EMAArguments)
    assert training_args.output_dir == "out" and training_args.learning_rate == 0.001
    assert training_args.max_steps == 50
    assert ema_args.half_life == "200ba" and ema_args.update_interval == "5ba" and ema_args.ema_start == "0.1dur"
    assert ema_args.smoothing is None
    assert ema_args.ema_eval_training_weights is True and ema_args.ema_checkpoint_weights == "training"
    assert ema_args.update_interval_time.value == 5 and ema_args.update_interval_time.unit == "ba"


def test_json_file(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps(SETTINGS), encoding="utf-8")
    check(*parser().parse_json_file(str(path)))


def test_yaml_file(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text(YAML, encoding="utf-8")
    check(*parser().parse_yaml_file(str(path)))


def test_a_file_with_a_bad_ema_setting_fails_with_the_field_name(tmp_path):
    path = tmp_path / "args.json"
    path.write_text(json.dumps({**SETTINGS, "half_life": "200"}), encoding="utf-8")
    with pytest.raises(ValueError, match="`half_life` must look like '1000ba'"):
        parser().parse_json_file(str(path))


def test_a_misspelt_key_is_refused(tmp_path):
    path = tmp_path / "args.yaml"
    path.write_text(YAML + "half_lif: 100ba\n", encoding="utf-8")
    with pytest.raises(ValueError, match="half_lif"):
        parser().parse_yaml_file(str(path))
