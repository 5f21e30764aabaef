"""Full-parameter fine-tuning of a causal LM with ``AdaLomo``, ``Lomo``, ``GoLore``, ``GaLore``
(in-backward updates) or AdamW, from the command line (docs/finetune.md).

    python -m lomo_kernels.finetune                       # the demo: tiny model, CPU, < 2 minutes
    python -m lomo_kernels.finetune --model ./my-model --data train.jsonl --output-dir out \
        --eval-fraction 0.05 --eval-generate --steps 300 --lr 5e-3
    python -m lomo_kernels.finetune --example             # SmolLM2-135M-Instruct, offline, CPU
    python -m lomo_kernels.finetune --model-config llama3-8b --dtype bf16 --device cuda \
        --seq-len 1024 --batch-size 1 --gradient-checkpointing --steps 20
    torchrun --nproc-per-node 2 -m lomo_kernels.finetune --fsdp   # sharded over 2 ranks

Without ``--model`` it runs the offline demo: a tiny Llama-shaped model built from a config,
trained from scratch with a byte-level tokenizer on text every Python installation has (the Zen
of Python and standard-library docstrings). Large demo shapes (``--model-config 1b``,
``llama3-8b``, ...; public shapes, never weights) are built on the meta device and materialised
directly in the target dtype on the target device.

With ``--model`` (a Hugging Face folder, a ``.gguf`` file or a Hub id) it fine-tunes the
pretrained model on ``--data`` (JSON Lines of prompt/completion, chat messages or text; loss on
completions only by default) or a built-in ``--task``, evaluates held-out loss and, with
``--eval-generate``, greedy exact match before and after, and saves the model with
``save_pretrained`` to ``--output-dir`` (checkpoints every ``--save-steps``, ``--resume``).

The package: ``cli`` (flags, config files), ``data`` and ``batches`` (formats, masks, padding,
packing), ``pretrained`` (loading, GGUF), ``model`` (shapes, meta init, FSDP2), ``optimizers``,
``train`` (the loop), ``evaluate``, ``checkpoint``, ``tasks`` (built-in tasks, the example),
``summary``, ``run`` (one run, end to end).

Function API: ``main(argv, train_dataset=None, eval_dataset=None) -> dict`` (the summary; raises
``UsageError`` on bad input), ``cli(argv) -> int`` (prints ``error: ...`` and returns 2 instead),
``build_model``, ``build_config``, ``ByteTokenizer``, ``stdlib_corpus``, ``task_rows``.
"""

from .demo_data import CORPUS_MODULES, ByteTokenizer, make_token_stream, sample_batch, stdlib_corpus
from .model import (DTYPES, MODEL_CONFIGS, build_config, build_model, default_dtype,
                    llama_num_params, shard_model)
from .optimizers import (DEFAULT_LR, GOLORE_EXCLUDE, IN_BACKWARD, OPTIMIZERS, make_optimizer,
                         optimizer_state_bytes)
from .errors import UsageError
from .run import cli, main
from .summary import format_summary, peak_rss_bytes
from .tasks import TASKS, task_rows

__all__ = [
    "main", "cli", "UsageError", "task_rows", "TASKS", "build_config", "build_model", "shard_model", "default_dtype", "llama_num_params",
    "make_optimizer", "optimizer_state_bytes", "peak_rss_bytes", "format_summary",
    "ByteTokenizer", "stdlib_corpus", "make_token_stream", "sample_batch", "CORPUS_MODULES",
    "MODEL_CONFIGS", "DTYPES", "OPTIMIZERS", "IN_BACKWARD", "DEFAULT_LR", "GOLORE_EXCLUDE",
]
