"""Lomo / AdaLomo driven by ``transformers.Trainer`` (plain backward + no-op step + scheduler).

The Trainer needs ``accelerate`` (``TrainingArguments`` refuses to start without it): the
Trainer tests are skipped, with that reason, where it is not installed; the helper's argument
checks run everywhere.
"""

import copy
import dataclasses
import types
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

import lomo_kernels.hf  # noqa: E402
from lomo_kernels import AdaLomo, GaLore, GoLore, Lomo  # noqa: E402
from lomo_kernels.finetune import build_config, build_model  # noqa: E402
from lomo_kernels.hf import check_training_args, make_trainer_optimizers  # noqa: E402

try:
    import accelerate  # noqa: F401

    HAVE_ACCELERATE = True
except ImportError:
    HAVE_ACCELERATE = False

requires_accelerate = pytest.mark.skipif(
    not HAVE_ACCELERATE,
    reason="transformers.Trainer needs accelerate>=1.1 (pip install accelerate)",
)

SEQ, N = 24, 4


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one thread is faster and steadier than OpenMP threads on a shared CPU."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)  # N samples, one batch of all of them per step: every step sees the same data


def _model(seed=0):
    return build_model(build_config("tiny", num_hidden_layers=2), seed=seed)


def _data(seed=0):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(N):
        x = torch.randint(0, 256, (SEQ,), generator=g)
        out.append({"input_ids": x, "labels": x.clone()})
    return out


def _batch(data):
    return torch.stack([d["input_ids"] for d in data])


def _args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path), report_to=[], use_cpu=True, max_steps=3,
                per_device_train_batch_size=N, learning_rate=1e-2, save_strategy="no",
                logging_steps=1, disable_tqdm=True, lr_scheduler_type="constant",
                max_grad_norm=0.0, seed=0, dataloader_num_workers=0)
    base.update(kw)
    return transformers.TrainingArguments(**base)


class _LrLog(transformers.TrainerCallback):
    """The lr in param_groups when each step begins: the lr its in-backward update uses."""

    def __init__(self, optimizer):
        self.optimizer, self.lrs, self.logs = optimizer, [], []

    def on_step_begin(self, args, state, control, **kw):
        self.lrs.append(self.optimizer.param_groups[0]["lr"])

    def on_log(self, args, state, control, logs=None, **kw):
        self.logs.append(dict(logs or {}))


def _replay(model, data, cls, lrs, **opt_kw):
    """The same steps with fused_backward(loss, lr) in a plain loop."""
    opt = cls(model, lr=lrs[0], **opt_kw)
    x = _batch(data)
    for lr in lrs:
        opt.fused_backward(model(input_ids=x, labels=x).loss, lr)
    return model


def _assert_same_params(a, b, rtol=1e-5, atol=1e-6):
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=rtol, atol=atol, msg=n)


@requires_accelerate
@pytest.mark.parametrize(
    "cls,kw",
    [(AdaLomo, {}), (Lomo, {}), (AdaLomo, {"clip_grad_value": 1e-4}),
     (AdaLomo, {"weight_decay": 0.1}),
     # inner SGD: linear in the gradient, so the Trainer's loss (rounded a little differently)
     # cannot be amplified the way Adam amplifies tiny projected gradients
     (GoLore, {"rank": 8, "update_proj_gap": 2, "inner": "sgd", "momentum": 0.9}),
     (GaLore, {"rank": 8, "update_proj_gap": 2, "inner": "sgd", "weight_decay": 0.1})],
    ids=["adalomo", "lomo", "adalomo-clip-value", "adalomo-wd", "golore", "galore-wd"],
)
def test_trainer_updates_like_fused_backward(tmp_path, cls, kw):
    model, data = _model(), _data()
    ref = copy.deepcopy(model)
    init = copy.deepcopy(model)
    opt = cls(model, lr=1e-2, **kw)
    log = _LrLog(opt)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=data,
                                   optimizers=(opt, None), callbacks=[log])
    trainer.train()
    assert trainer.state.global_step == 3
    assert log.lrs == [1e-2] * 3
    _replay(ref, data, cls, log.lrs, **kw)
    _assert_same_params(model, ref)
    moved = sum(not torch.equal(a, b) for a, b in zip(init.parameters(), model.parameters()))
    assert moved == len(list(model.parameters()))  # every parameter was updated


@requires_accelerate
def test_trainer_gradient_checkpointing_and_bf16_autocast(tmp_path):
    """Trainer's (activation|gradient)_checkpointing (non-reentrant by default in transformers >= 5)
    gives the
    in-backward updates the same full gradients; bf16 autocast runs (no loss scaler)."""
    model, data = _model(), _data()
    ref = copy.deepcopy(model)
    opt = AdaLomo(model, lr=1e-2)
    fields = {f.name for f in dataclasses.fields(transformers.TrainingArguments)}
    key = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    args = _args(tmp_path, **{key: True})
    transformers.Trainer(model=model, args=args, train_dataset=data,
                         optimizers=(opt, None)).train()
    _replay(ref, data, AdaLomo, [1e-2] * 3)
    _assert_same_params(model, ref)
    model = _model()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, bf16=True, max_steps=2),
                                   train_dataset=data, optimizers=(AdaLomo(model, lr=1e-2), None))
    trainer.train()
    assert trainer.accelerator.scaler is None and trainer.state.global_step == 2
    assert all(torch.isfinite(p).all() for p in model.parameters())


@requires_accelerate
@pytest.mark.parametrize("use_helper", [True, False], ids=["helper", "trainer-scheduler"])
def test_scheduler_drives_the_lr(tmp_path, use_helper):
    args = _args(tmp_path, max_steps=4, lr_scheduler_type="linear", warmup_steps=2)
    model, data = _model(), _data()
    ref = copy.deepcopy(model)
    if use_helper:
        opt, sched = make_trainer_optimizers(model, args, "adalomo")
        assert sched is not None
    else:
        opt, sched = AdaLomo(model, lr=args.learning_rate), None  # the Trainer builds one
    log = _LrLog(opt)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(opt, sched), callbacks=[log])
    trainer.train()
    # linear warm-up over 2 steps, then linear decay to 0 at step 4
    assert log.lrs == pytest.approx([0.0, 5e-3, 1e-2, 5e-3])
    logged = [e["learning_rate"] for e in log.logs if "learning_rate" in e]
    assert logged == pytest.approx(log.lrs)
    _replay(ref, data, AdaLomo, log.lrs)
    _assert_same_params(model, ref)


@requires_accelerate
def test_gradient_accumulation_without_accumulation_steps_raises_clearly(tmp_path):
    model, data = _model(), _data()
    opt = AdaLomo(model, lr=1e-2)
    args = _args(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(opt, None))
    with pytest.raises(RuntimeError, match=r"second gradient before optimizer\.step\(\)") as e:
        trainer.train()
    assert "accumulation_steps=K" in str(e.value)
    # the helper refuses such an instance before anything runs, and passes K on otherwise
    with pytest.raises(ValueError, match="gradient_accumulation_steps=2, but the optimizer has "
                                         "accumulation_steps=1"):
        make_trainer_optimizers(_model(), args, AdaLomo(_model(), lr=1e-2))
    opt, _ = make_trainer_optimizers(_model(), args)
    assert opt.accumulation_steps == 2


def _train(tmp_path, cls, kw, **args):
    model = _model()
    opt = cls(model, lr=1e-2, accumulation_steps=args.get("gradient_accumulation_steps", 1),
              **kw)
    transformers.Trainer(model=model, args=_args(tmp_path, **args), train_dataset=_data(),
                         optimizers=(opt, None)).train()
    return model, opt


ACCUMULATING = [(Lomo, {}), (AdaLomo, {}), (AdaLomo, {"clip_grad_norm": 0.05}),
                (GoLore, {"rank": 8, "update_proj_gap": 2, "inner": "sgd", "momentum": 0.9})]
ACCUMULATING_IDS = ["lomo", "adalomo", "adalomo-exact-clip", "golore"]


@requires_accelerate
@pytest.mark.parametrize("cls,kw", ACCUMULATING, ids=ACCUMULATING_IDS)
def test_trainer_gradient_accumulation_equals_a_k_times_larger_batch(tmp_path, cls, kw):
    """gradient_accumulation_steps=4 on micro-batches of 1 == one batch of 4 per step (the
    Trainer's loss scaling, the optimizer's buffers; exact clipping from one backward per
    micro-batch == grad_norm + fused_backward on the batch of 4, which the Trainer cannot run)."""
    if "clip_grad_norm" in kw:
        want = _model()
        opt = cls(want, lr=1e-2, **kw)
        x = _batch(_data())
        for _ in range(3):
            opt.grad_norm(want(input_ids=x, labels=x).loss)
            opt.fused_backward(want(input_ids=x, labels=x).loss)
        assert opt.clip_coef.item() < 1.0  # clipping is active
    else:
        want, _ = _train(tmp_path / "k1", cls, kw, per_device_train_batch_size=4)
    got, opt = _train(tmp_path / "k4", cls, kw, per_device_train_batch_size=1,
                      gradient_accumulation_steps=4)
    assert opt.accumulation_steps == 4 and opt._window.index == 3  # three windows applied
    _assert_same_params(got, want)


@requires_accelerate
@pytest.mark.parametrize("cls,kw", ACCUMULATING[:2], ids=ACCUMULATING_IDS[:2])
def test_trainer_epoch_end_partial_window(tmp_path, cls, kw):
    """4 samples, windows of 3 micro-batches: each epoch is a full window and a window of one;
    the same as batches of 3 and 1 without accumulation (2 epochs)."""
    want, _ = _train(tmp_path / "k1", cls, kw, per_device_train_batch_size=3, max_steps=4)
    got, _ = _train(tmp_path / "k3", cls, kw, per_device_train_batch_size=1,
                    gradient_accumulation_steps=3, max_steps=4)
    _assert_same_params(got, want)


@requires_accelerate
def test_max_grad_norm_clips_nothing(tmp_path):
    """Trainer's clip_grad_norm_ runs after the in-backward updates freed every gradient: it
    clips nothing (same parameters as without it); the logged grad_norm is the optimizer's."""
    data = _data()
    models, logged = {}, {}
    for mgn in (0.0, 1e-6):  # a tiny max norm would change everything if it acted
        model = _model()
        opt = AdaLomo(model, lr=1e-2)
        log = _LrLog(opt)
        trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_grad_norm=mgn),
                                       train_dataset=data, optimizers=(opt, None), callbacks=[log])
        trainer.train()
        models[mgn] = model
        logged[mgn] = [e["grad_norm"] for e in log.logs if "grad_norm" in e]
    _assert_same_params(models[0.0], models[1e-6], rtol=0, atol=0)
    assert len(logged[0.0]) == 3 and logged[0.0] == logged[1e-6] and min(logged[0.0]) > 0


def _plain_norms(model, data, cls, lrs, **opt_kw):
    """The global gradient norm of a plain backward before each step of the fused_backward
    replay (float64, on a copy of the model)."""
    opt = cls(model, lr=lrs[0], **opt_kw)
    x = _batch(data)
    norms = []
    for lr in lrs:
        ref = copy.deepcopy(model)
        ref(input_ids=x, labels=x).loss.backward()
        norms.append(torch.linalg.vector_norm(
            torch.cat([p.grad.double().flatten() for p in ref.parameters()])).item())
        opt.fused_backward(model(input_ids=x, labels=x).loss, lr)
    return norms


@requires_accelerate
@pytest.mark.parametrize("cls", [AdaLomo, Lomo])
@pytest.mark.parametrize("use_helper", [True, False], ids=["helper", "bare"])
def test_trainer_logs_the_real_grad_norm(tmp_path, cls, use_helper):
    """The logged grad_norm (the logs the callbacks see and the Trainer's log_history) is the
    optimizer's last_grad_norm: the norm of a plain backward's gradients on the same batch."""
    model, data = _model(), _data()
    ref = copy.deepcopy(model)
    args = _args(tmp_path)
    if use_helper:
        opt, _ = make_trainer_optimizers(model, args, cls.__name__.lower(), lr=1e-2)
    else:
        opt = cls(model, lr=1e-2)
    log = _LrLog(opt)
    trainer = transformers.Trainer(model=model, args=args, train_dataset=data,
                                   optimizers=(opt, None), callbacks=[log])
    trainer.train()
    want = _plain_norms(ref, data, cls, log.lrs)
    seen = [e["grad_norm"] for e in log.logs if "loss" in e]
    history = [e["grad_norm"] for e in trainer.state.log_history if "loss" in e]
    assert len(seen) == 3 and seen == history
    for got, w in zip(seen, want):
        assert w > 0 and got == pytest.approx(w, rel=1e-5)
    assert isinstance(trainer.callback_handler.callbacks[0], lomo_kernels.hf.GradNormCallback)


@requires_accelerate
def test_trainer_clips_with_the_previous_steps_norm(tmp_path):
    """clip_grad_norm with clip_mode="previous": global-norm clipping under the Trainer's single
    backward, the same updates as a fused_backward loop in that mode."""
    kw = dict(clip_grad_norm=0.5, clip_mode="previous")
    model, data = _model(), _data()
    ref = copy.deepcopy(model)
    args = _args(tmp_path)
    opt, _ = make_trainer_optimizers(model, args, "lomo", lr=1e-2, **kw)
    log = _LrLog(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error", lomo_kernels.GradNormSpikeWarning)  # no false alarm
        transformers.Trainer(model=model, args=args, train_dataset=data, optimizers=(opt, None),
                             callbacks=[log]).train()
        _replay(ref, data, Lomo, log.lrs, **kw)
    assert opt.clip_coef < 1.0  # clipping was active
    _assert_same_params(model, ref)


@requires_accelerate
@pytest.mark.parametrize("mgn", [1.0, 0.0])
def test_bare_optimizer_under_max_grad_norm_warns_once_at_the_first_step(tmp_path, mgn):
    model = _model()
    opt = Lomo(model, lr=1e-2)
    trainer = transformers.Trainer(model=model, args=_args(tmp_path, max_grad_norm=mgn),
                                   train_dataset=_data(), optimizers=(opt, None))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        trainer.train()
    said = [str(x.message) for x in w if "nothing is clipped" in str(x.message)]
    if mgn:
        assert len(said) == 1 and "max_grad_norm=1.0" in said[0] and "Lomo" in said[0]
    else:
        assert not said
    # the helper already said it (strict=False): not twice
    args = _args(tmp_path, max_grad_norm=1.0)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        model = _model()
        opt, _ = make_trainer_optimizers(model, args, "lomo", strict=False)
        transformers.Trainer(model=model, args=args, train_dataset=_data(),
                             optimizers=(opt, None)).train()
    assert len([x for x in w if "nothing is clipped" in str(x.message)]) == 1


@requires_accelerate
@pytest.mark.parametrize("cls", [Lomo, AdaLomo, GoLore])
def test_optimizer_clip_grad_norm_needs_the_two_pass_loop(tmp_path, cls):
    """Exact clipping cannot run under the Trainer's single backward: every optimizer refuses the
    first backward before any parameter changes, and says what works (docs/clipping.md)."""
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = transformers.Trainer(model=model, args=_args(tmp_path), train_dataset=_data(),
                                   optimizers=(cls(model, lr=1e-2, clip_grad_norm=1.0), None))
    with pytest.raises(ValueError, match="plain loss.backward\\(\\) cannot do global-norm") as e:
        trainer.train()
    assert "clip_mode='previous'" in str(e.value) and "accumulation_steps" in str(e.value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_helper_checks_arguments():
    ns = types.SimpleNamespace
    ok = ns(gradient_accumulation_steps=1, fp16=False, max_grad_norm=0.0)
    check_training_args(ok)
    four = ns(gradient_accumulation_steps=4, fp16=False, max_grad_norm=0, max_steps=-1)
    check_training_args(four)
    check_training_args(four, accumulation_steps=4)
    with pytest.raises(ValueError, match="gradient_accumulation_steps=4, but the optimizer has "
                                         "accumulation_steps=1"):
        check_training_args(four, accumulation_steps=1)
    with pytest.raises(ValueError, match="fp16=True"):
        check_training_args(ns(gradient_accumulation_steps=1, fp16=True, max_grad_norm=0))
    mgn = ns(gradient_accumulation_steps=1, fp16=False, max_grad_norm=1.0)
    with pytest.raises(ValueError, match="max_grad_norm=1.0"):
        check_training_args(mgn)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        check_training_args(mgn, strict=False)
    assert any("clip_grad_value" in str(x.message) for x in w)
    model = _model()
    with pytest.raises(ValueError, match="two backward passes.*clip_mode='previous'"):
        make_trainer_optimizers(model, None, "adalomo", clip_grad_norm=1.0)
    opt, _ = make_trainer_optimizers(model, four, "adalomo", lr=1e-3, clip_grad_norm=1.0)
    assert opt.clip_mode == "exact" and opt.accumulation_steps == 4
    opt, _ = make_trainer_optimizers(model, None, "adalomo", clip_grad_norm=1.0,
                                     clip_mode="previous")
    assert opt.clip_mode == "previous"
    with pytest.raises(ValueError, match="optimizer must be"):
        make_trainer_optimizers(model, None, "sgd")
    opt, sched = make_trainer_optimizers(model, None, "lomo", lr=0.5, backend="torch")
    assert isinstance(opt, Lomo) and sched is None and opt.param_groups[0]["lr"] == 0.5
    for name, cls in (("golore", GoLore), ("galore", GaLore)):
        opt, _ = make_trainer_optimizers(_model(), None, name, lr=0.5, rank=4)
        assert type(opt) is cls and opt.param_groups[0]["rank"] == 4


def test_helpers_check_the_kinds_of_their_arguments():
    ns = types.SimpleNamespace
    ok = ns(gradient_accumulation_steps=1, fp16=False, max_grad_norm=0.0)
    model = _model()
    with pytest.raises(TypeError, match="args must be a transformers.TrainingArguments.*dict"):
        check_training_args({"max_grad_norm": 0.0})
    with pytest.raises(TypeError, match="without max_grad_norm"):
        check_training_args(ns(gradient_accumulation_steps=1, fp16=False))
    with pytest.raises(TypeError, match="strict must be True or False"):
        check_training_args(ok, strict="no")
    with pytest.raises(TypeError, match="model must be the torch.nn.Module"):
        make_trainer_optimizers(list(model.parameters()), None, "adalomo")
    with pytest.raises(TypeError, match="optimizer must be one of"):
        make_trainer_optimizers(model, None, ["adalomo"])
    with pytest.raises(TypeError, match="optimizer must be one of"):
        make_trainer_optimizers(model, None, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="num_training_steps must be an integer >= 1"):
        make_trainer_optimizers(model, None, "adalomo", num_training_steps=10.5)
    with pytest.raises(ValueError, match="num_training_steps must be an integer >= 1"):
        make_trainer_optimizers(model, None, "adalomo", num_training_steps=0)
    with pytest.raises(TypeError, match="without learning_rate"):
        make_trainer_optimizers(model, ok, "adalomo")
    with pytest.raises(TypeError, match="trainer must be a transformers.Trainer"):
        lomo_kernels.hf.report_grad_norm(object(), AdaLomo(model))
    trainer = ns(callback_handler=ns(callbacks=[]), optimizer=torch.optim.SGD(
        model.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="optimizer must be a lomo_kernels optimizer.*SGD"):
        lomo_kernels.hf.report_grad_norm(trainer)
    with pytest.raises(TypeError, match="optimizer must be a lomo_kernels optimizer"):
        lomo_kernels.hf.GradNormCallback("adalomo")


def test_helper_builds_the_scheduler_without_a_trainer():
    args = types.SimpleNamespace(
        gradient_accumulation_steps=1, fp16=False, max_grad_norm=0.0, learning_rate=1e-3,
        lr_scheduler_type="cosine", lr_scheduler_kwargs={}, max_steps=10,
        get_warmup_steps=lambda n: 2,
    )
    model = _model()
    opt, sched = make_trainer_optimizers(model, args, "adalomo")
    lrs = []
    x = torch.randint(0, 256, (2, 16))
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        model(input_ids=x, labels=x).loss.backward()  # the update happens here
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))


@requires_accelerate
def test_checkpoint_and_resume(tmp_path):
    """Trainer saves the optimizer's state_dict (per-parameter step, fp32 factors) in a checkpoint
    and restores it: 2 steps + resume to 4 equals 4 straight steps."""
    data = _data()
    straight = _model()
    transformers.Trainer(model=straight, args=_args(tmp_path / "a", max_steps=4,
                                                    lr_scheduler_type="linear"),
                         train_dataset=data, optimizers=(AdaLomo(straight, lr=1e-2), None)).train()
    args = _args(tmp_path / "b", max_steps=4, lr_scheduler_type="linear", save_strategy="steps",
                 save_steps=2)
    first = _model()
    transformers.Trainer(model=first, args=args, train_dataset=data,
                         optimizers=(AdaLomo(first, lr=1e-2), None)).train()
    resumed = _model()
    opt = AdaLomo(resumed, lr=1e-2)
    trainer = transformers.Trainer(model=resumed, args=args, train_dataset=data,
                                   optimizers=(opt, None))
    trainer.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-2"))
    assert trainer.state.global_step == 4
    assert all(s["step"] == 4 for s in opt.state.values())
    _assert_same_params(straight, resumed)
