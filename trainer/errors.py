"""The one exception type users see: a message that says what is wrong and what to do."""


class LoraLabError(Exception):
    """A problem the user can fix (bad setting, bad file, bad folder).

    The message is shown as is, in the CLI and on the ComfyUI node, so it always names the thing
    that is wrong and says what to do about it.
    """
