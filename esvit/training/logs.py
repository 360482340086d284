"""Console logging and trackers of a pretraining run.

Log records go through `tqdm.write`, so they never glue onto the progress bar; accelerate's
per-checkpoint INFO lines (model, optimizer, RNG "saved in ...") are lowered to warnings only.
"""

from __future__ import annotations

import logging

from tqdm.auto import tqdm

#: Loggers whose INFO lines repeat at every checkpoint.
QUIET_LOGGERS = ("accelerate.checkpointing", "accelerate.accelerator", "accelerate.utils.other")


class TqdmHandler(logging.Handler):
    """A logging handler that prints above an active tqdm bar."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            tqdm.write(self.format(record))
        except Exception:
            self.handleError(record)


def configure_logging(is_local_main_process: bool) -> None:
    """INFO on the local main process, warnings elsewhere; accelerate's checkpoint chatter off."""
    handler = TqdmHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.INFO if is_local_main_process else logging.WARNING)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def trackers(report_to: str) -> list[str] | str | None:
    """`--report_to` as accelerate's `log_with`; tensorboard is dropped (with a warning) if missing."""
    if report_to in ("none", ""):
        return None
    if report_to == "all":
        return "all"
    names = [n.strip() for n in report_to.split(",") if n.strip()]
    if "tensorboard" in names:
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            logging.getLogger(__name__).warning("tensorboard is not installed: not logging to it.")
            names.remove("tensorboard")
    return names or None


__all__ = ["TqdmHandler", "configure_logging", "trackers"]
