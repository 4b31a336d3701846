"""KFP v2 components of the fcpts sparsify pipeline: one folder per step.

Each ``components/<step>/component.py`` defines one lightweight Python component whose
body imports fcpts inside the function and calls the step function in
:mod:`fcpts.steps`. All of them run in the project's image (:data:`IMAGE`, built from
``components/Dockerfile``) with ``install_kfp_package=False``: the image already holds
kfp, so the same component runs on a cluster and in ``kfp.local``'s SubprocessRunner.
"""

# The default image: fcpts with the pipeline and demo extras on CPU torch, pinned by
# components/requirements.lock. Build it with `make image`; a pipeline compiled with
# --image (or $FCPTS_IMAGE) runs in another (pipelines/k8s.py).
IMAGE = "ghcr.io/fcpts/fcpts:0.1.0"

__all__ = ["IMAGE"]
