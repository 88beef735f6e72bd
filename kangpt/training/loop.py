"""Train KAN-GPT-2 with accelerate (``python train.py`` and ``kangpt train`` run :func:`train`).

The same command runs on one CPU, and under ``accelerate launch`` (DDP, FSDP, DeepSpeed) or
``torchrun`` on several devices. :func:`train` reads top to bottom: run folder, data, model,
optimizer, the loop (learning rate, gradient accumulation, clipping, logging, evaluation,
checkpoints, SIGINT/SIGTERM), then the final model folder. What it calls lives beside it: the
Accelerator (``launch``), the corpus and batches (``corpus``), the model (``model``), the optimizer
and schedule (``optimizer``), the KAN grid levers (``grids``), checkpoints and the model folder
(``saving``); ``run_dir`` says what the run folder holds.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import broadcast_object_list, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import TokenStore
from ..kan import KANLinear
from .corpus import Corpus, StreamPositions, load_corpus, train_batches, trained_on
from .evaluation import evaluate
from .grids import KANGrids
from .launch import make_accelerator
from .model import build_model
from .optimizer import build_optimizer, learning_rate
from .report import sample
from .run_config import ConfigError, RunConfig, TrainConfig
from .run_dir import RunDir, checkpoint_step, read_metrics, writing
from .saving import outside_zero3, save_checkpoint, save_model


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
    report_store(accelerator, corpus.store)
    data = trained_on(config.data, corpus.tokenizer)
    if resuming:
        run.check_trained_on(data)
    model = build_model(config, corpus.tokenizer)
    n_params = model.num_parameters()  # before prepare: ZeRO-3 leaves each process an empty shard
    optimizer = build_optimizer(model, cfg)
    val_loader = DataLoader(corpus.val, batch_size=cfg.batch_size)
    model, optimizer, val_loader = accelerator.prepare(model, optimizer, val_loader)
    grids = KANGrids(accelerator.unwrap_model(model), optimizer, cfg)
    progress = Progress()
    accelerator.register_for_checkpointing(progress)
    positions = StreamPositions(accelerator) if config.data.streaming else None
    if positions is not None:  # each process's place in its stream, in every checkpoint
        accelerator.register_for_checkpointing(positions)

    with holding(accelerator, run):  # from its first write to the end, the folder is this run's alone
        resume_from = run.plan(config)  # again: what the folder holds now that no other run can change it
        for note in run.notes:  # the resume decision: a damaged checkpoint skipped, a start from step 0
            say(accelerator, note)
        if resume_from is not None:  # weights, optimizer, RNG states and progress come back
            resume(accelerator, grids, run, resume_from)
            say(accelerator, f"resumed from {resume_from} at step {progress.step}")
        accelerator.wait_for_everyone()  # every process has read the folder before the main one writes
        if accelerator.is_main_process:
            with writing(run.path):
                run.start(config, progress.step if resume_from is not None else None, trained_on=data)
        accelerator.wait_for_everyone()
        with writing(run.logs):
            accelerator.init_trackers("kangpt", config=_flat_hparams(config))
        tokens_per_step = config.tokens_per_step(accelerator.num_processes)
        trackers = ", ".join(t.name for t in accelerator.trackers) or "none"
        say(accelerator, f"model: {n_params:,} parameters | {accelerator.num_processes} process(es) on "
                         f"{accelerator.device} | {tokens_per_step:,} tokens per step | trackers: "
                         f"{trackers} | unigram baseline {corpus.baseline:.4f} nats/token")
        micro_steps_done = progress.step * cfg.gradient_accumulation_steps
        batches = train_batches(corpus.train, cfg, accelerator, micro_steps_done, positions)
        try:
            stopped_by, val_loss = loop(accelerator, model, optimizer, grids, val_loader, corpus, run, cfg,
                                        progress, tokens_per_step, batches)
        finally:
            batches.close()  # a stream's DataLoader worker stops here
        if stopped_by:
            say(accelerator, f"stopped by {signal.Signals(stopped_by).name} at step {progress.step}; "
                             f"checkpoint {run.checkpoint(progress.step)}; continue with --train.resume=auto")
        else:
            finish(accelerator, model, val_loader, corpus, run, config, progress, val_loss)
    accelerator.end_training()
    return 128 + int(stopped_by) if stopped_by else 0


def loop(accelerator: Accelerator, model, optimizer, grids: KANGrids, val_loader, corpus: Corpus,
         run: RunDir, cfg: TrainConfig, progress: Progress, tokens_per_step: int,
         batches) -> tuple[int | None, float | None]:
    """The training loop, one iteration per optimizer step, from ``progress`` to ``train.max_steps``, on
    ``batches`` (the micro-batches from ``progress`` on).

    Returns the signal that stopped it (None when it ran to the end) and the last validation loss.
    Raises ConfigError at the first step whose loss or gradient norm is not finite, before anything of
    that step is recorded or saved.
    """
    model.train()
    bar = tqdm(total=cfg.max_steps, initial=progress.step, desc="train", mininterval=1.0,
               disable=not accelerator.is_main_process)
    window = LossWindow()
    val_loss, stopped_by, grad_norm = None, None, None
    with StopOnSignal() as stop, bar:  # the bar is closed before an error line is printed, not after it
        while progress.step < cfg.max_steps:
            for message, record in grids.before_step(progress.step, corpus.val, accelerator.device):
                if record is not None:
                    log_metrics(accelerator, run, record)
                say(accelerator, message)
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


def resume(accelerator: Accelerator, grids: KANGrids, run: RunDir, checkpoint: Path) -> None:
    """Load ``checkpoint`` (weights, optimizer, RNG states, progress) into the prepared objects, the KAN
    grids first given the shape it was saved with (:meth:`KANGrids.replay`)."""
    grids.replay(read_metrics(run.metrics), checkpoint_step(checkpoint))
    accelerator.load_state(str(checkpoint))


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
    val_loss = _evaluate(accelerator, model, val_loader)
    log_metrics(accelerator, run, {"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
    say(accelerator, f"step {step}: val loss {val_loss:.4f}, perplexity {math.exp(val_loss):.2f}")
    return val_loss


def finish(accelerator: Accelerator, model, val_loader, corpus: Corpus, run: RunDir, config: RunConfig,
           progress: Progress, val_loss: float | None) -> None:
    """After the last step: the test loss (if there is a test split), ``model/``, the sample."""
    cfg = config.train
    if val_loss is None:  # resumed a run that had already finished
        val_loss = _evaluate(accelerator, model, val_loader)
    metrics = {"step": progress.step, "tokens": progress.tokens, "val_loss": val_loss,
               "val_ppl": math.exp(val_loss), "unigram_baseline": corpus.baseline}
    if corpus.test is not None:  # held out from every choice made on validation: read once, at the end
        test_loader = DataLoader(corpus.test, batch_size=cfg.batch_size)
        test_loader = accelerator.prepare(test_loader)
        metrics["test_loss"] = _evaluate(accelerator, model, test_loader)
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


def kan_penalty(model: torch.nn.Module, weight: float) -> torch.Tensor | None:
    """``weight`` times the sum of every KAN layer's sparsity regulariser (``KANLinear.regularization_loss``),
    or None when ``weight`` is 0. Added to the training loss only: logged losses stay the LM's."""
    if not weight:
        return None
    layers = [m for m in model.modules() if isinstance(m, KANLinear)]
    return weight * sum(layer.regularization_loss() for layer in layers) if layers else None


def log_metrics(accelerator: Accelerator, run: RunDir, record: dict) -> None:
    """Append ``record`` to metrics.jsonl (main process) and send it to the trackers."""
    if accelerator.is_main_process:
        with writing(run.metrics), run.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=record["step"])


def report_store(accelerator: Accelerator, store: TokenStore | None) -> None:
    """Say where the token store is: by the process that built it (one per machine, or none when it was
    found), and by the main process when it was found."""
    if store is not None and store.built:
        tqdm.write(f"process {accelerator.process_index} tokenized the corpus into {store.path} in "
                   f"{store.info['seconds']:.1f} s: {store.summary()}")
    elif store is not None:
        say(accelerator, f"token store {store.path} (built earlier): {store.summary()}")


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


def _evaluate(accelerator: Accelerator, model, loader: DataLoader) -> float:
    """The mean loss over every block of a prepared loader, all processes' blocks counted once."""
    return evaluate(model, loader, device=accelerator.device, gather=accelerator.gather_for_metrics)
