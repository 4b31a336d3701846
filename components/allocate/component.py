"""allocate: run an allocator on the calibration artifact; output the sparse model."""

from ..build import component

allocate = component("allocate")
