"""EMAArguments and time strings: parsing, defaults, and every bad input failing at construction."""

import dataclasses
import json

import pytest
import torch
from transformers import HfArgumentParser, TrainingArguments

from hf_ema import EMAArguments
from hf_ema.time import Time, parse_time


def test_defaults_follow_composer():
    a = EMAArguments()
    assert a.half_life == "1000ba" and a.smoothing is None
    assert a.half_life_time == Time(1000, "ba")
    assert a.update_interval_time == Time(1, "ba")
    assert a.ema_start_time == Time(0.0, "dur")


@pytest.mark.parametrize(
    "kwargs, interval",
    [
        ({"half_life": "3ep"}, Time(1, "ep")),
        ({"half_life": "500sp"}, Time(1, "sp")),
        ({"half_life": "0.1dur"}, Time(1, "ba")),
        ({"smoothing": 0.9}, Time(1, "ba")),
        ({"half_life": "100ba", "update_interval": "10ba"}, Time(10, "ba")),
    ],
)
def test_update_interval_default(kwargs, interval):
    assert EMAArguments(**kwargs).update_interval_time == interval


def test_smoothing_replaces_half_life():
    a = EMAArguments(smoothing=0.99)
    assert a.half_life is None and a.half_life_time is None and a.smoothing == 0.99


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1000ba", Time(1000, "ba")),
        ("0.5dur", Time(0.5, "dur")),
        ("2ep", Time(2, "ep")),
        ("1e3tok", Time(1000, "tok")),
    ],
)
def test_parse_time(text, expected):
    assert parse_time(text, "half_life") == expected


BAD = [
    ({"half_life": "1000"}, ValueError, "half_life"),
    ({"half_life": "abc"}, ValueError, "half_life"),
    ({"half_life": "10xx"}, ValueError, "half_life"),
    ({"half_life": ""}, ValueError, "half_life"),
    ({"half_life": "nanba"}, ValueError, "half_life"),
    ({"half_life": "infba"}, ValueError, "half_life"),
    ({"half_life": "1e400ba"}, ValueError, "half_life"),
    ({"half_life": "0ba"}, ValueError, "half_life"),
    ({"half_life": "-5ba"}, ValueError, "half_life"),
    ({"half_life": "2.5ba"}, ValueError, "half_life"),
    ({"half_life": "1.5dur"}, ValueError, "half_life"),
    ({"half_life": 1000}, TypeError, "half_life"),
    ({"smoothing": 0.0}, ValueError, "smoothing"),
    ({"smoothing": 1.0}, ValueError, "smoothing"),
    ({"smoothing": 1.5}, ValueError, "smoothing"),
    ({"smoothing": -0.1}, ValueError, "smoothing"),
    ({"smoothing": float("nan")}, ValueError, "smoothing"),
    ({"smoothing": True}, TypeError, "smoothing"),
    ({"smoothing": "high"}, ValueError, "smoothing"),
    ({"half_life": "100ba", "smoothing": 0.9}, ValueError, "half_life"),
    ({"update_interval": "0ba"}, ValueError, "update_interval"),
    ({"update_interval": "-1ba"}, ValueError, "update_interval"),
    ({"update_interval": "1.5ep"}, ValueError, "update_interval"),
    ({"ema_start": "-1ba"}, ValueError, "ema_start"),
    ({"ema_start": "1.1dur"}, ValueError, "ema_start"),
    ({"ema_start": "10"}, ValueError, "ema_start"),
    ({"ema_dtype": "float16"}, ValueError, "ema_dtype"),
    ({"ema_checkpoint_weights": "both"}, ValueError, "ema_checkpoint_weights"),
    ({"ema_resume_without_state": "ignore"}, ValueError, "ema_resume_without_state"),
    ({"ema_eval_training_weights": "yes"}, TypeError, "ema_eval_training_weights"),
]


@pytest.mark.parametrize("kwargs, error, field", BAD, ids=[json.dumps(b[0], default=str) for b in BAD])
def test_bad_input_fails_at_construction(kwargs, error, field):
    with pytest.raises(error) as info:
        EMAArguments(**kwargs)
    message = str(info.value)
    assert f"`{field}`" in message
    value = next(iter(kwargs.values())) if len(kwargs) == 1 else None
    if isinstance(value, str) and value:
        assert repr(value) in message  # the value received is quoted back


def test_no_field_clashes_with_training_arguments():
    ours = {f.name for f in dataclasses.fields(EMAArguments)}
    theirs = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert not ours & theirs


def test_hf_argument_parser_cli(tmp_path):
    parser = HfArgumentParser((TrainingArguments, EMAArguments))
    training, ema = parser.parse_args_into_dataclasses(
        ["--output_dir", str(tmp_path), "--half_life", "100ba", "--update_interval", "10ba", "--ema_dtype", "same"]
    )
    assert training.output_dir == str(tmp_path)
    assert ema.half_life_time == Time(100, "ba") and ema.update_interval_time == Time(10, "ba")
    assert ema.ema_dtype == "same" and ema.smoothing is None


def test_hf_argument_parser_smoothing_and_json(tmp_path):
    parser = HfArgumentParser((TrainingArguments, EMAArguments))
    _, ema = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--smoothing", "0.99"])
    assert ema.smoothing == 0.99 and ema.half_life is None
    path = tmp_path / "args.json"
    path.write_text(json.dumps({"output_dir": str(tmp_path), "half_life": "2ep", "ema_start": "0.5dur"}))
    _, ema = parser.parse_json_file(str(path))
    assert ema.half_life_time == Time(2, "ep") and ema.ema_start_time == Time(0.5, "dur")
    with pytest.raises(SystemExit):  # argparse choices from the Literal type
        parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--ema_dtype", "int8"])


def test_yaml(tmp_path):
    parser = HfArgumentParser((TrainingArguments, EMAArguments))
    path = tmp_path / "args.yaml"
    path.write_text(f"output_dir: {tmp_path}\nhalf_life: 300ba\nema_checkpoint_weights: training\n")
    _, ema = parser.parse_yaml_file(str(path))
    assert ema.half_life == "300ba" and ema.ema_checkpoint_weights == "training"


def test_a_zero_start_needs_no_clock_of_its_unit(tmp_path):
    """`ema_start="0ep"` (or "0tok") starts at train begin: no epoch count or token counting is needed."""
    from conftest import RegressionDataset
    from helpers import build

    assert EMAArguments(ema_start="0ep").units() == {"ba"}
    assert EMAArguments(half_life="8sp", ema_start="0tok").units() == {"sp"}
    assert EMAArguments(ema_start="2ep").units() == {"ba", "ep"}

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            data = RegressionDataset(32)
            return iter(data[i] for i in range(len(data)))

    trainer, _, callback = build(tmp_path, EMAArguments(half_life="4ba", ema_start="0ep"), max_steps=4)
    trainer.train_dataset = Stream()
    trainer.train()
    assert callback.started and callback.num_updates == 4


def test_help_groups_the_ema_options(capsys):
    parser = HfArgumentParser((TrainingArguments, EMAArguments))
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--help"])
    text = capsys.readouterr().out
    section = text[text.index("EMA arguments (hf-ema):") :]  # the group, after TrainingArguments' options
    for option in ("--half_life", "--sigma_rel", "--ema_start", "--ema_schedule", "--update_interval"):
        assert f"\n  {option} " in section, option
    assert "--learning_rate" not in section
