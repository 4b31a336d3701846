"""Where the compiled pipeline's steps run on a cluster: the flags of ``fcpts compile`` and
``fcpts submit`` for :class:`~fcpts.steps.options.ClusterOptions` (image, accelerators,
checkpoint volume), resolved and applied by ``pipelines/k8s.py``."""

from __future__ import annotations

from typing import Any

CLUSTER_HELP = (
    "fixed in the compiled pipeline. The image is the one `make image` builds (push it "
    "with make image PUSH=1 IMAGE=REF, or set $FCPTS_IMAGE for both); --gpu runs allocate "
    "and the sweep workers in the CUDA variant (make image VARIANT=cuda) with N accelerators"
)


def add_cluster_options(parser) -> None:
    """The flags of :class:`~fcpts.steps.options.ClusterOptions` (compile, submit)."""
    from ..steps.options import ClusterOptions
    from .derive import add_group

    add_group(parser, ClusterOptions, "cluster", CLUSTER_HELP)


def cluster_keys() -> frozenset[str]:
    """The config keys of :class:`~fcpts.steps.options.ClusterOptions` (not pipeline
    parameters: submit compiles them in)."""
    from ..settings import declared
    from ..steps.options import ClusterOptions

    return frozenset(s.dest for s in declared(ClusterOptions))


def cluster_from_args(args: Any):
    """The :class:`~fcpts.steps.options.ClusterOptions` the flags (or --config) give."""
    from ..steps.options import ClusterOptions
    from .derive import given

    return ClusterOptions(**given(args, ClusterOptions))
