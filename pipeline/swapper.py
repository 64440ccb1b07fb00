"""An optional learned face swapper: insightface's inswapper_128-shaped model, supplied by the operator.

The classic fusion (pipeline.fusion) warps the persona's own pixels; a learned swapper instead
redraws the template's face with the persona's identity, from the ArcFace embedding. insightface's
`model_zoo.get_model` recognises such a model by its shapes (two inputs, a 128x128 image and a
512-d latent) and loads it as `INSwapper`, which maps the embedding through the model's `emap`
(its last initializer). Its output goes through the same tone match and blend rule as the
classic fusion (`fuse_face` with the template's own landmarks), so skin tone, light and edges
follow the template either way.

Licence: insightface's inswapper_128 is released for non-commercial research only; nothing here
downloads it, and the site uses it only when an operator names a file (FACE_SWAPPER_MODEL).
It needs the insightface backend: its latent is ArcFace's 512-d embedding, which dlib's 128-d one
is not.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np

from pipeline.faces import Face


class LearnedSwapper:
    """An inswapper_128-shaped ONNX model, loaded through insightface's own model_zoo loader."""

    def __init__(self, model_file: str | Path, providers: tuple[str, ...] = ("CPUExecutionProvider",)) -> None:
        from insightface.model_zoo import get_model
        from insightface.model_zoo.inswapper import INSwapper

        path = Path(model_file).expanduser().resolve()
        if not path.is_file():
            raise FileNotFoundError(f"face swapper model not found: {path}")
        model = get_model(str(path), providers=list(providers))
        if not isinstance(model, INSwapper):
            raise ValueError(
                f"{path} is not an inswapper-shaped model (inputs: a 1x3x128x128 image and a latent; one output)"
            )
        self._model = model
        self.embedding_size = int(model.emap.shape[0])

    def swap(self, image: np.ndarray, face: Face, embedding: np.ndarray) -> np.ndarray:
        """`image` (RGB) with `face` redrawn with the identity of `embedding` (unit, ArcFace's);
        pixels outside the model's aligned 128-px square keep the image's own values."""
        if embedding.shape != (self.embedding_size,):
            raise ValueError(
                f"the swapper takes {self.embedding_size}-d identity embeddings, not {embedding.shape[0]}-d "
                "ones: use the insightface face backend with it"
            )
        bgr = np.ascontiguousarray(image[:, :, ::-1])
        target = SimpleNamespace(kps=face.keypoints)
        source = SimpleNamespace(normed_embedding=embedding.astype(np.float32))
        fake, matrix = self._model.get(bgr, target, source, paste_back=False)
        size = (image.shape[1], image.shape[0])
        inverse = cv2.invertAffineTransform(matrix)
        back = cv2.warpAffine(fake[:, :, ::-1], inverse, size, flags=cv2.INTER_LINEAR)
        inside = cv2.warpAffine(np.full(fake.shape[:2], 255, np.uint8), inverse, size, flags=cv2.INTER_NEAREST)
        return np.where(inside[..., None] > 0, back, image)
