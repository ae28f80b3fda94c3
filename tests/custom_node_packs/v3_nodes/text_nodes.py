"""V3 nodes on strings and numbers: widgets, hidden values, validate_inputs, fingerprint_inputs, lists."""

import os

import folder_paths
from comfy_api.latest import io, ui

WORDS = io.Custom("PACK_WORDS")


class V3Describe(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="V3Describe", display_name="Describe (V3)", category="pack/v3",
            description="Repeats a text, shouting it if asked.",
            inputs=[io.String.Input("text", multiline=True, default="hi"),
                    io.Int.Input("count", default=2, min=1, max=10, tooltip="how many times"),
                    io.Boolean.Input("shout", default=False, label_on="loud", label_off="quiet"),
                    io.Combo.Input("joiner", options=["space", "dash"], default="space", optional=True)],
            outputs=[io.String.Output(display_name="described")],
            hidden=[io.Hidden.unique_id], is_output_node=True)

    @classmethod
    def validate_inputs(cls, count) -> bool | str:
        return True if count is None or count != 7 else "7 is unlucky"

    @classmethod
    def execute(cls, text, count, shout, joiner="space") -> io.NodeOutput:
        words = " ".join([text] * count) if joiner == "space" else "-".join([text] * count)
        described = f"{words.upper() if shout else words} #{cls.hidden.unique_id}"
        return io.NodeOutput(described, ui=ui.PreviewText(described))


class V3Words(io.ComfyNode):
    """Splits a text into a list of words and a count (a custom socket type)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3Words", category="pack/v3",
                         inputs=[io.String.Input("text", force_input=True)],
                         outputs=[io.String.Output("words", is_output_list=True), WORDS.Output("bundle")])

    @classmethod
    def fingerprint_inputs(cls, text):
        return text

    @classmethod
    def execute(cls, text):
        words = text.split()
        return io.NodeOutput(words, {"words": words})


class V3ReadText(io.ComfyNode):
    """Reads a text file of the input folder; re-runs when the file's text changes (fingerprint_inputs)."""

    @classmethod
    def define_schema(cls):
        return io.Schema(node_id="V3ReadText", category="pack/v3", inputs=[io.String.Input("name")],
                         outputs=[io.String.Output()])

    @classmethod
    def fingerprint_inputs(cls, name):
        return cls.read(name)

    @classmethod
    def execute(cls, name):
        return io.NodeOutput(cls.read(name))

    @staticmethod
    def read(name):
        with open(os.path.join(folder_paths.get_input_directory(), name)) as handle:
            return handle.read()
