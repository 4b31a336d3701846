"""evaluate: compare sparse and dense on held-out data; output the gate decision."""

from ..build import component

evaluate = component("evaluate")
