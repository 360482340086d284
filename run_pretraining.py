#!/usr/bin/env python
"""Pretrain an EsViT model with 🤗 Accelerate.

EsViT (Li et al., "Efficient Self-supervised Vision Transformers for Representation Learning",
ICLR 2022, arXiv:2106.09785): a multi-stage backbone trained by self-distillation between a
student (all crops) and its EMA teacher (the 2 global crops), at the view level (DINO) and at the
region level (each student region matched to the most similar teacher region).

    python run_pretraining.py                          # tiny run on the embedded sample (CPU, ~1 min)
    python run_pretraining.py my_run.yaml              # arguments from a YAML or JSON file
    python run_pretraining.py --recipe small-images-cpu --train_dir my_images --eval_dir my_labelled_images
    accelerate launch --num_processes 8 run_pretraining.py \\
        --recipe esvit-swin-tiny-imagenet --train_dir /data/imagenet/train --output_dir esvit-swin-t

Outputs in `--output_dir`: `model/` (the teacher backbone, `AutoModel.from_pretrained` after
`import esvit`), `pretraining/` (backbone + both heads + loss centres, for `--init_from`),
`checkpoints/step_*` (`--checkpointing_steps`, resumable with `--resume_from_checkpoint`),
`train_summary.json` and the tracker logs. The pieces live in `esvit.training`; this file only
parses, builds and loops.
"""

from __future__ import annotations

import os
import sys


def parse_arguments_or_exit(argv: list[str] | None = None):
    """The three argument dataclasses, or a one-line error (`esvit.training.arguments` imports only
    the standard library: flag, recipe, file and directory mistakes are found before torch loads)."""
    from esvit.training.arguments import parse_arguments

    try:
        return parse_arguments(argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"run_pretraining.py: error: {err}") from None


if __name__ == "__main__":  # `--help` and argument mistakes answer in about a second, before the imports below
    os.environ["ESVIT_DEFER_AUTO_REGISTRATION"] = "1"  # `import esvit` without torch until the arguments are valid
    ARGUMENTS = parse_arguments_or_exit()
    del os.environ["ESVIT_DEFER_AUTO_REGISTRATION"]

import json
import math
import shutil
import signal
import time
from pathlib import Path

import datasets
import torch
import transformers
from accelerate.logging import get_logger
from accelerate.utils import set_seed
from tqdm.auto import tqdm

import esvit
from esvit.training import checkpointing as ckpt
from esvit.training.arguments import DataArguments, ModelArguments, PretrainingArguments
from esvit.training.builders import build_data, build_pretrainer, make_accelerator
from esvit.training.data import sample_seed
from esvit.training.hub import card_info, create_hub_repo, push_outputs, save_teacher, tracker_config
from esvit.training.logs import EtaReporter, configure_logging, warn_if_fewer_processes_than_launched
from esvit.training.monitoring import CollapseMonitor, KnnMonitor, MetricWindow
from esvit.training.pictures import log_pictures, pick_pictures

logger = get_logger("run_pretraining")


def train(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> dict:
    """Pretrain; return the run summary (also written to `output_dir/train_summary.json`)."""
    output_dir = Path(args.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    accelerator = make_accelerator(args)
    try:
        # ============ run set-up ============
        _set_up_process(accelerator)
        resume_folder = ckpt.resolve_checkpoint(args.resume_from_checkpoint, checkpoint_root)
        _claim_output_dir(output_dir, checkpoint_root, resume_folder, args, accelerator)
        if args.push_to_hub and accelerator.is_main_process:  # a wrong id or token fails now, not after training
            create_hub_repo(args.hub_model_id, args.hub_token, args.hub_private_repo)
        set_seed(args.seed)
        logger.info(f"Recipe: {args.recipe or 'none'}; data: {data_args.describe_source()}")

        # ============ data, networks, loss, optimizer, schedules ============
        data = build_data(data_args, args, accelerator)
        pretrainer = build_pretrainer(model_args, data_args, args, accelerator, data.steps_per_epoch)
        plan, teacher = pretrainer.plan, pretrainer.teacher
        state, position = _resume(resume_folder, pretrainer)

        # ============ monitors ============
        if accelerator.is_main_process:
            accelerator.init_trackers("esvit-pretraining", config=tracker_config(model_args, data_args, args))
        knn = KnnMonitor(data_args.eval_dataset_name, pretrainer.config.image_size, data_args.eval_max_samples,
                         data_args.eval_label_column, seed=args.seed) if data_args.eval_dataset_name else None  # fmt: skip
        eval_every = args.eval_steps or max(1, plan.total_steps // 10)
        tensorboard = accelerator.is_main_process and any(t.name == "tensorboard" for t in accelerator.trackers)
        pictures = pick_pictures(data.dataset, 2) if tensorboard else []  # drawn for TensorBoard only
        window = MetricWindow(accelerator.device)
        collapse = CollapseMonitor(pretrainer.config.head_out_dim, args.collapse_patience_steps)
        counts = accelerator.reduce(
            torch.tensor([position.images_seen, position.skipped_images], device=accelerator.device), "sum"
        )
        totals = {"images_seen": int(counts[0]), "skipped_images": int(counts[1])}
        final_metrics: dict[str, float] = {}
        seen_keys: list[list[int]] = []
        checkpoint_every = args.checkpoint_interval(data.steps_per_epoch)
        unused_metrics = [] if model_args.use_region_loss else ["region_loss", "teacher_region_entropy"]
        unused_metrics += [] if args.koleo_loss_weight else ["koleo_loss"]
        stop_signal = _StopOnSignal()
        logger.info(
            f"{plan.total_steps} optimizer steps of {pretrainer.global_batch_size} images ({accelerator.num_processes} "
            f"processes x {args.per_device_train_batch_size} x {args.gradient_accumulation_steps}); "
            f"{data.steps_per_epoch or 'unknown'} steps per epoch; peak lr {plan.schedules.lr.max():.3g}."
        )

        def evaluate(step: int) -> None:
            if knn and (top1 := knn.evaluate(accelerator.unwrap_model(teacher).esvit, accelerator, step)) is not None:
                accelerator.log({"knn_top1": top1}, step=step)
            log_pictures(accelerator, teacher, pictures, data.augmentation, step, seed=args.seed)

        def save(step: int) -> None:
            state.global_step, state.nonfinite_steps = step, pretrainer.nonfinite_steps
            try:
                folder = ckpt.save_checkpoint(accelerator, checkpoint_root, state, position, pretrainer,
                                              args.checkpoints_total_limit)  # fmt: skip
            except ckpt.CheckpointWriteError as err:
                if args.on_checkpoint_error == "stop":
                    raise
                return logger.error(f"{err} Training continues (--on_checkpoint_error continue).")
            if args.save_models_at_checkpoints and accelerator.is_main_process:
                save_teacher(teacher, pretrainer.loss_fn, folder, pretrainer.config, card(step))

        def card(step: int) -> dict:
            return card_info(pretrainer, model_args, data_args, args, step=step, steps_per_epoch=data.steps_per_epoch,
                             final_metrics=final_metrics, totals=totals, knn=knn)  # fmt: skip

        # ============ training loop ============
        step = start_step = state.global_step
        if step < plan.total_steps:
            evaluate(step)  # before training: the random-weights baseline of the k-NN monitor
        last_saved = step if resume_folder is not None else None
        progress = tqdm(total=plan.total_steps, initial=step, disable=not accelerator.is_local_main_process)
        eta = EtaReporter(plan.total_steps, step, pretrainer.global_batch_size)
        start_time = time.perf_counter()
        while step < plan.total_steps and not stop_signal.received:
            batches_this_epoch = 0
            for batch in data.loader.epoch(position.epoch, skip_batches=position.batches_done, accelerator=accelerator):
                batches_this_epoch += 1
                position.batches_done += 1
                position.skipped_images += batch["num_skipped"]
                _check_bad_fraction(position, batch, data_args.max_bad_fraction)
                if not batch["crops"]:  # every image of the batch failed to decode: take the next one
                    window.add_skipped(batch["num_skipped"])
                    continue
                position.images_seen += batch["crops"][0].shape[0]
                if args.record_sample_keys:
                    seen_keys.extend([step, position.epoch, k] for k in batch["keys"].tolist())
                batch_id = position.batches_done * accelerator.num_processes + accelerator.process_index
                crops = data.crops_on_device(batch["crops"], sample_seed(args.seed, position.epoch, batch_id))
                out = pretrainer.train_step(crops, step)
                window.add(out, batch["num_skipped"])
                if not out.optimizer_step:
                    continue
                pretrainer.update_teacher(step)
                step += 1
                progress.update(1)
                eta.update(step)
                done = step >= plan.total_steps
                if step % args.logging_steps == 0 or done:
                    epoch = position.epoch + position.batches_done / (data.batches_per_epoch or math.inf)
                    final_metrics = _log_window(
                        window, accelerator, plan, step, epoch, totals, progress, collapse, unused_metrics
                    )
                if step % eval_every == 0 or done:
                    evaluate(step)
                if checkpoint_every and step % checkpoint_every == 0:
                    save(step)
                    last_saved = step
                if done or stop_signal.received:
                    break
            else:  # the epoch is exhausted
                if batches_this_epoch == 0 and position.batches_done == 0:
                    raise RuntimeError(
                        f"epoch {position.epoch} yielded no batch on process {accelerator.process_index}."
                    )
                position.epoch, position.batches_done = position.epoch + 1, 0
        progress.close()
        train_seconds = time.perf_counter() - start_time

        # ============ outputs ============
        interrupted = stop_signal.received and step < plan.total_steps
        if (checkpoint_every or interrupted) and last_saved != step:
            save(step)
        if args.record_sample_keys:
            (output_dir / "sample_keys").mkdir(parents=True, exist_ok=True)
            (output_dir / "sample_keys" / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen_keys))
        accelerator.wait_for_everyone()
        summary = {
            "recipe": args.recipe, "global_step": step, "total_steps": plan.total_steps,
            "steps_per_epoch": data.steps_per_epoch, **totals, "final_metrics": final_metrics,
            "train_seconds": train_seconds, "steps_per_second": (step - start_step) / max(train_seconds, 1e-9),
            "interrupted": interrupted, **(knn.summary() if knn else {}), **_run_facts(pretrainer, output_dir),
        }  # fmt: skip
        if accelerator.is_main_process:
            _write_outputs(pretrainer, summary, output_dir, card(step), args, checkpoint_root)
        accelerator.wait_for_everyone()
        return summary
    finally:
        accelerator.end_training()


def _resume(folder, pretrainer) -> tuple[ckpt.TrainerState, ckpt.DataPosition]:
    """The run's counters and this process's data position: from `folder`, or fresh."""
    accelerator = pretrainer.accelerator
    state = ckpt.TrainerState(num_processes=accelerator.num_processes, global_batch_size=pretrainer.global_batch_size)
    if folder is None:
        return state, ckpt.DataPosition()
    loaded, position = ckpt.load_checkpoint(accelerator, folder, pretrainer)
    pretrainer.nonfinite_steps = loaded.nonfinite_steps
    state.global_step, state.nonfinite_steps = loaded.global_step, loaded.nonfinite_steps
    logger.info(f"Resumed from {folder} at step {state.global_step} (epoch {position.epoch}).")
    return state, position


def _write_outputs(pretrainer, summary: dict, output_dir: Path, card: dict, args, checkpoint_root: Path) -> None:
    """Main process: the teacher's folders (unless interrupted), the summary, the Hub upload."""
    if not summary["interrupted"]:
        save_teacher(pretrainer.teacher, pretrainer.loss_fn, output_dir, pretrainer.config, card)
    (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
    _print_summary(summary, summary["interrupted"], checkpoint_root)
    if args.push_to_hub and not summary["interrupted"]:
        summary["hub_url"] = push_outputs(output_dir, args.hub_model_id, args.hub_token)
        (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))


def _set_up_process(accelerator) -> None:
    """Console logging, the launch check, TF32 on CUDA, quiet libraries on the other processes."""
    configure_logging(accelerator.is_local_main_process)
    warn_if_fewer_processes_than_launched(accelerator)
    if accelerator.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls
    if not accelerator.is_local_main_process:
        datasets.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()


def _run_facts(pretrainer, output_dir: Path) -> dict:
    """The summary's description of where and how the run trained."""
    accelerator = pretrainer.accelerator
    return {
        "num_processes": accelerator.num_processes,
        "device": str(accelerator.device),
        "mixed_precision": accelerator.mixed_precision,
        "global_batch_size": pretrainer.global_batch_size,
        "nonfinite_steps": pretrainer.nonfinite_steps,
        "model_dir": str(output_dir / "model"),
        "pretraining_dir": str(output_dir / "pretraining"),
    }


def _log_window(window, accelerator, plan, step, epoch, totals, progress, collapse, unused) -> dict[str, float]:
    """Reduce the metric window over processes, log it to the trackers and the console (without
    the `unused` metrics of terms this run does not have); return the loss parts for the summary."""
    means = window.reduce(accelerator)
    totals["images_seen"] += means.pop("images")
    totals["skipped_images"] += means.pop("skipped_images")
    metrics = {**means, **plan.schedules.at(step - 1), **totals, "epoch": epoch}
    for name in unused:
        metrics.pop(name)
    accelerator.log(metrics, step=step)
    collapse.update(means["teacher_entropy"], steps=None, global_step=step)
    progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
    logger.info(
        f"step {step}/{plan.total_steps} "
        + " ".join(f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float))
    )
    return {k: means[k] for k in ("loss", "view_loss", "region_loss", "koleo_loss") if k in metrics}


class _StopOnSignal:
    """SIGINT / SIGTERM (Ctrl-C, a scheduler's pre-emption notice) end the run after the current
    optimizer step, with a checkpoint; a second signal stops at once."""

    def __init__(self):
        self.received = False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = True
        print(
            f"\n{signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
            "(again to stop at once).",
            file=sys.stderr,
        )


def _claim_output_dir(output_dir, checkpoint_root, resume_folder, args, accelerator) -> None:
    """Refuse to overwrite an earlier run (its checkpoints or finished model) unless asked to."""
    if resume_folder is None:
        earlier = ckpt.list_checkpoints(checkpoint_root)
        finished = (output_dir / "model" / "config.json").is_file()
        if (earlier or finished) and not args.overwrite_output_dir:
            what = f"checkpoints in {checkpoint_root}" if earlier else f"a finished model in {output_dir / 'model'}"
            raise FileExistsError(
                f"{output_dir} holds {what} of an earlier run: pass --resume_from_checkpoint latest to continue it, "
                "--overwrite_output_dir to start over, or another --output_dir."
            )
        accelerator.wait_for_everyone()  # every process has looked before anything goes
        if earlier and accelerator.is_main_process:
            shutil.rmtree(checkpoint_root)
    accelerator.wait_for_everyone()


def _check_bad_fraction(position, batch, max_fraction: float) -> None:
    """Stop when more than `max_fraction` of the images read so far (at least 50) failed."""
    read = position.images_seen + position.skipped_images + (batch["crops"][0].shape[0] if batch["crops"] else 0)
    if read >= 50 and position.skipped_images > max_fraction * read:
        raise RuntimeError(
            f"{position.skipped_images} of the {read} images read so far could not be decoded (more than "
            f"--max_bad_fraction {max_fraction}); e.g. {', '.join(batch['skipped'][:3]) or 'see the log'}. "
            "The data looks broken: check it, or raise --max_bad_fraction."
        )


def _print_summary(summary: dict, interrupted: bool, checkpoint_root) -> None:
    seconds = summary["train_seconds"]
    lines = [
        f"{'Interrupted' if interrupted else 'Done'}: {summary['global_step']}/{summary['total_steps']} steps in "
        f"{seconds / 60:.1f} min ({summary['steps_per_second'] or 0:.2f} steps/s), "
        f"{summary['images_seen']} images ({summary['skipped_images']} skipped), "
        f"final loss {summary['final_metrics'].get('loss', float('nan')):.4f}.",
    ]
    if "knn_top1_final" in summary:
        gain = summary["knn_top1_final"] - summary["knn_top1_initial"]
        verdict = "better than" if gain > 0 else "NOT better than"
        lines.append(
            f"k-NN top-1 (teacher pooled feature, {summary['knn_data']}): {summary['knn_top1_initial']:.2f}% with the "
            f"initial (random) weights -> {summary['knn_top1_final']:.2f}% now ({gain:+.2f}): {verdict} random weights."
        )
    if interrupted:
        lines.append(f"Checkpoint in {checkpoint_root}; continue with --resume_from_checkpoint latest.")
    else:
        lines.append(f"Saved the teacher to {summary['model_dir']} (AutoModel) and {summary['pretraining_dir']}.")
    print("\n".join(lines), flush=True)


def main(argv: list[str] | None = None) -> dict:
    return train(*parse_arguments_or_exit(argv))


if __name__ == "__main__":
    esvit.register_auto_classes()
    train(*ARGUMENTS)
