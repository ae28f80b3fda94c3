"""A V1 pack in the common layout: a package whose node modules import each other relatively."""

from .nodes_flow import NODE_CLASS_MAPPINGS as FLOW_NODES
from .nodes_math import NODE_CLASS_MAPPINGS as MATH_NODES
from .nodes_math import NODE_DISPLAY_NAME_MAPPINGS as MATH_NAMES

NODE_CLASS_MAPPINGS = {**MATH_NODES, **FLOW_NODES}
NODE_DISPLAY_NAME_MAPPINGS = {**MATH_NAMES, "PackLazySwitch": "Lazy Switch (pack)"}
