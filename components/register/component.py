"""register: apply the approval gate, record the decision, hand over to a registry."""

from ..build import component

register = component("register")
