"""Control over the memory focal's CPU operator keeps between calls.

The CPU op writes large outputs (4 MB and more: the gradient, and the loss with reduction "none")
into huge-page buffers of its own. When such a tensor is freed, its buffer is kept for the next call
of the same size, which then touches no fresh page: that is what makes a repeated training step
cheap. At most two buffers are kept, and a call that needs a size none of them has releases them,
so the cache never holds more than two outputs of the shapes last used.
"""

from __future__ import annotations

import torch

from focal import _extension

__all__ = ["empty_cache"]


def empty_cache() -> None:
    """Return the CPU op's cached output buffers to the operating system.

    The counterpart of ``torch.cuda.empty_cache`` for focal's own CPU buffers: tensors still in use
    are not affected, and later calls work as before (their first one maps fresh pages). Useful
    before a phase that needs the memory, or when measuring a process's footprint. Does nothing
    when the compiled extension is not available, since there is then no cache.
    """
    if _extension.BUILD_ERROR is None:
        torch.ops.focal.empty_cache()
