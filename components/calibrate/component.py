"""calibrate: resolve model and data, check they fit, record reference outputs."""

from ..build import component

calibrate = component("calibrate")
