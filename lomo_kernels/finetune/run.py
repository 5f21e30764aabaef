"""One fine-tuning run: parse, build (the demo, or a pretrained model on your data), train,
evaluate, save, summarise. ``main`` is the Python entry point (raises ``UsageError`` on bad
input); ``cli`` the command line's (prints ``error: ...``, returns 2)."""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from typing import Sequence

import torch

from .. import ops
from . import checkpoint as ckpt
from . import data as data_mod
from .batches import ExampleStream, WindowStream, eval_batches
from .cli import finalize, parse_args
from .demo_data import ByteTokenizer, make_token_stream, sample_batch, stdlib_corpus
from .distributed import barrier, init_distributed, rank_and_world
from .errors import UsageError
from .evaluate import eval_loss, exact_match
from .model import DTYPES, build_config, build_model
from .optimizers import IN_BACKWARD, make_optimizer
from .pretrained import ModelSource, load_config, load_model, load_sharded, load_tokenizer, resolve
from .summary import build_summary, format_samples, format_summary, write_summary
from .tasks import task_rows
from .train import History, train


def main(argv: Sequence[str] | None = None, *, train_dataset=None, eval_dataset=None) -> dict:
    """Run a fine-tuning job; returns the summary dict (also printed unless ``--quiet``).

    ``train_dataset`` / ``eval_dataset``: a ``datasets.Dataset`` (or a list of dicts) in one of
    the data formats, instead of ``--data`` / ``--eval-data``."""
    args = finalize(parse_args(argv), train_dataset=train_dataset, eval_dataset=eval_dataset)
    device = torch.device(args.device)
    started = args.fsdp and init_distributed(device)
    if args.fsdp and device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    threads = args.threads
    if threads is None and device.type == "cpu" and args.demo \
            and args.model_config in ("tiny", "small"):
        threads = 1
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        with _quiet_libraries():
            summary = Run(args, device).execute(train_dataset, eval_dataset)
        if started:  # every rank done before any tears the group down (gloo aborts a rank whose
            barrier()  # peer closed its connections while it still had work)
        return summary
    finally:
        torch.set_num_threads(old_threads)
        if started:
            torch.distributed.destroy_process_group()


def cli(argv: Sequence[str] | None = None) -> int:
    """The command line: 0 when done; ``error: <message>`` on stderr and 2 for bad input."""
    try:
        main(argv)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


@contextlib.contextmanager
def _quiet_libraries():
    """transformers' progress bars and advice (e.g. generation flags) off for the run: the
    command prints its own progress."""
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # the demo reports the missing transformers itself
        yield
        return
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


class Run:
    """Everything one run holds: the model, optimizer, data streams, evaluation sets."""

    def __init__(self, args, device) -> None:
        self.args, self.device = args, device
        self.rank, self.world = rank_and_world()
        self.quiet = args.quiet or self.rank != 0
        self.log = (lambda *a: None) if self.quiet else print
        self.dtype = DTYPES[args.dtype]
        self.resume_from = ckpt.find_checkpoint(args.resume) if args.resume else None
        self.tokenizer = None
        self.gen_examples = []
        self.data_stats = {}

    # ------------------------------------------------------------------ building
    def _model_from_checkpoint(self):
        folder = self.resume_from
        return load_model(ModelSource(folder, folder), dtype=self.dtype, device=self.device,
                          attn_implementation=self.args.attn_implementation,
                          gradient_checkpointing=self.args.gradient_checkpointing)

    def _build_demo(self) -> None:
        a = self.args
        self.tokenizer = ByteTokenizer()
        train_stream, eval_stream = make_token_stream(stdlib_corpus(), self.tokenizer)
        config = build_config(a.model_config, max_position_embeddings=max(4096, a.seq_len),
                              attn_implementation=a.attn_implementation)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        if self.resume_from and not a.fsdp:
            self.model = self._model_from_checkpoint()
        else:
            self.model = build_model(config, dtype=self.dtype, device=self.device,
                                     meta_init=a.meta_init, seed=a.seed, fsdp=a.fsdp,
                                     gradient_checkpointing=a.gradient_checkpointing)
        self.stream = WindowStream(train_stream, a.batch_size, a.seq_len, self.device,
                                   seed=a.seed, rank=self.rank)
        gen = torch.Generator().manual_seed(10_000 + a.seed)
        self.eval_batches = []
        for _ in range(a.eval_batches):
            b = sample_batch(eval_stream, a.batch_size, a.seq_len, gen).to(self.device)
            self.eval_batches.append({"input_ids": b, "labels": b})
        self.total_steps = a.steps
        self.model_name = a.model_config

    def _rows(self, train_dataset, eval_dataset):
        a = self.args
        if a.task:
            train_rows, eval_rows = task_rows(a.task)
            return (data_mod.as_dataset(train_rows, "--task"),
                    data_mod.as_dataset(eval_rows, "--task"))
        if train_dataset is not None:
            train_ds = data_mod.as_dataset(train_dataset, "train_dataset")
        else:
            train_ds = data_mod.read_rows(a.data, "--data")
        eval_ds = None
        if eval_dataset is not None:
            eval_ds = data_mod.as_dataset(eval_dataset, "eval_dataset")
        elif a.eval_data:
            eval_ds = data_mod.read_rows(a.eval_data, "--eval-data")
        elif a.eval_fraction:
            train_ds, eval_ds = data_mod.split_rows(train_ds, a.eval_fraction, a.seed)
        return train_ds, eval_ds

    def _source(self) -> ModelSource:
        """The model's folder; a GGUF file is converted by rank 0 while the others wait."""
        if self.rank == 0:
            source = resolve(self.args.model, log=self.log)
        barrier()
        if self.rank != 0:
            source = resolve(self.args.model, log=self.log)
        return source

    def _build_pretrained(self, train_dataset, eval_dataset) -> None:
        a = self.args
        train_ds, eval_ds = self._rows(train_dataset, eval_dataset)  # bad data fails early
        source = self._source()
        self.tokenizer = tok = load_tokenizer(source)
        encoder = data_mod.Encoder(tok, chat_template=a.chat_template,
                                   train_on_prompt=a.train_on_prompt)
        where = (f"--task {a.task}" if a.task else f"--data {a.data}" if train_dataset is None
                 else "train_dataset")
        enc = data_mod.encode(train_ds, encoder, a.seq_len, where)
        examples = data_mod.pack(enc.examples, a.seq_len) if a.packing else enc.examples
        self.data_stats = {"format": enc.format, "rows": enc.rows, "truncated": enc.truncated,
                           "dropped": enc.dropped, "train_sequences": len(examples)}
        pad = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
        held = []
        if eval_ds is not None:
            eval_enc = data_mod.encode(eval_ds, encoder, a.seq_len, "held-out data")
            held = eval_enc.examples[:a.eval_examples]
            self.data_stats.update(eval_rows=eval_enc.rows, eval_truncated=eval_enc.truncated,
                                   eval_dropped=eval_enc.dropped)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        kw = dict(dtype=self.dtype, device=self.device, attn_implementation=a.attn_implementation,
                  gradient_checkpointing=a.gradient_checkpointing)
        if self.resume_from and not a.fsdp:
            self.model = self._model_from_checkpoint()
        elif a.fsdp and self.resume_from:  # the weights come from the checkpoint's shards
            self.model = build_model(load_config(source, a.attn_implementation), fsdp=True,
                                     dtype=self.dtype, device=self.device, seed=a.seed,
                                     gradient_checkpointing=a.gradient_checkpointing)
        elif a.fsdp:
            self.model = load_sharded(source, rank=self.rank, **kw)
        else:
            self.model = load_model(source, **kw)
        self.stream = ExampleStream(examples, a.batch_size, pad, self.device, seed=a.seed,
                                    rank=self.rank, world=self.world)
        self.eval_batches = eval_batches(held, a.batch_size, pad, self.device)
        self.gen_examples = [ex for ex in held if ex.answer is not None]
        self.max_new_tokens = a.max_new_tokens or 8 + max(
            (len(tok(ex.answer, add_special_tokens=False)["input_ids"])
             for ex in self.gen_examples), default=0)
        per_epoch = self.stream.batches_per_epoch()
        self.total_steps = a.steps or max(1, math.ceil((a.epochs or 1) * per_epoch
                                                       / a.gradient_accumulation_steps))
        self.model_name = a.model

    def _build_optimizer(self) -> None:
        a = self.args
        self.backend = None
        if a.optimizer != "adamw":
            try:
                self.backend = ops.resolve_backend(a.backend, self.device)
            except RuntimeError as exc:
                raise UsageError(f"--backend {a.backend}: {exc}") from None
        try:
            self.opt = make_optimizer(
                a.optimizer, self.model, a.lr, backend=a.backend,
                clip_grad_norm=a.clip_grad_norm, clip_grad_value=a.clip_grad_value,
                weight_decay=a.weight_decay, rounding=a.rounding, seed=a.seed, rank=a.rank,
                update_proj_gap=a.update_proj_gap, golore_scale=a.golore_scale,
                svd_steps=a.svd_steps, clip_mode=a.clip_mode,
                accumulation_steps=a.gradient_accumulation_steps)
        except UsageError:
            raise
        except (ValueError, TypeError) as exc:  # the optimizer refused its arguments
            raise UsageError(f"--optimizer {a.optimizer}: {exc}") from None
        self.in_backward = isinstance(self.opt, IN_BACKWARD)

    # ------------------------------------------------------------------ evaluation, saving
    def eval_loss(self):
        return eval_loss(self.model, self.eval_batches)

    def exact_match(self, when: str):
        if not (self.args.eval_generate and self.gen_examples):
            return None
        result = exact_match(self.model, self.tokenizer, self.gen_examples,
                             max_new_tokens=self.max_new_tokens, batch_size=self.args.batch_size,
                             samples=self.args.print_samples, synced=self.args.fsdp)
        self.log(format_samples(result, when))
        return result

    def trainer_state(self, step: int, history: History) -> dict:
        return {"step": step, "args": {k: getattr(self.args, k) for k in ckpt.TRAJECTORY},
                "history": history.state_dict(), "eval_loss_start": self.eval_start,
                "exact_match_before": self.em_before}

    def save_checkpoint(self, step: int, history: History) -> None:
        folder = os.path.join(self.args.output_dir, f"checkpoint-{step}")
        ckpt.write_checkpoint(folder, model=self.model, tokenizer=self.tokenizer, opt=self.opt,
                              stream=self.stream, trainer_state=self.trainer_state(step, history),
                              fsdp=self.args.fsdp, rank=self.rank)

    def save_final(self, summary: dict) -> None:
        out = self.args.output_dir
        if self.args.fsdp:
            ckpt.save_sharded_model(self.model, self.tokenizer, out, self.rank)
        elif self.rank == 0:
            ckpt.save_model(self.model, self.tokenizer, out)
        if self.rank == 0:
            write_summary(summary, os.path.join(out, "train_summary.json"))

    # ------------------------------------------------------------------ the run
    def execute(self, train_dataset=None, eval_dataset=None) -> dict:
        a = self.args
        t_start = time.perf_counter()
        if a.demo:
            self._build_demo()
        else:
            self._build_pretrained(train_dataset, eval_dataset)
        self._build_optimizer()
        history, start = History(), 0
        if self.resume_from:
            state = ckpt.read_state(self.resume_from, a)
            ckpt.load_checkpoint(self.resume_from, model=self.model, opt=self.opt,
                                 stream=self.stream, fsdp=a.fsdp, rank=self.rank)
            history, start = History(**state["history"]), state["step"]
            self.eval_start, self.em_before = state["eval_loss_start"], state["exact_match_before"]
            self.log(f"resumed from {self.resume_from} at step {start}")
        else:
            self.eval_start = self.eval_loss()
            self.em_before = self.exact_match("before training")
        progress = None
        if not self.quiet:
            from tqdm.auto import tqdm

            progress = tqdm(total=self.total_steps, initial=start, unit="step",
                            desc=f"{a.optimizer} {os.path.basename(str(self.model_name))}",
                            dynamic_ncols=True)
        t_train0 = time.perf_counter()
        train(self, history, start, progress)
        t_end = time.perf_counter()
        if progress is not None:
            progress.close()
        eval_end = self.eval_loss()
        em_after = self.exact_match("after training")
        summary = build_summary(self, history, eval_end=eval_end, em_after=em_after,
                                train_s=t_end - t_train0, wall_s=time.perf_counter() - t_start)
        if a.output_dir:
            self.save_final(summary)
        if not self.quiet:
            print(format_summary(summary))
        return summary
