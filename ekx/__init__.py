"""ekx: EPIC-KITCHENS-100 action recognition on cached backbone features."""

__version__ = "0.1.0"


class EkxError(Exception):
    """A user-facing error: the CLI prints its message as one line and exits 1.

    Messages name the file / line / segment at fault and the way out.
    """
