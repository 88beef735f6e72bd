"""Train KAN-GPT-2 with accelerate (``python train.py`` and ``kangpt train`` run :func:`train`).

The same command runs on one CPU, and under ``accelerate launch`` (DDP, FSDP, DeepSpeed) or
``torchrun`` on several devices. :func:`train` reads top to bottom: run folder, data, model,
optimizer, the loop (learning rate, gradient accumulation, clipping, logging, evaluation,
checkpoints, SIGINT/SIGTERM), then the final model folder. See ``kangpt.training.run_dir`` for the files.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import datasets
import torch
import yaml
from accelerate import Accelerator
from accelerate.tracking import get_available_trackers
from accelerate.utils import (
    DistributedType,
    GradientAccumulationPlugin,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from datasets import Dataset, IterableDataset
from datasets.distributed import split_dataset_by_node
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import GenerationConfig

from ..data import (
    DataError,
    corpus_files,
    load_splits,
    load_tokenizer,
    pack_documents,
    stream_blocks,
    unigram_entropy,
)
from ..kan import KANLinear
from ..modeling_kangpt import KANGPT2LMHeadModel
from .evaluation import block_losses
from .launch import check_launch
from .report import plot_losses, write_model_card
from .run_config import ConfigError, DataConfig, RunConfig, TrainConfig, model_config
from .run_dir import (
    RunDir,
    checkpoint_problem,
    checkpoint_step,
    publish,
    read_metrics,
    remove,
    temporary_name,
    write_manifest,
    writing,
)

NO_MATPLOTLIB = "loss.png not written: matplotlib is not installed (pip install 'kangpt[plot]')"


@dataclass
class Progress:
    """Where training is; saved in every checkpoint (``accelerator.register_for_checkpointing``)."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # training tokens seen, all processes together

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens = state["step"], state["tokens"]


def train(config: RunConfig) -> int:
    """Run training as ``config`` says; return the exit code (0 done, 128 + signal number if stopped)."""
    cfg = config.train
    run = RunDir(cfg.out_dir)
    resuming = run.plan(config) is not None  # reads only: refuses a folder that holds something else
    accelerator = make_accelerator(cfg, run)
    set_seed(cfg.seed)
    say(accelerator, yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip())

    # Data, model, optimizer.
    corpus = load_corpus(config.data, cfg, accelerator)
    data = trained_on(config.data, corpus.tokenizer)
    if resuming:
        run.check_trained_on(data)
    model = build_model(config, corpus.tokenizer)
    n_params = model.num_parameters()  # before prepare: ZeRO-3 leaves each process an empty shard
    optimizer = build_optimizer(model, cfg)
    val_loader = DataLoader(corpus.val.with_format("torch"), batch_size=cfg.batch_size)
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)

    with holding(accelerator, run):  # from its first write to the end, the folder is this run's alone
        resume_from = run.plan(config)  # again: what the folder holds now that no other run can change it
        for note in run.notes:  # the resume decision: a damaged checkpoint skipped, a start from step 0
            say(accelerator, note)
        if resume_from is not None:  # weights, optimizer, RNG states and progress come back
            resume(accelerator, model, optimizer, run, resume_from, cfg)
            say(accelerator, f"resumed from {resume_from} at step {progress.step}")
        accelerator.wait_for_everyone()  # every process has read the folder before the main one writes
        if accelerator.is_main_process:
            with writing(run.path):
                run.start(config, progress.step if resume_from is not None else None, trained_on=data)
        accelerator.wait_for_everyone()
        with writing(run.logs):
            accelerator.init_trackers("kangpt", config=_flat_hparams(config))
        tokens_per_step = cfg.batch_size * cfg.gradient_accumulation_steps * accelerator.num_processes
        tokens_per_step *= config.data.block_size
        trackers = ", ".join(t.name for t in accelerator.trackers) or "none"
        say(accelerator, f"model: {n_params:,} parameters | {accelerator.num_processes} process(es) on "
                         f"{accelerator.device} | {tokens_per_step:,} tokens per step | trackers: "
                         f"{trackers} | unigram baseline {corpus.baseline:.4f} nats/token")
        stopped_by, val_loss = loop(accelerator, model, optimizer, val_loader, corpus, run, cfg, progress,
                                    tokens_per_step)
        if stopped_by:
            say(accelerator, f"stopped by {signal.Signals(stopped_by).name} at step {progress.step}; "
                             f"checkpoint {run.checkpoint(progress.step)}; continue with --train.resume=auto")
        else:
            finish(accelerator, model, val_loader, corpus, run, config, progress, val_loss)
    accelerator.end_training()
    return 128 + int(stopped_by) if stopped_by else 0


def loop(accelerator: Accelerator, model, optimizer, val_loader, corpus: Corpus, run: RunDir,
         cfg: TrainConfig, progress: Progress, tokens_per_step: int) -> tuple[int | None, float | None]:
    """The training loop, one iteration per optimizer step, from ``progress`` to ``train.max_steps``.

    Returns the signal that stopped it (None when it ran to the end) and the last validation loss.
    Raises ConfigError at the first step whose loss or gradient norm is not finite, before anything of
    that step is recorded or saved.
    """
    micro_steps_done = progress.step * cfg.gradient_accumulation_steps
    batches = train_batches(corpus.train, cfg, accelerator, skip=micro_steps_done)
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="train", mininterval=1.0,
               disable=not accelerator.is_main_process)
    window = LossWindow()
    val_loss, stopped_by, grad_norm = None, None, None
    with StopOnSignal() as stop, bar:  # the bar is closed before an error line is printed, not after it
        while progress.step < cfg.max_steps:
            change_grids(accelerator, model, optimizer, run, corpus.val, cfg, progress.step)
            lr = learning_rate(progress.step, cfg)
            loss, norm = optimizer_step(accelerator, model, optimizer, batches, cfg, lr)
            check_finite(accelerator, run, progress.step + 1, loss, norm)
            grad_norm = grad_norm if norm is None else norm
            window.add(loss)
            progress.step += 1
            progress.tokens += tokens_per_step
            step, last = progress.step, progress.step == cfg.max_steps
            bar.update()

            if step % cfg.log_interval == 0 or last:
                record = window.take(accelerator, step, lr, progress.tokens, tokens_per_step, grad_norm)
                log_metrics(accelerator, run, record)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{lr:.2e}",
                                tok_s=f"{record['tokens_per_sec']:.0f}")
            if step % cfg.eval_interval == 0 or last:
                val_loss = validate(accelerator, model, val_loader, run, step)
            if stop.signum is not None:
                accelerator.set_trigger()
            if accelerator.check_trigger():  # some process was signalled: all stop after this same step
                stopped_by = stop.signum or signal.SIGTERM
            if stopped_by or last or (cfg.save_interval and step % cfg.save_interval == 0):
                save_checkpoint(accelerator, run, step, cfg.keep_checkpoints)
            if stopped_by:
                break
    return stopped_by, val_loss


@contextmanager
def holding(accelerator: Accelerator, run: RunDir):
    """Hold the run folder's lock (main process) while inside: every process raises the same ConfigError
    when another run holds it."""
    refused = [None]
    if accelerator.is_main_process:
        try:
            run.lock()
        except ConfigError as err:
            refused[0] = str(err)
    refused = broadcast_object_list(refused) if accelerator.num_processes > 1 else refused
    if refused[0] is not None:
        raise ConfigError(refused[0])
    try:
        yield
    finally:
        run.unlock()


def check_finite(accelerator: Accelerator, run: RunDir, step: int, loss: torch.Tensor, grad_norm) -> None:
    """Raise ConfigError, on every process, if ``loss`` or ``grad_norm`` (None: not computed) of optimizer
    step ``step`` is not finite on any process: the weights are ruined from that step on, and the run
    stops at the first such step (no step is skipped) with its last finite checkpoint kept."""
    values = {"loss": loss, "gradient norm": 0.0 if grad_norm is None else grad_norm}
    bad = torch.stack([~torch.isfinite(torch.as_tensor(v, device=accelerator.device)).all()
                       for v in values.values()]).float()
    bad = accelerator.reduce(bad, "sum").tolist()  # one small all-reduce per step
    if not any(bad):
        return
    what = next(name for name, count in zip(values, bad, strict=True) if count)
    latest = run.latest_checkpoint()
    kept = f"the last checkpoint, {str(latest)!r}, is kept" if latest else "no checkpoint was saved"
    raise ConfigError(f"the training {what} is not finite at step {step}: training diverged; lower "
                      f"train.learning_rate (or raise train.warmup_steps); stopped before saving, {kept}")


def make_accelerator(cfg: TrainConfig, run: RunDir) -> Accelerator:
    """The run's Accelerator: mixed precision, gradient accumulation, trackers logging into ``run``."""
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_plugin=GradientAccumulationPlugin(
            num_steps=cfg.gradient_accumulation_steps, sync_with_dataloader=False
        ),
        log_with=installed_trackers(cfg.trackers) or None,
        project_config=ProjectConfiguration(project_dir=str(run.path), logging_dir=str(run.logs)),
    )
    check_launch(accelerator, cfg)  # before anything is loaded or written
    check_mixed_precision(accelerator, cfg)
    if not accelerator.is_main_process:
        datasets.disable_progress_bars()
    # save_state warns at every checkpoint that it drops the LM head tied to the embeddings (reloads fine).
    logging.getLogger("accelerate.utils.other").setLevel(logging.ERROR)
    return accelerator


def resume(accelerator: Accelerator, model, optimizer, run: RunDir, checkpoint: Path, cfg: TrainConfig):
    """Load ``checkpoint`` (weights, optimizer, RNG states, progress) into the prepared objects.

    The KAN grids are first given the shape the checkpoint was saved with: the sizes scheduled before its
    step, the ranges the run recorded in metrics.jsonl.
    """
    done = checkpoint_step(checkpoint)
    unwrapped = accelerator.unwrap_model(model)
    for record in read_metrics(run.metrics) if run.metrics.is_file() else []:
        if "kan_grid_low" in record and record["step"] < done:
            set_grid_ranges(unwrapped, optimizer, record["kan_grid_low"], record["kan_grid_high"])
    for step, grid_size in cfg.kan_grid_schedule:
        if step < done:
            extend_grids(unwrapped, optimizer, grid_size)
    accelerator.load_state(str(checkpoint))


def change_grids(accelerator: Accelerator, model, optimizer, run: RunDir, val: Dataset, cfg: TrainConfig,
                 step: int) -> None:
    """The grid changes due before optimizer step ``step``: ``train.kan_grid_update_steps`` moves every
    grid to the range its inputs take, ``train.kan_grid_schedule`` refines it."""
    unwrapped = accelerator.unwrap_model(model)
    if step in cfg.kan_grid_update_steps:  # on the first validation blocks: deterministic
        ids = val.with_format("torch")[: cfg.batch_size]["input_ids"].to(accelerator.device)
        low, high = grid_range_of_inputs(unwrapped, ids)
        set_grid_ranges(unwrapped, optimizer, low, high)
        log_metrics(accelerator, run, {"step": step, "kan_grid_low": low, "kan_grid_high": high})
        say(accelerator, f"step {step}: KAN grids moved to [{low}, {high}]")
    for at, grid_size in cfg.kan_grid_schedule:
        if at == step:
            extend_grids(unwrapped, optimizer, grid_size)
            say(accelerator, f"step {step}: KAN grids refined to {grid_size} intervals")


def optimizer_step(accelerator: Accelerator, model, optimizer, batches, cfg: TrainConfig, lr: float):
    """One optimizer step at learning rate ``lr`` over ``gradient_accumulation_steps`` micro-batches.

    Returns the mean loss of its micro-batches (a tensor, not synced: no wait) and the gradient norm
    before clipping (None when the gradients are not clipped).
    """
    for group in optimizer.param_groups:
        group["lr"] = lr * group["lr_scale"]
    loss_sum, grad_norm = 0.0, None
    for _ in range(cfg.gradient_accumulation_steps):
        input_ids = next(batches).to(accelerator.device)
        with accelerator.accumulate(model):  # gradients are synced and applied on the last micro-step
            loss = model(input_ids=input_ids, labels=input_ids).loss  # the model shifts the labels
            penalty = kan_penalty(model, cfg.kan_regularization)
            accelerator.backward(loss if penalty is None else loss + penalty)
            if accelerator.sync_gradients and cfg.grad_clip > 0:
                grad_norm = accelerator.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        loss_sum += loss.detach().float() / cfg.gradient_accumulation_steps
    return loss_sum, grad_norm


class LossWindow:
    """The training losses of the optimizer steps since the last metrics record, and their time."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.steps, self.started = 0.0, 0, time.perf_counter()

    def add(self, loss) -> None:
        self.loss_sum += loss
        self.steps += 1

    def take(self, accelerator: Accelerator, step: int, lr: float, tokens: int, tokens_per_step: int,
             grad_norm) -> dict:
        """The metrics record of the window (loss averaged over all processes); the window starts anew."""
        train_loss = accelerator.reduce(self.loss_sum, "mean").item() / self.steps
        tokens_per_sec = self.steps * tokens_per_step / (time.perf_counter() - self.started)
        record = {"step": step, "loss": train_loss, "lr": lr, "tokens": tokens,
                  "tokens_per_sec": tokens_per_sec}
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        self.reset()
        return record


def validate(accelerator: Accelerator, model, val_loader, run: RunDir, step: int) -> float:
    """The validation loss at ``step``, recorded and printed."""
    val_loss = evaluate(model, val_loader, accelerator)
    log_metrics(accelerator, run, {"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
    say(accelerator, f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}")
    return val_loss


def finish(accelerator: Accelerator, model, val_loader, corpus: Corpus, run: RunDir, config: RunConfig,
           progress: Progress, val_loss: float | None) -> None:
    """After the last step: the test loss (if there is a test split), ``model/``, the sample."""
    cfg = config.train
    if val_loss is None:  # resumed a run that had already finished
        val_loss = evaluate(model, val_loader, accelerator)
    metrics = {"step": progress.step, "tokens": progress.tokens, "val_loss": val_loss,
               "val_ppl": math.exp(val_loss), "unigram_baseline": corpus.baseline}
    if corpus.test is not None:  # held out from every choice made on validation: read once, at the end
        test_loader = DataLoader(corpus.test.with_format("torch"), batch_size=cfg.batch_size)
        test_loader = accelerator.prepare(test_loader)
        metrics["test_loss"] = evaluate(model, test_loader, accelerator)
        metrics["test_ppl"] = math.exp(metrics["test_loss"])
        log_metrics(accelerator, run, {"step": progress.step, "test_loss": metrics["test_loss"],
                                       "test_ppl": metrics["test_ppl"]})
        say(accelerator, f"test loss {metrics['test_loss']:.4f}, perplexity {metrics['test_ppl']:.2f}")
    missing = save_model(accelerator, model, corpus.tokenizer, run, config, metrics)
    say(accelerator, f"final validation loss {val_loss:.4f} nats/token (perplexity {metrics['val_ppl']:.2f});"
                     f" unigram baseline {corpus.baseline:.4f} nats/token\nmodel saved to {run.model}")
    if accelerator.is_main_process and cfg.sample_prompt:
        with outside_zero3(accelerator):
            say(accelerator, "sample: " + sample(run.model, cfg.sample_prompt, cfg.sample_tokens))
    if missing:  # last, where it is seen: the model folder lacks what the README promises
        say(accelerator, missing)
    accelerator.wait_for_everyone()  # every process returns with model/ written: a script may load it next


def check_mixed_precision(accelerator: Accelerator, cfg: TrainConfig) -> None:
    """Refuse fp16 on CPU: accelerate then neither autocasts nor scales, and trains in float32 unannounced.

    bf16 on CPU is real (accelerate autocasts to bfloat16), so it is kept.
    """
    if accelerator.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        source = "train.mixed_precision" if cfg.mixed_precision else "mixed precision (accelerate's config)"
        raise ConfigError(f"{source} 'fp16' needs a GPU: on CPU accelerate ignores it and trains in float32; "
                          "use 'bf16' or 'no'")


def installed_trackers(names: list[str]) -> list[str]:
    """The trackers among ``names`` whose package is installed (metrics.jsonl is written in any case)."""
    available = {tracker.value for tracker in get_available_trackers()}
    return [name for name in names if name in available]


def build_model(config: RunConfig, tokenizer) -> KANGPT2LMHeadModel:
    """A freshly initialised KAN-GPT-2 whose vocabulary and special tokens are the tokenizer's, or
    the model of the folder ``train.init_from`` (a GPT-2 folder's as ``ffn_type="mlp"``)."""
    bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    model_cfg = model_config(  # no pad_token_id: packed blocks hold no padding (as GPT-2)
        config, vocab_size=len(tokenizer), bos_token_id=bos, eos_token_id=tokenizer.eos_token_id
    )
    if config.train.init_from is None:
        model = KANGPT2LMHeadModel(model_cfg)
    elif model_cfg.ffn_type == "mlp" and _is_gpt2_folder(config.train.init_from):
        model = KANGPT2LMHeadModel.from_gpt2(config.train.init_from, ffn_type="mlp", **config.model)
    else:
        model = KANGPT2LMHeadModel.from_pretrained(config.train.init_from, config=model_cfg)
    if model.config.vocab_size < len(tokenizer):
        vocab = model.config.vocab_size
        raise ConfigError(f"model.vocab_size={vocab} is smaller than the tokenizer ({len(tokenizer)} tokens)")
    if config.train.gradient_checkpointing:
        model.activation_checkpointing_enable()
    if config.train.compile:
        model.compile()  # in place: parameter names, checkpoints and save_pretrained are unchanged
    return model


def _is_gpt2_folder(path: str) -> bool:
    return json.loads(Path(path, "config.json").read_text()).get("model_type") == "gpt2"


def learning_rate(step: int, cfg: TrainConfig) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine decay to the minimum.

    A function of the step alone, so it is the same for any number of processes and after resuming.
    """
    if step < cfg.warmup_steps:
        return cfg.learning_rate * (step + 1) / cfg.warmup_steps
    decay_steps = max(1, cfg.max_steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / decay_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * progress))  # 1 -> 0
    return cfg.min_learning_rate + cosine * (cfg.learning_rate - cfg.min_learning_rate)


def build_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on weight matrices only (not on norms, biases or function coefficients).

    The coefficients of the learnable functions of grouped and rational KAN layers (the parameters of
    a layer's ``basis``) get their own group, at ``train.kan_function_lr_scale`` times the learning
    rate; every group's ``lr_scale`` says by how much (the loop sets ``lr = schedule * lr_scale``).
    """
    decay, no_decay, functions = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if ".basis." in name:
            functions.append(param)
        else:
            (decay if name.endswith("weight") and param.ndim >= 2 else no_decay).append(param)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
              {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0},
              {"params": functions, "weight_decay": 0.0, "lr_scale": cfg.kan_function_lr_scale}]
    groups = [g for g in groups if g["params"]]
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2))


def extend_grids(model: KANGPT2LMHeadModel, optimizer: torch.optim.Optimizer, grid_size: int) -> None:
    """Refine the grid of every KAN layer to ``grid_size`` intervals (``KANLinear.extend_grid``: the
    functions are kept) and record the size in the model's config (the saved model is built with it)."""
    layers = [m for m in model.modules() if isinstance(m, KANLinear) and m.basis_name != "rational"]
    _refit_layers(layers, optimizer, lambda layer: layer.extend_grid(grid_size))
    model.config.kan_grid_size = grid_size


def set_grid_ranges(model: KANGPT2LMHeadModel, optimizer: torch.optim.Optimizer, low: float, high: float):
    """Move the grid of every B-spline or RBF KAN layer to ``[low, high]`` (``KANLinear.set_grid_range``)
    and record the range in the model's config."""
    _refit_layers(_ranged_grid_layers(model), optimizer, lambda layer: layer.set_grid_range(low, high))
    model.config.kan_grid_range = [low, high]


def _ranged_grid_layers(model: torch.nn.Module) -> list[KANLinear]:
    """The KAN layers whose grid has a range to move: B-spline and RBF ones."""
    return [m for m in model.modules() if isinstance(m, KANLinear) and m.basis_name in ("bspline", "rbf")]


def _refit_layers(layers: list[KANLinear], optimizer: torch.optim.Optimizer, refit) -> None:
    """``refit(layer)`` every layer, then put the parameters it replaced (the per-edge weight, or a
    grouped layer's function coefficients) in the optimizer in place of the old ones, with fresh state."""
    for layer in layers:
        before = list(layer.parameters())
        refit(layer)
        for old, new in zip(before, layer.parameters(), strict=True):
            if new is not old:
                optimizer.state.pop(old, None)
                for group in optimizer.param_groups:
                    group["params"] = [new if p is old else p for p in group["params"]]


# Quantiles of the inputs a data-driven grid covers (grid range update), and its rounding.
GRID_QUANTILES = (0.005, 0.995)


@torch.no_grad()
def grid_range_of_inputs(model: KANGPT2LMHeadModel, input_ids: torch.Tensor) -> tuple[float, float]:
    """The range covering the ``GRID_QUANTILES`` of the inputs of every B-spline or RBF KAN layer on
    ``input_ids`` (the widest over the layers, rounded out to 0.25): where a grid is worth its knots."""
    layers = _ranged_grid_layers(model)
    lows, highs = [], []

    def record(layer, args):
        x = args[0].detach().float().flatten()
        x = x[:: max(1, x.numel() // (1 << 20))]  # torch.quantile takes at most 16M values
        q = torch.quantile(x, torch.tensor(GRID_QUANTILES, device=x.device))
        lows.append(q[0].item())
        highs.append(q[1].item())

    handles = [layer.register_forward_pre_hook(record) for layer in layers]
    was_training = model.training
    model.eval()
    try:
        model(input_ids=input_ids)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return math.floor(min(lows) * 4) / 4, math.ceil(max(highs) * 4) / 4


def kan_penalty(model: torch.nn.Module, weight: float) -> torch.Tensor | None:
    """``weight`` times the sum of every KAN layer's sparsity regulariser (``KANLinear.regularization_loss``),
    or None when ``weight`` is 0. Added to the training loss only: logged losses stay the LM's."""
    if not weight:
        return None
    layers = [m for m in model.modules() if isinstance(m, KANLinear)]
    return weight * sum(layer.regularization_loss() for layer in layers) if layers else None


@dataclass
class Corpus:
    """Tokenizer, training blocks (this process's shard if streaming), validation and test blocks (None
    without a test split), unigram baseline."""

    tokenizer: object
    train: Dataset | IterableDataset
    val: Dataset
    test: Dataset | None
    baseline: float


def trained_on(data: DataConfig, tokenizer) -> dict:
    """What a run trains on, as its folder records it: the tokenizer's sha256 and the local corpus files
    (``{name: size}``, None for a built-in corpus or a hub dataset) of every source."""
    sources = {key: getattr(data, key) for key in ("dataset", "validation_dataset", "test_dataset")}
    tokenizer_json = tokenizer.backend_tokenizer.to_str()
    return {"tokenizer_sha256": hashlib.sha256(tokenizer_json.encode()).hexdigest(),
            "corpus": {key: corpus_files(source) for key, source in sources.items() if source is not None}}


def load_corpus(data: DataConfig, train: TrainConfig, accelerator: Accelerator) -> Corpus:
    """Load documents, get the tokenizer and pack both splits into ``data.block_size``-token blocks.

    The validation (and test) blocks are the same, in the same order, on every process and in every
    run. With ``data.streaming`` the training documents are sharded across processes, the BPE is
    trained on the first ``data.tokenizer_documents`` of them, and validation and test keep their first
    ``train.eval_blocks`` blocks.
    """
    splits = load_splits(
        data.dataset, name=data.name, text_field=data.text_field, val_fraction=data.val_fraction,
        test_fraction=data.test_fraction, validation_dataset=data.validation_dataset,
        test_dataset=data.test_dataset, streaming=data.streaming, max_documents=data.max_documents,
    )
    train_docs = splits["train"]
    if data.streaming:
        tokenizer_docs = list(itertools.islice(train_docs, data.tokenizer_documents))
    else:
        tokenizer_docs = train_docs.select(range(min(data.tokenizer_documents, len(train_docs))))
    # A run that starts from a model folder keeps the folder's tokenizer unless another is named.
    spec = train.init_from if train.init_from is not None and data.tokenizer == "bpe" else data.tokenizer
    with accelerator.main_process_first():  # the first process trains and caches the BPE, the others load it
        tokenizer = load_tokenizer(spec, tokenizer_docs, vocab_size=data.vocab_size)
    held_out = {split: _held_out_blocks(docs, tokenizer, data, train.eval_blocks, split)
                for split, docs in splits.items() if split != "train"}
    val, test = held_out["validation"], held_out.get("test")
    if data.streaming:
        rank, world_size = accelerator.process_index, accelerator.num_processes
        blocks = stream_blocks(split_dataset_by_node(train_docs, rank=rank, world_size=world_size), tokenizer,
                               data.block_size)
        sample_blocks = pack_documents(tokenizer_docs, tokenizer, data.block_size)
        baseline = unigram_entropy(sample_blocks, val, len(tokenizer))  # of the tokenizer's sample
    else:
        blocks = pack_documents(train_docs, tokenizer, data.block_size)
        baseline = unigram_entropy(blocks, val, len(tokenizer))
    return Corpus(tokenizer, blocks, val, test, baseline)


def _held_out_blocks(docs, tokenizer, data: DataConfig, eval_blocks: int | None, split: str) -> Dataset:
    """The first ``eval_blocks`` (all when None) packed blocks of a held-out split, in memory."""
    if isinstance(docs, IterableDataset):
        stream = stream_blocks(docs, tokenizer, data.block_size)
        blocks = Dataset.from_list(list(itertools.islice(stream, eval_blocks)))
        if len(blocks) == 0:
            raise DataError(f"the {split} documents hold no block of {data.block_size} tokens")
        return blocks
    try:
        blocks = pack_documents(docs, tokenizer, data.block_size)
    except DataError as err:
        raise DataError(f"{split} split: {err}") from err
    return blocks if eval_blocks is None else blocks.select(range(min(eval_blocks, len(blocks))))


class ShuffledForever(Sampler):
    """Indices ``0..n-1`` in a new seeded permutation every epoch, without end.

    Batch k is the same in every run with the same seed, so a resumed run skips k batches and
    continues exactly; the global RNG is never touched.
    """

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed

    def __iter__(self):
        for epoch in itertools.count():
            generator = torch.Generator().manual_seed(self.seed + epoch)
            yield from torch.randperm(self.n, generator=generator).tolist()


def train_batches(blocks: Dataset | IterableDataset, cfg: TrainConfig, accelerator: Accelerator, skip: int):
    """Endless ``(batch_size, block_size)`` input_ids batches of this process, after skipping ``skip``."""
    if isinstance(blocks, IterableDataset):  # already this process's shard: read in order, epoch after epoch
        loader = DataLoader(blocks.with_format("torch"), batch_size=cfg.batch_size)
        return itertools.islice((batch["input_ids"] for batch in _repeat(loader)), skip, None)
    loader = DataLoader(
        blocks.with_format("torch"),
        batch_size=cfg.batch_size,
        sampler=ShuffledForever(len(blocks), cfg.seed),
        generator=torch.Generator().manual_seed(cfg.seed),  # not the global RNG, which dropout uses
    )
    loader = accelerator.skip_first_batches(accelerator.prepare(loader), skip)  # prepare: shards the batches
    return (batch["input_ids"] for batch in loader)


def _repeat(loader: DataLoader):
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise DataError("the training data holds no block")


@torch.no_grad()
def evaluate(model, val_loader, accelerator: Accelerator) -> float:
    """Mean next-token cross-entropy (nats/token) over all validation blocks, each counted once."""
    model.eval()
    losses = [
        accelerator.gather_for_metrics(block_losses(model, batch["input_ids"].to(accelerator.device)))
        for batch in val_loader
    ]
    model.train()
    return torch.cat(losses).mean().item()


def save_checkpoint(accelerator: Accelerator, run: RunDir, step: int, keep: int) -> None:
    """``save_state`` into a temporary folder, renamed ``checkpoints/step-N`` when whole (all processes).

    Its manifest (sizes and sha256 of every file, of all processes) is written last, so resuming can
    tell a complete checkpoint from a damaged one. A damaged ``step-N`` already there is replaced.
    """
    final = run.checkpoint(step)
    # This very state may be saved already (resumed and stopped at once); a damaged one is written again.
    if final.is_dir() and checkpoint_problem(final) is None:
        return
    tmp = temporary_name(final)
    with writing(tmp):
        if accelerator.is_main_process:
            remove(tmp)  # left over by a process that died while saving
        accelerator.wait_for_everyone()
        try:
            accelerator.save_state(str(tmp))
        except Exception:
            remove(tmp)  # the part written: on a full disk, room for what comes next
            raise
        accelerator.wait_for_everyone()  # every process has written its files (random_states_<rank>.pkl)
        if accelerator.is_main_process:
            write_manifest(tmp)
            publish(tmp, final)
            run.prune_checkpoints(keep)
    accelerator.wait_for_everyone()


def save_model(
    accelerator: Accelerator, model, tokenizer, run: RunDir, config: RunConfig, metrics: dict
) -> str | None:
    """Write ``model/``: weights, config, tokenizer, generation config, model card, loss curve, atomically.

    Returns the line to print when loss.png could not be written (matplotlib missing), else None.
    """
    state_dict = accelerator.get_state_dict(model)  # gathers sharded weights (FSDP, DeepSpeed): all processes
    if not accelerator.is_main_process:
        return None
    # What is saved is the model the folder describes, empty, with the gathered weights: the prepared one
    # may be of another class (FSDP2 swaps in a subclass from torch, whose files save_pretrained would
    # copy as the folder's remote code) or hold empty shards (ZeRO-3), which the model card counts.
    with torch.device("meta"):
        saved = KANGPT2LMHeadModel(accelerator.unwrap_model(model).config)
    context = saved.config.n_positions
    # No length: generate() then asks for transformers' defaults (or the caller's), and the model stops
    # at its context (KANGPT2LMHeadModel._prepare_generated_length); a saved max_length would make every
    # generate(max_new_tokens=...) warn that both are set. use_cache as GPT-2 saves it (transformers'
    # export for decoder LMs refuses a config without it).
    saved.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        do_sample=True,
        temperature=0.8,
        top_k=50,
        use_cache=True,
    )
    tokenizer.model_max_length = context  # truncation=True then fits the model; the cached BPE is untouched
    tmp = temporary_name(run.model)
    with writing(tmp):
        remove(tmp)
        saved.save_pretrained(tmp, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        try:
            has_plot = plot_losses(read_metrics(run.metrics), tmp / "loss.png", metrics["unigram_baseline"])
            missing = None
        except ModuleNotFoundError:
            has_plot, missing = False, NO_MATPLOTLIB
        write_model_card(tmp, saved, config, metrics, has_plot)
        publish(tmp, run.model)
    return missing


@contextmanager
def outside_zero3(accelerator: Accelerator):
    """Where the main process loads a model alone: while DeepSpeed is configured, transformers builds a
    loaded model under ZeRO-3's ``zero.Init``, a collective that the other processes would never join."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        yield
        return
    from transformers.integrations import set_hf_deepspeed_config, unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        set_hf_deepspeed_config(accelerator.state.deepspeed_plugin.dschf)  # accelerate's, kept alive there


def sample(model_dir: Path, prompt: str, max_new_tokens: int) -> str:
    """Load the saved folder as a user would and complete ``prompt``, within the model's context.

    A prompt longer than the context keeps its last tokens; the new tokens are capped to the room left.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    context = model.config.n_positions
    tokenizer.truncation_side = "left"  # a prompt too long keeps its end, which the sample continues
    inputs = tokenizer(prompt, return_tensors="pt", truncation=True, max_length=context - 1)  # room for one
    room = context - inputs["input_ids"].shape[1]
    output = model.generate(**inputs, max_new_tokens=min(max_new_tokens, room))
    return tokenizer.decode(output[0], skip_special_tokens=True)


def log_metrics(accelerator: Accelerator, run: RunDir, record: dict) -> None:
    """Append ``record`` to metrics.jsonl (main process) and send it to the trackers."""
    if accelerator.is_main_process:
        with writing(run.metrics), run.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def say(accelerator: Accelerator, message: str) -> None:
    """Print on the main process without breaking the progress bar."""
    if accelerator.is_main_process:
        tqdm.write(message)


class StopOnSignal:
    """Turns SIGINT/SIGTERM into a request to stop (``signum``) while inside ``with``.

    The loop then checkpoints and stops after the current step; a second signal acts as usual.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signum = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def _flat_hparams(config: RunConfig) -> dict:
    """``{"train.learning_rate": 0.001, ...}`` with only scalars, as trackers want hyper-parameters."""
    flat = {}
    for section, values in config.to_dict().items():
        for key, value in values.items():
            flat[f"{section}.{key}"] = value if isinstance(value, (int, float, str, bool)) else str(value)
    return flat
