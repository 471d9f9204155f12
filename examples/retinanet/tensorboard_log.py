"""An optional TensorBoard log of the run (``OUTPUT/tensorboard``), the live view users of detection
codebases expect: ``tensorboard --logdir OUTPUT``.

TensorBoard is not a dependency of the example: without the ``tensorboard`` package the run prints one
line saying so and writes everything else (log.jsonl, training_curves.png) as usual.
"""

from __future__ import annotations

import os


class TensorBoardLog:
    """Scalars to TensorBoard when the package is installed; otherwise every call does nothing."""

    def __init__(self, output: str, enabled: bool = True):
        self.writer = None
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:  # torch's module raises ImportError when the tensorboard package is missing
            print("note: TensorBoard log off (pip install tensorboard to get one); "
                  "training_curves.png and log.jsonl are written as usual")
            return
        self.writer = SummaryWriter(os.path.join(output, "tensorboard"))

    def scalars(self, values: dict, step: int, prefix: str) -> None:
        """``prefix/name`` = value for every number in ``values``, at ``step``; flushed, so that a running
        TensorBoard shows it at once."""
        if self.writer is None:
            return
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(f"{prefix}/{name}", value, step)
        self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
