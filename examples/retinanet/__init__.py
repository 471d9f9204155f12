"""RetinaNet ("Focal Loss for Dense Object Detection", Lin et al.) trained with focal's fused loss.

One module per job, in the order the paper's pipeline runs:
``backbone`` (ResNet + FPN) -> ``anchors`` -> ``matcher`` -> ``box_coder`` -> ``head`` -> ``loss`` ->
``postprocess``; ``model`` wires them together and ``config`` builds it from plain keyword arguments.
``data`` and ``digits`` provide the COCO loader and the generated benchmark; ``train``, ``evaluate``,
``infer``, ``ablate``, ``loss_cdf`` and ``step_time`` are the command-line entry points.

Importing the package changes nothing in the process (see ``entry``: the entry points set their
OpenMP policy themselves).
"""
