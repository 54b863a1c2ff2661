"""The one exception type for mistakes a user can fix (bad path, bad flag value, missing column)."""


class UserError(Exception):
    """Printed as one line on stderr, exit status 2, no traceback (unless --debug)."""

    exit_code = 2


def utf8_text(raw: bytes, name: str) -> str:
    """`raw` decoded as UTF-8 (a byte order mark dropped), or a UserError naming `name` and the first bad byte."""
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserError(f"{name} is not UTF-8 (invalid byte 0x{raw[e.start]:02x} at offset {e.start}): "
                        "re-save it as UTF-8") from None
