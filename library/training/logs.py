"""What a training run reports: TensorBoard scalars, a loss-curve PNG, and a JSON-lines step log.

TensorBoard event files are written with tensorboardX (a maintained writer that needs no
TensorFlow or PyTorch). The same scalars go to `<output_dir>/<name>_log.jsonl`, one JSON object
per optimizer step, which tests and scripts read without TensorBoard; the loss curve is drawn with
PIL at the end, so there is no plotting dependency.
"""

import json
import logging
import os
import time

import numpy as np


class RunLog:
    def __init__(self, jsonl_path, tensorboard_dir=None):
        self.jsonl_path = jsonl_path
        self.losses = []
        self._file = open(jsonl_path, "a", encoding="utf-8")
        self._write_failed = False
        self._writer = None
        if tensorboard_dir:
            from tensorboardX import SummaryWriter
            self._writer = SummaryWriter(tensorboard_dir)

    def resume_losses(self, up_to_step):
        """Take the losses of steps 1..up_to_step from the log a resumed run continues, so the
        loss curve covers the whole run (steps a killed run logged past its state are redone)."""
        by_step = {}
        with open(self.jsonl_path, encoding="utf-8") as f:
            for line in f:
                try:
                    record = json.loads(line)
                except ValueError:      # the last line of a killed run may be cut short
                    continue
                # step lines only: event lines and per-epoch lines ({"epoch": N, ...}) have no loss
                if "event" not in record and "step" in record and record["step"] <= up_to_step:
                    by_step[record["step"]] = record["loss/current"]
        self.losses = [by_step[s] for s in sorted(by_step)]

    def event(self, kind, **fields):
        """A non-scalar record (a compile, a save, the run's end) in the JSON-lines log."""
        self._write({"event": kind, "time": time.time(), **fields})

    def _write(self, record):
        # A full disk must not end the run from here: the saves report it, with what to do.
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as e:
            if not self._write_failed:
                logging.getLogger(__name__).warning(
                    f"could not write to {self.jsonl_path}: {e.strerror or e}; the run goes on")
            self._write_failed = True

    def step(self, step, scalars):
        self.losses.append(scalars["loss/current"])
        self._write({"step": step, **scalars})
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, step)

    def epoch(self, epoch, scalars):
        """Per-epoch scalars (kohya logs them against the epoch number, 1-based)."""
        self._write({"epoch": epoch, **scalars})
        if self._writer is not None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, epoch)

    def close(self):
        try:
            self._file.close()
        except OSError:     # its last buffered line did not fit; _write has said so
            pass
        if self._writer is not None:
            self._writer.close()


def tensorboard_dir(logging_dir, log_prefix):
    """kohya's layout: <logging_dir>/<log_prefix><YYYYmmddHHMMSS>."""
    if not logging_dir:
        return None
    return os.path.join(logging_dir, (log_prefix or "") + time.strftime("%Y%m%d%H%M%S"))


def moving_average(values, window):
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 0:
        return values
    kernel = np.ones(min(window, len(values))) / min(window, len(values))
    padded = np.concatenate([np.full(len(kernel) - 1, values[0]), values])
    return np.convolve(padded, kernel, mode="valid")


def draw_loss_curve(losses, path, title="training loss", size=(800, 400)):
    """A PNG of the per-step loss (grey) and its moving average (blue), with axis labels."""
    from PIL import Image, ImageDraw
    from library.safetensors_io import write_atomically
    import io

    w, h = size
    left, right, top, bottom = 70, 20, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    losses = np.asarray(losses, dtype=np.float64)
    if len(losses):
        lo, hi = float(losses.min()), float(losses.max())
        hi = hi if hi > lo else lo + 1e-8
        n = max(len(losses) - 1, 1)

        def xy(i, v):
            return (left + (w - left - right) * i / n,
                    top + (h - top - bottom) * (1 - (v - lo) / (hi - lo)))

        d.line([xy(i, v) for i, v in enumerate(losses)], fill=(180, 180, 180), width=1)
        smooth = moving_average(losses, max(1, len(losses) // 20))
        d.line([xy(i, v) for i, v in enumerate(smooth)], fill=(30, 80, 200), width=2)
        for frac in (0.0, 0.5, 1.0):
            v = lo + (hi - lo) * frac
            _, y = xy(0, v)
            d.text((5, y - 6), f"{v:.4f}", fill="black")
        d.text((left, h - bottom + 8), "step 1", fill="black")
        d.text((w - right - 60, h - bottom + 8), f"step {len(losses)}", fill="black")
    d.rectangle([left, top, w - right, h - bottom], outline="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_atomically(path, [buf.getvalue()])
