"""Where the model looked: Grad-CAM heatmaps of P(defect) (Selvaraju et al., ICCV 2017) with the ``grad-cam``
package (pytorch-grad-cam), on the last stage of a ConvNeXt (the last blocks of an isotropic one)."""
import cv2
import numpy as np
import torch

from labels import head_classes, is_defect, label_indices
from utils import DataError


class DefectTarget:
    """Grad-CAM target: P(defect) of one image, the softmax mass of the head's defect classes.

    Called by pytorch-grad-cam with the model's output of one image, float tensor [C]; returns a scalar tensor.
    """

    def __init__(self, nb_classes):
        self.defect = torch.tensor(is_defect(label_indices(head_classes(nb_classes))), dtype=torch.bool)

    def __call__(self, output):
        return output.float().softmax(-1)[self.defect.to(output.device)].sum()


def target_layers(model):
    """The layers Grad-CAM reads: the last stage of a hierarchical ConvNeXt (or of the roadmap network), the last
    block of an isotropic one. Raises DataError for a model without either."""
    if hasattr(model, 'stages'):
        return [model.stages[-1]]
    if hasattr(model, 'blocks'):
        return [model.blocks[-1]]
    raise DataError(f'{model.__class__.__name__}: no ConvNeXt stage to compute Grad-CAM on')


def overlays(model, batch, images, nb_classes, device=None):
    """Grad-CAM overlays of P(defect) for a batch.

    Args:
        model: the classifier (torch.nn.Module, eval mode). batch: float32 tensor [B, C, S, S], the model's inputs.
        images: list of B uint8 arrays [H, W] or [H, W, 3] (RGB), the images as read, to draw on.
        nb_classes: 2 or 4. device: torch.device of the model (default: its parameters').
    Returns:
        list of B uint8 RGB arrays [S, S, 3]: each image resized to S x S with the heatmap blended in (jet colours).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.image import show_cam_on_image
    device = device or next(model.parameters()).device
    side = batch.shape[-1]
    with GradCAM(model=model, target_layers=target_layers(model)) as grad_cam:
        maps = grad_cam(input_tensor=batch.to(device), targets=[DefectTarget(nb_classes)] * len(batch))
    out = []
    for img, heat in zip(images, maps):
        rgb = img if img.ndim == 3 else cv2.cvtColor(img, cv2.COLOR_GRAY2RGB)
        rgb = cv2.resize(rgb, (side, side), interpolation=cv2.INTER_AREA).astype(np.float32) / 255.0
        out.append(show_cam_on_image(rgb, heat, use_rgb=True))
    return out
