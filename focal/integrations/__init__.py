"""One line to put the fused focal loss into a detector people already train.

Each module adapts one framework and is imported on its own, so that a framework that is not
installed costs nothing::

    import focal.integrations.torchvision
    model = focal.integrations.torchvision.use_fused_loss(model)     # RetinaNet or FCOS

    import focal.integrations.ultralytics
    model = focal.integrations.ultralytics.use_fused_loss(model)     # RT-DETR

Only the classification loss changes, and only its cost: values and gradients are the
framework's own (tests/test_integrations_*.py), inference is untouched.
"""
