"""Inference post-processing (paper section 4, "Inference"): per level keep scores above a threshold,
the top-k candidates, decode their boxes; then class-wise NMS over all levels and a per-image cap."""

from __future__ import annotations

import torch
from torchvision.ops import batched_nms, clip_boxes_to_image

from .box_coder import BoxCoder


def detections_for_image(logits_per_level: list[torch.Tensor], deltas_per_level: list[torch.Tensor],
                         anchors_per_level: list[torch.Tensor], image_size: tuple[int, int],
                         box_coder: BoxCoder, score_threshold: float = 0.05, topk: int = 1000,
                         nms_threshold: float = 0.5, max_detections: int = 100) -> dict:
    """Detections of one image.

    ``logits_per_level[i]`` (Ri, K), ``deltas_per_level[i]`` (Ri, 4), ``anchors_per_level[i]`` (Ri, 4)
    with Ri = Hi*Wi*A; ``image_size`` (height, width) to clip to. Returns ``boxes`` (D, 4) XYXY,
    ``scores`` (D,), ``labels`` (D,) int64 with D <= ``max_detections``, sorted by score.
    """
    boxes_all, scores_all, labels_all = [], [], []
    for logits, deltas, anchors in zip(logits_per_level, deltas_per_level, anchors_per_level):
        num_classes = logits.shape[-1]
        scores = torch.sigmoid(logits).flatten()  # (Ri*K,) anchor-major
        keep = scores > score_threshold
        scores = scores[keep]
        candidate_idxs = keep.nonzero(as_tuple=True)[0]
        if scores.numel() > topk:
            scores, order = scores.topk(topk)
            candidate_idxs = candidate_idxs[order]
        anchor_idxs = torch.div(candidate_idxs, num_classes, rounding_mode="floor")
        labels = candidate_idxs % num_classes
        boxes = box_coder.decode(deltas[anchor_idxs], anchors[anchor_idxs])
        boxes_all.append(clip_boxes_to_image(boxes, image_size))
        scores_all.append(scores)
        labels_all.append(labels)
    boxes, scores, labels = torch.cat(boxes_all), torch.cat(scores_all), torch.cat(labels_all)
    keep = batched_nms(boxes, scores, labels, nms_threshold)[:max_detections]  # sorted by score
    return {"boxes": boxes[keep], "scores": scores[keep], "labels": labels[keep]}
