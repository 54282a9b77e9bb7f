"""Train a small causal language model from scratch with an EMA of its weights, from the command line.

In the style of transformers' `examples/pytorch/language-modeling/run_clm.py`, with `EMATrainer` and `EMAArguments`
added to the parser, and everything offline: the text is the Python standard library's own source files (the `.py`
files next to `os.py`, so every Python installation has them), the tokenizer maps the 256 byte values to ids 0-255
plus three special tokens (built in code with `tokenizers`), and the model is a tiny Llama built from a config.

    python examples/run_clm_ema.py                                   # the defaults below (timing under the list)
    python examples/run_clm_ema.py --half_life 200ba --update_interval 5ba --max_steps 1000
    python examples/run_clm_ema.py --half_life 60ba 150ba --bema --update_interval 1ba   # three averages side by side
    python examples/run_clm_ema.py args.json                         # or args.yaml: the same names as the flags
    python examples/run_clm_ema.py --help                            # every option: model, data, Trainer, EMA

Evaluations score the EMA weights as `eval_loss` and (with `--ema_eval_training_weights`, on by default here) the
training weights as `eval_training_loss`, in the same log line. At the end the EMA weights and the tokenizer are saved
to `--output_dir` (load them with `AutoModelForCausalLM.from_pretrained` / `AutoTokenizer.from_pretrained`), with
`eval_results.json` holding both perplexities. Any default below can be given again on the command line. With
several half-lives and `--bema` every evaluation also scores the other averages, as `eval_ema_<label>_loss`
(`eval_ema_150ba_loss`, `eval_ema_bema_loss`); the first half-life is the one saved and scored as `eval_loss`.
`benchmarks/bench_quality.py` runs that comparison (docs/benchmarks.md, "Quality").

With the defaults (600 steps of 8 x 128 bytes, a 0.46M-parameter Llama, half-life 50ba updated every 5ba) one run
took 9 min 33 s wall clock and 5 min 32 s of CPU time on a 2-core machine that other jobs were loading at the same
time (load average 5-6), so expect less on idle cores. It ended with eval_loss 2.077 (perplexity 7.98) for the EMA
against 2.127 (8.39) for the training weights; the EMA trailed slightly at the 200- and 400-step evaluations
(2.471 vs 2.447, 2.245 vs 2.237) and led at 600.
"""

from __future__ import annotations

import glob
import logging
import math
import os
import sys
from dataclasses import dataclass, field

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

import datasets  # noqa: E402
import transformers  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    HfArgumentParser,
    LlamaConfig,
    PreTrainedTokenizerFast,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from hf_ema import EMAArguments, EMATrainer  # noqa: E402

logger = logging.getLogger(__name__)

# The run the docstring times. The command line (or a JSON/YAML file) overrides any of these.
DEFAULTS = {
    "output_dir": "outputs/run_clm_ema",
    "max_steps": 600,
    "per_device_train_batch_size": 8,
    "per_device_eval_batch_size": 64,
    "learning_rate": 3e-3,
    "lr_scheduler_type": "constant_with_warmup",
    "warmup_steps": 30,
    "eval_strategy": "steps",
    "eval_steps": 200,
    "logging_steps": 50,
    "save_strategy": "no",
    "report_to": "none",
    "seed": 0,
    "half_life": "50ba",
    "update_interval": "5ba",
    "ema_eval_training_weights": True,
}

SPECIAL_TOKENS = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}


@dataclass
class ModelArguments:
    """The size of the Llama built from a config (no pretrained weights)."""

    hidden_size: int = field(default=128, metadata={"help": "Width of the model."})
    intermediate_size: int = field(default=384, metadata={"help": "Width of the MLP."})
    num_hidden_layers: int = field(default=2, metadata={"help": "Number of decoder layers."})
    num_attention_heads: int = field(default=4, metadata={"help": "Attention heads per layer."})
    num_key_value_heads: int = field(default=2, metadata={"help": "Key/value heads per layer (grouped-query)."})


@dataclass
class DataArguments:
    """Where the text comes from and how it is cut into training examples."""

    source_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of text files to train on; defaults to the Python standard library's folder."},
    )
    file_pattern: str = field(default="*.py", metadata={"help": "Which files of `source_dir` to read (glob)."})
    max_files: int | None = field(default=None, metadata={"help": "Read at most this many files (sorted by name)."})
    validation_every: int = field(
        default=10, metadata={"help": "Hold out every n-th file (sorted by name) for evaluation."}
    )
    block_size: int = field(default=128, metadata={"help": "Tokens (bytes) per training example."})
    max_eval_samples: int | None = field(
        default=256, metadata={"help": "Evaluate on at most this many blocks (the first ones)."}
    )


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from the 256 byte values to printable characters (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level tokenizer: byte b is token id b, then <bos>, <eos>, <pad> (259 ids). Built offline, in code."""
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    for token in SPECIAL_TOKENS.values():
        vocab[token] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))  # no merges: every byte stays a token
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, **SPECIAL_TOKENS)


def read_texts(data_args: DataArguments) -> tuple[list[str], list[str]]:
    """(training texts, evaluation texts): one per file, every `validation_every`-th file held out."""
    source = data_args.source_dir or os.path.dirname(os.__file__)
    paths = sorted(glob.glob(os.path.join(source, data_args.file_pattern)))[: data_args.max_files]
    if len(paths) < 2:
        raise ValueError(f"Need at least 2 files matching {data_args.file_pattern!r} in {source}, found {len(paths)}.")
    texts = []
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as handle:
            texts.append(handle.read())
    every = max(2, min(data_args.validation_every, len(texts)))
    train = [t for i, t in enumerate(texts) if i % every != every - 1]
    evaluation = [t for i, t in enumerate(texts) if i % every == every - 1]
    logger.info("Read %d files from %s: %d for training, %d held out", len(paths), source, len(train), len(evaluation))
    return train, evaluation


def to_blocks(texts: list[str], tokenizer: PreTrainedTokenizerFast, block_size: int) -> datasets.Dataset:
    """Tokenizes, joins every file's ids after <bos> ... <eos>, and cuts the stream into blocks (labels = inputs)."""

    def tokenize(batch):
        ids = tokenizer(batch["text"], add_special_tokens=False)["input_ids"]
        return {"input_ids": [[tokenizer.bos_token_id, *x, tokenizer.eos_token_id] for x in ids]}

    def group(batch):
        stream = [i for ids in batch["input_ids"] for i in ids]
        total = len(stream) // block_size * block_size
        blocks = [stream[i : i + block_size] for i in range(0, total, block_size)]
        return {"input_ids": blocks, "labels": [list(b) for b in blocks]}

    dataset = datasets.Dataset.from_dict({"text": texts})
    dataset = dataset.map(tokenize, batched=True, remove_columns=["text"])
    return dataset.map(group, batched=True, batch_size=len(texts))


def build_model(model_args: ModelArguments, tokenizer: PreTrainedTokenizerFast, block_size: int):
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=model_args.hidden_size,
        intermediate_size=model_args.intermediate_size,
        num_hidden_layers=model_args.num_hidden_layers,
        num_attention_heads=model_args.num_attention_heads,
        num_key_value_heads=model_args.num_key_value_heads,
        max_position_embeddings=block_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = AutoModelForCausalLM.from_config(config)
    logger.info("Llama from a config: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    return model


def parse_arguments(parser: HfArgumentParser):
    """The command line, or one JSON/YAML file, on top of DEFAULTS."""
    if len(sys.argv) == 2 and sys.argv[1].endswith((".json", ".yaml", ".yml")):
        import json

        import yaml

        with open(sys.argv[1], encoding="utf-8") as handle:
            given = json.load(handle) if sys.argv[1].endswith(".json") else yaml.safe_load(handle)
        return parser.parse_dict({**DEFAULTS, **given})
    defaults = []
    for name, value in DEFAULTS.items():
        defaults += [f"--{name}", str(value)]
    return parser.parse_args_into_dataclasses(args=defaults + sys.argv[1:])  # later flags win


def perplexity(loss: float) -> float:
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def main() -> None:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments, EMAArguments))
    model_args, data_args, training_args, ema_args = parse_arguments(parser)

    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        datefmt="%H:%M:%S",
        handlers=[logging.StreamHandler(sys.stdout)],
    )
    log_level = training_args.get_process_log_level()
    logger.setLevel(logging.INFO if training_args.should_log else log_level)
    transformers.utils.logging.set_verbosity(log_level)
    datasets.utils.logging.set_verbosity(log_level)
    datasets.disable_progress_bars()
    if training_args.device.type == "cpu":  # without --use_cpu on a machine with no accelerator: quiet the noise
        training_args.dataloader_pin_memory = False  # torch warns that there is nothing to pin memory for
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # DeepSpeed, if installed, warns that it fell back to CPU
    logger.info("EMA settings: %s", ema_args)

    set_seed(training_args.seed)
    tokenizer = byte_tokenizer()
    train_texts, eval_texts = read_texts(data_args)
    train_dataset = to_blocks(train_texts, tokenizer, data_args.block_size)
    eval_dataset = to_blocks(eval_texts, tokenizer, data_args.block_size)
    if data_args.max_eval_samples is not None:
        eval_dataset = eval_dataset.select(range(min(data_args.max_eval_samples, len(eval_dataset))))
    logger.info("%d training blocks, %d evaluation blocks", len(train_dataset), len(eval_dataset))

    trainer = EMATrainer(
        model=build_model(model_args, tokenizer, data_args.block_size),
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=tokenizer,
        data_collator=default_data_collator,
        ema_args=ema_args,
    )

    result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()  # the EMA weights, with the tokenizer
    trainer.log_metrics("train", result.metrics)
    trainer.save_metrics("train", result.metrics)
    trainer.save_state()

    metrics = trainer.evaluate()  # the EMA weights (and the training weights with ema_eval_training_weights)
    metrics["perplexity"] = perplexity(metrics["eval_loss"])
    if "eval_training_loss" in metrics:
        metrics["training_perplexity"] = perplexity(metrics["eval_training_loss"])
    trainer.log_metrics("eval", metrics)
    trainer.save_metrics("eval", metrics)


if __name__ == "__main__":
    main()
