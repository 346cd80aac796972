"""SAMA prompt conventions, in one place.

The released SAMA model was trained and is run with:
  - every edit instruction prefixed with ``"[Video edit] "``,
  - the negative (unconditional) prompt exactly ``"[Video edit]"``,
  - text cleaned like Wan's tokenizer does (ftfy, HTML unescape, whitespace collapsed).

The headless text encoder (``text.py``) and the ComfyUI node layer both call these functions, so
this module imports neither torch nor ComfyUI.

Where we differ from the released code on purpose (SAMA_REFERENCE.md section 8): there, turning the
prefix option off made the negative prompt empty *and* ignored a user's negative prompt. Here a
user negative prompt is always used (cleaned, as given); only the default negative follows the
prefix option.
"""

import html
import re

import ftfy

from .errors import SamaInputError

EDIT_PREFIX = "[Video edit] "
NEGATIVE_PROMPT = "[Video edit]"

_WHITESPACE = re.compile(r"\s+")


def clean_prompt(text: str) -> str:
    """Clean a prompt the way Wan's UMT5 tokenizer wrapper does before tokenizing.

    ftfy repairs mojibake, HTML entities are unescaped (twice, for doubly escaped web text), then
    every run of whitespace becomes one space and the ends are stripped.
    """
    if not isinstance(text, str):
        raise SamaInputError(f"A prompt must be a string, got {type(text).__name__}: {text!r}.")
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return _WHITESPACE.sub(" ", text).strip()


def edit_prompt(instruction: str, prefix: bool = True) -> str:
    """The positive prompt for an edit instruction: cleaned, with ``"[Video edit] "`` in front.

    ``prefix=False`` returns the cleaned instruction alone (the released "no prefix" mode).
    """
    cleaned = clean_prompt(instruction)
    if not cleaned:
        raise SamaInputError(
            "The edit instruction is empty. Describe the edit to make, for example "
            "'Replace the red car with a blue bicycle' or 'Turn the scene into winter with snow'."
        )
    # The reference cleans the whole prefixed string once; prefix + cleaned instruction is the same
    # string (the prefix is clean and ends in the single space the join needs).
    return EDIT_PREFIX + cleaned if prefix else cleaned


def negative_prompt(user_negative: str | None = None, prefix: bool = True) -> str:
    """The negative (unconditional) prompt.

    A non-empty user negative prompt is used as given (cleaned, no prefix added). Otherwise the
    default is ``"[Video edit]"`` with the prefix option on (the released default) and the empty
    prompt with it off.
    """
    if user_negative is not None:
        cleaned = clean_prompt(user_negative)
        if cleaned:
            return cleaned
    return NEGATIVE_PROMPT if prefix else ""
