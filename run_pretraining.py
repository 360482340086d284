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

import sys

from esvit.training.arguments import DataArguments, ModelArguments, PretrainingArguments, parse_arguments


def train(model_args: ModelArguments, data_args: DataArguments, args: PretrainingArguments) -> dict:
    """Pretrain; return the run summary (also written to `output_dir/train_summary.json`)."""
    import copy
    import json
    import math
    import shutil
    import signal
    import time
    from datetime import timedelta
    from pathlib import Path

    import datasets
    import torch
    import transformers
    from accelerate import Accelerator, DataLoaderConfiguration, DistributedDataParallelKwargs, InitProcessGroupKwargs
    from accelerate.logging import get_logger
    from accelerate.utils import set_seed
    from safetensors.torch import load_file
    from tqdm.auto import tqdm

    from esvit import EsViTForPreTraining
    from esvit.training import checkpointing as ckpt
    from esvit.training.data import (
        MultiCropCollator,
        build_augmentation,
        build_pretraining_loader,
        load_pretraining_images,
        min_side_for_crops,
    )
    from esvit.training.hub import create_hub_repo, push_outputs, save_teacher, tracker_config
    from esvit.training.logs import (
        EtaReporter,
        configure_logging,
        default_mixed_precision,
        trackers,
        warn_if_fewer_processes_than_launched,
        worker_count,
    )
    from esvit.training.loss import LOSS_STATE_FILE, EsViTLoss
    from esvit.training.monitoring import CollapseMonitor, KnnMonitor, MetricWindow
    from esvit.training.optim import get_param_groups
    from esvit.training.pictures import log_pictures, pick_pictures
    from esvit.training.pretrainer import EsViTPretrainer
    from esvit.training.schedules import plan_training

    logger = get_logger("run_pretraining")
    output_dir = Path(args.output_dir)
    checkpoint_root = output_dir / "checkpoints"

    # ============ accelerator, output folder ============
    accelerator = Accelerator(
        cpu=args.cpu,
        mixed_precision=default_mixed_precision(args),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers(args.report_to),
        project_dir=str(output_dir),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
        dynamo_backend="inductor" if args.torch_compile else None,
        kwargs_handlers=[
            # View-only training freezes the region head, so every trainable parameter gets a gradient.
            DistributedDataParallelKwargs(find_unused_parameters=False),
            InitProcessGroupKwargs(timeout=timedelta(seconds=args.ddp_timeout)),
        ],
    )
    try:
        configure_logging(accelerator.is_local_main_process)
        warn_if_fewer_processes_than_launched(accelerator)
        if accelerator.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True  # TF32 matmuls
        if not accelerator.is_local_main_process:
            datasets.utils.logging.set_verbosity_error()
            transformers.utils.logging.set_verbosity_error()
        resume_folder = ckpt.resolve_checkpoint(args.resume_from_checkpoint, checkpoint_root)
        _claim_output_dir(output_dir, checkpoint_root, resume_folder, args, accelerator, shutil)
        hub_url = (
            create_hub_repo(args.hub_model_id, args.hub_token, args.hub_private_repo)
            if (args.push_to_hub and accelerator.is_main_process)
            else None
        )
        set_seed(args.seed)
        logger.info(f"Recipe: {args.recipe or 'none'}; data: {data_args.describe_source()}")

        # ============ data ============
        with accelerator.main_process_first():
            dataset = load_pretraining_images(data_args)
        collator = MultiCropCollator(
            build_augmentation(data_args), seed=args.seed, max_pixels=data_args.max_image_pixels,
            min_side=min_side_for_crops(data_args),
        )  # fmt: skip
        loader = build_pretraining_loader(
            dataset,
            accelerator=accelerator,
            collator=collator,
            batch_size=args.per_device_train_batch_size,
            num_workers=worker_count(data_args.dataloader_num_workers, accelerator),
            seed=args.seed,
            shuffle_buffer_size=data_args.shuffle_buffer_size,
        )
        batches_per_epoch = loader.known_batches_per_epoch(data_args, args.per_device_train_batch_size, accelerator)
        steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps) if batches_per_epoch else None

        # ============ networks: the student, and its EMA teacher without drop-path ============
        config = model_args.build_config()
        if data_args.global_crop_size != config.image_size:
            logger.warning(
                f"global_crop_size {data_args.global_crop_size} differs from the model's image_size "
                f"{config.image_size}: attention windows stay sized for {config.image_size}."
            )
        if model_args.init_from:
            student = EsViTForPreTraining.from_pretrained(model_args.init_from, config=config)
        else:
            student = EsViTForPreTraining(config)
        if model_args.gradient_checkpointing:
            student.gradient_checkpointing_enable()
        if not model_args.use_region_loss:  # DINO's view task: the region head is neither run nor trained
            student.head_dense.requires_grad_(False)
        teacher_config = copy.deepcopy(config)
        teacher_config.drop_path_rate = 0.0
        teacher = EsViTForPreTraining(teacher_config)
        teacher.load_state_dict(student.state_dict())
        teacher.requires_grad_(False)
        has_batchnorm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in student.modules())
        if has_batchnorm and accelerator.num_processes > 1 and accelerator.device.type == "cuda":
            student = torch.nn.SyncBatchNorm.convert_sync_batchnorm(student)
            teacher = torch.nn.SyncBatchNorm.convert_sync_batchnorm(teacher)
        # Both stay in train mode: BatchNorm heads / CvT use batch statistics, as in the original.
        student.train()
        teacher.train().to(accelerator.device)

        # ============ loss, optimizer, schedules ============
        loss_fn = EsViTLoss(
            out_dim=config.head_out_dim,
            num_global_crops=2,
            student_temp=args.student_temp,
            center_momentum=args.center_momentum,
            use_region_loss=model_args.use_region_loss,
            teacher_normalization=args.teacher_normalization,
        ).to(accelerator.device)
        if model_args.init_from and (Path(model_args.init_from) / LOSS_STATE_FILE).is_file():
            loss_fn.load_state_dict(load_file(str(Path(model_args.init_from) / LOSS_STATE_FILE)))
        optimizer = torch.optim.AdamW(get_param_groups(student))  # lr and wd are set every step
        student, optimizer = accelerator.prepare(student, optimizer)
        global_batch = args.per_device_train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
        plan = plan_training(args, steps_per_epoch, global_batch)
        checkpoint_every = args.checkpoint_interval(steps_per_epoch)
        pretrainer = EsViTPretrainer(
            accelerator, student, teacher, loss_fn, optimizer, plan,
            clip_grad=args.clip_grad, clip_grad_mode=args.clip_grad_mode,
            max_consecutive_nonfinite=args.max_consecutive_nonfinite,
            teacher_forward=torch.compile(teacher) if args.torch_compile else teacher,
        )  # fmt: skip

        # ============ resume ============
        state = ckpt.TrainerState(num_processes=accelerator.num_processes, global_batch_size=global_batch)
        position = ckpt.DataPosition()
        if resume_folder is not None:
            state, position = ckpt.load_checkpoint(accelerator, resume_folder, pretrainer)
            pretrainer.nonfinite_steps = state.nonfinite_steps
            state.num_processes, state.global_batch_size = accelerator.num_processes, global_batch
            logger.info(f"Resumed from {resume_folder} at step {state.global_step} (epoch {position.epoch}).")

        # ============ monitors ============
        if accelerator.is_main_process:
            accelerator.init_trackers("esvit-pretraining", config=tracker_config(model_args, data_args, args))
        knn = KnnMonitor(data_args.eval_dataset_name, config.image_size, data_args.eval_max_samples,
                         data_args.eval_label_column, seed=args.seed) if data_args.eval_dataset_name else None  # fmt: skip
        eval_every = args.eval_steps or max(1, plan.total_steps // 10)
        tensorboard = accelerator.is_main_process and any(t.name == "tensorboard" for t in accelerator.trackers)
        pictures = pick_pictures(dataset, 2) if tensorboard else []  # drawn for TensorBoard only
        window = MetricWindow(accelerator.device)
        collapse = CollapseMonitor(config.head_out_dim, args.collapse_patience_steps)
        counts = accelerator.reduce(
            torch.tensor([position.images_seen, position.skipped_images], device=accelerator.device), "sum"
        ).tolist()
        totals = {"images_seen": int(counts[0]), "skipped_images": int(counts[1])}
        final_metrics: dict[str, float] = {}
        seen_keys: list[list[int]] = []
        stop_signal = _StopOnSignal(signal)
        logger.info(
            f"{plan.total_steps} optimizer steps of {global_batch} images ({accelerator.num_processes} processes x "
            f"{args.per_device_train_batch_size} x {args.gradient_accumulation_steps}); "
            f"{steps_per_epoch or 'unknown'} steps per epoch; peak lr {plan.schedules.lr.max():.3g}."
        )

        def log_knn(step: int) -> None:
            top1 = knn.evaluate(accelerator.unwrap_model(teacher).esvit, accelerator, step)
            if top1 is not None:
                accelerator.log({"knn_top1": top1}, step=step)

        def save(step: int) -> None:
            state.global_step, state.nonfinite_steps = step, pretrainer.nonfinite_steps
            try:
                folder = ckpt.save_checkpoint(accelerator, checkpoint_root, state, position, pretrainer,
                                              args.checkpoints_total_limit)  # fmt: skip
            except ckpt.CheckpointWriteError as err:
                if args.on_checkpoint_error == "stop":
                    raise
                logger.error(f"{err} Training continues (--on_checkpoint_error continue).")
                return
            if args.save_models_at_checkpoints and accelerator.is_main_process:
                save_teacher(teacher, loss_fn, folder, config, card(step))

        def card(step: int) -> dict:
            return {
                "config": config.to_dict(), "region": model_args.use_region_loss,
                "preset": "continued" if model_args.init_from else model_args.model_preset,
                "num_parameters": sum(p.numel() for p in teacher.esvit.parameters()),
                "data": data_args.describe_source(public=True), "datasets": data_args.hub_dataset_ids(),
                "steps_per_epoch": steps_per_epoch, "global_batch_size": global_batch,
                "num_processes": accelerator.num_processes, "per_device_batch_size": args.per_device_train_batch_size,
                "gradient_accumulation_steps": args.gradient_accumulation_steps,
                "peak_lr": float(plan.schedules.lr.max()), "hyperparameters": tracker_config(model_args, data_args, args),
                "global_step": step, "final_metrics": final_metrics, "nonfinite_steps": pretrainer.nonfinite_steps,
                "knn": knn.summary() if knn else None, "model_name": args.hub_model_id, **totals,
            }  # fmt: skip

        # ============ training loop ============
        step = start_step = state.global_step
        if knn and step < plan.total_steps:
            log_knn(step)
        log_pictures(accelerator, teacher, pictures, collator.augment, step, seed=args.seed)
        last_saved = step if resume_folder is not None else None
        progress = tqdm(total=plan.total_steps, initial=step, disable=not accelerator.is_local_main_process)
        eta = EtaReporter(plan.total_steps, step, global_batch)
        start_time = time.perf_counter()
        while step < plan.total_steps and not stop_signal.received:
            batches_this_epoch = 0
            for batch in loader.epoch(position.epoch, skip_batches=position.batches_done, accelerator=accelerator):
                batches_this_epoch += 1
                position.batches_done += 1
                position.skipped_images += batch["num_skipped"]
                _check_bad_fraction(position, batch, data_args.max_bad_fraction)
                if not batch["crops"]:  # every image of the batch failed to decode: take the next one
                    window.add_skipped(batch["num_skipped"])
                    continue
                crops = batch["crops"]
                position.images_seen += crops[0].shape[0]
                if args.record_sample_keys:
                    seen_keys.extend([step, position.epoch, k] for k in batch["keys"].tolist())
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
                    means = window.reduce(accelerator)
                    totals["images_seen"] += means.pop("images")
                    totals["skipped_images"] += means.pop("skipped_images")
                    metrics = {**means, **plan.schedules.at(step - 1), **totals,
                               "epoch": position.epoch + position.batches_done / (batches_per_epoch or math.inf)}  # fmt: skip
                    if not model_args.use_region_loss:
                        for name in ("region_loss", "teacher_region_entropy"):
                            metrics.pop(name)
                    final_metrics = {k: means[k] for k in ("loss", "view_loss", "region_loss") if k in metrics}
                    accelerator.log(metrics, step=step)
                    collapse.update(means["teacher_entropy"], args.logging_steps, step)
                    progress.set_postfix(loss=f"{means['loss']:.4f}", lr=f"{metrics['lr']:.2e}")
                    logger.info(f"step {step}/{plan.total_steps} " + " ".join(
                        f"{k} {v:.4g}" for k, v in metrics.items() if isinstance(v, float)))  # fmt: skip
                if step % eval_every == 0 or done:
                    if knn:
                        log_knn(step)
                    log_pictures(accelerator, teacher, pictures, collator.augment, step, seed=args.seed)
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
                position.epoch += 1
                position.batches_done = 0
        progress.close()
        train_seconds = time.perf_counter() - start_time

        # ============ outputs ============
        interrupted = stop_signal.received and step < plan.total_steps
        if (checkpoint_every or interrupted) and last_saved != step:
            save(step)
        if args.record_sample_keys:
            keys_dir = output_dir / "sample_keys"
            keys_dir.mkdir(parents=True, exist_ok=True)
            (keys_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(seen_keys))
        accelerator.wait_for_everyone()
        steps_run = step - start_step
        summary = {
            "num_processes": accelerator.num_processes, "device": str(accelerator.device),
            "mixed_precision": accelerator.mixed_precision, "recipe": args.recipe,
            "global_step": step, "total_steps": plan.total_steps, "steps_per_epoch": steps_per_epoch,
            "global_batch_size": global_batch, "images_seen": totals["images_seen"],
            "skipped_images": totals["skipped_images"], "nonfinite_steps": pretrainer.nonfinite_steps,
            "final_metrics": final_metrics, "train_seconds": train_seconds,
            "steps_per_second": steps_run / train_seconds if train_seconds > 0 else None,
            "interrupted": interrupted, **(knn.summary() if knn else {}),
            "model_dir": str(output_dir / "model"), "pretraining_dir": str(output_dir / "pretraining"),
        }  # fmt: skip
        if accelerator.is_main_process:
            if not interrupted:
                save_teacher(teacher, loss_fn, output_dir, config, card(step))
            (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
            _print_summary(summary, interrupted, checkpoint_root)
            if args.push_to_hub and not interrupted:
                summary["hub_url"] = push_outputs(output_dir, args.hub_model_id, args.hub_token) or hub_url
                (output_dir / "train_summary.json").write_text(json.dumps(summary, indent=2))
        accelerator.wait_for_everyone()
        return summary
    finally:
        accelerator.end_training()


class _StopOnSignal:
    """SIGINT / SIGTERM (Ctrl-C, a scheduler's pre-emption notice) end the run after the current
    optimizer step, with a checkpoint; a second signal stops at once."""

    def __init__(self, signal_module):
        self.received = False
        self._signal = signal_module
        for sig in (signal_module.SIGINT, signal_module.SIGTERM):
            signal_module.signal(sig, self._handle)

    def _handle(self, signum, frame):
        if self.received:
            raise KeyboardInterrupt
        self.received = True
        print(
            f"\n{self._signal.Signals(signum).name}: stopping after this step and writing a checkpoint "
            "(again to stop at once).",
            file=sys.stderr,
        )


def _claim_output_dir(output_dir, checkpoint_root, resume_folder, args, accelerator, shutil) -> None:
    """Refuse to overwrite an earlier run (its checkpoints or finished model) unless asked to."""
    from esvit.training.checkpointing import list_checkpoints

    if resume_folder is None:
        earlier = list_checkpoints(checkpoint_root)
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
    try:
        arguments = parse_arguments(argv)
    except (ValueError, FileNotFoundError) as err:
        raise SystemExit(f"run_pretraining.py: error: {err}") from None
    return train(*arguments)


if __name__ == "__main__":
    main()
