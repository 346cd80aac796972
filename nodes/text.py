"""SAMA Text Encode: an instruction -> positive and negative CONDITIONING with SAMA's prompt rules."""

import folder_paths
from comfy_api.latest import io

from ..sama_core.pretext import CUBE, SPEED, TUBE, with_task_token
from ..sama_core.prompts import edit_prompt, negative_prompt

CATEGORY = "SAMA"
EDIT = "edit"
PROMPT_RULES = ("The instruction gets SAMA's \"[Video edit] \" prefix and the negative defaults to "
                "\"[Video edit]\", exactly as the released SAMA inference (turn 'use_prefix' off for "
                "pretext/restore task tokens or experiments).")


def _inputs_common():
    return [
        io.String.Input("instruction", multiline=True, default="",
                        tooltip="What to change, e.g. \"make the car red\" or \"remove the man on the left\"."),
        io.String.Input("negative", multiline=True, default="", optional=True,
                        tooltip="Optional negative prompt; empty = SAMA's default \"[Video edit]\"."),
        io.Boolean.Input("use_prefix", default=True, optional=True,
                         tooltip="Prepend \"[Video edit] \" to the instruction (SAMA was trained with it)."),
        io.Combo.Input("task", options=[EDIT, CUBE, SPEED, TUBE], default=EDIT, optional=True,
                       tooltip="edit = an instruction edit. cube / speed / tube = restore a motion pretext "
                               "(fill black frames, normal speed, unshuffle): the instruction becomes SAMA's "
                               "task token (+ the text as a caption) and no prefix is added."),
    ]


def prompts_for(instruction, negative, use_prefix, task):
    """(positive text, negative text) for an edit or a pretext-restoration task."""
    if task != EDIT:
        return with_task_token(task, instruction), negative_prompt(negative or None, prefix=False)
    return edit_prompt(instruction, prefix=use_prefix), negative_prompt(negative or None, prefix=use_prefix)


_OUTPUTS = [
    io.Conditioning.Output("positive_out", display_name="positive", tooltip="The instruction's conditioning."),
    io.Conditioning.Output("negative_out", display_name="negative", tooltip="The negative conditioning."),
]


class SamaTextEncode(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaTextEncode", display_name="SAMA Text Encode", category=CATEGORY,
            description="Encodes an edit instruction with the UMT5 text encoder (native Load CLIP, type 'wan'). "
                        + PROMPT_RULES,
            inputs=[io.Clip.Input("clip", tooltip="UMT5-XXL from Load CLIP (type: wan).")] + _inputs_common(),
            outputs=_OUTPUTS)

    @classmethod
    def execute(cls, clip, instruction, negative="", use_prefix=True, task=EDIT) -> io.NodeOutput:
        pos, neg = prompts_for(instruction, negative, use_prefix, task)
        return io.NodeOutput(*(clip.encode_from_tokens_scheduled(clip.tokenize(text)) for text in (pos, neg)))


class SamaTextEncodeFile(io.ComfyNode):
    """For text encoders ComfyUI's loader cannot read (e.g. the embedded tiny SAMA model's small UMT5)."""

    _cache = {}

    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="SamaTextEncodeFile", display_name="SAMA Text Encode (file)", category=CATEGORY,
            description="Loads a UMT5 encoder file from models/text_encoders with SAMA's own loader (any size, "
                        "with its embedded tokenizer) and encodes the instruction. Use it for models "
                        "ComfyUI's Load CLIP cannot read, such as the bundled tiny demo model. " + PROMPT_RULES,
            inputs=[io.Combo.Input("text_encoder", options=folder_paths.get_filename_list("text_encoders"),
                                   tooltip="A UMT5 encoder .safetensors (with embedded tokenizer) or .pth.")]
            + _inputs_common(),
            outputs=_OUTPUTS)

    @classmethod
    def execute(cls, text_encoder, instruction, negative="", use_prefix=True, task=EDIT) -> io.NodeOutput:
        from ..sama_core.text import load_text_encoder
        path = folder_paths.get_full_path_or_raise("text_encoders", text_encoder)
        if path not in cls._cache:
            cls._cache.clear()  # keep at most one encoder resident
            cls._cache[path] = load_text_encoder(path, dtype="fp32")
        pos, neg = prompts_for(instruction, negative, use_prefix, task)
        both = cls._cache[path].encode([pos, neg]).float().cpu()  # texts already follow SAMA's rules
        return io.NodeOutput([[both[0:1], {}]], [[both[1:2], {}]])


NODES = [SamaTextEncode, SamaTextEncodeFile]
