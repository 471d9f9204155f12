"""RetinaNet ("Focal Loss for Dense Object Detection", Lin et al.) trained with focal's fused loss.

One module per job, in the order the paper's pipeline runs:
``backbone`` (ResNet + FPN) -> ``anchors`` -> ``matcher`` -> ``box_coder`` -> ``head`` -> ``loss`` ->
``postprocess``; ``model`` wires them together and ``config`` builds it from plain keyword arguments.
``data`` and ``digits`` provide the COCO loader and the generated benchmark; ``train``, ``evaluate``,
``infer``, ``ablate``, ``loss_cdf`` and ``step_time`` are the command-line entry points.
"""

import os as _os

# OpenMP threads that spin while waiting collapse when the CPU is shared: on a 2-core machine with
# other jobs running, a training step measured 3.9 s with spinning threads and 0.32 s with passive
# ones. Set before torch is imported (libgomp reads it once); an explicit user setting wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
